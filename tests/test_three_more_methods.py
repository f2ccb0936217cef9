"""PMR, MSLR, the ensembles, UMT and G-Blending on `synthetic/three` (audio, visual, 1-D text):
a short CLI run completes with per-modality metrics for all three modalities and each method's own
per-modality diagnostics; the ensembles and UMT get their three unimodal reference runs."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from test_three_methods import MODS, RECIPE

CASES = [
    ("pmr", "{name: pmr, alpha: 2.0, momentum_coef: 0.5}", 2, ["coef", "loss_proto"]),
    ("mslr", "{name: mslr, init_coeffs: {audio: 0.9, visual: 1.1, text: 0.7}, window: 1}", 2, ["coeff", "ratio"]),
    ("ensemble", "ensemble", 2, []),
    ("ume", "ume", 2, []),
    ("umt", "{name: umt, scaling: 5.0}", 2, ["distill"]),
    ("gblending", "{name: gblending, super_epoch: 1, probe_epochs: 1}", 2, ["w", "loss", "gain"]),
]


@pytest.mark.parametrize("tag, entry, epochs, diags", CASES, ids=[c[0] for c in CASES])
def test_method_runs_on_three_modalities(mm_env: Path, cli, tag: str, entry: str, epochs: int, diags: list[str]) -> None:
    r = mm_env / "r.yaml"
    r.write_text(RECIPE.format(tag=tag, epochs=epochs, method=entry))
    code, out = cli("sweep", r)
    assert code == 0, out
    with sqlite3.connect(mm_env / "results.db") as c:
        runs = dict(c.execute("select method, status from run where method != 'unimodal'").fetchall())
        refs = c.execute("select count(*) from run where method = 'unimodal' and status = 'completed'").fetchone()[0]
        finals = {n for (n,) in c.execute(
            "select f.name from final_metric f join run r on r.id = f.run_id "
            "where r.method != 'unimodal' and f.split='test' and f.selection='best-val'")}
        logged = {n for (n,) in c.execute("select distinct name from epoch_metric where name like 'method/%'")}
    assert runs == {tag: "completed"}
    assert refs == (3 if tag in ("ensemble", "ume", "umt") else 0)
    assert {f"acc/{m}" for m in MODS} | {"imbalance_ratio"} <= finals, sorted(finals)
    for d in diags:
        assert {f"method/{d}_{m}" for m in MODS} <= logged, (d, sorted(logged))
