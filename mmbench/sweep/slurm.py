"""Cluster launch through submitit: `--launcher slurm` (one job per run, submitted as job arrays)
and `--launcher local-submitit` (submitit's local executor: the same submission, pickling, job
and requeue path, on this machine, for tests and for machines without a scheduler).

Jobs write their run directories only (sweep/worker.py); the submitting driver fills the database
as they finish, or, after `--no-wait`, a later `mmbench sweep` (or `mmbench ingest`) does. Each
run's job id is kept in its `job.json`, so a re-run waits for a job still queued instead of
submitting it again. Dependencies: on SLURM, a run whose unimodal references are still queued is
submitted at once behind them (`--dependency=afterany:<ids>`; the job itself checks that they
completed); submitit's local executor has no dependencies, so such runs are submitted when their
references finish (or by the next `mmbench sweep` after `--no-wait`).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import submitit
from submitit.helpers import Checkpointable

from mmbench.config import LauncherCfg
from mmbench.errors import UserError
from mmbench.sweep import rundir
from mmbench.sweep.launcher import Handle
from mmbench.sweep.worker import Task, train_task

ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING",
                 "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD"}
UNKNOWN_GRACE_S = 600  # sacct may not know a job for a while after sbatch: treat it as queued


class RunJob(Checkpointable):
    """The callable each job runs. Checkpointable: when SLURM preempts the job or its time runs
    out, submitit requeues it and the run resumes from its last per-epoch checkpoint."""

    def __init__(self, task: Task) -> None:
        self.task = task

    def __call__(self) -> str:
        return train_task(self.task)


def check(cfg: LauncherCfg) -> None:
    """Everything a submission needs, checked before anything is submitted."""
    if cfg.name == "slurm":
        if not cfg.partition:
            raise UserError("--launcher slurm needs a partition: pass --partition NAME or set launcher.partition "
                            "in the recipe (`sinfo -s` lists the partitions)")
        missing = [c for c in ("sbatch", "srun") if shutil.which(c) is None]
        if missing:
            raise UserError(f"--launcher slurm: {' and '.join(missing)} not found on PATH; run `mmbench sweep` on the "
                            "cluster's login node, or use --launcher local-submitit to run the same jobs on this machine")


def executor_params(cfg: LauncherCfg, cluster: str, job_name: str, dependency: list[str] | None = None) -> dict[str, Any]:
    """LauncherCfg -> submitit AutoExecutor parameters (generic ones and `slurm_`-prefixed)."""
    p: dict[str, Any] = {"name": job_name, "timeout_min": int(cfg.time), "tasks_per_node": 1, "nodes": 1}
    if cluster == "slurm":
        p.update(gpus_per_node=cfg.gpus_per_job, slurm_partition=cfg.partition,
                 slurm_array_parallelism=cfg.array_parallelism, slurm_signal_delay_s=120)
        if cfg.cpus_per_job:
            p["cpus_per_task"] = cfg.cpus_per_job
        if cfg.mem_gb:
            p["mem_gb"] = cfg.mem_gb
        if cfg.sbatch:
            p["slurm_additional_parameters"] = {str(k).replace("_", "-"): v for k, v in cfg.sbatch.items()}
        if cfg.setup:
            p["slurm_setup"] = list(cfg.setup)
        if dependency:
            p["slurm_dependency"] = "afterany:" + ":".join(dependency)
    else:
        import torch

        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        p["gpus_per_node"] = min(cfg.gpus_per_job, have)
        if cfg.cpus_per_job:
            p["cpus_per_task"] = cfg.cpus_per_job
    return p


class SubmititHandle:
    def __init__(self, rid: str, job: Any, submitted_at: datetime | None = None) -> None:
        self.rid, self.job, self.job_id = rid, job, str(job.job_id)
        self.submitted_at = submitted_at or datetime.now(timezone.utc)

    def alive(self) -> bool:
        if isinstance(self.job, submitit.LocalJob) and self.job._process is None:
            return _local_pid_alive(self.job_id)
        state = str(self.job.state).split(" ")[0].upper()
        if state in ACTIVE_STATES:
            return True
        if state in ("UNKNOWN", "READY", "NO"):
            age = (datetime.now(timezone.utc) - self.submitted_at).total_seconds()
            return age < UNKNOWN_GRACE_S
        return False

    def ended_why(self) -> str:
        state = str(self.job.state)
        err = ""
        try:
            tail = [ln for ln in (self.job.stderr() or "").splitlines() if ln.strip()][-3:]
            err = (": " + " | ".join(tail)) if tail else ""
        except Exception:  # noqa: BLE001 - logs may be missing on this machine
            pass
        return (f"job {self.job_id} ended ({state}) without writing a summary{err}; "
                f"log: {self.job.paths.stderr}; re-run the sweep to resume it")


def _local_pid_alive(pid: str) -> bool:
    """A local-submitit job of an earlier driver: its controller process, if still there."""
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return b"submitit" in cmd and ") Z " not in stat  # pid not reused, not a zombie


class SubmititLauncher:
    def __init__(self, cfg: LauncherCfg, folder: Path, job_name: str, device: str) -> None:
        check(cfg)
        self.cfg = cfg
        self.cluster = "slurm" if cfg.name == "slurm" else "local"
        self.name = cfg.name
        self.folder = Path(folder)
        self.job_name = job_name
        self.device = device
        self.scheduler_deps = self.cluster == "slurm"
        # SLURM queues everything (array_parallelism throttles); locally, --jobs bounds the processes
        self.capacity: int | None = None if self.cluster == "slurm" else (cfg.jobs or 1)
        self.poll_seconds = 15.0 if self.cluster == "slurm" else 0.5
        self.immediate = False

    def executor(self, dependency: list[str] | None = None) -> submitit.AutoExecutor:
        ex = submitit.AutoExecutor(folder=self.folder / "%j", cluster=self.cluster)
        ex.update_parameters(**executor_params(self.cfg, self.cluster, self.job_name, dependency))
        return ex

    def start(self, tasks: list[Task], after: dict[str, list[str]]) -> list[Handle]:
        groups: dict[tuple[str, ...], list[Task]] = {}
        for t in tasks:
            t.device, t.threads = self.device, self.cfg.cpus_per_job
            t.save()
            groups.setdefault(tuple(sorted(set(after.get(t.rid, [])))), []).append(t)
        out: list[Handle] = []
        for deps, group in groups.items():
            ex = self.executor(list(deps) or None)
            try:
                with ex.batch():
                    jobs = [ex.submit(RunJob(t)) for t in group]
            except (subprocess.CalledProcessError, submitit.core.utils.FailedJobError,
                    submitit.core.utils.FailedSubmissionError) as e:
                detail = getattr(e, "output", None) or getattr(e, "stderr", None) or str(e)
                if isinstance(detail, bytes):
                    detail = detail.decode(errors="replace")
                raise UserError(f"the scheduler rejected the submission: {str(detail).strip()}; "
                                "check the partition, time and sbatch options") from None
            for t, job in zip(group, jobs):
                rundir.write_job(Path(t.run_dir), self.name, str(job.job_id), folder=str(self.folder))
                out.append(SubmititHandle(t.rid, job))
        return out

    def adopt(self, rdir: Path, record: dict[str, Any]) -> Handle | None:
        if record.get("launcher") != self.name or not record.get("job_id"):
            return None
        folder = Path(record.get("folder") or self.folder) / "%j"
        jid = str(record["job_id"])
        job: Any
        if self.cluster == "slurm":
            job = submitit.SlurmJob(folder=folder, job_id=jid)
        else:
            job = submitit.LocalJob(folder=folder, job_id=jid)
        try:
            at = datetime.fromisoformat(record["submitted_at"])
        except (KeyError, ValueError):
            at = None
        h = SubmititHandle(rdir.name, job, at)
        return h if h.alive() else None

    def close(self, cancel: bool) -> None:
        return None  # jobs outlive the driver by design: a later `mmbench sweep` collects them
