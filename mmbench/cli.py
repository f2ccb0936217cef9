"""The `mmbench` command: a thin Typer layer over the library (parse, call, render).

Exit codes: 0 ok; 1 a run or step failed; 2 bad input (the message says what and what to do).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mmbench.errors import UserError
from mmbench.redact import plain

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Experiment runner for balanced multimodal learning.")
console = Console()
err_console = Console(stderr=True)


def _flags_without_type() -> None:
    """An on/off flag takes no value, so its help shows no `<bool>` type (typer shows one for every option)."""
    from typer import core

    show = getattr(core.TyperOption, "display_type_rich", None)
    if show is None or getattr(show, "_mmbench", False):
        return

    def display_type_rich(self, ctx):  # type: ignore[no-untyped-def]
        return None if getattr(self, "is_flag", False) and self.metavar is None else show(self, ctx)

    display_type_rich._mmbench = True  # type: ignore[attr-defined]
    core.TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_flags_without_type()

# the same help for the same option on every command
DB_HELP = "results database, an SQLAlchemy URL (default $MMBENCH_DB or sqlite:///results.db); a missing folder is created"
RUNS_HELP = "folder of the run directories (default $MMBENCH_RUNS or ./runs)"
DATA_HELP = "folder of the prepared datasets (default $MMBENCH_DATA or ./data)"
DEVICE_HELP = "auto (default: CUDA when present), cpu, cuda or cuda:N"
THREADS_HELP = ("torch threads per run (recorded with the run; same run id). Default: the recipe's train.threads, "
                "else cores / --jobs with --jobs, else torch's default")
FORCE_HELP = "re-train the selected runs from scratch; their database rows are replaced when each ends"


def _version(value: bool) -> None:
    if value:
        from mmbench import __version__

        console.print(f"mmbench {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print the version and exit")) -> None:
    """Experiment runner for balanced multimodal learning."""


def _prepare_help() -> str:
    from mmbench.data.layouts import SOURCE_LAYOUTS, SPLIT_LISTS

    lines = ["Raw dataset -> verified, preprocessed, fast-to-load store.", "",
             "--source DIR uses raw files you already have instead of downloading; accepted layouts:", ""]
    lines += [f"{name}: {text}" for name, text in SOURCE_LAYOUTS.items()]
    return "\n\n".join(lines[:3]) + "\n\n" + "\n\n".join(lines[4:]) + f"\n\n({SPLIT_LISTS})"


@app.command(help=_prepare_help())
def prepare(
    dataset: str = typer.Argument(..., help="dataset name (see `mmbench datasets`)"),
    source: Optional[Path] = typer.Option(None, "--source", help="use raw files you already have (layouts: see above)"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help=DATA_HELP),
    protocol: Optional[str] = typer.Option(None, "--protocol", help="preprocessing protocol (default: the dataset's)"),
    workers: int = typer.Option(max(1, (os.cpu_count() or 2) // 2), "--workers", min=1, help="parallel decoding workers"),
    force: bool = typer.Option(False, "--force", help="redo even if an up-to-date store exists"),
    no_verify: bool = typer.Option(False, "--no-verify", help="keep files whose checksum differs from the canonical "
                                   "one (re-encoded or resampled copies): counted and recorded, the store and every "
                                   "run on it marked unverified"),
) -> None:
    from mmbench.data.base import DATASETS, PrepareRequest
    from mmbench.data.store import data_root, writable_data_dir

    builder = DATASETS.get(dataset)
    proto = protocol or builder.default_protocol
    if builder.protocols and proto not in builder.protocols:
        raise UserError(f"unknown protocol '{proto}' for dataset '{dataset}'; choose one of: {', '.join(builder.protocols)}")
    if source is not None and not source.exists():
        raise UserError(f"--source {source}: no such file or folder")
    req = PrepareRequest(data_root(data_dir), proto, source, workers, force, {"verify": False} if no_verify else {})
    with writable_data_dir(req.data_dir):
        res = builder().prepare(req)
    if res.skipped:
        console.print(f"[green]{plain(dataset)}/{plain(proto)} is already prepared[/green] at {plain(res.store)} (nothing to do; --force redoes it)")
        return
    _print_prepare_report(dataset, proto, res.store, res.report)


def _print_prepare_report(dataset: str, proto: str, store: Path, rep: dict) -> None:
    """The summary a user needs to trust a store: counts per split, why items are out, size, speed."""
    cols = ("expected", "found", "missing", "corrupt", "stored")
    tab = Table(title=plain(f"prepared {dataset}/{proto} -> {store}"), title_justify="left")
    tab.add_column("split")
    for c in cols:
        tab.add_column(c, justify="right")
    tab.add_column("why not stored")
    for split, c in rep.get("splits", {}).items():
        why = ", ".join(f"{n} {r}" for r, n in sorted(rep.get("reasons", {}).get(split, {}).items(), key=lambda x: -x[1]))
        stored = c.get("stored", c.get("found", 0) - c.get("corrupt", 0))
        tab.add_row(plain(split), *(str(c.get(k, "")) for k in cols[:-1]), str(stored), plain(why))
    console.print(tab)
    from mmbench.data.pipeline import reason_lines

    out = rep.get("missing", []) + rep.get("corrupt", [])
    if out:
        console.print(f"[yellow]{len(out)} listed items are not in the store[/yellow] (all of them: \"missing\" and "
                      f"\"corrupt\" in the report); runs record the stored counts", highlight=False)
        console.print(escape("\n".join(reason_lines(out))), highlight=False)
    if rep.get("verified") is False:
        console.print(f"[yellow]unverified:[/yellow] {rep.get('checksum_mismatches')} stored items differ from the "
                      "canonical files (--no-verify); the store and every run trained on it are marked unverified",
                      highlight=False)
        console.print(escape("\n".join(reason_lines(rep.get("unverified", [])))), highlight=False)
    prm = rep.get("params", {})
    a, v = prm.get("audio", {}), prm.get("visual", {})
    if a or v:
        desc = []
        if a:
            desc.append(f"audio {a.get('features')} at {a.get('sample_rate')} Hz (resampler {a.get('resampler')}), {a.get('dtype')}")
        if v:
            desc.append(f"visual {v.get('frames', 1)} frame(s) {v.get('size')}x{v.get('size')} ({v.get('rule', v.get('features'))})")
        console.print(f"[dim]{plain('; '.join(desc))}; split {plain(prm.get('split'))}[/dim]")
    parts = []
    if rep.get("store_bytes") is not None:
        parts.append(f"store {rep['store_bytes'] / 1e9:.2f} GB")
    if rep.get("seconds") is not None:
        parts.append(f"{rep['seconds']} s")
    if rep.get("items_per_second"):
        parts.append(f"{rep['items_per_second']} clips/s with {rep.get('workers', 1)} workers")
    parts.append(f"report: {store / 'prepare_report.json'}")
    console.print("[dim]" + plain("; ".join(parts)) + "[/dim]")


def _sweep_opts(recipe: Path, sets: Optional[list[str]], db: Optional[str], runs_dir: Optional[Path],
                data_dir: Optional[Path], device: Optional[str], workers: Optional[int], dry_run: bool, max_runs: Optional[int] = None,
                launcher: Optional[dict] = None, wait: bool = True, force: bool = False, threads: Optional[int] = None):
    from mmbench.sweep.launch import SweepOptions

    overrides = list(sets or []) + ([f"train.threads={threads}"] if threads is not None else [])
    return SweepOptions(recipe=recipe, overrides=overrides, db_url=db, runs_dir=runs_dir,
                        data_dir=str(data_dir) if data_dir else None, device=device, workers=workers,
                        dry_run=dry_run, max_runs=max_runs, launcher=launcher or {}, wait=wait, force=force)


def _print_plan(runs: list) -> None:
    from mmbench.config import describe_run

    tab = Table(title=f"{len(runs)} runs", title_justify="left")
    for c in ("#", "run id", "dataset/protocol", "run", "needs"):
        tab.add_column(c)
    for i, r in enumerate(runs, 1):
        c = r.cfg
        needs = ", ".join(r.deps.values()) + ("" if r.requested else " (dependency)")
        tab.add_row(str(i), r.id, plain(f"{c['dataset']['name']}/{c['dataset']['protocol']}"), plain(describe_run(c)), needs.strip())
    console.print(tab)


SET_HELP = "override a recipe key, value parsed as YAML (repeatable): --set train.epochs=2"


def _launcher_opts(launcher: Optional[str], jobs: Optional[int], gpus: Optional[str], jobs_per_gpu: Optional[int],
                   partition: Optional[str], time: Optional[str], gpus_per_job: Optional[int], cpus_per_job: Optional[int],
                   mem_gb: Optional[float], array_parallelism: Optional[int], sbatch: Optional[list[str]]) -> dict:
    """Command-line launcher options -> fields of the recipe's `launcher:` section (they win over it)."""
    import yaml

    if launcher is not None and launcher not in ("local", "slurm", "local-submitit"):
        raise UserError(f"--launcher {launcher}: choose local, slurm or local-submitit")
    for flag, v in (("--jobs", jobs), ("--jobs-per-gpu", jobs_per_gpu), ("--array-parallelism", array_parallelism),
                    ("--cpus-per-job", cpus_per_job)):
        if v is not None and v < 1:
            raise UserError(f"{flag} {v}: must be at least 1")
    if gpus_per_job is not None and gpus_per_job < 0:
        raise UserError(f"--gpus-per-job {gpus_per_job}: must be 0 or more")
    out: dict = {}
    if gpus is not None:
        try:
            out["gpus"] = [int(x) for x in gpus.split(",") if x.strip() != ""]
        except ValueError:
            raise UserError(f"--gpus {gpus}: expected comma-separated GPU ids, e.g. --gpus 0,1") from None
    extra = {}
    for item in sbatch or []:
        if "=" not in item:
            raise UserError(f"--sbatch {item}: expected KEY=VALUE, e.g. --sbatch account=myproj (or --sbatch exclusive=true)")
        k, v = item.split("=", 1)
        extra[k.strip().lstrip("-")] = yaml.safe_load(v) if v.strip() else v
    if extra:
        out["sbatch"] = extra
    time_v = None if time is None else (int(time) if time.strip().isdigit() else time)
    for k, v in (("name", launcher), ("jobs", jobs), ("jobs_per_gpu", jobs_per_gpu), ("partition", partition),
                 ("time", time_v), ("gpus_per_job", gpus_per_job), ("cpus_per_job", cpus_per_job), ("mem_gb", mem_gb),
                 ("array_parallelism", array_parallelism)):
        if v is not None:
            out[k] = v
    return out


