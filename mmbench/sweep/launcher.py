"""What the sweep driver needs from a launcher: start runs, tell whether each is still going, and
recognise runs that an earlier driver started and that are still going (so they are waited for,
not started twice). Implementations: local.py (in-process, local processes with GPU placement),
slurm.py (submitit: SLURM, and submitit's local executor)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from mmbench.sweep import rundir
from mmbench.sweep.worker import Task


class Handle(Protocol):
    rid: str
    job_id: str

    def alive(self) -> bool:
        """Still queued or training."""

    def ended_why(self) -> str:
        """Why it ended without a summary (exit code, job state, where its log is)."""


class Launcher(Protocol):
    name: str
    capacity: int | None  # runs in flight at once from this driver; None: the scheduler queues them
    scheduler_deps: bool  # can queue a run behind in-flight dependencies (SLURM --dependency)
    poll_seconds: float
    immediate: bool  # a started run trains at once (no queue): the driver marks it running

    def start(self, tasks: list[Task], after: dict[str, list[str]]) -> list[Handle]:
        """Start the tasks; `after[rid]`: job ids the run must wait for (only if scheduler_deps)."""

    def adopt(self, rdir: Path, record: dict[str, Any]) -> Handle | None:
        """A handle on a job recorded in `rdir/job.json` if it is still queued or running."""

    def close(self, cancel: bool) -> None:
        """Stop what must not outlive the driver (cancel=True on interrupt)."""


class LockHandle:
    """A run some other process on this machine is training (it holds the run's lock)."""

    def __init__(self, rid: str, rdir: Path) -> None:
        self.rid, self.rdir, self.job_id = rid, Path(rdir), "external"

    def alive(self) -> bool:
        return rundir.lock_held(self.rdir)

    def ended_why(self) -> str:
        return "the process that was training it ended without writing a summary (killed?); re-run to resume it"


class DoneHandle:
    """A run that already ended when start() returned (trained in the driver's own process)."""

    def __init__(self, rid: str, status: str) -> None:
        self.rid, self.job_id, self.status = rid, "inline", status

    def alive(self) -> bool:
        return False

    def ended_why(self) -> str:
        return f"ended with status '{self.status}' without writing a summary"
