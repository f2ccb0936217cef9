"""The prepared store: what `mmbench prepare` writes and training reads.

Layout (one folder per dataset and protocol)::

    <data_dir>/<dataset>/<protocol>/
        meta.json              written last, atomically: its presence means the store is complete;
                               it records every file's size and sha256 ("files")
        prepare_report.json    counts, missing/corrupt items with reasons, parameters, versions
        <split>/labels.npy     int64 (N,)
        <split>/<modality>.npy (N, ...) fixed-shape arrays, opened memory-mapped
        <split>/ids.txt        one item id per line, in array order

Arrays are memory-mapped so a training process's resident memory does not grow with the dataset,
and a batch is one fancy-indexing read per modality (no per-item decoding, no STFT per epoch).

A store can be damaged after it was written (a deleted or truncated file, a hand-edited meta.json).
`verify_store` finds that: cheaply (existence, size, .npy header) before a sweep trains, fully
(checksums) when `prepare` finds a store it would otherwise keep, so damage is rebuilt or named,
never read as data. Stores written before checksums were recorded still load (sizes checked only).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from mmbench.errors import UserError

STORE_FORMAT = 1


def data_root(data_dir: str | os.PathLike[str] | None = None) -> Path:
    return Path(data_dir or os.environ.get("MMBENCH_DATA", "./data")).expanduser()


def store_dir(dataset: str, protocol: str, data_dir: str | os.PathLike[str] | None = None) -> Path:
    return data_root(data_dir) / dataset / protocol


@dataclass
class ModalitySpec:
    """How one modality is stored and turned into model input.

    `transform` names a batch transform in `mmbench.data.transforms` (e.g. ``identity`` for
    float features, ``frames`` for uint8 video frames that get crops, flips and normalisation).
    """

    shape: list[int]
    dtype: str
    transform: str = "identity"
    transform_args: dict[str, Any] = field(default_factory=dict)


@dataclass
class StoreMeta:
    dataset: str
    protocol: str
    classes: list[str]
    modalities: dict[str, ModalitySpec]
    splits: dict[str, int]
    params: dict[str, Any] = field(default_factory=dict)
    format: int = STORE_FORMAT
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # relative path -> {bytes, sha256}

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "dataset": self.dataset,
            "protocol": self.protocol,
            "classes": self.classes,
            "modalities": {m: vars(s) for m, s in self.modalities.items()},
            "splits": self.splits,
            "params": self.params,
            "files": self.files,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "StoreMeta":
        return cls(
            dataset=d["dataset"],
            protocol=d["protocol"],
            classes=list(d["classes"]),
            modalities={m: ModalitySpec(**s) for m, s in d["modalities"].items()},
            splits={k: int(v) for k, v in d["splits"].items()},
            params=d.get("params", {}),
            format=int(d.get("format", STORE_FORMAT)),
            files=dict(d.get("files") or {}),
        )


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


class StoreWriter:
    """Builds a store in a staging folder and moves it into place only when complete.

    Usage: ``w = StoreWriter(final_dir)``; ``w.write_split("train", arrays, labels, ids)``
    for each split; ``w.finish(meta, report)``. An interrupted writer leaves only the staging
    folder, which the next `prepare` discards, so an existing complete store is never damaged.
    """

    def __init__(self, final_dir: Path) -> None:
        self.final_dir = final_dir
        self.staging = final_dir.with_name(f".{final_dir.name}.staging")
        if self.staging.exists():
            shutil.rmtree(self.staging)
        self.staging.mkdir(parents=True)

    def write_split(
        self,
        split: str,
        arrays: dict[str, np.ndarray],
        labels: np.ndarray,
        ids: Iterable[str],
    ) -> None:
        d = self.staging / split
        d.mkdir(parents=True, exist_ok=True)
        for m, a in arrays.items():
            np.save(d / f"{m}.npy", a)
        self.write_labels(split, labels, ids)

    def write_labels(self, split: str, labels: np.ndarray, ids: Iterable[str]) -> None:
        d = self.staging / split
        d.mkdir(parents=True, exist_ok=True)
        np.save(d / "labels.npy", np.asarray(labels, dtype=np.int64))
        (d / "ids.txt").write_text("".join(f"{i}\n" for i in ids))

    def finish(self, meta: StoreMeta, report: dict[str, Any]) -> Path:
        report = {**report, "store_bytes": dir_size_bytes(self.staging)}
        meta = replace(meta, files=record_files(self.staging))
        atomic_write_json(self.staging / "prepare_report.json", report)
        atomic_write_json(self.staging / "meta.json", meta.to_json())
        if self.final_dir.exists():
            old = self.final_dir.with_name(f".{self.final_dir.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(self.final_dir, old)
            os.replace(self.staging, self.final_dir)
            shutil.rmtree(old)
        else:
            os.replace(self.staging, self.final_dir)
        return self.final_dir


def dir_size_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


UNRECORDED = ("meta.json", "prepare_report.json")  # written after the record, or informational only


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (as downloads are checked): CPUs with SHA extensions hash it at
    GB/s, and hashlib releases the GIL, so `digests` runs files in parallel threads."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def digests(paths: list[Path]) -> list[str]:
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as ex:
        return list(ex.map(file_digest, paths))


def record_files(root: Path) -> dict[str, dict[str, Any]]:
    """Size and checksum of every file of a finished store, for `verify_store` to compare later."""
    files = [p for p in sorted(root.rglob("*"))
             if p.is_file() and p.relative_to(root).as_posix() not in UNRECORDED and not p.name.startswith(".")]
    return {p.relative_to(root).as_posix(): {"bytes": p.stat().st_size, "sha256": h}
            for p, h in zip(files, digests(files))}


@dataclass
class StoreCheck:
    """What `verify_store` found: the meta (None if unreadable), each damaged file with the reason,
    and whether checksums were recorded (stores written before they were: sizes checked only)."""

    root: Path
    meta: StoreMeta | None
    damage: list[tuple[Path, str]]
    checksums: bool

    @property
    def ok(self) -> bool:
        return not self.damage

    def describe(self) -> str:
        first = "; ".join(f"{p} {why}" for p, why in self.damage[:3])
        more = len(self.damage) - 3
        return first + (f" (and {more} more damaged file{'s' if more > 1 else ''})" if more > 0 else "")


def _read_meta(f: Path) -> StoreMeta:
    """meta.json parsed and checked for the keys a store needs; ValueError says what is wrong."""
    try:
        d = json.loads(f.read_text())
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        return StoreMeta.from_json(d)
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"missing or malformed entry {e}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(str(e)) from None


def _npy_problem(path: Path, rows: int, item_shape: list[int] | None, dtype: str | None) -> str | None:
    """Why an .npy file cannot be the array meta.json describes (None: it can): header parses,
    the file holds every byte the header announces, rows (and item shape, dtype) match."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _fortran, dt = read(f)
            offset = f.tell()
    except (OSError, ValueError, SyntaxError) as e:
        return f"has no readable .npy header ({e})"
    need = offset + int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    have = path.stat().st_size
    if have < need:
        return f"is truncated: {have} bytes, its header announces {need}"
    if not shape or shape[0] != rows:
        return f"holds {shape[0] if shape else 0} rows, meta.json says {rows}"
    if item_shape is not None and list(shape[1:]) != list(item_shape):
        return f"holds items of shape {list(shape[1:])}, meta.json says {list(item_shape)}"
    if dtype is not None and dt != np.dtype(dtype):
        return f"holds {dt}, meta.json says {dtype}"
    return None