@app.command()
def sweep(
    recipe: Path = typer.Argument(..., help="YAML recipe"),
    sets: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help="list the runs and exit"),
    db: Optional[str] = typer.Option(None, "--db", help=DB_HELP),
    runs_dir: Optional[Path] = typer.Option(None, "--runs-dir", help=RUNS_HELP),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help=DATA_HELP),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
    workers: Optional[int] = typer.Option(None, "--workers", min=0,
                                          help="data-loader worker processes per run (default: 4 on a GPU, 0 on a CPU)"),
    launcher: Optional[str] = typer.Option(None, "--launcher", help="local (default) | slurm | local-submitit"),
    jobs: Optional[int] = typer.Option(None, "--jobs", help="runs at once (local: worker processes; local-submitit: jobs)"),
    gpus: Optional[str] = typer.Option(None, "--gpus", help="local: GPU ids to place runs on, e.g. 0,1,2,3"),
    jobs_per_gpu: Optional[int] = typer.Option(None, "--jobs-per-gpu", help="local: runs sharing each GPU (default 1)"),
    partition: Optional[str] = typer.Option(None, "--partition", help="slurm: partition (required for slurm)"),
    time: Optional[str] = typer.Option(None, "--time", help="slurm: time limit per job, minutes or SLURM format (2:00:00)"),
    gpus_per_job: Optional[int] = typer.Option(None, "--gpus-per-job", help="slurm: GPUs per job (default 1)"),
    cpus_per_job: Optional[int] = typer.Option(None, "--cpus-per-job", help="slurm: CPUs per job"),
    mem_gb: Optional[float] = typer.Option(None, "--mem-gb", help="slurm: memory per job (GB)"),
    array_parallelism: Optional[int] = typer.Option(None, "--array-parallelism", help="slurm: array tasks running at once"),
    sbatch: Optional[list[str]] = typer.Option(None, "--sbatch", help="slurm: extra sbatch option KEY=VALUE (repeatable)"),
    no_wait: bool = typer.Option(False, "--no-wait", help="submit and return; re-run the same command to collect and resume"),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help=THREADS_HELP),
) -> None:
    """Train every (method x setting x seed) run of a recipe; re-run to resume."""
    from mmbench.sweep.launch import run_sweep

    lopts = _launcher_opts(launcher, jobs, gpus, jobs_per_gpu, partition, time, gpus_per_job, cpus_per_job, mem_gb,
                           array_parallelism, sbatch)
    opts = _sweep_opts(recipe, sets, db, runs_dir, data_dir, device, workers, dry_run, launcher=lopts, wait=not no_wait,
                       force=force, threads=threads)
    out = run_sweep(opts, console, on_plan=_print_plan if dry_run else None)
    if dry_run:
        return
    line = f"[bold]{plain(out.sweep_name)}[/bold]: {out.completed} trained"
    if out.by_other:
        line += f", {out.by_other} trained meanwhile by another process (e.g. the same sweep started twice)"
    line += f", {out.skipped} already done, {len(out.failed)} failed"
    if out.in_flight or out.waiting:
        line += f", {out.in_flight} queued or training, {out.waiting} waiting for dependencies"
    console.print(line)
    if out.in_flight or out.waiting:
        console.print("re-run the same `mmbench sweep` command to collect finished runs and submit the rest "
                      "(`mmbench runs` shows progress)")
    if out.db_errors:
        from mmbench.sweep.launch import default_runs_dir

        where = opts.runs_dir or default_runs_dir()
        err_console.print(f"[yellow]{len(out.db_errors)} finished run(s) are not in the database[/yellow] "
                          f"({plain(out.db_errors[0][1])}); their results are safe: `mmbench ingest {plain(where)}` writes them")
    if out.failed:
        for label, err in out.failed:
            err_console.print(f"[red]failed[/red] {plain(label)}: {plain(err)}", highlight=False)
    if out.failed or out.db_errors:
        raise typer.Exit(1)


