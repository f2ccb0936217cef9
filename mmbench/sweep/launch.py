"""Run a sweep: plan, check, register, then hand the runs to a launcher through the driver.

Everything that can be checked is checked before the first run trains or is submitted (recipe,
launcher options, GPUs, database reachable and writable, data prepared, method/fusion
compatibility), so bad input costs nothing and writes nothing. Completed runs are skipped,
interrupted ones resume, failed ones are retried, and a run's failure never stops the others.
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError
from rich.console import Console

from mmbench import __version__
from mmbench.config import LauncherCfg, describe_run, load_recipe
from mmbench.data.store import check_store, is_prepared, load_meta
from mmbench.engine.device import pick_device
from mmbench.engine.run import run_dir_for, run_row
from mmbench.env import git_sha
from mmbench.errors import UserError
from mmbench.methods.base import METHODS, ModelSpec, TrainSpec
from mmbench.redact import mask_credentials
from mmbench.store import db
from mmbench.store.tables import Sweep
from mmbench.sweep import rundir
from mmbench.sweep.driver import Driver, TaskDefaults
from mmbench.sweep.launcher import Launcher
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
    workers: int | None = None
    dry_run: bool = False
    max_runs: int | None = None  # train at most this many requested runs, with their dependencies (`train`: 1)
    launcher: dict[str, Any] = field(default_factory=dict)  # command-line launcher options, over the recipe's
    wait: bool = True  # False: submit what can go now and return (submitit launchers)
    force: bool = False  # re-train the requested runs from scratch; their database rows are replaced when they end


@dataclass
class SweepOutcome:
    planned: list[PlannedRun]
    completed: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (label, error)
    sweep_name: str = ""
    launcher: str = "local"
    in_flight: int = 0  # still queued or training (after --no-wait)
    waiting: int = 0  # not submitted yet: their dependencies have not finished (after --no-wait)
    db_errors: list[tuple[str, str]] = field(default_factory=list)  # (run id, error): results only in run dirs
    by_other: int = 0  # finished during this sweep, but trained by another process (e.g. an identical sweep)


def ensure_data(runs: list[PlannedRun], data_dir: str | None, console: Console | None) -> None:
    """Every (dataset, protocol) must be prepared; the embedded synthetic data is generated on the fly."""
    from mmbench.data.base import DATASETS, PrepareRequest
    from mmbench.data.store import data_root, writable_data_dir

    for ds, proto in sorted({(r.cfg["dataset"]["name"], r.cfg["dataset"]["protocol"]) for r in runs}):
        if is_prepared(ds, proto, data_dir):
            check_store(ds, proto, data_dir)  # a damaged store is named here, not met mid-training
            continue
        if ds == "synthetic":
            if console:
                console.print(f"[dim]preparing synthetic/{proto} (embedded, deterministic)[/dim]")
            with writable_data_dir(data_root(data_dir)):
                DATASETS.get(ds)().prepare(PrepareRequest(data_root(data_dir), proto))
            continue
        load_meta(ds, proto, data_dir)  # raises the UserError that says how to prepare


def check_stores(runs: list[PlannedRun], data_dir: str | None) -> None:
    """The dry run's share of `ensure_data`: every store already prepared is intact."""
    for ds, proto in sorted({(r.cfg["dataset"]["name"], r.cfg["dataset"]["protocol"]) for r in runs}):
        if is_prepared(ds, proto, data_dir):
            check_store(ds, proto, data_dir)


def check_methods(runs: list[PlannedRun], data_dir: str | None, dry_run: bool = False) -> None:
    """Each method against its model and data. A dry-run does not prepare data: where a store is not
    there yet it checks against the dataset's declared modalities (shapes are not needed to check)."""
    from mmbench.data.base import DATASETS

    for r in runs:
        c = r.cfg
        ds, proto = c["dataset"]["name"], c["dataset"]["protocol"]
        if dry_run and not is_prepared(ds, proto, data_dir):
            shapes: dict[str, list[int]] = {m: [] for m in DATASETS.get(ds).modalities}
            n_classes = 0
        else:
            meta = load_meta(ds, proto, data_dir)
            shapes, n_classes = {m: list(s.shape) for m, s in meta.modalities.items()}, len(meta.classes)
        spec = ModelSpec(c["model"]["backbone"], c["model"]["fusion"], shapes, n_classes, c["model"]["init"])
        cls = METHODS.get(c["method"]["name"])
        hp = cls.HParams.model_validate({k: v for k, v in c["method"].items() if k != "name"})
        cls.check(spec, hp)
        t = c["train"]
        cls.check_train(TrainSpec(t["epochs"], t["optimizer"], t["scheduler"], t["precision"]), hp)


