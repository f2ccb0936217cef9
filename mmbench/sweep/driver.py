"""The sweep driver: the one process that schedules runs and writes the results database.

It starts runs whose dependencies completed (or, on SLURM, queues them behind in-flight ones),
follows them through their run directories (`status.json`), and ingests each run directory into
the database when it ends. Workers never write the database, so any number of concurrent runs
share one SQLite file without lock errors; if a database write fails anyway, the run's results
stay in its directory and `mmbench ingest` (or the next `mmbench sweep`) writes them.

On start it first collects what earlier drivers left: completed runs not yet in the database are
ingested, runs still training (their lock is held) or still queued (their `job.json` names a live
job) are waited for, everything else is (re)started and resumes from its last checkpoint.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.markup import escape
from rich.table import Column
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from mmbench.config import describe_run, short_label
from mmbench.data.store import atomic_write_json
from mmbench.engine.run import ingest_run_dir, load_summary
from mmbench.redact import plain
from mmbench.store import db
from mmbench.sweep import rundir
from mmbench.sweep.launcher import Handle, Launcher, LockHandle
from mmbench.sweep.plan import PlannedRun
from mmbench.sweep.worker import Task

MAX_ROWS = 12  # per-run progress bars shown at once; the rest are counted in the overall line


@dataclass
class DriveResult:
    completed: list[str] = field(default_factory=list)  # trained (to the end) by this invocation
    skipped: list[str] = field(default_factory=list)  # completed before it
    failed: dict[str, str] = field(default_factory=dict)  # run id -> error
    in_flight: list[str] = field(default_factory=list)  # still queued or training (--no-wait)
    waiting: list[str] = field(default_factory=list)  # not submitted: dependencies unfinished (--no-wait)
    db_errors: dict[str, str] = field(default_factory=dict)  # finished, but not (yet) in the database
    by_other: list[str] = field(default_factory=list)  # finished while we waited, trained by another process


@dataclass
class TaskDefaults:
    device: str = "auto"
    data_dir: str | None = None
    workers: int | None = None


class Driver:
    def __init__(self, runs: list[PlannedRun], launcher: Launcher, engine: Engine, sweep_id: str, runs_dir: Path,
                 defaults: TaskDefaults, console: Console, wait: bool = True) -> None:
        self.runs = {r.id: r for r in runs}
        self.order = [r.id for r in runs]
        self.launcher, self.engine, self.sid = launcher, engine, sweep_id
        self.runs_dir, self.defaults, self.console, self.wait = Path(runs_dir), defaults, console, wait
        self.state: dict[str, str] = {}  # pending | inflight | completed | failed
        self.handles: dict[str, Handle] = {}
        self.result = DriveResult()
        self._running: set[str] = set()  # marked running in the database
        self._epochs: dict[str, int] = {}  # epochs_done last written to the database
        self._rows: dict[str, TaskID] = {}
        self.prog: Progress | None = None
        self.overall: TaskID | None = None
        self.token = f"{os.getpid()}-{time.time_ns()}"  # in the status.json of each run this driver trains

    # ----- helpers ------------------------------------------------------------------------------
    def rdir(self, rid: str) -> Path:
        return self.runs_dir / rid

    def label(self, rid: str) -> str:
        return plain(describe_run(self.runs[rid].cfg))  # printed as rich markup: user text escaped

    def short(self, rid: str) -> str:
        """What a progress row or a `done` line shows: fits an 80-column terminal."""
        return short_label(self.runs[rid].cfg)

    def print(self, msg: str) -> None:
        (self.prog.console if self.prog else self.console).print(msg, highlight=False)

    def _advance(self) -> None:
        if self.prog is not None and self.overall is not None:
            self.prog.advance(self.overall)

    def _db(self, rid: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """A database write that must not stop the sweep: the run directory keeps the truth."""
        try:
            return fn(*args, **kw)
        except SQLAlchemyError as e:
            msg = f"{e.__class__.__name__}: {str(e).splitlines()[0]}"
            if rid not in self.result.db_errors:
                self.print(f"[yellow]database write failed[/yellow] for {rid} ({plain(msg)}); its results are safe in "
                           f"{plain(self.rdir(rid))} and `mmbench ingest {plain(self.runs_dir)}` writes them later")
            self.result.db_errors[rid] = msg
            return None

    def _ingest(self, rid: str) -> None:
        if self._db(rid, ingest_run_dir, self.engine, self.rdir(rid), self.sid) is not None:
            self.result.db_errors.pop(rid, None)

    # ----- the loop ---------------------------------------------------------------------------
    def run(self) -> DriveResult:
        # the label column is capped and the bar shrinks, so a long method label never pushes the bar
        # off an 80-column line; per-run info (step, val acc) comes last and is cut first
        with Progress(TextColumn("[bold]{task.description}", table_column=Column(max_width=32, no_wrap=True,
                                                                                 overflow="ellipsis")),
                      BarColumn(bar_width=None, table_column=Column(min_width=8, max_width=30)), MofNCompleteColumn(),
                      TimeElapsedColumn(),
                      TextColumn("{task.fields[info]}", table_column=Column(no_wrap=True, overflow="ellipsis")),
                      console=self.console, transient=False, expand=False) as prog:
            self.prog = prog
            self.overall = prog.add_task("runs", total=len(self.order), info="")
            if hasattr(self.launcher, "on_event"):
                self.launcher.on_event = self._on_event  # type: ignore[attr-defined]
            try:
                self._collect()
                while True:
                    self._poll()
                    self._fail_blocked()
                    started = self._start_ready()
                    self._overall()
                    if not self.wait:
                        break  # submitted what can go now; a later `mmbench sweep` collects the rest
                    if not self.handles and not started:
                        break
                    if self.handles and self.launcher.poll_seconds:
                        time.sleep(self.launcher.poll_seconds)
            except KeyboardInterrupt:
                self.launcher.close(cancel=True)
                raise
            self.launcher.close(cancel=False)
        self.result.in_flight = [r for r in self.order if self.state[r] == "inflight"]
        self.result.waiting = [r for r in self.order if self.state[r] == "pending"]
        return self.result

    def _collect(self) -> None:
        for rid in self.order:
            rdir = self.rdir(rid)
            s = load_summary(rdir)
            if s is not None and s.get("status") == "completed":
                self.state[rid] = "completed"
                self.result.skipped.append(rid)
                row = self._db(rid, db.get_run, self.engine, rid)
                if row is None or row.status != "completed":
                    self._ingest(rid)  # finished earlier, its database write was lost: recover it
                self._advance()
                continue
            h: Handle | None = None
            if rundir.lock_held(rdir):
                h = LockHandle(rid, rdir)
            else:
                rec = rundir.read_job(rdir)
                if rec is not None and s is None:
                    h = self.launcher.adopt(rdir, rec)
            if h is not None:
                self.state[rid], self.handles[rid] = "inflight", h
                self.print(f"[dim]waiting for {self.label(rid)} ({rid}): already {'training' if isinstance(h, LockHandle) else 'submitted as job ' + h.job_id}[/dim]")
            else:
                self.state[rid] = "pending"

    def _poll(self) -> None:
        for rid, h in list(self.handles.items()):
            self._show(rid, rundir.read_status(self.rdir(rid)))
            if not h.alive():
                del self.handles[rid]
                self._finish(rid, h)

    def _fail_blocked(self) -> None:
        for rid in self.order:
            if self.state[rid] != "pending":
                continue
            bad = [(m, d) for m, d in self.runs[rid].deps.items() if self.state.get(d) == "failed"]
            if bad:
                m, d = bad[0]
                self._failed(rid, f"dependency {d} (unimodal {m} reference) failed; fix it and re-run the sweep")

    def _start_ready(self) -> int:
        """Start what can start; with scheduler dependencies, keep going so that runs waiting on
        runs just submitted are queued behind them now (one `--no-wait` submits the whole sweep)."""
        total = 0
        while True:
            n = self._start_round()
            total += n
            if n == 0 or not self.launcher.scheduler_deps:
                return total

    def _start_round(self) -> int:
        cap = self.launcher.capacity
        free = len(self.order) if cap is None else cap - len(self.handles)
        ready: list[str] = []
        after: dict[str, list[str]] = {}
        for rid in self.order:
            if len(ready) >= free:
                break
            if self.state[rid] != "pending":
                continue
            deps = list(self.runs[rid].deps.values())
            if all(self.state.get(d) == "completed" for d in deps):
                ready.append(rid)
            elif self.launcher.scheduler_deps and all(
                self.state.get(d) == "completed"
                or (self.state.get(d) == "inflight" and self.handles[d].job_id not in ("external", "inline"))
                for d in deps
            ):
                after[rid] = [self.handles[d].job_id for d in deps if self.state.get(d) == "inflight"]
                ready.append(rid)
        if not ready:
            return 0
        tasks = [self._task(rid) for rid in ready]
        for rid in ready:
            self.state[rid] = "inflight"
            if self.launcher.immediate:
                self._mark_running(rid)
        for h in self.launcher.start(tasks, after):
            self.handles[h.rid] = h
            if not self.launcher.immediate:
                rundir.write_status(self.rdir(h.rid), status="queued", job_id=h.job_id)
                self.print(f"[dim]submitted {self.label(h.rid)} ({h.rid}) as job {h.job_id}"
                           + (f" after {', '.join(after[h.rid])}" if after.get(h.rid) else "") + "[/dim]")
        return len(ready)

    def _task(self, rid: str) -> Task:
        r, rdir = self.runs[rid], self.rdir(rid)
        rdir.mkdir(parents=True, exist_ok=True)
        if not (rdir / "config.json").is_file():  # `ingest` can then always read what the run is
            atomic_write_json(rdir / "config.json", r.cfg)
        d = self.defaults
        return Task(rid=rid, run_dir=str(rdir), cfg=r.cfg, device=d.device, data_dir=d.data_dir, workers=d.workers,
                    deps={m: str(self.rdir(did)) for m, did in r.deps.items()}, driver=self.token)

    # ----- progress -------------------------------------------------------------------------
    def _mark_running(self, rid: str, st: dict[str, Any] | None = None) -> None:
        if rid in self._running:
            return
        self._running.add(rid)
        st = st or {}
        self._db(rid, db.set_status, self.engine, rid, "running", started_at=db.now(), error=None,
                 run_dir=str(self.rdir(rid)), **({"device": st["device"]} if st.get("device") else {}))
        if self.prog is not None and len(self._rows) < MAX_ROWS:
            total = int(self.runs[rid].cfg["train"]["epochs"])
            self._rows[rid] = self.prog.add_task(escape(self.short(rid)), total=total, info="")

    def _show(self, rid: str, st: dict[str, Any]) -> None:
        if st.get("status") != "running":
            return
        self._mark_running(rid, st)
        done = int(st.get("epochs_done") or 0)
        if done != self._epochs.get(rid, 0):
            self._epochs[rid] = done
            self._db(rid, db.set_status, self.engine, rid, "running", epochs_done=done)
        row = self._rows.get(rid)
        if row is not None and self.prog is not None:
            info = " ".join(f"{name} {st[k]:.3f}" for k, name in (("val_acc", "val acc"), ("imbalance_ratio", "imb"))
                            if st.get(k) is not None)
            if st.get("step") and st.get("steps"):
                info = f"step {st['step']}/{st['steps']} " + info
            self.prog.update(row, completed=done, total=st.get("epochs_total") or None, info=info)

    def _on_event(self, rid: str, ev: dict[str, Any]) -> None:
        """Progress of a run trained in this process (inline launcher)."""
        if ev["event"] == "epoch":
            val = ev["metrics"].get("val", {})
            self._show(rid, {"status": "running", "epochs_done": ev["epoch"], "epochs_total": ev["epochs"],
                             "val_acc": val.get("acc"), "imbalance_ratio": val.get("imbalance_ratio")})
        else:
            self._show(rid, {"status": "running", "epochs_done": self._epochs.get(rid, 0), "epochs_total": ev["epochs"],
                             "step": ev["step"], "steps": ev["steps"]})

    def _overall(self) -> None:
        running = sum(1 for r in self.handles if r in self._running)
        queued = len(self.handles) - running
        parts = [f"{running} running"] + ([f"{queued} queued"] if queued else [])
        if self.result.failed:
            parts.append(f"[red]{len(self.result.failed)} failed[/red]")
        if self.prog is not None and self.overall is not None:
            self.prog.update(self.overall, info=", ".join(parts))

    # ----- endings -----------------------------------------------------------------------------
    def _drop_row(self, rid: str) -> None:
        row = self._rows.pop(rid, None)
        if row is not None and self.prog is not None:
            self.prog.remove_task(row)

    def _finish(self, rid: str, h: Handle) -> None:
        rdir = self.rdir(rid)
        s = load_summary(rdir)
        if s is None:
            if rundir.lock_held(rdir):  # another process trains it (a second driver): wait for that one
                self.handles[rid] = LockHandle(rid, rdir)
                return
            self._failed(rid, h.ended_why())
            return
        self._ingest(rid)
        self._drop_row(rid)
        if s.get("status") == "completed":
            self.state[rid] = "completed"
            other = rundir.read_status(rdir).get("trained_by") != self.token
            (self.result.by_other if other else self.result.completed).append(rid)
            sel = s.get("selection", "best-val")
            acc = (s.get("finals", {}).get(sel, {}).get("test", {}) or {}).get("acc")
            extra = (f" test acc {100 * acc:.2f} %" + ("" if sel == "best-val" else f" ({sel})")) if acc is not None else ""
            who = " (trained by another process)" if other else ""
            self.print(f"[green]done[/green] {escape(self.short(rid))} [dim]{rid}[/dim]{extra}{who}")
            self._advance()
        else:
            self._failed(rid, str(s.get("error") or "failed"), recorded=True)

    def _failed(self, rid: str, error: str, recorded: bool = False) -> None:
        """`recorded`: the run's summary.json says so (and was ingested); otherwise only the
        database learns it, and the run directory stays as it was, to be resumed."""
        self.state[rid] = "failed"
        self.result.failed[rid] = error
        self._drop_row(rid)
        if not recorded:
            self._db(rid, db.set_status, self.engine, rid, "failed", error=error, finished_at=db.now())
        self.print(f"[red]failed[/red] {self.label(rid)} [dim]{rid}[/dim]: {plain(error)}")
        self._advance()