def verify_store(root: Path, full: bool = False) -> StoreCheck:
    """Check a prepared store against its meta.json. Cheap (existence, sizes, .npy headers: for every
    sweep start and dry run) or `full` (also every recorded checksum: `prepare`)."""
    root = Path(root)
    try:
        meta = _read_meta(root / "meta.json")
    except ValueError as e:
        return StoreCheck(root, None, [(root / "meta.json", f"is unreadable ({e})")], False)
    damage: list[tuple[Path, str]] = []
    for split, rows in meta.splits.items():
        expect = {"labels.npy": (None, "int64"), **{f"{m}.npy": (s.shape, s.dtype) for m, s in meta.modalities.items()}}
        for name, (shape, dtype) in expect.items():
            p = root / split / name
            why = "is missing" if not p.is_file() else _npy_problem(p, rows, shape, dtype)
            if why:
                damage.append((p, why))
    bad = {p for p, _ in damage}
    to_hash: list[tuple[Path, str]] = []
    for rel, rec in meta.files.items():
        p = root / rel
        if p in bad:
            continue
        if not p.is_file():
            damage.append((p, "is missing"))
        elif p.stat().st_size != int(rec.get("bytes", -1)):
            damage.append((p, f"has {p.stat().st_size} bytes, {rec.get('bytes')} when prepared"))
        elif full and rec.get("sha256"):
            to_hash.append((p, rec["sha256"]))
    for (p, want), have in zip(to_hash, digests([p for p, _ in to_hash])):
        if have != want:
            damage.append((p, "has changed since it was prepared (checksum differs)"))
    return StoreCheck(root, meta, damage, bool(meta.files))


