"""`avmnist`: spoken digits (FSDD) paired by digit with handwritten digits (MNIST's 10k test set).

Real audio and real images, small enough for a CPU: the dataset the real-data tests and the
quick examples train on. The pairing is deterministic and documented in data_manifests/avmnist.yaml
(FSDD's official test recordings stay test; each MNIST image is used at most once).
"""
from __future__ import annotations

import gzip
import hashlib
import re
from pathlib import Path
from typing import Any

import numpy as np

from mmbench.data.archive import safe_extract
from mmbench.data.base import PrepareRequest, register_dataset
from mmbench.data.builder import ManifestBuilder, ManifestProtocols, fetch_source, find_named, raw_dir, subdirs
from mmbench.data.manifest import Manifest, Source, load_table
from mmbench.data.pipeline import Item, Plan
from mmbench.errors import UserError

RECORDING = re.compile(r"^(\d)_([a-z]+)_(\d+)\.wav$")


def parse_idx(data: bytes, what: str) -> np.ndarray:
    """An IDX file (MNIST's format): big-endian magic, dims, then uint8 data."""
    if len(data) < 8 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise UserError(f"{what}: not an IDX uint8 file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise UserError(f"{what}: truncated ({body.size} of {int(np.prod(dims))} values)")
    return body.reshape(dims)


def read_mnist_file(path: Path, src: Source) -> np.ndarray:
    """Decompress if needed and check the content hash (mirrors re-gzip, so the .gz hash may differ)."""
    raw = path.read_bytes()
    data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    got = hashlib.sha256(data).hexdigest()
    if src.content_sha256 and got != src.content_sha256:
        raise UserError(f"{path}: checksum mismatch: uncompressed sha256 {got}, expected {src.content_sha256} "
                        f"(the MNIST test file from {src.urls[0]}); replace the file and re-run")
    return parse_idx(data, str(path))


def find_recordings(source: Path) -> Path | None:
    """The folder holding `{digit}_{speaker}_{index}.wav` files: `recordings/` at most 3 levels down."""
    def has_wavs(d: Path) -> bool:
        return any(RECORDING.match(p.name) for p in d.glob("*.wav"))

    if source.is_dir() and has_wavs(source):
        return source
    for cand in [*find_dir(source, "recordings", 3)]:
        if has_wavs(cand):
            return cand
    return None


def find_dir(root: Path, name: str, depth: int) -> list[Path]:
    out, level = [], [root]
    for _ in range(depth + 1):
        nxt = []
        for d in level:
            if (d / name).is_dir():
                out.append(d / name)
            nxt += subdirs(d)
        level = nxt
    return out


def find_mnist(source: Path, src: Source) -> Path | None:
    name = src.filename
    for cand in (name, name.removesuffix(".gz")):
        hits = find_named([source], cand, 3)
        if hits:
            return hits[0]
    return None


def pair(names: list[str], labels: np.ndarray, spec: dict[str, Any]) -> dict[str, list[tuple[str, int]]]:
    """split -> [(recording name, MNIST index)], by the rule of the manifest's `splits.fsdd`."""
    ranges = {s: spec[f"{s}_index"] for s in ("test", "val", "train")}
    by_split: dict[str, list[tuple[str, int, str, int]]] = {s: [] for s in ("train", "val", "test")}
    for n in names:
        m = RECORDING.match(n)
        if not m:
            continue
        digit, speaker, index = int(m[1]), m[2], int(m[3])
        for s, (lo, hi) in ranges.items():
            if lo <= index <= hi:
                by_split[s].append((n, digit, speaker, index))
    rng = np.random.default_rng(int(spec["seed"]))
    pools: dict[int, np.ndarray] = {d: rng.permutation(np.flatnonzero(labels == d)) for d in range(10)}
    taken = {d: 0 for d in range(10)}
    out: dict[str, list[tuple[str, int]]] = {}
    for s in ("test", "val", "train"):  # pool order: test first, so test images never depend on train size
        rows = sorted(by_split[s], key=lambda r: (r[1], r[2], r[3]))
        out[s] = []
        for n, digit, _, _ in rows:
            k = taken[digit]
            if k >= len(pools[digit]):
                raise UserError(f"MNIST has only {len(pools[digit])} images of digit {digit}; the pairing needs more")
            out[s].append((n, int(pools[digit][k])))
            taken[digit] += 1
    return {s: out[s] for s in ("train", "val", "test")}


@register_dataset
class AVMnist(ManifestBuilder):
    """FSDD spoken digits + MNIST images, paired by digit (10 classes, real and CPU-sized)."""

    name = "avmnist"
    description = "FSDD spoken digits + MNIST digits paired by class (10 classes, 2400/300/300); real, CPU-sized"
    protocols = ManifestProtocols("avmnist")
    default_protocol = "v2"  # `default` (zero-energy padding) stays preparable by name

    def plan(self, man: Manifest, req: PrepareRequest, params: dict[str, Any]) -> Plan:
        img_src, lab_src = man.source("mnist_images"), man.source("mnist_labels")
        if req.source is not None:
            src = Path(req.source)
            rec = find_recordings(src)
            img_f, lab_f = find_mnist(src, img_src), find_mnist(src, lab_src)
            absent = [w for w, f in (("FSDD recordings/ ({digit}_{speaker}_{index}.wav)", rec),
                                     (f"MNIST {img_src.filename}", img_f), (f"MNIST {lab_src.filename}", lab_f)) if f is None]
            if absent:
                raise UserError(f"--source {src}: does not hold {'; '.join(absent)} (searched 3 folder levels); "
                                "leave out --source to download them")
            assert rec is not None and img_f is not None and lab_f is not None
            req.used.update({"fsdd recordings/": str(rec.resolve()), img_src.filename: str(img_f.resolve()),
                             lab_src.filename: str(lab_f.resolve())})
        else:
            archive = fetch_source(man.source("fsdd_archive"), req, self.name)
            rec = find_recordings(safe_extract(archive, raw_dir(req, self.name) / "fsdd"))
            if rec is None:
                raise UserError(f"{archive}: the FSDD archive has no recordings/ folder; delete it and re-run")
            img_f, lab_f = fetch_source(img_src, req, self.name), fetch_source(lab_src, req, self.name)
        assert rec is not None and img_f is not None and lab_f is not None
        images, labels = read_mnist_file(img_f, img_src), read_mnist_file(lab_f, lab_src)
        if images.shape[0] != labels.shape[0]:
            raise UserError(f"MNIST files disagree: {images.shape[0]} images, {labels.shape[0]} labels")
        table = load_table(man.table_path("fsdd"))
        spec = man.raw["splits"][params["split"]]
        items: dict[str, list[Item]] = {}
        missing: dict[str, list[tuple[str, str]]] = {}
        for split, rows in pair(sorted(table), labels, spec).items():
            items[split], missing[split] = [], []
            for name, img in rows:
                wav = rec / name
                if not wav.is_file():
                    missing[split].append((name, "not found"))
                    continue
                digit = int(name[0])
                assert int(labels[img]) == digit
                items[split].append(Item(f"{name.removesuffix('.wav')}+mnist{img}", digit, audio=wav,
                                         image=images[img], checks=((wav, table[name][1]),)))
        if not any(items.values()):
            raise UserError(f"{rec}: none of the 3,000 FSDD recordings is there")
        sources = [man.source(k).describe() for k in ("fsdd_archive", "mnist_images", "mnist_labels")]
        sources.append({"key": "fsdd", "used": str(rec), "checksums": man.raw["tables"]["fsdd"]})
        return Plan(self.name, req.protocol, params, man.classes, items, missing, sources, [spec["description"].strip()])
