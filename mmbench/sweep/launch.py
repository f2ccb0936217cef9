"""Run a sweep's planned runs: skip completed ones, resume interrupted ones, go on past failures.

Everything that can be checked is checked before the first run trains (recipe, data prepared,
method/fusion compatibility, database writable), so bad input costs nothing and writes nothing.
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mmbench import __version__
from mmbench.config import describe_run, load_recipe
from mmbench.data.store import is_prepared, load_meta
from mmbench.engine.device import pick_device
from mmbench.engine.run import execute, ingest_run_dir, load_summary, run_dir_for, run_row
from mmbench.env import git_sha
from mmbench.errors import UserError
from mmbench.methods.base import METHODS, ModelSpec
from mmbench.store import db
from mmbench.store.tables import Sweep
from mmbench.sweep.plan import PlannedRun, plan, sweep_id


def default_runs_dir() -> Path:
    return Path(os.environ.get("MMBENCH_RUNS", "./runs"))


@dataclass
class SweepOptions:
    recipe: Path
    overrides: list[str] = field(default_factory=list)
    db_url: str | None = None
    runs_dir: Path | None = None
    data_dir: str | None = None
    device: str | None = None
    workers: int = 0
    dry_run: bool = False
    max_runs: int | None = None  # train exactly this many at most (`mmbench train` uses 1)


@dataclass
class SweepOutcome:
    planned: list[PlannedRun]
    completed: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    sweep_name: str = ""


def ensure_data(runs: list[PlannedRun], data_dir: str | None, console: Console | None) -> None:
    """Every (dataset, protocol) must be prepared; the embedded synthetic data is generated on the fly."""
    from mmbench.data.base import DATASETS, PrepareRequest
    from mmbench.data.store import data_root

    for ds, proto in sorted({(r.cfg["dataset"]["name"], r.cfg["dataset"]["protocol"]) for r in runs}):
        if is_prepared(ds, proto, data_dir):
            continue
        if ds == "synthetic":
            if console:
                console.print(f"[dim]preparing synthetic/{proto} (embedded, deterministic)[/dim]")
            DATASETS.get(ds)().prepare(PrepareRequest(data_root(data_dir), proto))
            continue
        load_meta(ds, proto, data_dir)  # raises the UserError that says how to prepare


def check_methods(runs: list[PlannedRun], data_dir: str | None) -> None:
    for r in runs:
        c = r.cfg
        meta = load_meta(c["dataset"]["name"], c["dataset"]["protocol"], data_dir)
        spec = ModelSpec(c["model"]["backbone"], c["model"]["fusion"], {m: list(s.shape) for m, s in meta.modalities.items()},
                         len(meta.classes), c["model"]["init"])
        cls = METHODS.get(c["method"]["name"])
        hp = cls.HParams.model_validate({k: v for k, v in c["method"].items() if k != "name"})
        cls.check(spec, hp)


def run_sweep(opts: SweepOptions, console: Console | None = None,
              on_plan: Callable[[list[PlannedRun]], None] | None = None) -> SweepOutcome:
    console = console or Console()
    recipe, _raw = load_recipe(opts.recipe, opts.overrides)
    runs = plan(recipe, str(opts.recipe), opts.data_dir)
    outcome = SweepOutcome(runs, sweep_name=recipe.name)
    if on_plan:
        on_plan(runs)
    if opts.dry_run:
        return outcome
    device = pick_device(opts.device)
    ensure_data(runs, opts.data_dir, console)
    check_methods(runs, opts.data_dir)
    engine = db.get_engine(opts.db_url)
    runs_dir = Path(opts.runs_dir or default_runs_dir())
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"runs dir {runs_dir} cannot be created: {e}; pass --runs-dir") from None
    sid, sha = sweep_id(recipe.name, opts.recipe, opts.overrides)
    db.upsert_sweep(engine, Sweep(id=sid, name=recipe.name, recipe_path=str(opts.recipe), recipe_sha256=sha,
                                  created_at=db.now(), mmbench_version=__version__, git_sha=git_sha(),
                                  host=platform.node(), overrides_json=db.json_dumps(opts.overrides)))
    db.register_runs(engine, sid, [run_row(r.cfg, r.id, run_dir_for(runs_dir, r.id), list(r.deps.values())) for r in runs])

    todo = runs if opts.max_runs is None else runs[: opts.max_runs]
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"), console=console, transient=False,
    ) as prog:
        overall = prog.add_task("runs", total=len(todo), info="")
        current = prog.add_task("epochs", total=1, info="", visible=False)
        for r in todo:
            label = describe_run(r.cfg)
            status = run_one(r, engine, sid, runs_dir, device, opts, prog, current, label)
            if status == "skipped":
                outcome.skipped += 1
            elif status == "completed":
                outcome.completed += 1
            else:
                row = db.get_run(engine, r.id)
                outcome.failed.append((label, (row.error if row else None) or "failed"))
                prog.console.print(f"[red]run failed[/red] {label}: {outcome.failed[-1][1]}")
            prog.advance(overall)
    return outcome


def run_one(r: PlannedRun, engine: Any, sid: str, runs_dir: Path, device: torch.device, opts: SweepOptions,
            prog: Progress | None = None, task: Any = None, label: str = "") -> str:
    """Train one planned run unless it is done; returns 'skipped', 'completed' or 'failed'."""
    rdir = run_dir_for(runs_dir, r.id)
    row = db.get_run(engine, r.id)
    summary = load_summary(rdir)
    if summary is not None and summary.get("status") == "completed":
        if row is None or row.status != "completed":
            ingest_run_dir(engine, rdir, sid)  # finished earlier, database write lost: recover it
        return "skipped"
    if summary is not None:  # failed before: retry from its last checkpoint
        (rdir / "summary.json").unlink()
    deps = {}
    for m, did in r.deps.items():
        dsum = load_summary(run_dir_for(runs_dir, did))
        if dsum is None or dsum.get("status") != "completed":
            db.set_status(engine, r.id, "failed", error=f"dependency {did} (unimodal {m}) did not complete")
            return "failed"
        deps[m] = run_dir_for(runs_dir, did)
    db.set_status(engine, r.id, "running", started_at=db.now(), device=str(device), run_dir=str(rdir), error=None)

    def progress(ev: dict[str, Any]) -> None:
        if prog is None:
            return
        if ev["event"] == "epoch":
            val = ev["metrics"].get("val", {})
            info = " ".join(f"{k}={val[k]:.3f}" for k in ("acc", "imbalance_ratio") if k in val)
            prog.update(task, completed=ev["epoch"], total=ev["epochs"], description=label, info=info, visible=True)
            db.set_status(engine, r.id, "running", epochs_done=ev["epoch"])
        else:
            prog.update(task, total=ev["epochs"], description=f"{label} (epoch {ev['epoch'] + 1}, step {ev['step']}/{ev['steps']})", visible=True)

    summary = execute(r.cfg, r.id, runs_dir, device, opts.data_dir, opts.workers, progress, deps)
    return ingest_run_dir(engine, rdir, sid) or "failed"