def prepare_hint(dataset: str, protocol: str) -> str:
    from mmbench.data.base import DATASETS

    default = DATASETS.get(dataset).default_protocol if dataset in DATASETS else None
    return f"`mmbench prepare {dataset}{'' if protocol == default else ' --protocol ' + protocol} --force`"


def check_store(dataset: str, protocol: str, data_dir: str | os.PathLike[str] | None = None) -> None:
    """The cheap check before anything trains: a damaged store is exit 2 naming the file."""
    res = verify_store(store_dir(dataset, protocol, data_dir))
    if not res.ok:
        raise UserError(f"the prepared store of {dataset}/{protocol} is damaged: {res.describe()}. "
                        f"Run {prepare_hint(dataset, protocol)} to rebuild it")


def intact(root: Path, console: Any | None = None) -> bool:
    """`prepare`'s full check of a store it would keep: False (and why, on `console`) means rebuild."""
    from rich.markup import escape

    res = verify_store(root, full=True)
    if console is not None and not res.ok:
        console.print(f"[yellow]damaged store[/yellow]: {escape(res.describe())}; rebuilding it", highlight=False)
    elif console is not None and not res.checksums:
        console.print(f"[dim]{escape(str(root))} was prepared before mmbench recorded checksums: checked sizes only "
                      "(--force rebuilds it with checksums)[/dim]", highlight=False)
    return res.ok


NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST)


@contextlib.contextmanager
def writable_data_dir(root: Path) -> Iterator[None]:
    """A store write refused by the file system (read-only mount, no permission, a file where a
    folder should be) becomes exit 2 naming the path and the fix, instead of a traceback."""
    try:
        yield
    except OSError as e:
        if e.errno not in NOT_WRITABLE:
            raise
        where = Path(e.filename) if e.filename else root
        if not str(where.absolute()).startswith(str(root.absolute())):  # e.g. an unreadable --source file
            raise UserError(f"{where}: {e.strerror or e}; check that this path exists and can be read") from None
        raise UserError(f"cannot write the prepared store under {root}: {where}: {e.strerror or e}. "
                        "Pass --data-dir (or set MMBENCH_DATA) to a folder you can write to") from None


def is_prepared(dataset: str, protocol: str, data_dir: str | os.PathLike[str] | None = None) -> bool:
    return (store_dir(dataset, protocol, data_dir) / "meta.json").is_file()


