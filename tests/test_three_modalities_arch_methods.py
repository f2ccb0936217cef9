"""Issue 12's architecture- and data-level methods on `synthetic/three`: those their authors define for more
than two modalities train; the others refuse with exit 2 and the reason, before anything runs."""
from __future__ import annotations

import sqlite3

import pytest
from conftest import run_cli

RECIPE = """
name: three
dataset: {{name: synthetic, protocol: three}}
model: {{backbone: tiny, fusion: concat}}
train:
  epochs: 2
  batch_size: 32
  optimizer: {{name: sgd, lr: 0.01, momentum: 0.9}}
methods: {methods}
seeds: [0]
"""


def test_mla_opm_amco_train_on_three_modalities(tmp_path, monkeypatch):
    monkeypatch.setenv("MMBENCH_DATA", str(tmp_path / "data"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(methods="[{name: mla, model: {fusion: shared}}, {name: opm, warmup_epochs: 0}, amco]"))
    db = tmp_path / "r.db"
    assert run_cli(monkeypatch, "sweep", str(recipe), "--db", f"sqlite:///{db}", "--runs-dir", str(tmp_path / "runs"),
                   "--device", "cpu") == 0
    con = sqlite3.connect(db)
    done = {m for (m,) in con.execute("select method from run where status = 'completed'")}
    names = {n for (n,) in con.execute("select distinct name from epoch_metric")}
    con.close()
    assert {"mla", "opm", "amco"} <= done
    want = {"acc/audio", "acc/visual", "acc/text", "imbalance_ratio", "method/q_text", "method/loss_text"}
    assert want <= names, want - names


@pytest.mark.parametrize("entry,reason", [("valuation", "two modalities"), ("{name: opm, mode: ogm}", "two")])
def test_two_modality_methods_refuse_three(tmp_path, monkeypatch, capsys, entry, reason):
    monkeypatch.setenv("MMBENCH_DATA", str(tmp_path / "data"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(methods=f"[{entry}]"))
    assert run_cli(monkeypatch, "sweep", str(recipe), "--db", f"sqlite:///{tmp_path / 'r.db'}",
                   "--runs-dir", str(tmp_path / "runs"), "--device", "cpu") == 2
    assert reason in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("checkpoint.pt"))
