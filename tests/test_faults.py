"""Nothing executed, nothing lost, nothing silent (issue 9, §1-2): a checkpoint carrying pickled code
is refused (exit 2) and never run; a damaged checkpoint falls back to the previous one with a warning;
a full disk stops the sweep with exit 1, no temporary files and a resumable run; Ctrl-C says so and
leaves the run resumable; a driver killed with SIGKILL takes its forkserver and workers with it."""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_recipe
from mmbench.config import Recipe, expand
from mmbench.engine import checkpoint as ckpt
from mmbench.engine.device import rng_state
from mmbench.engine.trainer import Trainer
from mmbench.errors import DiskFull

ROOT = Path(__file__).resolve().parents[1]


def q(db: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(db) as c:
        return c.execute(sql).fetchall()


def cfg(epochs: int = 4, method: str | dict = "joint") -> dict:
    rec = Recipe.model_validate({"name": "r", "dataset": {"name": "synthetic", "protocol": "tiny"},
                                 "train": {"epochs": epochs, "batch_size": 32, "scheduler": {"name": "step", "step_size": 2}},
                                 "methods": [method], "seeds": [3]})
    return expand(rec)[0]


class Hostile:
    """Pickles as a call of os.system: loading it with weights_only=False runs the command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant_hostile(path: Path, marker: Path) -> None:
    torch.save({"epoch": 0, "method": {}, "extra": Hostile(marker), "rng": {}, "history": [], "best": {}}, path)


def only_run_dir(runs: Path) -> Path:
    (d,) = [p for p in runs.iterdir() if p.is_dir() and not p.name.startswith("_")]
    return d


# ----- §1 a run directory must not execute code ------------------------------------------------
def test_hostile_checkpoint_is_refused_with_exit_2_and_never_run(mm_env: Path, cli, tiny_data_dir: Path) -> None:
    r = write_recipe(mm_env / "r.yaml", epochs=1)
    code, out = cli("sweep", r)
    assert code == 0, out
    rdir = only_run_dir(mm_env / "runs")
    (rdir / "summary.json").unlink()  # as if it had been interrupted: the next sweep resumes it
    marker = mm_env / "pwned"
    plant_hostile(rdir / "checkpoint.pt", marker)
    code, out = cli("sweep", r)
    flat = " ".join(out.split())
    assert code == 2, out
    assert "refusing to load" in flat and "checkpoint.pt" in flat and "Traceback" not in out
    assert not marker.exists(), "loading the checkpoint ran its pickled command"
    # the engine itself refuses too (a worker on a node, a checkpoint named as the previous one)
    (rdir / "checkpoint.pt").rename(rdir / "checkpoint.prev.pt")
    with pytest.raises(ckpt.UnsafeCheckpoint, match="checkpoint.prev.pt"):
        Trainer(json.loads((rdir / "config.json").read_text()), rdir, torch.device("cpu"), str(tiny_data_dir)).fit()
    assert not marker.exists()


def test_checkpoints_hold_only_plain_values() -> None:
    @dataclasses.dataclass
    class D:
        x: int = 1

    for bad in ({"a": np.zeros(2)}, {"a": np.float64(1.0)}, {"a": {1, 2}}, {"a": (1, D())}, [D()]):
        with pytest.raises(TypeError, match="plain Python values"):
            ckpt.check_plain(bad)
    state = {"rng": rng_state(), "t": torch.ones(2), "x": [1, 2.0, "s", None, (True, torch.Size([2]))]}
    ckpt.check_plain(state)
    with pytest.raises(TypeError):
        ckpt.save_atomic({"n": np.int64(3)}, Path("/nonexistent/never-written.pt"))


@pytest.mark.parametrize("method", [
    "agm", "ogm_ge", "mmpareto", {"name": "relearn", "reinit_epoch": 1, "reinit_num": 1},
    {"name": "mie", "epoch_list": [1, 1]},
], ids=["agm", "ogm_ge", "mmpareto", "relearn", "mie"])
def test_every_method_state_loads_with_weights_only(tmp_path: Path, tiny_data_dir: Path, method) -> None:
    """Each method's extra_state, optimizer and scheduler state after real epochs: saved (checked
    plain), loaded with weights_only=True, and accepted back by a fresh method."""
    # Re-learning re-initialises after its epoch 1 (0-based) only when a third epoch follows
    c = cfg(epochs=3 if isinstance(method, dict) and method["name"] == "relearn" else 2, method=method)
    t = Trainer(c, tmp_path, torch.device("cpu"), str(tiny_data_dir))
    t.fit()
    for name in ("checkpoint.pt", "model_selected.pt"):
        state = ckpt.load(tmp_path / name)
        ckpt.check_plain(state)
    from mmbench.data.store import PreparedDataset

    fresh = t.build_method(PreparedDataset("synthetic", "tiny", str(tiny_data_dir)))
    fresh.setup(torch.device("cpu"))
    state = ckpt.load(tmp_path / "checkpoint.pt")
    fresh.load_extra_state(state["extra"])
    fresh.load_state_dict(state["method"])
    assert not (tmp_path / "checkpoint.prev.pt").exists()  # finished: the fallback is dropped


# ----- §2 a truncated checkpoint --------------------------------------------------------------
class Stop(Exception):
    pass


def stop_after(n: int):
    def cb(ev: dict) -> None:
        if ev["event"] == "epoch" and ev["epoch"] == n:
            raise Stop

    return cb


def truncate(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def test_truncated_checkpoint_resumes_from_the_previous_one_exactly(tmp_path: Path, tiny_data_dir: Path) -> None:
    c = cfg(epochs=4)
    cpu = torch.device("cpu")
    full = Trainer(c, tmp_path / "full", cpu, str(tiny_data_dir)).fit()
    rdir = tmp_path / "cut"
    with pytest.raises(Stop):
        Trainer(c, rdir, cpu, str(tiny_data_dir), progress=stop_after(3)).fit()
    assert ckpt.load(rdir / "checkpoint.prev.pt")["epoch"] == 1
    truncate(rdir / "checkpoint.pt")
    seen: list[int] = []
    t = Trainer(c, rdir, cpu, str(tiny_data_dir), progress=lambda ev: seen.append(ev["epoch"]) if ev["event"] == "epoch" else None)
    resumed = t.fit()
    assert seen == [3, 4]  # from the previous checkpoint (2 epochs done), not from scratch
    assert any(str(rdir / "checkpoint.pt") in w and "damaged" in w for w in t.warnings), t.warnings
    assert any("previous checkpoint" in w for w in t.warnings), t.warnings
    assert (rdir / "checkpoint.damaged.pt").is_file()
    assert [h["metrics"]["test"]["acc"] for h in resumed.history] == [h["metrics"]["test"]["acc"] for h in full.history]
    assert resumed.history[-1]["metrics"]["val"]["loss"] == full.history[-1]["metrics"]["val"]["loss"]


def test_truncated_checkpoint_without_a_previous_one_trains_from_scratch_with_a_warning(mm_env: Path, cli) -> None:
    r = write_recipe(mm_env / "r.yaml", epochs=2)
    code, out = cli("sweep", r)
    assert code == 0, out
    rdir = only_run_dir(mm_env / "runs")
    first = json.loads((rdir / "summary.json").read_text())["finals"]
    (rdir / "summary.json").unlink()
    truncate(rdir / "checkpoint.pt")
    code, out = cli("sweep", r)
    flat = " ".join(out.split())
    assert code == 0, out
    assert "warning" in flat and "checkpoint.pt is damaged" in flat and "training from scratch" in flat, out
    summary = json.loads((rdir / "summary.json").read_text())
    assert summary["finals"]["last"]["test"] == first["last"]["test"]  # retrained from scratch: the same run
    assert any("damaged" in w for w in summary["warnings"])


# ----- §2 a full disk ----------------------------------------------------------------------------
def test_disk_full_stops_the_sweep_cleanly_and_the_run_resumes(mm_env: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    r = write_recipe(mm_env / "r.yaml", epochs=3, seeds="[0, 1]")
    real_save = ckpt.torch.save
    saves = {"n": 0}

    def save_until_full(obj, f, *a, **kw):  # the second epoch's checkpoint hits a full disk mid-write
        if Path(f).name.startswith(".checkpoint.pt.tmp"):
            saves["n"] += 1
            if saves["n"] == 2:
                Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
                raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *a, **kw)

    from mmbench.data import store

    real_text = store.atomic_write_text

    def no_room_for_summary(path: Path, text: str) -> None:  # and there is no room for its summary either
        if path.name == "summary.json" and saves["n"] >= 2:
            Path(path.with_name(f".{path.name}.tmp{os.getpid()}")).write_text(text[:10])
            raise OSError(errno.ENOSPC, "No space left on device")
        real_text(path, text)

    monkeypatch.setattr(ckpt.torch, "save", save_until_full)
    monkeypatch.setattr(store, "atomic_write_text", no_room_for_summary)
    code, out = cli("sweep", r)
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    monkeypatch.setattr(store, "atomic_write_text", real_text)
    flat = " ".join(out.split())
    runs = mm_env / "runs"
    (rdir,) = [d for d in runs.iterdir() if (d / "checkpoint.pt").is_file()]
    assert code == 1, out
    assert f"disk full at {rdir / 'checkpoint.pt'}" in flat and "free space and re-run" in flat, out
    assert "Traceback" not in out
    assert not list(runs.rglob(".*tmp*")), list(runs.rglob(".*tmp*"))
    assert ckpt.load(rdir / "checkpoint.pt")["epoch"] == 0  # the last good checkpoint is intact
    db = mm_env / "results.db"
    rows = dict(q(db, "select id, status from run"))
    assert rows.pop(rdir.name) == "failed"
    assert list(rows.values()) == ["pending"]  # the other run of the sweep was not touched
    (err,) = q(db, f"select error from run where id = '{rdir.name}'")[0]
    assert "disk full" in err

    stale = rdir / ".checkpoint.pt.tmp424242"  # as a process killed mid-write would leave it
    stale.write_bytes(b"PK half")
    code, out = cli("sweep", r)
    assert code == 0 and "2 trained" in " ".join(out.split()), out
    assert not stale.exists()
    assert q(db, "select count(*) from run where status = 'completed'") == [(2,)]
    assert [h["epoch"] for h in json.loads((rdir / "summary.json").read_text())["history"]] == [0, 1, 2]


def test_disk_full_in_save_removes_the_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(obj, f, *a, **kw):
        Path(f).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    ckpt.save_atomic({"a": 1}, tmp_path / "checkpoint.pt", keep_prev=True)
    monkeypatch.setattr(ckpt.torch, "save", full)
    with pytest.raises(DiskFull, match="disk full at .*checkpoint.pt"):
        ckpt.save_atomic({"a": 2}, tmp_path / "checkpoint.pt", keep_prev=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    assert ckpt.load(tmp_path / "checkpoint.pt") == {"a": 1}


# ----- §2 Ctrl-C and kill -9 -----------------------------------------------------------------------
def start_sweep(mm_env: Path, recipe: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", COLUMNS="250")
    return subprocess.Popen([sys.executable, "-m", "mmbench.cli", "sweep", str(recipe), *args, "--set", "train.eval_train=false"],
                            cwd=mm_env, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_training(proc: subprocess.Popen, runs: Path, n: int, timeout: float = 240) -> list[Path]:
    """Run dirs of `n` runs that have finished at least one epoch (checkpoint written)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        dirs = [d for d in runs.glob("*") if (d / "checkpoint.pt").is_file()] if runs.is_dir() else []
        if len(dirs) >= n:
            return dirs
        time.sleep(0.2)
    raise AssertionError("the sweep did not start training in time")


