"""Decode + featurize a dataset's items in parallel into a prepared store, resumably.

Items are featurized by a process pool (`--workers`) straight into memory-mapped arrays in a work
folder (`<data_dir>/<dataset>/.work/<protocol>/`), preallocated so a full disk fails up front
with a clear message instead of mid-way. Every `CHUNK` items a line is appended to a log; a killed
run resumes after the last logged chunk. At the end, rows of corrupt items are squeezed out in
place and the arrays are moved (renamed, not copied) into the store via `StoreWriter`, whose
staging keeps any previous store intact until the new one is complete.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import multiprocessing as mp
import os
import platform
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from mmbench.data import features
from mmbench.data.base import PrepareResult
from mmbench.data.download import disk_full, sha256_file
from mmbench.data.media import MediaError
from mmbench.data.store import ModalitySpec, StoreMeta, StoreWriter, atomic_write_json, dir_size_bytes, store_dir
from mmbench.errors import UserError

CHUNK = 32
STORE_VERSION = 1  # bump when the featurization code changes what a protocol produces


@dataclass
class Item:
    """One clip: where its modalities come from and what its files must hash to."""

    id: str
    label: int
    audio: Path | None = None
    video: Path | None = None
    image: np.ndarray | None = None  # a decoded image (AV-MNIST), instead of a video file
    checks: tuple[tuple[Path, str], ...] = ()  # (file, sha256), verified before decoding

    def key(self) -> str:
        return f"{self.id}|{self.label}|{self.audio}|{self.video}|{[c[1] for c in self.checks]}"


@dataclass
class Plan:
    """Everything `build_store` needs: the resolved protocol and the indexed items per split."""

    dataset: str
    protocol: str
    params: dict[str, Any]
    classes: list[str]
    items: dict[str, list[Item]]
    missing: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # split -> [(id, reason)]
    sources: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    local_files: dict[str, str] = field(default_factory=dict)  # what was read from this machine: name -> path

    @property
    def verify(self) -> bool:
        """False after `prepare --no-verify`: a checksum mismatch is recorded, not a rejection."""
        return bool(self.options.get("verify", True))


UNVERIFIED = "unverified: "  # status prefix of an item kept despite a checksum mismatch (--no-verify)


def store_params(dataset: str, protocol: str, params: dict[str, Any], options: dict[str, Any] | None = None) -> dict[str, Any]:
    """What `meta.json` records and a second `prepare` compares to decide there is nothing to do."""
    out = {"store_version": STORE_VERSION, "dataset": dataset, "protocol": protocol, **params}
    if options:
        out["options"] = dict(options)
    return json.loads(json.dumps(out))


def featurize(item: Item, params: dict[str, Any], verify: bool = True) -> tuple[dict[str, np.ndarray], str | None]:
    """The item's features, and the checksum mismatch it was kept despite (verify=False) or None."""
    mismatch = None
    for path, sha in item.checks:
        try:
            got = sha256_file(path)
        except FileNotFoundError:
            raise MediaError(f"file missing ({path.name})") from None
        if got != sha:
            why = f"checksum mismatch ({path.name}: sha256 {got[:12]}..., expected {sha[:12]}...)"
            if verify:
                raise MediaError(why)
            mismatch = mismatch or why
    out: dict[str, np.ndarray] = {}
    if "audio" in params:
        if item.audio is None:
            raise MediaError("no audio file")
        out["audio"] = features.audio_from_file(item.audio, params["audio"])
    if "visual" in params:
        vp = params["visual"]
        if item.image is not None:
            img = np.asarray(item.image, dtype=np.uint8)
            out["visual"] = img.reshape(features.visual_shape(vp))
        elif item.video is not None:
            out["visual"] = features.frames_from_file(item.video, vp)
        else:
            raise MediaError("no video file")
    return out, mismatch


def _work(task: tuple[int, Item, dict[str, Any], bool]) -> tuple[int, dict[str, np.ndarray] | None, str | None]:
    i, item, params, verify = task
    try:
        out, mismatch = featurize(item, params, verify)
        return i, out, None if mismatch is None else UNVERIFIED + mismatch
    except MediaError as e:
        return i, None, str(e)
    except Exception as e:  # a decoder crash on one odd file must not lose the whole run
        return i, None, f"undecodable ({type(e).__name__}: {e})"


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def reason_category(reason: str) -> str:
    return reason.split(" (")[0].split(":")[0].strip()