@app.command()
def train(
    recipe: Path = typer.Argument(..., help="YAML recipe that expands to exactly one run"),
    sets: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
    db: Optional[str] = typer.Option(None, "--db", help=DB_HELP),
    runs_dir: Optional[Path] = typer.Option(None, "--runs-dir", help=RUNS_HELP),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help=DATA_HELP),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="data-loader workers (default: 4 on a GPU, 0 on a CPU)"),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help=THREADS_HELP),
) -> None:
    """Train exactly one run (errors if the recipe expands to more)."""
    from mmbench.config import load_recipe
    from mmbench.sweep.launch import run_sweep
    from mmbench.sweep.plan import plan

    rec, _ = load_recipe(recipe, sets)
    runs = plan(rec, str(recipe), str(data_dir) if data_dir else None)
    requested = [r for r in runs if r.requested]
    if len(requested) != 1:
        raise UserError(f"{recipe}: expands to {len(requested)} runs; `mmbench train` runs exactly one. "
                        "Narrow it with --set (e.g. --set methods=[joint] --set seeds=[0]) or use `mmbench sweep`.")
    opts = _sweep_opts(recipe, sets, db, runs_dir, data_dir, device, workers, False, max_runs=1, force=force,
                       threads=threads)
    out = run_sweep(opts, console)
    if out.failed:
        err_console.print(f"[red]failed[/red] {plain(out.failed[0][0])}: {plain(out.failed[0][1])}", highlight=False)
        raise typer.Exit(1)


