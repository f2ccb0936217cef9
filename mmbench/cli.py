"""The `mmbench` command: a thin Typer layer over the library (parse, call, render).

Exit codes: 0 ok; 1 a run or step failed; 2 bad input (the message says what and what to do).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from mmbench.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Experiment runner for balanced multimodal learning.")
console = Console()
err_console = Console(stderr=True)


@app.command()
def prepare(
    dataset: str = typer.Argument(..., help="dataset name (see `mmbench datasets`)"),
    source: Optional[Path] = typer.Option(None, "--source", help="use raw files you already have (the dataset's own layout)"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="where prepared stores go (default $MMBENCH_DATA or ./data)"),
    protocol: Optional[str] = typer.Option(None, "--protocol", help="preprocessing protocol (default: the dataset's)"),
    workers: int = typer.Option(max(1, (os.cpu_count() or 2) // 2), "--workers", min=1, help="parallel decoding workers"),
    force: bool = typer.Option(False, "--force", help="redo even if an up-to-date store exists"),
) -> None:
    """Raw dataset -> verified, preprocessed, fast-to-load store."""
    from mmbench.data.base import DATASETS, PrepareRequest
    from mmbench.data.store import data_root

    builder = DATASETS.get(dataset)
    proto = protocol or builder.default_protocol
    if builder.protocols and proto not in builder.protocols:
        raise UserError(f"unknown protocol '{proto}' for dataset '{dataset}'; choose one of: {', '.join(builder.protocols)}")
    if source is not None and not source.exists():
        raise UserError(f"--source {source}: no such file or folder")
    req = PrepareRequest(data_root(data_dir), proto, source, workers, force)
    res = builder().prepare(req)
    if res.skipped:
        console.print(f"[green]{dataset}/{proto} is already prepared[/green] at {res.store} (nothing to do; --force redoes it)")
        return
    rep = res.report
    tab = Table(title=f"prepared {dataset}/{proto} -> {res.store}", title_justify="left")
    for c in ("split", "expected", "found", "missing", "corrupt"):
        tab.add_column(c, justify="right" if c != "split" else "left")
    for split, c in rep.get("splits", {}).items():
        tab.add_row(split, *(str(c.get(k, "")) for k in ("expected", "found", "missing", "corrupt")))
    console.print(tab)
    if rep.get("seconds") is not None:
        console.print(f"[dim]{rep['seconds']} s; report: {res.store / 'prepare_report.json'}[/dim]")


def _sweep_opts(recipe: Path, sets: Optional[list[str]], db: Optional[str], runs_dir: Optional[Path],
                data_dir: Optional[Path], device: Optional[str], workers: int, dry_run: bool, max_runs: Optional[int] = None):
    from mmbench.sweep.launch import SweepOptions

    return SweepOptions(recipe=recipe, overrides=list(sets or []), db_url=db, runs_dir=runs_dir,
                        data_dir=str(data_dir) if data_dir else None, device=device, workers=workers,
                        dry_run=dry_run, max_runs=max_runs)


def _print_plan(runs: list) -> None:
    from mmbench.config import describe_run

    tab = Table(title=f"{len(runs)} runs", title_justify="left")
    for c in ("#", "run id", "dataset/protocol", "run", "needs"):
        tab.add_column(c)
    for i, r in enumerate(runs, 1):
        c = r.cfg
        needs = ", ".join(r.deps.values()) + ("" if r.requested else " (dependency)")
        tab.add_row(str(i), r.id, f"{c['dataset']['name']}/{c['dataset']['protocol']}", describe_run(c), needs.strip())
    console.print(tab)


SET_HELP = "override a recipe key, value parsed as YAML (repeatable): --set train.epochs=2"


@app.command()
def sweep(
    recipe: Path = typer.Argument(..., help="YAML recipe"),
    sets: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help="list the runs and exit"),
    db: Optional[str] = typer.Option(None, "--db", help="SQLAlchemy URL (default $MMBENCH_DB or sqlite:///results.db)"),
    runs_dir: Optional[Path] = typer.Option(None, "--runs-dir", help="run directories (default $MMBENCH_RUNS or ./runs)"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="prepared stores (default $MMBENCH_DATA or ./data)"),
    device: Optional[str] = typer.Option(None, "--device", help="auto (default), cpu, cuda, cuda:N"),
    workers: int = typer.Option(0, "--workers", min=0, help="data-loader worker processes per run"),
) -> None:
    """Train every (method x setting x seed) run of a recipe; re-run to resume."""
    from mmbench.sweep.launch import run_sweep

    opts = _sweep_opts(recipe, sets, db, runs_dir, data_dir, device, workers, dry_run)
    out = run_sweep(opts, console, on_plan=_print_plan if dry_run else None)
    if dry_run:
        return
    console.print(f"[bold]{out.sweep_name}[/bold]: {out.completed} trained, {out.skipped} already done, {len(out.failed)} failed")
    if out.failed:
        for label, err in out.failed:
            err_console.print(f"[red]failed[/red] {label}: {err}")
        raise typer.Exit(1)


@app.command()
def train(
    recipe: Path = typer.Argument(..., help="YAML recipe that expands to exactly one run"),
    sets: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
    db: Optional[str] = typer.Option(None, "--db"),
    runs_dir: Optional[Path] = typer.Option(None, "--runs-dir"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir"),
    device: Optional[str] = typer.Option(None, "--device"),
    workers: int = typer.Option(0, "--workers", min=0),
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
    opts = _sweep_opts(recipe, sets, db, runs_dir, data_dir, device, workers, False)
    out = run_sweep(opts, console)
    if out.failed:
        err_console.print(f"[red]failed[/red] {out.failed[0][0]}: {out.failed[0][1]}")
        raise typer.Exit(1)


@app.command()
def report(
    compare: bool = typer.Option(False, "--compare", help="comparison table: one row per method and setting"),
    sweep: Optional[str] = typer.Option(None, "--sweep", help="only runs of this sweep (by name)"),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="only this dataset"),
    selection: str = typer.Option("best-val", "--selection", help="best-val | last | oracle-test"),
    fmt: str = typer.Option("table", "--format", help="table | markdown | csv | latex"),
    output: Optional[Path] = typer.Option(None, "--output", help="write to this file instead of the terminal"),
    db: Optional[str] = typer.Option(None, "--db"),
) -> None:
    """Comparison tables from the results database."""
    from mmbench.report.aggregate import compare as do_compare
    from mmbench.report.render import FORMATS, render_text, to_rich
    from mmbench.store.db import get_engine

    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if selection not in ("best-val", "last", "oracle-test"):
        raise UserError(f"--selection {selection}: choose best-val, last or oracle-test")
    engine = get_engine(db, create=False)
    tables = do_compare(engine, sweep, dataset, selection)
    if fmt == "table" and output is None:
        for t in tables:
            console.print(to_rich(t))
        return
    if fmt == "table":
        text_console = Console(record=True, width=200, file=open(os.devnull, "w"))
        for t in tables:
            text_console.print(to_rich(t))
        text = text_console.export_text()
    else:
        text = render_text(tables, fmt)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)
        console.print(f"wrote {output}")
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
        params = ", ".join(f"{k}={f.default!r}" for k, f in cls.HParams.model_fields.items())
        tab.add_row(name, describe(cls), params)
    console.print(tab)


@app.command()
def datasets(data_dir: Optional[Path] = typer.Option(None, "--data-dir")) -> None:
    """List datasets and protocols, with what is prepared here."""
    from mmbench.data.base import DATASETS
    from mmbench.data.store import is_prepared, load_meta

    dd = str(data_dir) if data_dir else None
    tab = Table(title="datasets", title_justify="left")
    for c in ("name", "protocol", "prepared", "train/val/test", "description"):
        tab.add_column(c)
    for name, cls in DATASETS.items():
        for proto, desc in cls.protocols.items():
            ok = is_prepared(name, proto, dd)
            counts = "/".join(str(v) for v in load_meta(name, proto, dd).splits.values()) if ok else ""
            mark = "[green]yes[/green]" if ok else "no"
            tab.add_row(name, proto + (" (default)" if proto == cls.default_protocol else ""), mark, counts, desc)
    console.print(tab)


def main() -> None:
    try:
        rc = app(standalone_mode=False)  # returns the code of a typer.Exit instead of raising it
        if isinstance(rc, int) and rc != 0:
            sys.exit(rc)
    except UserError as e:
        err_console.print(f"[red]error:[/red] {e}", highlight=False, markup=True)
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
                err_console.print(f"error: {e}")
            sys.exit(2 if getattr(e, "exit_code", 1) == 2 else e.exit_code)
        if isinstance(e, Abort):
            sys.exit(130)
        raise


if __name__ == "__main__":
    main()
