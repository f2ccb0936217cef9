"""AGM's competition strength and linear probes: the math on hand-made features, and the run
dependency that supplies the mono-modal concept."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import torch

from conftest import write_recipe
from mmbench.config import Recipe
from mmbench.metrics.competition import competition_strength
from mmbench.metrics.probe import linear_probe
from mmbench.sweep.plan import plan


def test_competition_near_zero_when_joint_contains_concept() -> None:
    g = torch.Generator().manual_seed(0)
    # feature scale as pooled CNN features (ridge alpha 120 shrinks unit-scale features visibly)
    y_fit, y_eval = 10 * torch.randn(400, 8, generator=g), 10 * torch.randn(300, 8, generator=g)
    other_fit, other_eval = 10 * torch.randn(400, 8, generator=g), 10 * torch.randn(300, 8, generator=g)
    z_fit, z_eval = torch.cat([y_fit, other_fit], 1), torch.cat([y_eval, other_eval], 1)
    c_same = competition_strength(z_fit, y_fit, z_eval, y_eval)
    c_unrelated = competition_strength(other_fit, y_fit, other_eval, y_eval)
    assert c_same < 0.01
    # unrelated: the ridge predicts ~the mean, residual energy ~ the whitened variance: ~1
    assert 0.9 < c_unrelated < 1.2
    assert c_unrelated > 50 * c_same


def test_competition_matches_the_formula() -> None:
    from sklearn.linear_model import Ridge

    g = torch.Generator().manual_seed(1)
    z_fit, z_eval = torch.randn(50, 4, generator=g), torch.randn(40, 4, generator=g)
    y_fit, y_eval = z_fit[:, :2] + 0.5 * torch.randn(50, 2, generator=g), z_eval[:, :2] + 0.5 * torch.randn(40, 2, generator=g)
    r = Ridge(alpha=120).fit(z_fit.numpy(), y_fit.numpy())
    res = torch.from_numpy(r.predict(z_eval.numpy())).double() - y_eval.double()
    b = torch.cov(y_eval.double().T) * 40
    want = float(torch.trace(res.T @ res @ torch.linalg.pinv(b)) / 2)
    assert competition_strength(z_fit, y_fit, z_eval, y_eval) == pytest.approx(want, rel=1e-6)


def test_linear_probe_separable_vs_noise() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 3
    x = torch.randn(300, 6, generator=g) * 0.1 + torch.nn.functional.one_hot(y, 6).float()
    noise = torch.randn(300, 6, generator=g)
    good = linear_probe(x[:200], y[:200], {"test": (x[200:], y[200:])})
    bad = linear_probe(noise[:200], y[:200], {"test": (noise[200:], y[200:])})
    assert good["test"] == 1.0
    assert bad["test"] < 0.6


def test_plan_schedules_unimodal_dependencies_first() -> None:
    rec = Recipe.model_validate({
        "name": "c", "dataset": {"name": "synthetic", "protocol": "tiny"}, "metrics": {"competition": True},
        "methods": ["joint", {"name": "unimodal", "modality": "audio"}], "seeds": [0, 1],
        "grid": {"model.fusion": ["concat", "sum"]},
    })
    runs = plan(rec)
    ids = [r.id for r in runs]
    joint = [r for r in runs if r.cfg["method"]["name"] == "joint"]
    assert len(joint) == 4 and all(set(r.deps) == {"audio", "visual"} for r in joint)
    for r in joint:
        assert all(ids.index(d) < ids.index(r.id) for d in r.deps.values())
    # the explicit audio reference is reused, the visual one added once per seed; fusions share them
    uni = [r for r in runs if r.cfg["method"]["name"] == "unimodal"]
    assert len(uni) == 4
    assert sum(not r.requested for r in uni) == 2


def test_sweep_with_competition_and_probes(mm_env: Path, cli) -> None:
    r = write_recipe(mm_env / "r.yaml", epochs=2, methods="[joint]",
                     extra="metrics: {competition: true, probe: true}\n")
    code, out = cli("sweep", r)
    assert code == 0, out
    with sqlite3.connect(mm_env / "results.db") as c:
        methods = sorted(m for (m,) in c.execute("select method from run"))
        comp = c.execute("select count(*) from epoch_metric where name like 'competition/%' and split='test'").fetchone()[0]
        probes = dict(c.execute("select name || ':' || split, value from final_metric f join run r on r.id=f.run_id "
                                "where r.method='joint' and f.selection='best-val' and name like 'probe_acc/%'").fetchall())
    assert methods == ["joint", "unimodal", "unimodal"]
    assert comp == 4  # 2 modalities x 2 epochs
    assert set(probes) == {"probe_acc/audio:val", "probe_acc/audio:test", "probe_acc/visual:val", "probe_acc/visual:test"}
    assert all(0 <= v <= 1 for v in probes.values())