@app.command()
def ingest(
    path: Path = typer.Argument(..., help="a runs dir (e.g. ./runs) or one run's directory"),
    db: Optional[str] = typer.Option(None, "--db", help=DB_HELP),
) -> None:
    """Fill the database from run directories; idempotent, so safe to repeat (recovers lost writes)."""
    from sqlalchemy.exc import SQLAlchemyError

    from mmbench.store.db import get_engine
    from mmbench.sweep.ingest import ingest_path, run_dirs

    run_dirs(path)  # bad input first, before a database file is created
    engine = get_engine(db)
    try:
        rep = ingest_path(engine, path)
    except SQLAlchemyError as e:
        err_console.print(f"[red]database write failed[/red]: {e.__class__.__name__}: {plain(str(e).splitlines()[0])}; "
                          "nothing was half-written (one transaction per run); retry when the database is reachable")
        raise typer.Exit(1)
    c = rep.counts
    line = (f"ingested {sum(c.values())} run(s) from {path}: {c['completed']} completed, {c['failed']} failed, "
            f"{c['unfinished']} unfinished")
    if rep.sweeps:
        line += f" (sweeps: {', '.join(sorted(set(rep.sweeps)))})"
    console.print(plain(line))


@app.command("runs")
def runs_cmd(
    sweep: Optional[str] = typer.Option(None, "--sweep", help="only runs of this sweep (by name)"),
    status: Optional[str] = typer.Option(None, "--status", help="pending | running | completed | failed"),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="only this dataset"),
    db: Optional[str] = typer.Option(None, "--db", help=DB_HELP),
) -> None:
    """List runs with status, progress (epochs done/total), error and run directory."""
    from mmbench.report.runs import list_runs, runs_table
    from mmbench.store.db import get_engine

    engine = get_engine(db, create=False)
    rows = list_runs(engine, sweep, status, dataset)
    what = " ".join(x for x in (status or "", "runs", f"of sweep {sweep}" if sweep else "",
                                f"on {dataset}" if dataset else "") if x)
    if not rows:
        console.print(f"no {plain(what)}")
        return
    console.print(runs_table(rows, plain(f"{len(rows)} {what}"), width=console.width))


