"""Precise BatchNorm and the BN gap: statistics re-estimated over train batches for evaluation,
the training's own statistics put back afterwards, and accuracy with batch statistics measured
without changing anything."""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mmbench.engine.evaluate import batch_stat_accuracy, bn_buffers, recompute_bn, restore_bn


class Tiny(nn.Module):
    """Just enough of a Method: predict, autocast, train/eval."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(3)
        self.fc = nn.Linear(3, 2)

    def predict(self, inputs):
        return SimpleNamespace(logits=self.fc(self.bn(inputs["x"])))

    def autocast(self):
        return contextlib.nullcontext()


def batches(seed: int, n: int = 5, shift: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    return [{"x": shift + 2 * torch.randn(8, 3, generator=g), "label": torch.zeros(8, dtype=torch.long)} for _ in range(n)]


def prepare(raw, train):
    return {"x": raw["x"]}, raw["label"]


def test_recompute_is_the_plain_average_over_the_batches_and_restore_puts_training_statistics_back() -> None:
    m = Tiny()
    m.train()
    for b in batches(0):  # stale statistics from "training"
        m.predict({"x": b["x"] * 0.1})
    stale = bn_buffers(m)
    data = batches(1)
    used = recompute_bn(m, data, prepare, limit=3)
    assert used == 3
    xs = [b["x"] for b in data[:3]]
    want_mean = torch.stack([x.mean(0) for x in xs]).mean(0)
    want_var = torch.stack([x.var(0, unbiased=True) for x in xs]).mean(0)
    assert torch.allclose(m.bn.running_mean, want_mean, atol=1e-6)
    assert torch.allclose(m.bn.running_var, want_var, atol=1e-5)
    assert m.bn.momentum == 0.1 and m.training  # momentum and mode restored
    restore_bn(m, stale)
    assert torch.equal(m.bn.running_mean, stale[0]["running_mean"]) and torch.equal(m.bn.running_var, stale[0]["running_var"])
    assert recompute_bn(m, data, prepare, limit=0) == 0 and torch.equal(m.bn.running_mean, stale[0]["running_mean"])


def test_batch_stat_accuracy_changes_no_buffer() -> None:
    m = Tiny()
    before = bn_buffers(m)
    acc = batch_stat_accuracy(m, batches(2), prepare)
    assert 0.0 <= acc <= 1.0
    after = bn_buffers(m)
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])


def test_precise_bn_end_to_end_is_recorded_and_gap_logged(tmp_path, cli) -> None:
    import json
    import sqlite3

    rec = tmp_path / "pbn.yaml"
    rec.write_text("name: pbn\ndataset: {name: synthetic, protocol: tiny}\n"
                   "train: {epochs: 2, batch_size: 32, precise_bn: 4}\nmethods: [joint]\nseeds: [0]\n")
    db = tmp_path / "r.db"
    code, out = cli("sweep", str(rec), "--db", f"sqlite:///{db}", "--runs-dir", str(tmp_path / "runs"),
                    "--data-dir", str(tmp_path / "data"))
    assert code == 0, out
    with sqlite3.connect(db) as c:
        cfg = json.loads(c.execute("select config_json from run").fetchone()[0])
        gaps = c.execute("select count(*) from epoch_metric where name='bn_gap' and split='val'").fetchone()[0]
        cpu = c.execute("select count(*) from epoch_metric where name='epoch_cpu_seconds' and split='train'").fetchone()[0]
    assert cfg["train"]["precise_bn"] == 4 and gaps == 2 and cpu == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ndataset: {name: synthetic, protocol: tiny}\ntrain: {precise_bn: -1}\nmethods: [joint]\n")
    code, out = cli("sweep", str(bad), "--dry-run", "--db", f"sqlite:///{tmp_path / 'b.db'}")
    assert code == 2 and "precise_bn" in out


def test_precise_bn_changes_evaluation_only_even_for_agm(tmp_path, cli) -> None:
    """AGM trains through eval-mode forwards, which read the running statistics: re-estimating them
    for evaluation must not leak into its training (same losses and coefficients with and without)."""
    import sqlite3

    logs = []
    for n in (0, 3):
        rec = tmp_path / f"agm{n}.yaml"
        rec.write_text("name: a\ndataset: {name: synthetic, protocol: tiny}\n"
                       f"train: {{epochs: 2, batch_size: 32, precise_bn: {n}, eval_train: false}}\nmethods: [agm]\nseeds: [0]\n")
        db = tmp_path / f"a{n}.db"
        code, out = cli("sweep", str(rec), "--db", f"sqlite:///{db}", "--runs-dir", str(tmp_path / f"runs{n}"),
                        "--data-dir", str(tmp_path / "data"))
        assert code == 0, out
        with sqlite3.connect(db) as c:
            logs.append(c.execute("select epoch, name, value from epoch_metric where split='train' and "
                                  "(name='train_loss' or name like 'method/%') order by epoch, name").fetchall())
    assert logs[0] and logs[0] == logs[1]
