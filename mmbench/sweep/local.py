"""Local launchers: one run at a time in the driver's own process, or N runs at once in separate
worker processes, placed on GPUs (`--gpus 0,1 --jobs-per-gpu K`) or on the CPU (`--jobs N`).

A fresh process per run rather than a pool of long-lived workers: a crash, an out-of-memory kill
or a leaked CUDA context affects that run only and is attributed to it exactly (its exit code,
its `worker.log`), and a finished run's memory goes back to the system. The processes are forked
from a multiprocessing forkserver that imported torch and every method once (sweep/preload.py),
so a run starts in well under a second instead of paying the multi-second torch import each time
(CUDA is never initialised in the forkserver, so forking it is safe). Workers die with the driver,
even by kill -9: each worker closes its inherited copy of the forkserver's "alive" pipe, so the
forkserver exits when the driver does; each asks the kernel (PR_SET_PDEATHSIG) to be killed when
the forkserver goes; and a watchdog thread kills it if the driver's pid is gone anyway. So a killed
driver leaves no orphan training a run that the next `mmbench sweep` would resume.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import threading
import time
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Callable

from mmbench.config import LauncherCfg
from mmbench.errors import UserError
from mmbench.sweep.launcher import DoneHandle, Handle
from mmbench.sweep import rundir, worker
from mmbench.engine.checkpoint import DiskFull
from mmbench.sweep.worker import EXIT_BUSY, EXIT_DISK_FULL, Task, train_task

PR_SET_PDEATHSIG = 1


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def parse_gpus(spec: str | list[int] | None) -> list[int] | None:
    """`0,1,3` -> [0, 1, 3]; checked against the GPUs this machine has."""
    if spec is None:
        return None
    if isinstance(spec, str):
        try:
            ids = [int(x) for x in spec.split(",") if x.strip() != ""]
        except ValueError:
            raise UserError(f"--gpus {spec}: expected comma-separated GPU ids, e.g. --gpus 0,1") from None
    else:
        ids = list(spec)
    if not ids:
        raise UserError("--gpus: no GPU ids given; e.g. --gpus 0,1 (or leave it out to run on the CPU with --jobs N)")
    if len(set(ids)) != len(ids):
        raise UserError(f"--gpus {','.join(map(str, ids))}: a GPU id is repeated; use --jobs-per-gpu K for several runs per GPU")
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        raise UserError(f"--gpus {','.join(map(str, ids))}: this machine has no CUDA GPU; drop --gpus and use --jobs N for CPU runs")
    bad = [i for i in ids if i < 0 or i >= n]
    if bad:
        raise UserError(f"--gpus: GPU id(s) {', '.join(map(str, bad))} do not exist; this machine has {n} GPU(s): "
                        f"{', '.join(map(str, range(n)))}")
    return ids


def slot_devices(cfg: LauncherCfg, device: str) -> list[str]:
    """One device per concurrent run. GPUs are interleaved (0,1,0,1) so the first runs spread out."""
    gpus = parse_gpus(cfg.gpus)
    if gpus is None:
        return [device] * (cfg.jobs or 1)
    slots = [f"cuda:{g}" for _ in range(cfg.jobs_per_gpu) for g in gpus]
    if cfg.jobs is not None:
        if cfg.jobs > len(slots):
            raise UserError(f"--jobs {cfg.jobs} exceeds --gpus x --jobs-per-gpu = {len(gpus)} x {cfg.jobs_per_gpu} = "
                            f"{len(slots)}; raise --jobs-per-gpu or lower --jobs")
        slots = slots[: cfg.jobs]
    return slots


class InlineLauncher:
    """Trains each run in the driver's process, one after the other (the default)."""

    name, capacity, scheduler_deps, poll_seconds, immediate = "local", 1, False, 0.0, True

    def __init__(self, device: str) -> None:
        self.device = device
        self.on_event: Callable[[str, dict[str, Any]], None] | None = None

    def start(self, tasks: list[Task], after: dict[str, list[str]]) -> list[Handle]:
        out: list[Handle] = []
        for t in tasks:
            t.device = self.device
            cb = self.on_event
            try:
                status = train_task(t, (lambda ev, rid=t.rid: cb(rid, ev)) if cb else None)
            except DiskFull as e:  # the driver stops the sweep and names the place
                h = DoneHandle(t.rid, "failed")
                h.disk_full = e.path  # type: ignore[attr-defined]
                out.append(h)
                break
            out.append(DoneHandle(t.rid, status))
        return out

    def adopt(self, rdir: Path, record: dict[str, Any]) -> Handle | None:
        return None

    def close(self, cancel: bool) -> None:
        return None


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent exits (Linux; elsewhere a no-op)."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def release_forkserver() -> None:
    """Drop this worker's copy of the forkserver's "alive" pipe. The forkserver exits when every
    copy is closed; a worker inherits one (to start processes of its own through it), so while any
    worker lived, a killed driver left the forkserver, and with it every worker, running."""
    try:
        from multiprocessing import forkserver

        fs = forkserver._forkserver  # type: ignore[attr-defined]
        fd = getattr(fs, "_forkserver_alive_fd", None)
    except (ImportError, AttributeError):  # pragma: no cover - another Python's internals
        return
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass
        fs._forkserver_alive_fd = None


