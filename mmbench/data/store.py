"""The prepared store: what `mmbench prepare` writes and training reads.

Layout (one folder per dataset and protocol)::

    <data_dir>/<dataset>/<protocol>/
        meta.json              written last, atomically: its presence means the store is complete
        prepare_report.json    counts, missing/corrupt items with reasons, parameters, versions
        <split>/labels.npy     int64 (N,)
        <split>/<modality>.npy (N, ...) fixed-shape arrays, opened memory-mapped
        <split>/ids.txt        one item id per line, in array order

Arrays are memory-mapped so a training process's resident memory does not grow with the dataset,
and a batch is one fancy-indexing read per modality (no per-item decoding, no STFT per epoch).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

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

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "dataset": self.dataset,
            "protocol": self.protocol,
            "classes": self.classes,
            "modalities": {m: vars(s) for m, s in self.modalities.items()},
            "splits": self.splits,
            "params": self.params,
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
    return StoreMeta.from_json(json.loads(f.read_text()))


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
        self.labels = np.load(d / "labels.npy")
        self._arrays: dict[str, np.ndarray] | None = None

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        # opened lazily, so each DataLoader worker maps the files itself after fork
        if self._arrays is None:
            self._arrays = {m: np.load(self.root / self.split / f"{m}.npy", mmap_mode="r") for m in self.modalities}
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