def test_ctrl_c_says_so_and_leaves_the_run_resumable(mm_env: Path, cli) -> None:
    r = write_recipe(mm_env / "r.yaml", name="int", epochs=5000, seeds="[0, 1]")
    proc = start_sweep(mm_env, r)
    (rdir,) = wait_training(proc, mm_env / "runs", 1)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 130, out
    assert "interrupted; re-run the same command to resume" in out and "Traceback" not in out
    db = mm_env / "results.db"
    status, error = q(db, f"select status, error from run where id = '{rdir.name}'")[0]
    assert status == "pending" and "interrupted" in error and "resume" in error
    code, out = cli("runs")
    assert code == 0 and "running" not in out


def test_kill_9_of_the_driver_takes_forkserver_and_workers_with_it(mm_env: Path, cli) -> None:
    r = write_recipe(mm_env / "r.yaml", name="k9", epochs=5000, seeds="[0, 1]")
    proc = start_sweep(mm_env, r, "--jobs", "2")
    try:
        dirs = wait_training(proc, mm_env / "runs", 2)
        tree = _descendants(proc.pid)  # the forkserver, the resource tracker, the two workers
        assert len(tree) >= 3, tree
    except BaseException:
        _kill_all([proc.pid, *_descendants(proc.pid)])
        raise
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    left = tree
    while left and time.time() < deadline:
        time.sleep(0.2)
        left = [p for p in tree if _alive(p)]
    _kill_all(left)  # never leave them training after the test, whatever it finds
    assert not left, "workers or the forkserver outlived their driver"
    # `mmbench runs` shows the killed runs as interrupted (their owners are gone), not running
    code, out = cli("runs")
    assert code == 0 and out.count("interrupted") == 2 and " running " not in out, out
    code, out = cli("runs", "--status", "running")
    assert code == 0 and "no running runs" in out, out
    code, out = cli("runs", "--status", "interrupted")
    assert code == 0 and "2 interrupted runs" in out and "re-run the sweep to resume" in " ".join(out.split()), out
    # a re-run sees free locks and whole checkpoints: nothing half-written to adopt
    from mmbench.sweep import rundir

    for d in dirs:
        assert not rundir.lock_held(d)
        ckpt.load(d / "checkpoint.pt")


def _descendants(pid: int) -> list[int]:
    procs = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    out, frontier = [], [pid]
    while frontier:
        kids = [p for p in procs if _ppid(p) in frontier and _alive(p)]
        out += kids
        frontier = kids
    return out


def _kill_all(pids: list[int]) -> None:
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has stopped; only its exit status is left


def test_a_worker_process_on_a_full_disk_exits_74_naming_its_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--jobs N: the worker can only tell its driver by its exit code (and a summary, if it fits)."""
    from mmbench.sweep import local, worker

    def full(task, on_event=None):
        raise DiskFull(tmp_path / "checkpoint.pt")

    monkeypatch.setattr(worker.Task, "load", classmethod(lambda cls, rdir: None))
    monkeypatch.setattr(worker, "train_task", full)
    assert worker.main([str(tmp_path)]) == worker.EXIT_DISK_FULL

    class Proc:
        exitcode, pid = worker.EXIT_DISK_FULL, 1

    h = local.ProcessHandle("r", Proc(), 0, tmp_path / "worker.log")  # type: ignore[arg-type]
    assert h.disk_full == str(tmp_path)
