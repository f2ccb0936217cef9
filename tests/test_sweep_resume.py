"""Results survive anything: a driver killed with SIGKILL mid-sweep, a NaN loss, a database write
that fails. Re-running `sweep` or `ingest` completes the database with no duplicate or half-written
rows, and a failed run never stops the others."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from conftest import write_recipe
from mmbench.sweep import rundir

TWO = "[joint, {name: unimodal, modality: audio}]"


def q(db: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(db) as c:
        return c.execute(sql).fetchall()


def metric_rows_expected(runs: Path) -> int:
    """Epoch metric rows the database must hold: exactly those in the completed runs' summaries."""
    n = 0
    for f in runs.glob("*/summary.json"):
        s = json.loads(f.read_text())
        if s["status"] == "completed":
            n += sum(len(v) for h in s["history"] for v in h["metrics"].values())
    return n


def test_sigkill_of_the_driver_then_rerun(mm_env: Path, cli) -> None:
    r = write_recipe(mm_env / "r.yaml", name="kill", epochs=2, methods=TWO, seeds="[0, 1]")
    runs = mm_env / "runs"
    with open(mm_env / "driver.log", "wb") as log:
        driver = subprocess.Popen([sys.executable, "-m", "mmbench.cli", "sweep", str(r), "--jobs", "2",
                                   "--set", "train.eval_train=false"], cwd=mm_env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while time.time() < deadline and not list(runs.glob("*/summary.json")):
        assert driver.poll() is None, (mm_env / "driver.log").read_text()
        time.sleep(0.2)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    done_before = len(list(runs.glob("*/summary.json")))
    assert 1 <= done_before < 4, "the driver should have been killed mid-sweep"
    # the workers die with their driver: no run is left training (or locked) by an orphan
    deadline = time.time() + 30
    while any(rundir.lock_held(d) for d in runs.iterdir() if d.is_dir()) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(rundir.lock_held(d) for d in runs.iterdir() if d.is_dir())

    code, out = cli("sweep", r, "--jobs", "2", "--set", "train.eval_train=false")
    assert code == 0, out
    db = mm_env / "results.db"
    assert q(db, "select count(*), count(distinct id) from run where status = 'completed'") == [(4, 4)]
    assert q(db, "select count(*) from sweep") == [(1,)] and q(db, "select count(*) from sweep_run") == [(4,)]
    assert q(db, "select count(*) from epoch_metric") == [(metric_rows_expected(runs),)]
    assert q(db, "select count(*) from final_metric where selection = 'best-val' and split = 'test' and name = 'acc'") == [(4,)]
    assert q(db, "select count(distinct epoch) from epoch_metric") == [(2,)]
    assert all(len(json.loads(f.read_text())["history"]) == 2 for f in runs.glob("*/summary.json"))


def test_nan_loss_fails_its_run_only_and_ingest_recovers_a_lost_write(mm_env: Path, cli,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    methods = "[{name: joint, train: {optimizer: {lr: 1.0e+6}}}, {name: unimodal, modality: audio}]"
    r = write_recipe(mm_env / "r.yaml", name="fail", epochs=1, methods=methods, seeds="[0]")
    from mmbench.engine.run import load_run_config
    from mmbench.sweep import driver

    real = driver.ingest_run_dir

    def lost_write(engine, rdir, sweep_id=None):  # the database write of the unimodal run fails
        if load_run_config(rdir)["method"]["name"] == "unimodal":
            raise OperationalError("INSERT INTO epoch_metric", {}, sqlite3.OperationalError("disk I/O error"))
        return real(engine, rdir, sweep_id)

    monkeypatch.setattr(driver, "ingest_run_dir", lost_write)
    code, out = cli("sweep", r, "--set", "train.eval_train=false")
    monkeypatch.setattr(driver, "ingest_run_dir", real)
    flat = " ".join(out.split())
    assert code == 1
    assert "non-finite training loss" in flat and "lower the learning rate" in flat
    assert "are not in the database" in flat and "mmbench ingest" in flat
    db = mm_env / "results.db"
    assert q(db, "select method, status from run order by method") == [("joint", "failed"), ("unimodal", "running")]
    assert q(db, "select count(*) from epoch_metric") == [(0,)]  # nothing half-written
    runs = mm_env / "runs"
    assert len([f for f in runs.glob("*/summary.json") if json.loads(f.read_text())["status"] == "completed"]) == 1

    code, out = cli("ingest", runs)
    assert code == 0 and "2 run(s)" in out and "1 completed, 1 failed" in out
    assert q(db, "select method, status from run order by method") == [("joint", "failed"), ("unimodal", "completed")]
    rows = q(db, "select count(*) from epoch_metric")[0][0]
    assert rows == metric_rows_expected(runs) > 0
    code, _ = cli("ingest", runs)  # idempotent
    assert code == 0 and q(db, "select count(*) from epoch_metric")[0][0] == rows
    assert q(db, "select count(*) from run") == [(2,)] and q(db, "select count(*) from sweep_run") == [(2,)]
    code, out = cli("runs", "--status", "failed")
    assert code == 0 and "non-finite training loss" in out

    # a database that never saw the sweep (results copied back from a cluster) is rebuilt from the run dirs
    fresh = f"sqlite:///{mm_env / 'fresh.db'}"
    code, out = cli("ingest", runs, "--db", fresh)
    assert code == 0 and "sweeps: fail" in out
    code, out = cli("report", "--db", fresh, "--sweep", "fail", "--format", "markdown")
    assert code == 0 and "| unimodal" in out
    one = next(d for d in runs.iterdir() if (d / "config.json").is_file())
    code, out = cli("ingest", one, "--db", f"sqlite:///{mm_env / 'one.db'}")
    assert code == 0 and "ingested 1 run(s)" in out


def test_a_killed_worker_fails_its_run_only_and_a_rerun_resumes_it(mm_env: Path, cli,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGKILL of a worker (the out-of-memory killer, a node lost): the run is reported failed with
    the signal and its log, the other run completes, and the next sweep finishes it from its
    last checkpoint."""
    import threading

    from mmbench.sweep import local

    r = write_recipe(mm_env / "r.yaml", name="oom", epochs=4, methods=TWO, seeds="[0]")
    real_start = local.ProcessLauncher.start
    victim: dict[str, str] = {}

    def start_then_kill(self, tasks, after):
        handles = real_start(self, tasks, after)
        if not victim:
            h = handles[0]
            victim["rid"] = h.rid

            def kill_after_first_epoch() -> None:
                status = Path(tasks[0].run_dir) / "status.json"
                while h.alive():
                    st = json.loads(status.read_text()) if status.is_file() else {}
                    if (st.get("epochs_done") or 0) >= 1:
                        os.kill(h.proc.pid, signal.SIGKILL)
                        return
                    time.sleep(0.02)

            threading.Thread(target=kill_after_first_epoch, daemon=True).start()
        return handles

    monkeypatch.setattr(local.ProcessLauncher, "start", start_then_kill)
    code, out = cli("sweep", r, "--jobs", "2", "--set", "train.eval_train=false")
    monkeypatch.setattr(local.ProcessLauncher, "start", real_start)
    flat = " ".join(out.split())
    assert code == 1 and "1 trained" in flat and "killed by signal 9" in flat and "worker.log" in flat
    rdir = mm_env / "runs" / victim["rid"]
    assert (rdir / "checkpoint.pt").is_file() and not (rdir / "summary.json").exists()
    db = mm_env / "results.db"
    assert q(db, f"select status from run where id = '{victim['rid']}'") == [("failed",)]

    code, out = cli("sweep", r, "--jobs", "2", "--set", "train.eval_train=false")
    assert code == 0 and "1 trained, 1 already done" in out
    assert q(db, "select count(*) from run where status = 'completed'") == [(2,)]
    assert [h["epoch"] for h in json.loads((rdir / "summary.json").read_text())["history"]] == [0, 1, 2, 3]
    assert q(db, "select count(*) from epoch_metric") == [(metric_rows_expected(mm_env / "runs"),)]