def watch_driver(driver_pid: int, driver_start: str | None, every: float = 1.0) -> None:
    """Fallback where the parent-death signal cannot work (not Linux, or a forkserver that outlives
    the driver): a daemon thread that SIGKILLs this worker once its driver or its parent is gone."""
    parent = os.getppid()

    def loop() -> None:
        while True:
            time.sleep(every)
            if os.getppid() != parent or not rundir.pid_alive(driver_pid, driver_start):
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=loop, name="mmbench-driver-watchdog", daemon=True).start()


def process_entry(run_dir: str, driver_pid: int | None = None, driver_start: str | None = None) -> None:
    """Body of a worker process: its output goes to the run's worker.log, its exit code says how
    the run ended (worker.EXIT_*). It dies with its driver (see the module docstring)."""
    release_forkserver()
    die_with_parent()
    if driver_pid is not None:
        watch_driver(driver_pid, driver_start)
    fd = os.open(Path(run_dir) / "worker.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ["PYTHONUNBUFFERED"] = "1"
    raise SystemExit(worker.main([run_dir]))


_CTX: multiprocessing.context.BaseContext | None = None


def context() -> multiprocessing.context.BaseContext:
    """The forkserver context, preloading torch and the registries once per driver."""
    global _CTX
    if _CTX is None:
        try:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["mmbench.sweep.preload"])
        except ValueError:  # pragma: no cover - no forkserver on this platform
            ctx = multiprocessing.get_context("spawn")
        _CTX = ctx
    return _CTX


class ProcessHandle:
    def __init__(self, rid: str, proc: BaseProcess, slot: int, log: Path) -> None:
        self.rid, self.proc, self.slot, self.log = rid, proc, slot, log
        self.job_id = str(proc.pid)

    def alive(self) -> bool:
        return self.proc.is_alive()

    @property
    def disk_full(self) -> str | None:
        """The run's directory when its worker stopped on a full disk (it could not say more)."""
        return str(self.log.parent) if self.proc.exitcode == EXIT_DISK_FULL else None

    def ended_why(self) -> str:
        rc = self.proc.exitcode
        if rc is not None and rc < 0:
            how = f"was killed by signal {-rc}" + (" (out of memory?)" if -rc == signal.SIGKILL else "")
        elif rc == EXIT_BUSY:
            how = "found the run busy in another process"
        else:
            how = f"exited with code {rc}"
        return f"worker process {how} without writing a summary; log: {self.log}"


class ProcessLauncher:
    """`--jobs N` / `--gpus ... --jobs-per-gpu K`: each run in its own worker process, bound to a slot."""

    name, scheduler_deps, poll_seconds, immediate = "local", False, 0.5, True

    def __init__(self, slots: list[str], threads: int) -> None:
        self.slots = slots
        self.threads = threads
        self.capacity: int | None = len(slots)
        self._by_slot: dict[int, ProcessHandle] = {}
        if context().get_start_method() == "forkserver":
            from multiprocessing import forkserver

            forkserver.ensure_running()  # its imports now overlap the driver's checks and data preparation

    def _free_slot(self) -> int:
        for i in range(len(self.slots)):
            h = self._by_slot.get(i)
            if h is None or not h.alive():
                return i
        raise RuntimeError("no free slot: the driver started more runs than the launcher's capacity")

    def start(self, tasks: list[Task], after: dict[str, list[str]]) -> list[Handle]:
        out: list[Handle] = []
        for t in tasks:
            slot = self._free_slot()
            t.device, t.threads = self.slots[slot], self.threads
            t.save()
            proc = context().Process(target=process_entry, args=(t.run_dir, os.getpid(), rundir.process_start(os.getpid())),
                                     name=f"mmbench-{t.rid}", daemon=False)
            proc.start()
            h = ProcessHandle(t.rid, proc, slot, Path(t.run_dir) / "worker.log")
            self._by_slot[slot] = h
            out.append(h)
        return out

    def adopt(self, rdir: Path, record: dict[str, Any]) -> Handle | None:
        return None  # a worker of an earlier driver died with it; a live one is found by its lock

    def close(self, cancel: bool) -> None:
        live = [h for h in self._by_slot.values() if h.alive()]
        for h in live:
            if cancel:
                h.proc.terminate()
        for h in live:
            h.proc.join(timeout=30)
            if h.proc.is_alive():
                h.proc.kill()


def make_local(cfg: LauncherCfg, device: str) -> InlineLauncher | ProcessLauncher:
    slots = slot_devices(cfg, device)
    if len(slots) == 1:
        return InlineLauncher(slots[0])
    return ProcessLauncher(slots, threads=max(1, cpu_count() // len(slots)))