@app.command()
def report(
    compare: bool = typer.Option(False, "--compare", help="comparison table: one row per method and setting (default)"),
    sweep: Optional[str] = typer.Option(None, "--sweep", help="only runs of this sweep (by name)"),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="only this dataset"),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="method (or label) to compare to, paired over seeds"),
    metric: Optional[list[str]] = typer.Option(None, "--metric", help="column(s) to show, repeatable; wildcards: 'acc/*'"),
    selection: str = typer.Option("best-val", "--selection", help="best-val | last | oracle-test"),
    split: str = typer.Option("test", "--split", help="test | val"),
    ci: bool = typer.Option(False, "--ci", help="show 95 % confidence intervals instead of standard deviations"),
    fmt: str = typer.Option("table", "--format", help="table | markdown | csv | latex | html"),
    plot: Optional[str] = typer.Option(None, "--plot", help="curves | bar: write a figure to --output"),
    output: Optional[Path] = typer.Option(None, "--output", help="write to this file instead of the terminal"),
    reference: Optional[Path] = typer.Option(None, "--reference", help="YAML of published numbers: adds a gap table per dataset"),
    db: Optional[str] = typer.Option(None, "--db", help=DB_HELP),
) -> None:
    """Comparison tables and figures from the results database (works while a sweep still runs)."""
    from mmbench.report.aggregate import compare as do_compare
    from mmbench.report.render import FORMATS, render_text, to_rich
    from mmbench.store.db import get_engine

    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if selection not in ("best-val", "last", "oracle-test"):
        raise UserError(f"--selection {selection}: choose best-val, last or oracle-test")
    if split not in ("test", "val"):
        raise UserError(f"--split {split}: choose test or val")
    interval = "ci" if ci else "std"
    ref = None
    if reference is not None:
        from mmbench.report import reference as refmod

        if plot is not None or fmt not in refmod.REFERENCE_FORMATS:
            raise UserError(f"--reference adds a table: use it with --format {', '.join(refmod.REFERENCE_FORMATS)}, without --plot")
        ref = refmod.load_reference(reference)
    if plot is not None:
        from mmbench.report import plots

        if plot not in plots.PLOTS:
            raise UserError(f"--plot {plot}: choose one of {', '.join(plots.PLOTS)}")
        if output is None:
            raise UserError(f"--plot {plot} writes an image: pass --output FILE.png")
        plots.check_output(output)
        engine = get_engine(db, create=False)
        if plot == "curves":
            files = plots.curves(engine, output, sweep, dataset, metric, split)
        else:
            files = plots.bar(do_compare(engine, sweep, dataset, selection, metric, split, baseline), output)
        for f in files:
            console.print(f"wrote {plain(f)}")
        return
    engine = get_engine(db, create=False)
    tables = do_compare(engine, sweep, dataset, selection, metric, split, baseline)
    gaps = refmod.gap_tables(tables, ref) if ref is not None else []
    if fmt == "table" and output is None:
        for t in tables:
            console.print(to_rich(t, interval, width=console.width, droppable=not metric))
        for g in gaps:
            console.print(refmod.to_rich(g))
        return
    if fmt == "table":
        text_console = Console(record=True, width=200, file=open(os.devnull, "w"))
        for t in tables:
            text_console.print(to_rich(t, interval))
        for g in gaps:
            text_console.print(refmod.to_rich(g))
        text = text_console.export_text()
    else:
        text = render_text(tables, fmt, interval)
        if gaps:
            text += "\n" + (refmod.to_csv(gaps) if fmt == "csv" else "\n".join(refmod.to_markdown(g) for g in gaps))
    if output is not None:
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(text)
        except OSError as e:
            raise UserError(f"--output {output}: cannot write {e.filename or output} ({e.strerror or e}); "
                            "pass --output a path in a folder you can write to") from None
        console.print(f"wrote {plain(output)}")
    else:
        sys.stdout.write(text)