def reason_lines(entries: list[dict[str, str]], first: int = 3) -> list[str]:
    """Per reason: how many items, in which splits, and the first few with their full reason, so a
    failed (or partial) prepare says why without opening the report."""
    groups: dict[str, list[dict[str, str]]] = {}
    for e in entries:
        groups.setdefault(reason_category(e["reason"]), []).append(e)
    lines = []
    for cat, es in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        per = Counter(e["split"] for e in es)
        lines.append(f"  {len(es)} {cat} ({', '.join(f'{s} {n}' for s, n in per.items())}), e.g.:")
        lines += [f"    {e['id']}: {e['reason']}" for e in es[:first]]
    return lines


def failed_report_path(store: Path) -> Path:
    """Where a prepare that produced no store leaves its report (beside where the store would be)."""
    return store.parent / f"prepare_report.{store.name}.failed.json"


def versions() -> dict[str, Any]:
    import av

    from mmbench.env import versions as pkg_versions

    out: dict[str, Any] = dict(pkg_versions())
    out["ffmpeg"] = getattr(av, "ffmpeg_version_info", None)
    out["ffmpeg_libs"] = {k: ".".join(map(str, v)) for k, v in av.library_versions.items()}
    out["platform"] = platform.platform()
    return out


class _Work:
    """The resumable work folder of one (dataset, protocol)."""

    def __init__(self, root: Path, plan: Plan, shapes: dict[str, tuple[list[int], str]]) -> None:
        self.root = root
        self.plan = plan
        self.shapes = shapes
        h = hashlib.sha256(json.dumps(store_params(plan.dataset, plan.protocol, plan.params, plan.options), sort_keys=True).encode())
        for split, items in sorted(plan.items.items()):
            h.update(split.encode())
            for it in items:
                h.update(it.key().encode())
        self.key = h.hexdigest()
        kf = root / "key.txt"
        if root.exists() and (not kf.is_file() or kf.read_text().strip() != self.key):
            shutil.rmtree(root)  # a different protocol or item list: nothing to reuse
        root.mkdir(parents=True, exist_ok=True)
        kf.write_text(self.key + "\n")

    def log_path(self, split: str) -> Path:
        return self.root / split / "chunks.jsonl"

    def done(self, split: str) -> dict[int, list[str | None]]:
        """chunk index -> per-item status (None ok, else the reason), from the log."""
        out: dict[int, list[str | None]] = {}
        f = self.log_path(split)
        if f.is_file():
            for line in f.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill: that chunk is redone
                out[int(rec["chunk"])] = rec["status"]
        return out

    def arrays(self, split: str, n: int) -> dict[str, np.memmap]:
        d = self.root / split
        d.mkdir(parents=True, exist_ok=True)
        out = {}
        for m, (shape, dtype) in self.shapes.items():
            f = d / f"{m}.npy"
            full = (n, *shape)
            if f.is_file():
                a = np.load(f, mmap_mode="r+")
                if a.shape == full and a.dtype == np.dtype(dtype):
                    out[m] = a
                    continue
                del a
            out[m] = _allocate(f, full, dtype)
        return out

    def log_chunk(self, split: str, chunk: int, status: list[str | None]) -> None:
        with open(self.log_path(split), "a") as f:
            f.write(json.dumps({"chunk": chunk, "status": status}) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _allocate(path: Path, shape: tuple[int, ...], dtype: str) -> np.memmap:
    """A .npy memmap with its blocks reserved now, so a full disk is an error here, not a SIGBUS later."""
    a = np.lib.format.open_memmap(path, mode="w+", dtype=np.dtype(dtype), shape=shape)
    size = path.stat().st_size
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            del a
            path.unlink(missing_ok=True)
            raise disk_full(e, path) from None
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    finally:
        os.close(fd)
    return a


def compact_npy(path: Path, keep: np.ndarray) -> None:
    """Drop the rows not in `keep`, in place: shift kept rows up, truncate, rewrite the header.

    Avoids a second full copy of a split (tens of GB for Kinetics-Sounds frames).
    """
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
    a = np.load(path, mmap_mode="r+")
    idx = np.flatnonzero(keep)
    for j, i in enumerate(idx):
        if i != j:
            a[j] = a[i]
    a.flush()
    shape, dtype = (len(idx), *a.shape[1:]), a.dtype
    row = int(np.prod(a.shape[1:], dtype=np.int64)) * a.dtype.itemsize
    offset = a.offset
    del a
    header = repr({"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
    size_bytes = 2 if version == (1, 0) else 4  # header length field: uint16 in v1, uint32 in v2/v3
    head_len = offset - 8 - size_bytes  # after magic (6) + version (2) + length field
    body = header.ljust(head_len - 1) + "\n"
    if len(body) != head_len:
        raise RuntimeError(f"{path}: cannot rewrite the .npy header in place")
    with open(path, "r+b") as f:
        f.seek(0)
        f.write(b"\x93NUMPY" + bytes(version) + head_len.to_bytes(size_bytes, "little") + body.encode("latin1"))
        f.truncate(offset + row * len(idx))


def _progress(console: Console | None) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console or Console(stderr=True), transient=False,
    )


def _tasks(plan: Plan, split: str, todo: list[int]) -> Iterator[tuple[int, Item, dict[str, Any], bool]]:
    items = plan.items[split]
    for c in todo:
        for i in range(c * CHUNK, min((c + 1) * CHUNK, len(items))):
            yield i, items[i], plan.params, plan.verify


def build_store(plan: Plan, data_dir: Path, workers: int = 1, console: Console | None = None) -> PrepareResult:
    """Featurize every indexed item (resuming), write the store and its report; returns the result."""
    t0 = time.perf_counter()
    shapes = features.spec_shapes(plan.params)
    target = store_dir(plan.dataset, plan.protocol, data_dir)
    work = _Work(target.parent / ".work" / plan.protocol, plan, shapes)
    status: dict[str, list[str | None]] = {}
    fresh = 0
    try:
        _check_space(work, plan, shapes)
        with _pool(workers) as pool, _progress(console) as prog:
            for split, items in plan.items.items():
                n = len(items)
                arrays = work.arrays(split, n)
                done = work.done(split)
                n_chunks = (n + CHUNK - 1) // CHUNK
                todo = [c for c in range(n_chunks) if c not in done]
                task = prog.add_task(f"{plan.dataset}/{plan.protocol} {split}", total=n, rate="",
                                     completed=sum(len(done[c]) for c in done if c < n_chunks))
                fresh += _run_split(plan, split, todo, arrays, work, prog, task, pool)
                done = work.done(split)
                status[split] = [s for c in range(n_chunks) for s in done[c]]
                for a in arrays.values():
                    a.flush()
                del arrays
        result = _finish(plan, data_dir, work, status, shapes, t0, fresh, workers)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise disk_full(e, target) from None
        raise
    shutil.rmtree(work.root, ignore_errors=True)
    try:
        work.root.parent.rmdir()  # .work/, when no other protocol is half-done
    except OSError:
        pass
    return result


def _check_space(work: _Work, plan: Plan, shapes: dict[str, tuple[list[int], str]]) -> None:
    need = 0
    for split, items in plan.items.items():
        for m, (shape, dtype) in shapes.items():
            f = work.root / split / f"{m}.npy"
            if not f.is_file():
                need += len(items) * int(np.prod(shape)) * np.dtype(dtype).itemsize
    free = shutil.disk_usage(work.root).free
    if need > free:
        raise UserError(
            f"not enough disk space for {plan.dataset}/{plan.protocol}: the store needs {need / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB free under {work.root.parent}; free space or use --data-dir elsewhere"
        )


@contextlib.contextmanager
def _pool(workers: int) -> Iterator[Any]:
    """A spawn pool (fork is unsafe once torch has started threads), or None to work in-process."""
    import torch

    if workers <= 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # per-clip DSP is tiny: intra-op threads cost more than they save
        try:
            yield None
        finally:
            torch.set_num_threads(threads)
        return
    pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker)
    try:
        yield pool
    finally:
        pool.terminate()
        pool.join()


def _run_split(plan: Plan, split: str, todo: list[int], arrays: dict[str, np.memmap], work: _Work,
               prog: Progress, task: Any, pool: Any) -> int:
    if not todo:
        return 0
    items = plan.items[split]
    chunk_status: dict[int, list[str | None]] = {}
    pending = {c: min((c + 1) * CHUNK, len(items)) - c * CHUNK for c in todo}
    t0, count = time.perf_counter(), 0
    results = pool.imap(_work, _tasks(plan, split, todo), chunksize=2) if pool else map(_work, _tasks(plan, split, todo))
    for i, out, reason in results:
        if out is not None:
            for m, a in arrays.items():
                a[i] = out[m]
        c = i // CHUNK
        st = chunk_status.setdefault(c, [None] * pending[c])
        st[i - c * CHUNK] = reason
        pending[c] -= 1
        if pending[c] == 0:
            for a in arrays.values():
                a.flush()
            work.log_chunk(split, c, st)
        count += 1
        prog.update(task, advance=1, rate=f"{count / max(time.perf_counter() - t0, 1e-9):.1f} items/s")
    return count


def _finish(plan: Plan, data_dir: Path, work: _Work, status: dict[str, list[str | None]],
            shapes: dict[str, tuple[list[int], str]], t0: float, fresh: int, workers: int) -> PrepareResult:
    target = store_dir(plan.dataset, plan.protocol, data_dir)
    writer = StoreWriter(target)
    counts: dict[str, int] = {}
    split_rep: dict[str, dict[str, Any]] = {}
    corrupt: list[dict[str, str]] = []
    missing: list[dict[str, str]] = []
    reasons: dict[str, dict[str, int]] = {}
    unverified: list[dict[str, str]] = []
    for split, items in plan.items.items():
        st = status[split]
        keep = np.array([s is None or s.startswith(UNVERIFIED) for s in st], dtype=bool)
        unverified += [{"split": split, "id": it.id, "reason": s[len(UNVERIFIED):]}
                       for it, s in zip(items, st) if s is not None and s.startswith(UNVERIFIED)]
        # the log goes first: once arrays leave the work folder, a kill must mean "redo", never reuse
        work.log_path(split).unlink(missing_ok=True)
        (writer.staging / split).mkdir(parents=True, exist_ok=True)
        for m in shapes:
            f = writer.staging / split / f"{m}.npy"
            os.replace(work.root / split / f"{m}.npy", f)
            if not keep.all():
                compact_npy(f, keep)
        kept = [it for it, k in zip(items, keep) if k]
        writer.write_labels(split, np.array([it.label for it in kept], dtype=np.int64), (it.id for it in kept))
        bad = [(it.id, s) for it, s, k in zip(items, st, keep) if not k]
        miss = plan.missing.get(split, [])
        corrupt += [{"split": split, "id": i, "reason": r} for i, r in bad]
        missing += [{"split": split, "id": i, "reason": r} for i, r in miss]
        reasons[split] = dict(Counter(reason_category(r) for _, r in bad + miss))
        counts[split] = len(kept)
        split_rep[split] = {"expected": len(items) + len(miss), "found": len(items), "missing": len(miss),
                            "corrupt": len(bad), "stored": len(kept)}
    if sum(counts.values()) == 0:
        shutil.rmtree(writer.staging, ignore_errors=True)
        failed = {"dataset": plan.dataset, "protocol": plan.protocol, "outcome": "failed: no item could be used",
                  "splits": split_rep, "reasons": reasons, "missing": missing, "corrupt": corrupt,
                  "sources": plan.sources, "local_files": plan.local_files, "verified": False}
        where = failed_report_path(target)
        atomic_write_json(where, failed)
        hint = ("; the files differ from the canonical ones: if your copy was re-encoded or resampled, "
                "`prepare --no-verify` keeps them and marks the store and its runs unverified"
                if any("checksum mismatch" in r for split in reasons.values() for r in split) and plan.verify else "")
        raise UserError(f"{plan.dataset}: none of the {sum(r['expected'] for r in split_rep.values())} listed items "
                        f"could be used; is the source the right dataset?{hint}\n"
                        + "\n".join(reason_lines(missing + corrupt)) + f"\n  report: {where}")
    params = store_params(plan.dataset, plan.protocol, plan.params, plan.options)
    mods = {}
    for m, (shape, dtype) in shapes.items():
        tname, targs = features.transform_for(m, plan.params[m])
        mods[m] = ModalitySpec(list(shape), dtype, tname, targs)
    meta = StoreMeta(plan.dataset, plan.protocol, plan.classes, mods, counts, params)
    seconds = time.perf_counter() - t0
    report = {
        "dataset": plan.dataset,
        "protocol": plan.protocol,
        "splits": split_rep,
        "reasons": reasons,
        "missing": missing,
        "corrupt": corrupt,
        "classes": plan.classes,
        "params": params,
        "sources": plan.sources,
        "local_files": plan.local_files,
        "verified": not unverified,
        "checksum_mismatches": len(unverified),
        "unverified": unverified,
        "notes": plan.notes,
        "resampler": ({plan.params["audio"].get("resampler", "kaiser_best"):
                       features.RESAMPLERS[plan.params["audio"].get("resampler", "kaiser_best")],
                       "library": "torchaudio.functional.resample"} if "audio" in plan.params else None),
        "versions": versions(),
        "workers": workers,
        "seconds": round(seconds, 3),
        "items_featurized": fresh,
        "items_per_second": round(fresh / seconds, 2) if seconds > 0 else None,
        "store_bytes": 0,
    }
    report["store_bytes"] = dir_size_bytes(writer.staging)
    store = writer.finish(meta, report)
    failed_report_path(target).unlink(missing_ok=True)  # an earlier failed attempt's report is obsolete
    return PrepareResult(store, False, report)
