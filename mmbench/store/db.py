"""Engine setup and the writes the sweep makes. SQLite by default (WAL, busy timeout), any
SQLAlchemy URL via --db / MMBENCH_DB. Every write is one transaction."""
from __future__ import annotations

import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlmodel import Session, SQLModel, create_engine, delete, select

from mmbench.errors import UserError
from mmbench.store.tables import EpochMetric, FinalMetric, Run, Sweep, SweepRun

_ENGINES: dict[str, Engine] = {}


def default_db_url() -> str:
    return os.environ.get("MMBENCH_DB", "sqlite:///results.db")


def now() -> datetime:
    return datetime.now(timezone.utc)


def get_engine(url: str | None = None, create: bool = True) -> Engine:
    """Open (and create the tables of) a results database; a bad URL or path is a UserError."""
    url = url or default_db_url()
    if url in _ENGINES:
        return _ENGINES[url]
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///"):])
        if str(path) not in ("", ":memory:"):
            parent = path.expanduser().resolve().parent
            if not parent.is_dir():
                raise UserError(f"database {url}: folder {parent} does not exist; create it or pass another --db")
            if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
                raise UserError(f"database {url}: {path} is not writable; pass a writable --db path or set MMBENCH_DB")
            if not create and not path.exists():
                raise UserError(f"database {url} does not exist yet; run a sweep first or pass --db")
        engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _rec: Any) -> None:  # pragma: no cover - trivial
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()
    else:
        try:
            engine = create_engine(url, pool_pre_ping=True)
        except Exception as e:  # noqa: BLE001 - bad URL formats raise several types
            raise UserError(f"database URL '{url}' is not usable: {e}") from None
    try:
        SQLModel.metadata.create_all(engine)
    except (OperationalError, SQLAlchemyError) as e:
        raise UserError(f"cannot open database {url}: {e.__class__.__name__}: {str(e).splitlines()[0]}") from None
    _ENGINES[url] = engine
    return engine


def _clean(v: float | None) -> float | None:
    if v is None:
        return None
    v = float(v)
    return None if math.isnan(v) else v


def upsert_sweep(engine: Engine, sweep: Sweep) -> None:
    with Session(engine) as s:
        if s.get(Sweep, sweep.id) is None:
            s.add(sweep)
            s.commit()


def register_runs(engine: Engine, sweep_id: str | None, runs: Iterable[Run]) -> None:
    """Insert pending runs that are new and link them to the sweep; existing rows are kept."""
    with Session(engine) as s:
        for r in runs:
            if s.get(Run, r.id) is None:
                s.add(r)
            if sweep_id is not None and s.get(SweepRun, (sweep_id, r.id)) is None:
                s.add(SweepRun(sweep_id=sweep_id, run_id=r.id))
        s.commit()


def get_run(engine: Engine, rid: str) -> Run | None:
    with Session(engine) as s:
        return s.get(Run, rid)


def set_status(engine: Engine, rid: str, status: str, **fields: Any) -> None:
    with Session(engine) as s:
        r = s.get(Run, rid)
        if r is None:
            return
        r.status = status
        for k, v in fields.items():
            setattr(r, k, v)
        s.add(r)
        s.commit()


def write_results(
    engine: Engine,
    rid: str,
    history: list[dict[str, Any]],
    finals: dict[str, dict[str, dict[str, float]]],
    run_fields: dict[str, Any],
    status: str = "completed",
) -> None:
    """Replace a run's metrics with `history` (per epoch: {"epoch", "metrics": {split: {name: v}}})
    and `finals` ({selection: {split: {name: v}}}) and set its fields, in one transaction."""
    with Session(engine) as s:
        s.exec(delete(EpochMetric).where(EpochMetric.run_id == rid))  # type: ignore[arg-type]
        s.exec(delete(FinalMetric).where(FinalMetric.run_id == rid))  # type: ignore[arg-type]
        for h in history:
            for split, vals in h["metrics"].items():
                for name, v in vals.items():
                    s.add(EpochMetric(run_id=rid, epoch=int(h["epoch"]), split=split, name=name, value=_clean(v)))
        for sel, splits in finals.items():
            for split, vals in splits.items():
                for name, v in vals.items():
                    s.add(FinalMetric(run_id=rid, split=split, name=name, selection=sel, value=_clean(v)))
        r = s.get(Run, rid)
        if r is not None:
            r.status = status
            for k, v in run_fields.items():
                setattr(r, k, v)
            s.add(r)
        s.commit()


def runs_of(engine: Engine, sweep: str | None = None, dataset: str | None = None, status: str | None = None) -> list[Run]:
    with Session(engine) as s:
        q = select(Run)
        if sweep is not None:
            ids = select(SweepRun.run_id).join(Sweep, Sweep.id == SweepRun.sweep_id).where(Sweep.name == sweep)  # type: ignore[arg-type]
            q = q.where(Run.id.in_(ids))  # type: ignore[union-attr]
        if dataset is not None:
            q = q.where(Run.dataset == dataset)
        if status is not None:
            q = q.where(Run.status == status)
        return list(s.exec(q.order_by(Run.created_at, Run.id)).all())


def json_dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)
