"""`mmbench ingest DIR`: fill the database from run directories (a runs dir, or one run dir).

The run directories are the record; the database is an index of them that can always be rebuilt.
Ingesting is idempotent (a run's metrics are replaced in one transaction), so it completes a
database after a driver was killed, a write failed, or results were copied back from a cluster
whose nodes could not reach the database. Sweep membership comes from the runs dir's manifests.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import Engine

from mmbench.engine.run import ingest_run_dir, load_run_config, run_row
from mmbench.errors import UserError
from mmbench.store import db
from mmbench.store.tables import Sweep
from mmbench.sweep import rundir


@dataclass
class IngestReport:
    counts: Counter[str] = field(default_factory=Counter)  # completed | failed | unfinished
    runs: list[tuple[str, str]] = field(default_factory=list)  # (run id, status)
    sweeps: list[str] = field(default_factory=list)  # sweep names restored from manifests


def run_dirs(path: Path) -> tuple[list[Path], Path]:
    """The run directories under `path` and the runs dir that holds them."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such folder; pass a runs dir (e.g. ./runs) or one run's directory")
    if rundir.is_run_dir(path):
        return [path], path.parent
    if not path.is_dir():
        raise UserError(f"{path}: not a folder; pass a runs dir (e.g. ./runs) or one run's directory")
    dirs = sorted(d for d in path.iterdir() if d.is_dir() and rundir.is_run_dir(d))
    if not dirs:
        raise UserError(f"{path}: no run directories in it (a run directory holds config.json); "
                        "pass the --runs-dir of a sweep, e.g. ./runs")
    return dirs, path


def ingest_path(engine: Engine, path: Path) -> IngestReport:
    dirs, root = run_dirs(path)
    rep = IngestReport()
    wanted = {d.name for d in dirs}
    members: dict[str, list[str]] = {}
    for m in rundir.sweep_manifests(root):
        ids = [r for r in m["run_ids"] if r in wanted]
        if not ids:
            continue
        db.upsert_sweep(engine, Sweep.model_validate(m["sweep"]))
        rep.sweeps.append(str(m["sweep"].get("name")))
        for r in ids:
            members.setdefault(r, []).append(m["sweep"]["id"])
    for d in dirs:
        for sid in members.get(d.name, []):
            db.register_runs(engine, sid, [run_row(load_run_config(d), d.name, d)])
        status = ingest_run_dir(engine, d) or "unfinished"
        rep.counts[status] += 1
        rep.runs.append((d.name, status))
    return rep
