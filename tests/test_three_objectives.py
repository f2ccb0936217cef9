"""MMCosine, CML, MBSD and LFM on `synthetic/three` (audio, visual, 1-D text) through the CLI: each
run completes with per-modality metrics for all three modalities and the method's own diagnostics
(per modality where it has them)."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

RECIPE = """
name: three-{tag}
dataset: {{name: synthetic, protocol: three}}
model: {{backbone: tiny, fusion: {fusion}}}
train:
  epochs: 2
  batch_size: 32
  optimizer: {{name: sgd, lr: 0.01, momentum: 0.9, weight_decay: 1.0e-4}}
methods: [{method}]
seeds: [0]
"""

MODS = ("audio", "visual", "text")

# (tag, fusion, method entry, diagnostics per modality, other diagnostics)
CASES = [
    ("mmcosine", "concat", "{name: mmcosine, scaling: 10}", ["logit"], []),
    ("cml", "concat", "{name: cml, lam: 0.1}", [], ["ce", "calibration"]),
    ("mbsd", "concat", "mbsd", ["loss"], ["loss_rs", "loss_kl", "distilled"]),
    ("lfm", "sum", "{name: lfm, strategy: learnable}", [], ["loss_cls", "loss_align", "alpha_grad", "alpha_cls"]),
]


@pytest.mark.parametrize("tag, fusion, entry, per_mod, other", CASES, ids=[c[0] for c in CASES])
def test_objective_method_on_three_modalities(mm_env: Path, cli, tag, fusion, entry, per_mod, other) -> None:
    r = mm_env / "r.yaml"
    r.write_text(RECIPE.format(tag=tag, fusion=fusion, method=entry))
    code, out = cli("sweep", r)
    assert code == 0, out
    with sqlite3.connect(mm_env / "results.db") as c:
        (status,) = c.execute("select status from run").fetchone()
        finals = {n for (n,) in c.execute("select name from final_metric where split='test' and selection='best-val'")}
        logged = {n for (n,) in c.execute("select distinct name from epoch_metric where name like 'method/%'")}
    assert status == "completed"
    assert {f"acc/{m}" for m in MODS} | {"imbalance_ratio"} <= finals, sorted(finals)
    for d in per_mod:
        assert {f"method/{d}_{m}" for m in MODS} <= logged, (d, sorted(logged))
    assert {f"method/{d}" for d in other} <= logged, sorted(logged)