@app.command()
def methods() -> None:
    """List the training methods, with their parameters."""
    from mmbench.methods.base import METHODS
    from mmbench.registry import describe

    tab = Table(title="methods", title_justify="left")
    tab.add_column("name", style="bold")
    tab.add_column("description")
    tab.add_column("parameters (default)")
    for name, cls in METHODS.items():
        params = ", ".join(f"{k}=" + ("required" if f.is_required() else repr(f.get_default(call_default_factory=True)))
                           for k, f in cls.HParams.model_fields.items())
        tab.add_row(name, escape(describe(cls)), escape(params))
    console.print(tab)


@app.command()
def datasets(data_dir: Optional[Path] = typer.Option(None, "--data-dir", help=DATA_HELP)) -> None:
    """List datasets and protocols, with what is prepared here."""
    from mmbench.data.base import DATASETS
    from mmbench.data.store import is_prepared, load_meta

    dd = str(data_dir) if data_dir else None
    narrow = console.width < 120
    tab = Table(title="datasets", title_justify="left",
                caption="*: default protocol; unverified: prepared with --no-verify from files that differ from the "
                        "canonical ones" if narrow else None, caption_justify="left")
    cols = ("dataset/protocol", "prepared", "description") if narrow else \
        ("name", "protocol", "prepared", "train/val/test", "description")
    for c in cols:
        tab.add_column(c, overflow="fold", **({"no_wrap": True} if c == "dataset/protocol" else {}))
    for name, cls in DATASETS.items():
        for proto, desc in cls.protocols.items():
            ok = is_prepared(name, proto, dd)
            try:
                counts = "/".join(str(v) for v in load_meta(name, proto, dd).splits.values()) if ok else ""
                mark = ("[green]yes[/green]" + (" [yellow]unverified[/yellow]" if _unverified_store(name, proto, dd) else "")
                        if ok else "no")
            except UserError:  # an unreadable meta.json: say so here, `prepare` rebuilds it
                counts, mark = "", "[red]damaged[/red] (prepare --force)"
            default = proto == cls.default_protocol
            if narrow:
                tab.add_row(f"{name}/{proto}" + ("*" if default else ""), mark + (f"\n{counts}" if counts else ""),
                            escape(desc))
            else:
                tab.add_row(name, proto + (" (default)" if default else ""), mark, counts, escape(desc))
    console.print(tab)


