"""`mmbench sweep --jobs N`: runs train at once in separate processes, one SQLite file receives all
of them with no lock error and no duplicate, and a run that needs unimodal references (competition
strength) starts only after they completed. GPU placement is checked against a faked GPU count."""
from __future__ import annotations

import json
import os
import sqlite3
from datetime import datetime
from pathlib import Path

import pytest

from conftest import write_recipe
from mmbench.config import LauncherCfg
from mmbench.errors import UserError
from mmbench.sweep.local import InlineLauncher, ProcessLauncher, make_local, slot_devices

COMPETITION = "metrics: {competition: true}\n"


def q(db: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(db) as c:
        return c.execute(sql).fetchall()


def summary(rdir: Path) -> dict:
    return json.loads((rdir / "summary.json").read_text())


def test_parallel_runs_one_sqlite_file_dependencies_first(mm_env: Path, cli) -> None:
    r = write_recipe(mm_env / "r.yaml", name="par", epochs=1, methods="[joint]", seeds="[0]", extra=COMPETITION)
    code, out = cli("sweep", r, "--jobs", "2", "--set", "train.eval_train=false")
    assert code == 0, out
    assert "locked" not in out.lower()
    db = mm_env / "results.db"
    assert q(db, "select count(*), count(distinct id) from run where status = 'completed'") == [(3, 3)]
    assert q(db, "select count(*), count(distinct run_id) from sweep_run") == [(3, 3)]

    runs = {rid: summary(mm_env / "runs" / rid) for (rid,) in q(db, "select id from run")}
    cfgs = {rid: json.loads((mm_env / "runs" / rid / "config.json").read_text()) for rid in runs}
    joint = next(rid for rid, c in cfgs.items() if c["method"]["name"] == "joint")
    refs = [rid for rid in runs if rid != joint]
    # every epoch metric of every run is in the database exactly once
    expected = sum(len(v) for s in runs.values() for h in s["history"] for v in h["metrics"].values())
    assert q(db, "select count(*) from epoch_metric") == [(expected,)]
    # the unimodal references trained at the same time, in worker processes, and before the joint run
    t = {rid: (datetime.fromisoformat(s["started_at"]), datetime.fromisoformat(s["finished_at"])) for rid, s in runs.items()}
    (a0, a1), (b0, b1) = t[refs[0]], t[refs[1]]
    assert a0 < b1 and b0 < a1, "the two references did not overlap"
    assert t[joint][0] >= max(a1, b1)
    pids = {json.loads((mm_env / "runs" / rid / "status.json").read_text())["pid"] for rid in runs}
    assert len(pids) == 3 and os.getpid() not in pids
    assert all((mm_env / "runs" / rid / "worker.log").is_file() for rid in runs)
    assert q(db, f"select count(*) from final_metric where run_id = '{joint}' and name like 'competition/%' "
                 "and selection = 'best-val'") == [(2,)]

    code, out = cli("sweep", r, "--jobs", "2", "--set", "train.eval_train=false")
    assert code == 0 and "0 trained, 3 already done" in out


def fake_gpus(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


def test_gpu_placement_several_runs_per_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpus(monkeypatch, 4)
    assert slot_devices(LauncherCfg(gpus=[0, 1], jobs_per_gpu=2), "cpu") == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert slot_devices(LauncherCfg(gpus=[3], jobs_per_gpu=3, jobs=2), "cpu") == ["cuda:3", "cuda:3"]
    launcher = make_local(LauncherCfg(gpus=[0, 1, 2, 3], jobs_per_gpu=2), "cpu")
    assert isinstance(launcher, ProcessLauncher) and launcher.capacity == 8
    assert launcher.threads == max(1, len(os.sched_getaffinity(0)) // 8)  # cores shared out, at least one each
    assert isinstance(make_local(LauncherCfg(gpus=[2]), "cpu"), InlineLauncher)
    with pytest.raises(UserError, match="do not exist; this machine has 4"):
        slot_devices(LauncherCfg(gpus=[0, 7]), "cpu")
    with pytest.raises(UserError, match="exceeds --gpus x --jobs-per-gpu"):
        slot_devices(LauncherCfg(gpus=[0, 1], jobs=3), "cpu")
    with pytest.raises(UserError, match="repeated"):
        slot_devices(LauncherCfg(gpus=[1, 1]), "cpu")


def test_cpu_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpus(monkeypatch, 0)
    assert isinstance(make_local(LauncherCfg(), "cpu"), InlineLauncher)
    launcher = make_local(LauncherCfg(jobs=3), "cpu")
    assert isinstance(launcher, ProcessLauncher) and launcher.slots == ["cpu"] * 3
    with pytest.raises(UserError, match="no CUDA GPU"):
        slot_devices(LauncherCfg(gpus=[0]), "cpu")
