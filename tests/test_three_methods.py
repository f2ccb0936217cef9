"""Every method on `synthetic/three` (audio, visual, 1-D text): a short run through the CLI that
completes with per-modality metrics for all three modalities and the method's own per-modality
diagnostics, or a refusal with exit 2 and the reason."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

RECIPE = """
name: three-{tag}
dataset: {{name: synthetic, protocol: three}}
model: {{backbone: tiny, fusion: concat}}
train:
  epochs: {epochs}
  batch_size: 32
  optimizer: {{name: sgd, lr: 0.01, momentum: 0.9, weight_decay: 1.0e-4}}
methods: [{method}]
seeds: [0]
"""

MODS = ("audio", "visual", "text")

# (tag, method entry, epochs, method/* diagnostics expected per modality)
CASES = [
    ("joint", "joint", 2, []),
    ("unimodal", "{name: unimodal, modality: text}", 2, []),
    ("agm", "{name: agm, alpha: 1.5}", 2, ["k", "score"]),
    ("ogm_ge", "{name: ogm_ge, alpha: 0.8, modulation_ends: 1}", 2, ["k", "ratio"]),
    ("mmpareto", "mmpareto", 2, ["cos", "w_mm"]),
    ("relearn", "{name: relearn, reinit_epoch: 1, reinit_num: 1}", 3, ["w", "gap"]),
    ("mie", "{name: mie, epoch_list: [1, 1, 1]}", 3, ["active"]),  # one stage per modality, in order
]


@pytest.mark.parametrize("tag, entry, epochs, diags", CASES, ids=[c[0] for c in CASES])
def test_method_runs_on_three_modalities(mm_env: Path, cli, tag: str, entry: str, epochs: int, diags: list[str]) -> None:
    r = mm_env / "r.yaml"
    r.write_text(RECIPE.format(tag=tag, epochs=epochs, method=entry))
    code, out = cli("sweep", r)
    assert code == 0, out
    with sqlite3.connect(mm_env / "results.db") as c:
        (status,) = c.execute("select status from run").fetchone()
        finals = {n for (n,) in c.execute("select name from final_metric where split='test' and selection='best-val'")}
        logged = {n for (n,) in c.execute("select distinct name from epoch_metric where name like 'method/%'")}
    assert status == "completed"
    if tag == "unimodal":
        assert "acc/text" in finals
        return
    assert {f"acc/{m}" for m in MODS} | {"imbalance_ratio"} <= finals, sorted(finals)
    for d in diags:
        assert {f"method/{d}_{m}" for m in MODS} <= logged, (d, sorted(logged))
