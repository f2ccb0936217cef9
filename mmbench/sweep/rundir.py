"""The run directory as the one channel between a sweep's driver and the processes that train.

A worker (local process, submitit job on a cluster node) writes only here: `task.json` (what to
run, written by the driver), `status.json` (progress, rewritten atomically each epoch), `.lock`
(held while training, so two processes never train one run; it names its last holder's pid and
host, so a `running` row whose process was killed shows as interrupted), `job.json` (which scheduler job
trains it, so a later driver adopts a queued job instead of submitting it twice) and, from the
engine, `config.json`, checkpoints and `summary.json`. Nothing here needs the database, so a node
that cannot reach it loses nothing: the driver (or `mmbench ingest`) reads these files later.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any, IO

from mmbench.data.store import atomic_write_json
from mmbench.store import db

SWEEPS_DIR = "_sweeps"  # per-sweep manifests inside a runs dir (sweep row + its run ids)


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file written atomically by another process, or None if absent or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError, OSError):
        return None


def read_status(rdir: Path) -> dict[str, Any]:
    return read_json(rdir / "status.json") or {}


def write_status(rdir: Path, **fields: Any) -> None:
    """Merge `fields` into status.json (only the run's own worker writes it, so no race)."""
    cur = read_status(rdir)
    cur.update(fields, pid=os.getpid(), host=socket.gethostname(), updated_at=db.now().isoformat())
    atomic_write_json(rdir / "status.json", cur)


def read_job(rdir: Path) -> dict[str, Any] | None:
    return read_json(rdir / "job.json")


def write_job(rdir: Path, launcher: str, job_id: str, **extra: Any) -> None:
    rdir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(rdir / "job.json", {"launcher": launcher, "job_id": job_id, "host": socket.gethostname(),
                                          "submitted_at": db.now().isoformat(), **extra})


def write_failed_summary(rdir: Path, rid: str, error: str, started_at: str | None = None) -> None:
    """A failure the engine did not get to record (a dependency missing, the data absent on a node):
    the driver or `ingest` shows it like any failed run; re-running the sweep retries it."""
    now = db.now().isoformat()
    atomic_write_json(rdir / "summary.json", {"id": rid, "status": "failed", "error": error,
                                              "started_at": started_at or now, "finished_at": now})


class RunLock:
    """An exclusive, non-blocking flock on `<run dir>/.lock`, held for as long as a process trains
    the run. The kernel drops it when the process dies (even by SIGKILL), so a stale lock cannot
    block a resume. (On a network filesystem flock may not span nodes; there the scheduler's job
    state, `job.json`, is what stops a second submission.)"""

    def __init__(self, rdir: Path) -> None:
        self.path = Path(rdir) / ".lock"
        self._fh: IO[str] | None = None

    def acquire(self, record: bool = True) -> bool:
        """Take the lock if free; `record`: write this process's pid/host into it (not for a probe)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            return False
        self._fh = fh
        if not record:
            return True
        try:  # who holds it, so `mmbench runs` can tell a live run from one whose process was killed
            fh.seek(0)
            fh.truncate()
            fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "start": process_start(os.getpid())}))
            fh.flush()
        except OSError:
            pass  # a full disk: the lock itself still holds
        return True

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


def lock_held(rdir: Path) -> bool:
    """True while some process trains this run (on this machine)."""
    if not (Path(rdir) / ".lock").exists():
        return False
    probe = RunLock(rdir)
    if probe.acquire(record=False):
        probe.release()
        return False
    return True


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (Linux); None where absent."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), which tells a process from a
    later one that reuses its pid; None where /proc is absent."""
    st = _proc_stat(pid)
    return st[19] if st and len(st) > 19 else None


def pid_alive(pid: int, start: str | None = None) -> bool:
    """Whether `pid` is a live process (not a zombie), and the same one that started at `start`."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    st = _proc_stat(pid)
    if st is None:
        return True  # no /proc: the signal probe is all there is
    if st[0] == "Z":  # exited, waiting for a parent (often none, after a killed driver) to reap it
        return False
    return start is None or len(st) <= 19 or st[19] == start


def owner_gone(rdir: Path) -> dict[str, Any] | None:
    """The last process that trained this run (pid, host) if it is known to be dead: it ran on this
    machine and its pid is gone or belongs to a newer process. None: alive, unknown or elsewhere."""
    owner = read_json(Path(rdir) / ".lock")
    if not owner or owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return None
    return None if pid_alive(owner["pid"], owner.get("start")) else owner


def write_sweep_manifest(runs_dir: Path, sweep: dict[str, Any], run_ids: list[str]) -> None:
    """Which runs a sweep has, beside the runs themselves, so `mmbench ingest` can rebuild the
    sweep's rows in a database that never saw the sweep (results copied from a cluster)."""
    atomic_write_json(Path(runs_dir) / SWEEPS_DIR / f"{sweep['id']}.json", {"sweep": sweep, "run_ids": run_ids})


def sweep_manifests(runs_dir: Path) -> list[dict[str, Any]]:
    d = Path(runs_dir) / SWEEPS_DIR
    out = [read_json(f) for f in sorted(d.glob("*.json"))] if d.is_dir() else []
    return [m for m in out if m and "sweep" in m and "run_ids" in m]


def is_run_dir(path: Path) -> bool:
    return (Path(path) / "config.json").is_file()
