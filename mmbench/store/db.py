"""Engine setup and the writes the sweep makes. SQLite by default (WAL, busy timeout), any
SQLAlchemy URL via --db / MMBENCH_DB. Every write is one transaction.

Concurrency: in a sweep only the driver process writes (workers and cluster jobs write their run
directories only). Several drivers, or a driver and `mmbench ingest`, may still share one SQLite
file, so every write transaction (a) starts with BEGIN IMMEDIATE, taking the write lock up front:
a deferred transaction that reads and then writes can fail with "database is locked" at once,
without waiting, when another writer committed in between (the busy timeout cannot help there);
and (b) is retried with exponential backoff while the file stays locked beyond the busy timeout."""
from __future__ import annotations

import functools
import json
import math
import os
import random
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlmodel import Session, SQLModel, create_engine, delete, select

from mmbench.errors import UserError
from mmbench.redact import mask_credentials
from mmbench.store.tables import EpochMetric, FinalMetric, Run, Sweep, SweepRun

_ENGINES: dict[str, Engine] = {}
RETRY_SECONDS = 300.0  # give up on a locked database after this long (busy timeout included)
_F = TypeVar("_F", bound=Callable[..., Any])


def _transient(e: BaseException) -> bool:
    msg = str(getattr(e, "orig", None) or e).lower()
    return isinstance(e, OperationalError) and any(
        w in msg for w in ("database is locked", "database table is locked", "busy", "already exists"))


def retrying(fn: _F) -> _F:
    """Retry a whole transaction while SQLite reports the file locked (or a concurrent process
    created the tables first), with jittered exponential backoff up to RETRY_SECONDS."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        delay, deadline = 0.05, time.monotonic() + RETRY_SECONDS
        while True:
            try:
                return fn(*args, **kwargs)
            except OperationalError as e:
                if not _transient(e) or time.monotonic() > deadline:
                    raise
                time.sleep(delay * (1 + random.random()))
                delay = min(2 * delay, 2.0)

    return wrapper  # type: ignore[return-value]


@contextmanager
def writing(engine: Engine) -> Iterator[Session]:
    """A session whose transaction holds SQLite's write lock from its first statement."""
    with Session(engine) as s:
        if engine.dialect.name == "sqlite":
            s.connection().exec_driver_sql("BEGIN IMMEDIATE")
        yield s
        s.commit()


def default_db_url() -> str:
    return os.environ.get("MMBENCH_DB", "sqlite:///results.db")


def now() -> datetime:
    return datetime.now(timezone.utc)


def _check_sqlite_path(url: str, create: bool, make_dirs: bool = False) -> None:
    path = Path(url[len("sqlite:///"):])
    if str(path) in ("", ":memory:"):
        return
    parent = path.expanduser().resolve().parent
    if not parent.is_dir() and create:
        # a new results file in a new folder: create the folder (a check alone only looks for the
        # nearest existing folder being writable, so a dry-run still writes nothing)
        base = next((p for p in parent.parents if p.exists()), None)
        if base is None or not base.is_dir() or not os.access(base, os.W_OK) or parent.exists():
            raise UserError(f"database {url}: folder {parent} cannot be created; pass another --db")
        if not make_dirs:
            return
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"database {url}: folder {parent} cannot be created ({e.strerror}); pass another --db") from None
    if not parent.is_dir():
        raise UserError(f"database {url}: folder {parent} does not exist; create it or pass another --db")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"database {url}: {path} is not writable; pass a writable --db path or set MMBENCH_DB")
    if not create and not path.exists():
        raise UserError(f"database {url} does not exist yet; run a sweep first or pass --db")


def _server_engine(url: str) -> Engine:
    shown = mask_credentials(url)  # messages quote the URL, never its password
    try:
        return create_engine(url, pool_pre_ping=True)
    except ModuleNotFoundError as e:
        raise UserError(f"database URL '{shown}' needs the Python driver '{e.name}', which is not installed; "
                        f"pip install it, or use a SQLite URL (sqlite:///results.db)") from None
    except Exception as e:  # noqa: BLE001 - bad URL formats raise several types
        raise UserError(mask_credentials(f"database URL '{shown}' is not usable: {e}")) from None


def check_url(url: str | None = None) -> None:
    """Fail early, writing nothing, when the database cannot be used: an SQLite path that cannot be
    created, a missing driver, a server that does not answer."""
    url = url or default_db_url()
    if url in _ENGINES:
        return
    if url.startswith("sqlite:///"):
        _check_sqlite_path(url, create=True)
        return
    engine = _server_engine(url)
    try:
        with engine.connect():
            pass
    except SQLAlchemyError as e:
        raise UserError(mask_credentials(f"cannot reach database {url}: {e.__class__.__name__}: {str(e).splitlines()[0]}; "
                                         "check the URL and that the server is up, or pass another --db")) from None
    finally:
        engine.dispose()


def get_engine(url: str | None = None, create: bool = True) -> Engine:
    """Open (and create the tables of) a results database; a bad URL or path is a UserError."""
    url = url or default_db_url()
    if url in _ENGINES:
        return _ENGINES[url]
    if url.startswith("sqlite:///"):
        _check_sqlite_path(url, create, make_dirs=create)
        engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _rec: Any) -> None:  # pragma: no cover - trivial
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA busy_timeout=60000")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()
    else:
        engine = _server_engine(url)
    try:
        retrying(SQLModel.metadata.create_all)(engine)
    except (OperationalError, SQLAlchemyError) as e:
        raise UserError(mask_credentials(f"cannot open database {url}: {e.__class__.__name__}: {str(e).splitlines()[0]}")) from None
    _ENGINES[url] = engine
    return engine


def _clean(v: float | None) -> float | None:
    if v is None:
        return None
    v = float(v)
    return None if math.isnan(v) else v


def _masked(fields: dict[str, Any]) -> dict[str, Any]:
    """Row fields with credentials masked in every text value: a URL with a password that reached a
    recipe, an override, an error or the environment is not kept in a shared results database."""
    return {k: mask_credentials(v) if isinstance(v, str) else v for k, v in fields.items()}


@retrying
def upsert_sweep(engine: Engine, sweep: Sweep) -> None:
    with writing(engine) as s:
        if s.get(Sweep, sweep.id) is None:
            s.add(Sweep.model_validate(_masked(sweep.model_dump())))


@retrying
def register_runs(engine: Engine, sweep_id: str | None, runs: Iterable[Run]) -> None:
    """Insert pending runs that are new and link them to the sweep; existing rows are kept."""
    runs = list(runs)
    with writing(engine) as s:
        for r in runs:
            if s.get(Run, r.id) is None:
                s.add(Run.model_validate(_masked(r.model_dump())))  # a copy: a retried transaction re-adds it
            if sweep_id is not None and s.get(SweepRun, (sweep_id, r.id)) is None:
                s.add(SweepRun(sweep_id=sweep_id, run_id=r.id))


def get_run(engine: Engine, rid: str) -> Run | None:
    with Session(engine) as s:
        return s.get(Run, rid)


@retrying
def set_status(engine: Engine, rid: str, status: str, **fields: Any) -> None:
    with writing(engine) as s:
        r = s.get(Run, rid)
        if r is None:
            return
        r.status = status
        for k, v in _masked(fields).items():
            setattr(r, k, v)
        s.add(r)


@retrying
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
    with writing(engine) as s:
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
            for k, v in _masked(run_fields).items():
                setattr(r, k, v)
            s.add(r)


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
