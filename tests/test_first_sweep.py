"""What a first sweep must not trip over: dry-runs that check what a real run checks, schedules that
scale with train.epochs, --force, --threads, --db in a new folder, and honest counts when two
identical sweeps race."""
from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

import pytest

from tests.conftest import write_recipe

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"


# ---- dry-run runs every check a real run runs --------------------------------------------------
@pytest.mark.parametrize("entry,sets,needle", [
    ("[{name: mie, epoch_list: [1, 2]}]", [], "sums to 3"),
    ("[{name: relearn, reinit_epoch: 3}]", [], "never re-initialises"),
    ("[{name: mie, epoch_list: [1, 1]}]", ["--set", "model.fusion=sum"], "no fusion layer"),
])
def test_dry_run_fails_where_the_real_run_would(mm_env: Path, cli, entry, sets, needle):
    r = write_recipe(mm_env / "r.yaml", epochs=2, methods=entry)
    dry, out_dry = cli("sweep", r, "--dry-run", *sets)
    real, out_real = cli("sweep", r, *sets)
    assert (dry, real) == (2, 2), (out_dry, out_real)
    assert needle in out_dry and needle in out_real
    assert not list(mm_env.rglob("config.json"))


def test_dry_run_checks_the_launcher_and_database(mm_env: Path, cli):
    r = write_recipe(mm_env / "r.yaml")
    code, out = cli("sweep", r, "--dry-run", "--launcher", "slurm")
    assert code == 2 and "partition" in out
    (mm_env / "afile").write_text("x")
    code, out = cli("sweep", r, "--dry-run", "--db", f"sqlite:///{mm_env / 'afile' / 'sub' / 'r.db'}")
    assert code == 2 and "cannot be created" in out


def test_quickstart_shortened_passes_dry_run_or_says_why(mm_env: Path, cli):
    """The issue's command: at 5 epochs every method fits (MIE's stages scale); at 2, Re-learning cannot
    re-initialise at all and the dry-run says so instead of the real sweep."""
    code, out = cli("sweep", QUICKSTART, "--set", "train.epochs=5", "--dry-run")
    assert code == 0, out
    assert "epoch_list=[1,2,1,1],stages=scale" in out
    code, out = cli("sweep", QUICKSTART, "--set", "train.epochs=2", "--dry-run")
    assert code == 2 and "relearn" in out and "never re-initialises" in out


def test_dry_run_says_which_data_is_not_prepared(mm_env: Path, cli):
    r = write_recipe(mm_env / "r.yaml")
    r.write_text(r.read_text().replace("{name: synthetic, protocol: tiny}", "{name: avmnist, protocol: tiny}"))
    code, out = cli("sweep", r, "--dry-run")
    assert code == 0, out
    assert "avmnist/tiny is not prepared yet" in out and "mmbench prepare avmnist --protocol tiny" in out


# ---- MIE: a stage schedule that scales with train.epochs ---------------------------------------
@pytest.mark.parametrize("props,epochs,want", [
    ([2, 3, 2, 3], 10, [2, 3, 2, 3]),  # already the right length: unchanged
    ([25, 50] * 6, 450, [25, 50] * 6),
    ([2, 3, 2, 3], 5, [1, 2, 1, 1]),
    ([2, 3, 2, 3], 2, [1, 1]),  # fewer epochs than stages: alternate A/B, one epoch each
    ([1, 9], 4, [1, 3]),  # every stage keeps at least one epoch
    ([25, 50, 25], 20, [5, 10, 5]),
])
def test_scale_stages(props, epochs, want):
    from mmbench.methods.mie import scale_stages

    got = scale_stages(props, epochs)
    assert got == want and sum(got) == epochs


def test_scaled_schedule_is_resolved_in_the_run_config():
    from mmbench.config import Recipe, expand

    rec = Recipe.model_validate({"name": "t", "dataset": {"name": "synthetic", "protocol": "tiny"},
                                 "train": {"epochs": 6},
                                 "methods": [{"name": "mie", "epoch_list": [25, 50], "stages": "scale"}]})
    (cfg,) = expand(rec, "r.yaml")
    assert cfg["method"]["epoch_list"] == [2, 4] and cfg["method"]["stages"] == "scale"
    exact = Recipe.model_validate({"name": "t", "train": {"epochs": 6}, "methods": [{"name": "mie", "epoch_list": [25, 50]}]})
    with pytest.raises(Exception, match="stages: scale"):
        expand(exact, "r.yaml")


def test_mie_needs_two_epochs_even_scaled():
    from mmbench.errors import UserError
    from mmbench.methods.mie import scale_stages

    with pytest.raises(UserError, match="at least 2 epochs"):
        scale_stages([1, 1], 1)