def discard_for_rerun(runs: list[PlannedRun], runs_dir: Path) -> list[str]:
    """`--force`: move each run's directory out of the way (one rename, so an interrupted --force never
    leaves half a run under its id) and delete it; the run then trains from scratch and its database
    rows are replaced in one transaction when it ends (until then the old results stay readable).
    A run another process is training is refused, before anything is moved."""
    busy = [r.id for r in runs if rundir.lock_held(runs_dir / r.id)]
    if busy:
        raise UserError(f"--force: run(s) {', '.join(busy)} are being trained by another process right now; "
                        "wait for it (or stop it), then re-run with --force")
    import shutil
    import time

    moved = []
    for r in runs:
        rdir = runs_dir / r.id
        if not rdir.exists():
            continue
        trash = runs_dir / "_replaced" / f"{r.id}.{time.time_ns()}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        rdir.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
        moved.append(r.id)
    return moved


def resolve_launcher(recipe_cfg: LauncherCfg, overrides: dict[str, Any], where: str) -> LauncherCfg:
    """The recipe's `launcher:` section with the command line's options on top (sbatch options merge)."""
    merged = recipe_cfg.model_dump()
    for k, v in overrides.items():
        if v is not None:
            merged[k] = {**merged.get("sbatch", {}), **v} if k == "sbatch" else v
    try:
        return LauncherCfg.model_validate(merged)
    except ValidationError as e:
        lines = [f"{where}: invalid launcher options"]
        for err in e.errors():
            loc = "launcher." + ".".join(str(x) for x in err["loc"])
            lines.append(f"  - {loc}: {err['msg']}; got {err.get('input')!r}")
        raise UserError("\n".join(lines)) from None


def check_launcher(cfg: LauncherCfg, opts: SweepOptions) -> None:
    """What build_launcher checks, without starting anything (for --dry-run)."""
    if cfg.name == "local":
        from mmbench.sweep.local import slot_devices

        if not opts.wait:
            raise UserError("--no-wait needs a launcher whose jobs outlive this command: --launcher slurm or local-submitit")
        slot_devices(cfg, "auto" if cfg.gpus else str(pick_device(opts.device)))
        return
    from mmbench.sweep.slurm import check

    if cfg.gpus:
        raise UserError(f"--gpus places local runs; with --launcher {cfg.name} use --gpus-per-job instead")
    check(cfg)


def build_launcher(cfg: LauncherCfg, opts: SweepOptions, runs_dir: Path, sweep_name: str) -> Launcher:
    if cfg.name == "local":
        from mmbench.sweep.local import make_local

        if not opts.wait:
            raise UserError("--no-wait needs a launcher whose jobs outlive this command: --launcher slurm or local-submitit")
        device = "auto" if cfg.gpus else str(pick_device(opts.device))
        return make_local(cfg, device)
    from mmbench.sweep.slurm import SubmititLauncher

    if cfg.gpus:
        raise UserError(f"--gpus places local runs; with --launcher {cfg.name} use --gpus-per-job instead")
    folder = Path(cfg.folder) if cfg.folder else runs_dir / "_submitit"
    return SubmititLauncher(cfg, folder.resolve(), f"mmbench-{sweep_name}", opts.device or "auto")


def with_dependencies(runs: list[PlannedRun], chosen: list[PlannedRun]) -> list[PlannedRun]:
    """`chosen` and the runs they depend on, in plan order (dependencies first)."""
    want = {r.id for r in chosen}
    want |= {d for r in chosen for d in r.deps.values()}
    return [r for r in runs if r.id in want]


