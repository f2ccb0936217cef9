"""Several processes writing one SQLite results file at once never fail with "database is locked",
and every row lands exactly once; a write that meets a locked file waits instead of failing."""
from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from mmbench.store import db
from mmbench.store.tables import Run

WRITER = textwrap.dedent("""
    import sys
    from mmbench.store import db
    from mmbench.store.tables import Run
    engine = db.get_engine(sys.argv[1])
    k = int(sys.argv[2])
    for i in range(25):
        rid = f"w{k}-{i}"
        db.register_runs(engine, "s", [Run(id=rid, dataset="d", protocol="p", method="m", fusion="f", backbone="b",
                                           seed=i, config_json="{}", created_at=db.now())])
        db.set_status(engine, rid, "running", epochs_done=1)
        history = [{"epoch": e, "metrics": {"train": {f"m{j}": float(j) for j in range(20)}}} for e in range(5)]
        db.write_results(engine, rid, history, {"last": {"test": {"acc": 0.5}}}, {"epochs_done": 5})
        db.write_results(engine, rid, history, {"last": {"test": {"acc": 0.5}}}, {"epochs_done": 5})  # re-ingest
""")


def test_three_processes_one_sqlite_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'results.db'}"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, url, str(k)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for k in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert "locked" not in err
    with sqlite3.connect(tmp_path / "results.db") as c:
        assert c.execute("select count(*), count(distinct id) from run").fetchone() == (75, 75)
        assert c.execute("select count(*) from run where status = 'completed' and epochs_done = 5").fetchone() == (75,)
        assert c.execute("select count(*) from epoch_metric").fetchone() == (75 * 5 * 20,)
        assert c.execute("select count(*) from final_metric").fetchone() == (75,)
        assert c.execute("select count(*), count(distinct run_id) from sweep_run").fetchone() == (75, 75)


def test_a_write_waits_for_a_locked_file(tmp_path: Path) -> None:
    path = tmp_path / "results.db"
    engine = db.get_engine(f"sqlite:///{path}")
    db.register_runs(engine, None, [Run(id="r", dataset="d", protocol="p", method="m", fusion="f", backbone="b",
                                        seed=0, config_json="{}", created_at=db.now())])
    other = sqlite3.connect(path, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock for a second
    other.execute("update run set error = 'x'")
    threading.Timer(1.0, other.commit).start()
    t0 = time.perf_counter()
    db.set_status(engine, "r", "running", epochs_done=2)
    assert time.perf_counter() - t0 >= 0.9
    assert db.get_run(engine, "r").epochs_done == 2  # type: ignore[union-attr]
    other.close()


def test_retry_with_backoff_only_for_lock_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    @db.retrying
    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise OperationalError("UPDATE run", {}, sqlite3.OperationalError("database is locked"))
        return "ok"

    assert flaky() == "ok" and len(calls) == 3

    @db.retrying
    def broken() -> None:
        calls.append(1)
        raise OperationalError("SELECT", {}, sqlite3.OperationalError("no such table: run"))

    calls.clear()
    with pytest.raises(OperationalError):
        broken()
    assert len(calls) == 1

    monkeypatch.setattr(db, "RETRY_SECONDS", 0.2)
    calls.clear()

    @db.retrying
    def always_locked() -> None:
        calls.append(1)
        raise OperationalError("UPDATE", {}, sqlite3.OperationalError("database is locked"))

    with pytest.raises(OperationalError):
        always_locked()
    assert 1 < len(calls) < 50  # backed off, then gave up
