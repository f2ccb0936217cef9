"""`cremad`: CREMA-D emotion clips (WAV audio + FLV video), OGM-GE's split or an actor-disjoint one.

Raw media come from the official repository's Git LFS objects at a pinned commit (downloaded over
parallel connections) or from `--source` (a folder with `AudioWAV/` and `VideoFlash/`); every file
is checked against the SHA-256 read from the LFS pointers. Split lists come from the method repos
at pinned commits (data_manifests/cremad.yaml).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from mmbench.data.base import PrepareRequest, register_dataset
from mmbench.data.builder import (ManifestBuilder, ManifestProtocols, console, download_files, fetch_source, raw_dir,
                                  read_text)
from mmbench.data.download import Job
from mmbench.data.manifest import Manifest, load_table
from mmbench.data.pipeline import Item, Plan
from mmbench.errors import UserError


def parse_list(text: str, where: str) -> list[tuple[str, str]]:
    """OGM-GE / Re-learning lists: `<stem>,<EMO>` per line (CRLF or LF, optional `name,label` header)."""
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line == "name,label":
            continue
        parts = line.split(",")
        if len(parts) != 2 or parts[0].count("_") != 3:
            raise UserError(f"{where}:{n}: expected `<actor>_<sentence>_<emotion>_<level>,<EMO>`, got {line!r}")
        stem, emo = parts
        if stem.split("_")[2] != emo:
            raise UserError(f"{where}:{n}: label {emo} differs from the emotion in the name {stem}")
        rows.append((stem, emo))
    return rows


def actor(stem: str) -> int:
    return int(stem.split("_")[0])


def split_rows(man: Manifest, req: PrepareRequest, split_name: str) -> dict[str, list[tuple[str, str]]]:
    spec = man.raw["splits"][split_name]

    def load(key: str) -> list[tuple[str, str]]:
        f = fetch_source(man.source(key), req, man.name)
        return parse_list(read_text(f), f.name)

    if split_name == "speaker":
        rows = [r for key in spec["from"] for r in load(key)]
        val, test = set(spec["val_actors"]), set(spec["test_actors"])
        out: dict[str, list[tuple[str, str]]] = {"train": [], "val": [], "test": []}
        for r in sorted(rows):
            a = actor(r[0])
            out["test" if a in test else "val" if a in val else "train"].append(r)
        return out
    return {s: [r for key in spec[s] for r in load(key)] for s in ("train", "val", "test")}


def find_root(source: Path) -> Path:
    """The folder holding AudioWAV/ and VideoFlash/: the source itself or one level below."""
    for cand in [source, *sorted(p for p in source.iterdir() if p.is_dir())] if source.is_dir() else []:
        if (cand / "AudioWAV").is_dir() and (cand / "VideoFlash").is_dir():
            return cand
    raise UserError(
        f"--source {source} does not look like CREMA-D: expected the folders AudioWAV/ (<stem>.wav) and "
        "VideoFlash/ (<stem>.flv) of the official repository (github.com/CheyneyComputerScience/CREMA-D, "
        "fetched with git lfs), in it or one level below"
    )


@register_dataset
class CremaD(ManifestBuilder):
    """CREMA-D: 6 emotions, WAV audio + FLV video, 7,442 clips of 91 actors."""

    name = "cremad"
    description = "CREMA-D emotions (6 classes, 7,442 clips): WAV + FLV, OGM-GE split or speaker split"
    protocols = ManifestProtocols("cremad")
    default_protocol = "ogm-ge"

    def plan(self, man: Manifest, req: PrepareRequest, params: dict[str, Any]) -> Plan:
        root = find_root(Path(req.source)) if req.source is not None else raw_dir(req, self.name)
        rows = split_rows(man, req, params["split"])
        table = load_table(man.table_path("media"))
        stems = sorted({s for r in rows.values() for s, _ in r})
        missing_dl: dict[str, str] = {}
        if req.source is None:
            missing_dl = self._download(man, root, stems, table)
        classes = man.classes
        items: dict[str, list[Item]] = {}
        missing: dict[str, list[tuple[str, str]]] = {}
        for split, rs in rows.items():
            items[split], missing[split] = [], []
            for stem, emo in rs:
                wav, flv = root / "AudioWAV" / f"{stem}.wav", root / "VideoFlash" / f"{stem}.flv"
                absent = [p.parent.name + "/" + p.name for p in (wav, flv) if not p.is_file()]
                if absent:
                    missing[split].append((stem, missing_dl.get(stem) or f"not found: {', '.join(absent)}"))
                    continue
                checks: tuple[tuple[Path, str], ...] = ()
                if stem in table:
                    _, wav_sha, _, flv_sha = table[stem]
                    checks = ((wav, wav_sha), (flv, flv_sha))
                items[split].append(Item(stem, classes.index(emo), audio=wav, video=flv, checks=checks))
        if req.source is not None and not any(items.values()):
            raise UserError(f"--source {req.source}: none of the {len(stems)} listed CREMA-D clips has both "
                            "AudioWAV/<stem>.wav and VideoFlash/<stem>.flv there")
        split_spec = man.raw["splits"][params["split"]]
        sources = [man.source(k).describe() for k in (split_spec.get("from") or
                   [k for s in ("train", "val", "test") for k in split_spec[s]])]
        sources.append({"key": "media", "url": man.raw["media"]["base_url"], "commit": man.raw["media"]["commit"],
                        "checksums": man.raw["tables"]["media"], "used": str(root)})
        notes = [split_spec["description"].strip(), man.raw["task"]]
        return Plan(self.name, req.protocol, params, classes, items, missing, sources, notes)

    def _download(self, man: Manifest, root: Path, stems: list[str], table: dict[str, list[str]]) -> dict[str, str]:
        base = man.raw["media"]["base_url"].rstrip("/") + "/"
        jobs: list[Job] = []
        owner: dict[Path, str] = {}
        for stem in stems:
            if stem not in table:
                continue
            wav_size, wav_sha, flv_size, flv_sha = table[stem]
            for sub, ext, size, sha in (("AudioWAV", "wav", wav_size, wav_sha), ("VideoFlash", "flv", flv_size, flv_sha)):
                rel = f"{sub}/{stem}.{ext}"
                j = Job((base + rel,), root / rel, sha, int(size))
                jobs.append(j)
                owner[j.dest] = stem
        errors = download_files(jobs, f"cremad media, {len(jobs)} files")
        if errors:
            console.print(f"[yellow]{len(errors)} files could not be downloaded; they are reported as missing[/yellow]")
        return {owner[d]: f"download failed: {e}" for d, e in errors.items()}
