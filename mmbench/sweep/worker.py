"""Train one run inside whatever process a launcher gives it: the driver itself, a local worker
process (`python -m mmbench.sweep.worker RUN_DIR`) or a submitit job on a cluster node.

The worker never opens the results database: it reads its task from the run directory and
writes progress and results there (sweep/rundir.py), which is what lets many runs train at once
against one SQLite file, and lets a job on a node without database access lose nothing.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from mmbench.sweep import rundir

EXIT_COMPLETED, EXIT_FAILED, EXIT_BUSY = 0, 1, 75


@dataclass
class Task:
    """Everything a process needs to train one run, without the database or the recipe."""

    rid: str
    run_dir: str
    cfg: dict[str, Any]
    device: str = "auto"
    data_dir: str | None = None
    workers: int | None = None
    deps: dict[str, str] = field(default_factory=dict)  # modality -> run dir of its unimodal reference
    threads: int | None = None  # torch intra-op threads (None: torch's default, or SLURM's cpus)
    driver: str | None = None  # the token of the driver that started it, left in status.json when it trains it

    def save(self) -> None:
        from mmbench.data.store import atomic_write_json

        atomic_write_json(Path(self.run_dir) / "task.json", asdict(self))

    @classmethod
    def load(cls, rdir: Path) -> "Task":
        d = rundir.read_json(Path(rdir) / "task.json")
        if d is None:
            raise FileNotFoundError(f"{rdir}/task.json is missing or unreadable")
        return cls(**d)


def set_threads(n: int | None) -> None:
    """Several runs share the machine's cores: each process takes its share, not all of them
    (oversubscribed BLAS/OpenMP threads make parallel runs slower than sequential ones)."""
    import torch

    if n is None and os.environ.get("SLURM_CPUS_PER_TASK"):
        n = int(os.environ["SLURM_CPUS_PER_TASK"])
    if n is not None:
        torch.set_num_threads(max(1, n))


def _deps_missing(task: Task) -> str | None:
    from mmbench.engine.run import load_summary

    for m, d in task.deps.items():
        s = load_summary(Path(d))
        if s is None or s.get("status") != "completed":
            return (f"dependency {Path(d).name} (unimodal {m} reference, needed for competition strength) "
                    "did not complete; fix it and re-run the sweep")
    return None


def train_task(task: Task, on_event: Callable[[dict[str, Any]], None] | None = None) -> str:
    """Train (or resume) the run; returns its status: 'completed', 'failed', or 'busy' when another
    process holds the run (it is not trained twice)."""
    from mmbench.engine.device import pick_device
    from mmbench.engine.run import execute, load_summary
    from mmbench.errors import UserError

    rdir = Path(task.run_dir)
    lock = rundir.RunLock(rdir)
    if not lock.acquire():
        return "busy"
    try:
        done = load_summary(rdir)
        if done is not None and done.get("status") == "completed":
            return "completed"  # finished by an earlier process; only ingesting is left
        if done is not None:
            (rdir / "summary.json").unlink()  # failed before: retry, from its last checkpoint
        set_threads(task.cfg.get("train", {}).get("threads") or task.threads)  # train.threads / --threads win
        missing = _deps_missing(task)
        if missing:
            rundir.write_failed_summary(rdir, task.rid, missing)
            return "failed"
        last_write = [0.0]

        def progress(ev: dict[str, Any]) -> None:
            if ev["event"] == "epoch":
                val = ev["metrics"].get("val", {})
                rundir.write_status(rdir, status="running", epochs_done=ev["epoch"], epochs_total=ev["epochs"],
                                    val_acc=val.get("acc"), imbalance_ratio=val.get("imbalance_ratio"))
                last_write[0] = time.time()
            elif time.time() - last_write[0] > 2.0:  # step progress: throttled, it is only for display
                rundir.write_status(rdir, status="running", epochs_total=ev["epochs"], step=ev["step"],
                                    steps=ev["steps"], epoch=ev["epoch"])
                last_write[0] = time.time()
            if on_event is not None:
                on_event(ev)

        try:
            device = pick_device(task.device)
            if device.type == "cuda":
                import torch

                torch.cuda.set_device(device)
            rundir.write_status(rdir, status="running", device=str(device), epochs_total=int(task.cfg["train"]["epochs"]))
            summary = execute(task.cfg, task.rid, rdir.parent, device, task.data_dir, task.workers, progress,
                              {m: Path(d) for m, d in task.deps.items()})
        except UserError as e:  # e.g. the data is not prepared on this node: the run's record says so
            rundir.write_failed_summary(rdir, task.rid, str(e))
            return "failed"
        rundir.write_status(rdir, status=summary["status"], trained_by=task.driver)
        return str(summary["status"])
    finally:
        lock.release()


def main(argv: list[str] | None = None) -> int:
    """Entry point of a local worker process: `python -m mmbench.sweep.worker RUN_DIR`."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m mmbench.sweep.worker RUN_DIR", file=sys.stderr)
        return 2
    status = train_task(Task.load(Path(args[0])))
    return {"completed": EXIT_COMPLETED, "busy": EXIT_BUSY}.get(status, EXIT_FAILED)


if __name__ == "__main__":
    sys.exit(main())