def _unverified_store(dataset: str, protocol: str, data_dir: Optional[str]) -> bool:
    from mmbench.engine.run import data_verification

    return data_verification(dataset, protocol, data_dir).get("verified") is False


@app.command()
def doctor() -> None:
    """Check that this environment works: versions, and that each native extension really loads."""
    from mmbench import doctor as doc

    checks = doc.run_checks()
    tab = Table(title="mmbench environment", title_justify="left")
    for c in ("component", "status", "version", "details"):
        tab.add_column(c, overflow="fold")
    for c in checks:
        facts = dict(c.facts)
        ver = str(facts.pop("version", ""))
        if c.name == "torch" and c.ok:
            devs = facts.get("devices") or []
            facts = {"CUDA build": facts.get("cuda_build") or "none (CPU build)",
                     "CUDA devices": ", ".join(devs) if devs else "none (runs on CPU)", "threads": facts.get("threads")}
        details = c.error if not c.ok else "; ".join(f"{k} {v}" for k, v in facts.items())
        tab.add_row(c.name, "[green]ok[/green]" if c.ok else "[red]FAILED[/red]", escape(ver), escape(details))
    console.print(tab)
    lock = doc.find_lock()
    drift = doc.lock_drift(lock)
    if drift:
        shown = ", ".join(f"{n} {have} (locked {want})" for n, want, have in drift[:8])
        more = f" and {len(drift) - 8} more" if len(drift) > 8 else ""
        console.print(f"[yellow]differs from {lock}[/yellow]: {escape(shown)}{more}; "
                      "`rm -rf .venv && make venv` installs exactly the locked set", highlight=False)
    elif lock is not None:
        console.print(f"[dim]installed versions match {lock}[/dim]")
    bad = [c for c in checks if not c.ok]
    for c in bad:
        err_console.print(f"[red]{c.name} does not work[/red]: {escape(c.error)}\n  what to do: {escape(doc.fix_for(c))}",
                          highlight=False)
    if bad:
        raise typer.Exit(2)
    console.print("[green]all components load and work[/green]")


def main() -> None:
    try:
        rc = app(standalone_mode=False)  # returns the code of a typer.Exit instead of raising it
        if isinstance(rc, int) and rc != 0:
            sys.exit(rc)
    except UserError as e:
        err_console.print(f"[red]error:[/red] {plain(e)}", highlight=False)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted; re-run the same command to resume")
        sys.exit(130)
    except Exception as e:  # usage errors from the CLI parser
        from typer.exceptions import Abort, TyperException

        if isinstance(e, TyperException):
            if hasattr(e, "show"):
                e.show()
            else:
                err_console.print(f"error: {plain(e)}", highlight=False)
            sys.exit(2 if getattr(e, "exit_code", 1) == 2 else e.exit_code)
        if isinstance(e, Abort):  # Ctrl-C inside a command arrives as the parser's Abort
            err_console.print("interrupted; re-run the same command to resume")
            sys.exit(130)
        raise


if __name__ == "__main__":
    main()