def load_meta(dataset: str, protocol: str, data_dir: str | os.PathLike[str] | None = None) -> StoreMeta:
    d = store_dir(dataset, protocol, data_dir)
    f = d / "meta.json"
    if not f.is_file():
        raise UserError(
            f"dataset '{dataset}' (protocol '{protocol}') is not prepared: no {f}. "
            f"Run `mmbench prepare {dataset} --protocol {protocol}` (data dir: {data_root(data_dir)}; "
            "set MMBENCH_DATA or --data-dir to use another)."
        )
    try:
        return _read_meta(f)
    except ValueError as e:
        raise UserError(f"the prepared store of {dataset}/{protocol} is damaged: {f} is unreadable ({e}). "
                        f"Run {prepare_hint(dataset, protocol)} to rebuild it") from None


class StoreSplit(Dataset):
    """One split of a prepared store, memory-mapped.

    Implements `__getitems__`, so a DataLoader with automatic batching fetches a whole batch with
    one read per modality; `collate` then only converts to tensors.
    """

    def __init__(self, root: Path, split: str, modalities: Iterable[str]) -> None:
        self.root = Path(root)
        self.split = split
        self.modalities = list(modalities)
        d = self.root / split
        if not (d / "labels.npy").is_file():
            raise UserError(f"prepared store {self.root} has no split '{split}' ({d / 'labels.npy'} missing)")
        self.labels = self._open(d / "labels.npy", None)
        self._arrays: dict[str, np.ndarray] | None = None

    def _open(self, path: Path, mmap_mode: Any) -> np.ndarray:
        """np.load naming the file when it is damaged (numpy's own errors name none)."""
        try:
            return np.load(path, mmap_mode=mmap_mode)
        except (OSError, ValueError, EOFError) as e:
            hint = prepare_hint(self.root.parent.name, self.root.name)
            raise UserError(f"prepared store file {path} is damaged ({e}). Run {hint} to rebuild it") from None

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        # opened lazily, so each DataLoader worker maps the files itself after fork
        if self._arrays is None:
            self._arrays = {m: self._open(self.root / self.split / f"{m}.npy", "r") for m in self.modalities}
        return self._arrays

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        out: dict[str, Any] = {m: np.asarray(a[i]) for m, a in self.arrays.items()}
        out["label"] = self.labels[i]
        out["index"] = i
        return out

    def __getitems__(self, idx: list[int]) -> dict[str, np.ndarray]:
        order = np.asarray(idx, dtype=np.int64)
        # memmaps read fastest in ascending order; undo the sort afterwards
        sort = np.argsort(order, kind="stable")
        inv = np.empty_like(sort)
        inv[sort] = np.arange(len(sort))
        srt = order[sort]
        out: dict[str, Any] = {m: np.ascontiguousarray(a[srt][inv]) for m, a in self.arrays.items()}
        out["label"] = self.labels[order]
        out["index"] = order
        return out


def collate(batch: Any) -> dict[str, torch.Tensor]:
    """Collate for both paths: a dict from `__getitems__`, or a list of per-item dicts."""
    if isinstance(batch, dict):
        return {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
    keys = batch[0].keys()
    return {k: torch.from_numpy(np.stack([np.asarray(b[k]) for b in batch])) for k in keys}


class PreparedDataset:
    """A prepared store opened for training: meta plus one `StoreSplit` per split."""

    def __init__(self, dataset: str, protocol: str, data_dir: str | os.PathLike[str] | None = None) -> None:
        self.meta = load_meta(dataset, protocol, data_dir)
        self.root = store_dir(dataset, protocol, data_dir)
        self.modalities = list(self.meta.modalities)

    @property
    def num_classes(self) -> int:
        return len(self.meta.classes)

    def split(self, name: str, modalities: Iterable[str] | None = None) -> StoreSplit:
        return StoreSplit(self.root, name, modalities if modalities is not None else self.modalities)

    def report(self) -> dict[str, Any]:
        f = self.root / "prepare_report.json"
        return json.loads(f.read_text()) if f.is_file() else {}
