"""An interrupted run resumes from its last finished epoch and ends exactly where an
uninterrupted run ends (CPU, same seed); a NaN loss fails that run and the sweep goes on."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import write_recipe
from mmbench.config import Recipe, expand
from mmbench.engine.trainer import Trainer
from mmbench.methods.base import METHODS, HParams, Method, StepContext, register_method


def cfg(epochs: int = 4, method: str | dict = "joint") -> dict:
    rec = Recipe.model_validate({"name": "r", "dataset": {"name": "synthetic", "protocol": "tiny"},
                                 "train": {"epochs": epochs, "batch_size": 32, "scheduler": {"name": "step", "step_size": 2}},
                                 "methods": [method], "seeds": [3]})
    return expand(rec)[0]


class Stop(Exception):
    pass


def test_resume_matches_uninterrupted(tmp_path: Path, tiny_data_dir: Path) -> None:
    c = cfg()
    full = Trainer(c, tmp_path / "full", torch.device("cpu"), str(tiny_data_dir)).fit()

    def stop_after_2(ev: dict) -> None:
        if ev["event"] == "epoch" and ev["epoch"] == 2:
            raise Stop

    rdir = tmp_path / "cut"
    with pytest.raises(Stop):
        Trainer(c, rdir, torch.device("cpu"), str(tiny_data_dir), progress=stop_after_2).fit()
    seen: list[int] = []
    resumed = Trainer(c, rdir, torch.device("cpu"), str(tiny_data_dir),
                      progress=lambda ev: seen.append(ev["epoch"]) if ev["event"] == "epoch" else None).fit()
    assert seen == [3, 4]  # only the remaining epochs were trained
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2, 3]
    for a, b in zip(full.history, resumed.history):
        for split in ("train", "val", "test"):
            for k, v in a["metrics"][split].items():
                if not k.startswith("epoch_") or not k.endswith("seconds"):  # timings differ run to run
                    assert b["metrics"][split][k] == pytest.approx(v, abs=1e-6), (a["epoch"], split, k)
    assert resumed.finals["best-val"]["test"]["acc"] == full.finals["best-val"]["test"]["acc"]


def test_selection_rules(tmp_path: Path, tiny_data_dir: Path) -> None:
    res = Trainer(cfg(epochs=3), tmp_path / "s", torch.device("cpu"), str(tiny_data_dir)).fit()
    val = [h["metrics"]["val"]["acc"] for h in res.history]
    test = [h["metrics"]["test"]["acc"] for h in res.history]
    assert res.selected["best-val"] == val.index(max(val))
    assert res.selected["oracle-test"] == test.index(max(test))
    assert res.selected["last"] == 2
    assert res.finals["best-val"]["test"]["acc"] == test[val.index(max(val))]


@register_method
class _NaNMethod(Method):
    """test-only: produces a NaN loss"""

    name = "_test_nan"
    HParams = HParams

    def update(self, inputs: dict, labels: torch.Tensor, ctx: StepContext) -> dict:
        return {"loss": torch.tensor(float("nan"))}


def test_nan_loss_fails_the_run_and_the_sweep_goes_on(mm_env: Path, cli) -> None:
    assert "_test_nan" in METHODS
    r = write_recipe(mm_env / "r.yaml", epochs=1, methods="[_test_nan, joint]")
    code, out = cli("sweep", r)
    assert code == 1, out
    assert "non-finite training loss" in out
    import sqlite3

    with sqlite3.connect(mm_env / "results.db") as c:
        st = dict(c.execute("select method, status from run").fetchall())
        err = c.execute("select error from run where method='_test_nan'").fetchone()[0]
        n_metrics = c.execute("select count(*) from epoch_metric e join run r on r.id = e.run_id where r.method='_test_nan'").fetchone()[0]
    assert st == {"_test_nan": "failed", "joint": "completed"}
    assert "non-finite" in err and n_metrics == 0