def run_sweep(opts: SweepOptions, console: Console | None = None,
              on_plan: Callable[[list[PlannedRun]], None] | None = None) -> SweepOutcome:
    console = console or Console()
    recipe, _raw = load_recipe(opts.recipe, opts.overrides)
    lcfg = resolve_launcher(recipe.launcher, opts.launcher, str(opts.recipe))
    runs = plan(recipe, str(opts.recipe), opts.data_dir)
    outcome = SweepOutcome(runs, sweep_name=recipe.name, launcher=lcfg.name)
    runs_dir = Path(opts.runs_dir or default_runs_dir()).resolve()
    if opts.dry_run:  # every check a real run makes before training, writing nothing
        check_launcher(lcfg, opts)
        db.check_url(opts.db_url)
        check_stores(runs, opts.data_dir)
        check_methods(runs, opts.data_dir, dry_run=True)
        if on_plan:
            on_plan(runs)
        for ds, proto in sorted({(r.cfg["dataset"]["name"], r.cfg["dataset"]["protocol"]) for r in runs}):
            if ds != "synthetic" and not is_prepared(ds, proto, opts.data_dir):  # synthetic is generated on the fly
                console.print(f"[yellow]{ds}/{proto} is not prepared yet[/yellow]: the sweep needs "
                              f"`mmbench prepare {ds} --protocol {proto}` first", highlight=False)
        return outcome
    if on_plan:
        on_plan(runs)
    launcher = build_launcher(lcfg, opts, runs_dir, recipe.name)
    db.check_url(opts.db_url)  # before data is prepared: bad input writes nothing
    ensure_data(runs, opts.data_dir, console)
    check_methods(runs, opts.data_dir)
    engine = db.get_engine(opts.db_url)
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"runs dir {runs_dir} cannot be created: {e}; pass --runs-dir") from None

    sid, sha = sweep_id(recipe.name, opts.recipe, opts.overrides)
    sweep = Sweep(id=sid, name=recipe.name, recipe_path=mask_credentials(str(opts.recipe)), recipe_sha256=sha,
                  created_at=db.now(), mmbench_version=__version__, git_sha=git_sha(), host=platform.node(),
                  overrides_json=mask_credentials(db.json_dumps(opts.overrides)))  # also in the runs dir manifest
    rundir.write_sweep_manifest(runs_dir, sweep.model_dump(mode="json"), [r.id for r in runs])
    try:
        db.upsert_sweep(engine, sweep)
        db.register_runs(engine, sid, [run_row(r.cfg, r.id, run_dir_for(runs_dir, r.id), list(r.deps.values()))
                                       for r in runs])
    except SQLAlchemyError as e:
        raise UserError(mask_credentials(f"cannot write to the database {opts.db_url or db.default_db_url()}: "
                                         f"{e.__class__.__name__}: {str(e).splitlines()[0]}; nothing was trained, "
                                         "re-run when it is writable")) from None

    todo = runs
    if opts.max_runs is not None:
        todo = with_dependencies(runs, [r for r in runs if r.requested][: opts.max_runs])
    if opts.force:
        chosen = [r for r in todo if r.requested]
        n = len(discard_for_rerun(chosen, runs_dir))
        console.print(f"[dim]--force: re-training {len(chosen)} run(s) from scratch ({n} had results; their database "
                      "rows are replaced when each ends)[/dim]")
    defaults = TaskDefaults(device=opts.device or "auto", data_dir=opts.data_dir, workers=opts.workers)
    res = Driver(todo, launcher, engine, sid, runs_dir, defaults, console, wait=opts.wait).run()
    by_id = {r.id: r for r in runs}
    outcome.completed, outcome.skipped = len(res.completed), len(res.skipped)
    outcome.by_other = len(res.by_other)
    outcome.failed = [(describe_run(by_id[rid].cfg), err) for rid, err in res.failed.items()]
    outcome.in_flight, outcome.waiting = len(res.in_flight), len(res.waiting)
    outcome.db_errors = list(res.db_errors.items())
    return outcome
