"""`mmbench runs`: what every run is doing, from the database (status, progress, error, where its
files are), so a failed or stuck run can be found without opening run directories."""
from __future__ import annotations

import os
from pathlib import Path

from rich.markup import escape
from rich.table import Table
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from mmbench.errors import UserError
from mmbench.redact import mask_credentials
from mmbench.store import db
from mmbench.store.tables import Run, Sweep

STATUSES = ("pending", "running", "completed", "failed")
STYLE = {"completed": "green", "failed": "red", "running": "yellow", "pending": "dim"}


def list_runs(engine: Engine, sweep: str | None = None, status: str | None = None, dataset: str | None = None) -> list[Run]:
    if status is not None and status not in STATUSES:
        raise UserError(f"--status {status}: choose one of {', '.join(STATUSES)}")
    if sweep is not None:
        with Session(engine) as s:
            known = sorted(set(s.exec(select(Sweep.name)).all()))
        if sweep not in known:
            raise UserError(f"no sweep named '{sweep}' in the database; known: {', '.join(known) or '(none)'}")
    return db.runs_of(engine, sweep, dataset, status)


def progress(r: Run) -> str:
    total = r.epochs_total if r.epochs_total is not None else "?"
    return f"{r.epochs_done}/{total}"


def short_path(p: str | None) -> str:
    """Relative to the working directory when inside it (the usual ./runs/<id>), else as stored."""
    if not p:
        return ""
    try:
        rel = Path(p).resolve().relative_to(Path.cwd().resolve())
    except (ValueError, OSError):
        return p
    return os.path.join(".", str(rel))


def runs_table(runs: list[Run], title: str, error_width: int = 60, width: int | None = None) -> Table:
    """All columns on a wide terminal; below 120 columns the run directory, wall time and (when all
    runs share it) the dataset go (said in the caption), the label folds, and errors get the rest."""
    if width is not None and width < 120:
        return _narrow_table(runs, title, width)
    tab = Table(title=title, title_justify="left")
    for c, kw in (("run id", {"no_wrap": True}), ("run", {}), ("dataset/protocol", {}), ("seed", {"justify": "right"}),
                  ("status", {}), ("epochs", {"justify": "right"}), ("wall s", {"justify": "right"}), ("error", {}),
                  ("run dir", {"overflow": "fold"})):
        tab.add_column(c, **kw)
    for r in runs:
        err = (r.error or "").splitlines()[0] if r.error else ""
        if len(err) > error_width:
            err = err[: error_width - 1] + "…"
        style = STYLE.get(r.status, "")
        tab.add_row(r.id, escape(f"{r.label or r.method} {r.backbone}/{r.fusion}"), escape(f"{r.dataset}/{r.protocol}"),
                    str(r.seed), f"[{style}]{r.status}[/{style}]" if style else escape(r.status), progress(r),
                    "" if r.wall_seconds is None else f"{r.wall_seconds:.0f}", escape(mask_credentials(err)),
                    escape(short_path(r.run_dir)))
    return tab


def _short(r: Run) -> str:
    """The method with only its non-default parameters (the seed has its own column)."""
    import json

    from mmbench.config import short_label

    try:
        return short_label(json.loads(r.config_json)).rsplit(" ", 1)[0]
    except (ValueError, KeyError, TypeError):
        return r.label or r.method


def _narrow_table(runs: list[Run], title: str, width: int) -> Table:
    datasets = {f"{r.dataset}/{r.protocol}" for r in runs}
    one = len(datasets) == 1
    caption = "run dirs: `mmbench runs` on a wider terminal (>= 120 columns)"
    tab = Table(title=title + (f" on {next(iter(datasets))}" if one else ""), title_justify="left",
                caption=caption, caption_justify="left")
    tab.add_column("run id", no_wrap=True)
    tab.add_column("run", overflow="fold", min_width=16)
    if not one:
        tab.add_column("data", overflow="fold")
    tab.add_column("seed", justify="right")
    tab.add_column("status", no_wrap=True)
    tab.add_column("epochs", justify="right", no_wrap=True)
    tab.add_column("error", overflow="fold", ratio=1)
    for r in runs:
        err = (r.error or "").splitlines()[0] if r.error else ""
        err = err if len(err) <= 120 else err[:119] + "…"
        style = STYLE.get(r.status, "")
        row = [r.id, escape(_short(r))] + ([] if one else [f"{r.dataset}/{r.protocol}"])
        row += [str(r.seed), f"[{style}]{r.status}[/{style}]" if style else r.status, progress(r), escape(err)]
        tab.add_row(*row)
    return tab
