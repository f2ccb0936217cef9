"""Checkpoint files that are safe to receive and hard to lose.

Safe to receive: a run directory is what researchers pass around (`mmbench ingest DIR`, resuming a
colleague's `runs/`), and a pickle can run code when it is loaded. So a checkpoint holds only
tensors and plain Python values (checked when it is written, so a method whose state would not load
fails at its first save, not at a resume days later) and is read with `weights_only=True`; a file
that holds anything else is refused (`UnsafeCheckpoint`, a UserError: exit 2), never executed.

Hard to lose: written to a temporary name and renamed, with the file it replaces kept as
`<name>.prev.pt`, so a kill, a full disk or a damaged copy leaves one good checkpoint to resume from.
A write that fails removes its temporary file; a full disk becomes `DiskFull` naming the file.
"""
from __future__ import annotations

import errno
import os
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from mmbench.errors import DiskFull, UserError

PLAIN = (bool, int, float, str, bytes, type(None), torch.Size)
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class UnsafeCheckpoint(UserError):
    """A checkpoint that holds more than tensors and plain values: possibly code; never loaded."""


class CorruptCheckpoint(Exception):
    """A checkpoint that cannot be read (truncated, damaged in a copy): resume from an older one."""


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS


def prev_path(path: Path) -> Path:
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def check_plain(obj: Any, where: str = "checkpoint") -> None:
    """Raise TypeError naming the first value `weights_only=True` would refuse (numpy arrays and
    scalars, sets, dataclasses, enums...): exact types, since e.g. numpy.float64 is a float subclass
    that pickles as a numpy global."""
    t = type(obj)
    if t in PLAIN or isinstance(obj, torch.Tensor):
        return
    if t in (dict, OrderedDict):
        for k, v in obj.items():
            check_plain(k, f"{where} key")
            check_plain(v, f"{where}[{k!r}]")
        return
    if t in (list, tuple):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"{where} is a {t.__module__}.{t.__qualname__}; checkpoints hold only tensors and plain "
                    "Python values (dict, list, tuple, str, int, float, bool, None), so that loading one never runs code")


def _remove(p: Path) -> None:
    try:
        p.unlink()
    except FileNotFoundError:
        pass


def save_atomic(obj: Any, path: Path, keep_prev: bool = False) -> None:
    """Write `obj` to `path` via a temporary file; with `keep_prev` the replaced file stays as
    `<name>.prev.pt` (there is always a complete `path` or `prev`, even mid-rename)."""
    check_plain(obj)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        if keep_prev and path.is_file():
            hold = path.with_name(f".{prev_path(path).name}.tmp{os.getpid()}")
            try:
                os.link(path, hold)  # a second name for the current file, then moved over the old prev
                os.replace(hold, prev_path(path))
            except OSError as e:
                if is_disk_full(e):
                    raise
                os.replace(path, prev_path(path))  # no hard links here: a moment with only prev, still resumable
        os.replace(tmp, path)
    except BaseException as e:
        _remove(tmp)
        _remove(path.with_name(f".{prev_path(path).name}.tmp{os.getpid()}"))
        if is_disk_full(e):
            raise DiskFull(path) from e
        raise


def load(path: Path, device: torch.device | str = "cpu") -> Any:
    """Load a checkpoint without running code. UnsafeCheckpoint: it holds pickled objects other
    than tensors and plain values. CorruptCheckpoint: it cannot be read at all."""
    path = Path(path)
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise CorruptCheckpoint(f"{path} is damaged ({_first_line(e)})") from e
        what = next((ln.strip().rstrip(".") for ln in str(e).splitlines() if "GLOBAL" in ln or "Unsupported" in ln), "")
        raise UnsafeCheckpoint(
            f"refusing to load {path}: it holds pickled objects, not only tensors and plain values, and loading it "
            f"could run code ({what or 'see torch.load weights_only'}). mmbench no longer writes such files (an older "
            f"version stored numpy RNG state this way); do not trust it: delete it (the run then starts from scratch) "
            f"or the whole run directory"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError) as e:
        if isinstance(e, OSError) and e.errno not in (errno.EINVAL, None):
            raise  # unreadable for another reason (permissions): not a damaged file
        raise CorruptCheckpoint(f"{path} is damaged ({_first_line(e) or e.__class__.__name__})") from e


def _first_line(e: BaseException) -> str:
    """The gist of a loader's error: its first sentence (torch's go on for lines)."""
    s = str(e).strip()
    return s.splitlines()[0].split(". ")[0].rstrip(".") if s else ""


def verify(path: Path) -> None:
    """Raise UnsafeCheckpoint if `path` exists and holds anything but tensors and plain values.
    Cheap (tensor data is memory-mapped, not read); a damaged file is left to the resume logic."""
    path = Path(path)
    if not path.is_file():
        return
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            load(path)  # raises UnsafeCheckpoint with the full message
    except Exception:  # noqa: BLE001 - damaged: the trainer falls back to the previous checkpoint
        return