# ---- Re-learning: a schedule that never re-initialises is refused -----------------------------
@pytest.mark.parametrize("epochs,reinit_epoch,reinit_num,ok", [
    (5, 3, 2, True), (4, 3, 1, False), (100, 20, 3, True), (2, 1, 1, False), (3, 1, 1, True), (2, 5, 0, True),
])
def test_relearn_schedule_must_fire(epochs, reinit_epoch, reinit_num, ok):
    from mmbench.errors import UserError
    from mmbench.methods.base import TrainSpec
    from mmbench.methods.relearn import Relearn

    hp = Relearn.HParams(reinit_epoch=reinit_epoch, reinit_num=reinit_num)
    if ok:
        Relearn.check_train(TrainSpec(epochs, {}, {}), hp)
    else:
        with pytest.raises(UserError, match="never re-initialises"):
            Relearn.check_train(TrainSpec(epochs, {}, {}), hp)


# ---- --force -----------------------------------------------------------------------------------
def _finished(db: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(db) as con:
        return con.execute("select id, finished_at from run where status='completed' order by id").fetchall()


def test_force_retrains_and_replaces_the_rows(mm_env: Path, cli):
    r = write_recipe(mm_env / "r.yaml", epochs=1)
    code, out = cli("sweep", r, "--set", "train.eval_train=false")
    assert code == 0, out
    first = _finished(mm_env / "results.db")
    code, out = cli("sweep", r, "--set", "train.eval_train=false")
    assert code == 0 and "0 trained, 1 already done" in out
    code, out = cli("sweep", r, "--set", "train.eval_train=false", "--force")
    assert code == 0 and "1 trained" in out, out
    again = _finished(mm_env / "results.db")
    assert [i for i, _ in again] == [i for i, _ in first] and again[0][1] != first[0][1]
    with sqlite3.connect(mm_env / "results.db") as con:  # one set of metrics, not two
        n = con.execute("select count(*) from final_metric where split='test' and name='acc' and selection='best-val'").fetchone()
    assert n == (1,)
    assert not list((mm_env / "runs").glob("_replaced/*"))


# ---- --threads / train.threads ----------------------------------------------------------------
def test_threads_are_recorded_and_do_not_change_the_run_id(mm_env: Path, cli):
    r = write_recipe(mm_env / "r.yaml", epochs=1)
    code, out = cli("sweep", r, "--set", "train.eval_train=false", "--threads", "1")
    assert code == 0, out
    with sqlite3.connect(mm_env / "results.db") as con:
        (rid, env), = con.execute("select id, env_json from run").fetchall()
    assert json.loads(env)["threads"] == 1
    cfg = json.loads((mm_env / "runs" / rid / "config.json").read_text())
    assert cfg["train"]["threads"] == 1
    code, out = cli("sweep", r, "--set", "train.eval_train=false", "--set", "train.threads=2")
    assert code == 0 and "1 already done" in out  # the same run: threads change speed, not the experiment


# ---- --db in a folder that does not exist yet ------------------------------------------------
def test_db_in_a_new_folder_is_created(mm_env: Path, cli):
    r = write_recipe(mm_env / "r.yaml", epochs=1)
    url = f"sqlite:///{mm_env / 'new' / 'dir' / 'results.db'}"
    code, out = cli("sweep", r, "--dry-run", "--db", url)
    assert code == 0 and not (mm_env / "new").exists()  # a dry-run writes nothing
    code, out = cli("sweep", r, "--set", "train.eval_train=false", "--db", url)
    assert code == 0, out
    assert (mm_env / "new" / "dir" / "results.db").is_file()


# ---- two identical sweeps at once -----------------------------------------------------------
def test_second_identical_sweep_says_the_other_trained_it(mm_env: Path, monkeypatch):
    """Sweep B starts while A trains the run: B waits for it and must not claim it trained it."""
    from rich.console import Console

    from mmbench.sweep.launch import SweepOptions, run_sweep

    r = write_recipe(mm_env / "r.yaml", epochs=1, extra="")
    started, release = threading.Event(), threading.Event()
    from mmbench.engine import run as run_mod

    orig = run_mod.execute

    def slow_execute(*a, **kw):
        started.set()
        release.wait(60)
        return orig(*a, **kw)

    monkeypatch.setattr(run_mod, "execute", slow_execute)
    opts = SweepOptions(recipe=r, overrides=["train.eval_train=false"])
    res: dict[str, object] = {}
    ta = threading.Thread(target=lambda: res.__setitem__("a", run_sweep(opts, Console(quiet=True))))
    ta.start()
    assert started.wait(60)
    monkeypatch.setattr(run_mod, "execute", orig)
    tb = threading.Thread(target=lambda: res.__setitem__("b", run_sweep(opts, Console(quiet=True))))
    tb.start()
    import time

    time.sleep(1.0)  # B has found the run locked by A and waits for it
    release.set()
    ta.join(120)
    tb.join(120)
    a, b = res["a"], res["b"]
    assert (a.completed, a.by_other) == (1, 0)  # type: ignore[attr-defined]
    assert (b.completed, b.by_other) == (0, 1)  # type: ignore[attr-defined]
