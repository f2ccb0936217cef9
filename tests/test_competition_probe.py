"""AGM's competition strength and linear probes: the math on hand-made features, and the run
dependency that supplies the mono-modal concept."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import torch

from conftest import write_recipe
from mmbench.config import Recipe
from mmbench.metrics.competition import RIDGE_ALPHA, competition_metrics, competition_strength, competition_strength_official
from mmbench.metrics.probe import linear_probe
from mmbench.sweep.plan import plan


def _features(seed: int, n_fit: int = 400, n_eval: int = 300, d: int = 8) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g)  # correlated concept dimensions, as pooled CNN features are
    y_fit, y_eval = 10 * torch.randn(n_fit, d, generator=g) @ mix, 10 * torch.randn(n_eval, d, generator=g) @ mix
    other_fit, other_eval = 10 * torch.randn(n_fit, d, generator=g), 10 * torch.randn(n_eval, d, generator=g)
    return y_fit, y_eval, other_fit, other_eval


def test_official_competition_near_zero_when_joint_contains_concept() -> None:
    y_fit, y_eval, other_fit, other_eval = _features(0)
    z_fit, z_eval = torch.cat([y_fit, other_fit], 1), torch.cat([y_eval, other_eval], 1)
    c_same = competition_strength_official(z_fit, y_fit, z_eval, y_eval)
    c_unrelated = competition_strength_official(other_fit, y_fit, other_eval, y_eval)
    assert c_same < 0.01
    assert 0.9 < c_unrelated < 1.2  # the ridge predicts ~the mean: ~the whitened variance
    assert c_unrelated > 50 * c_same


def test_official_competition_matches_the_formula_exactly() -> None:
    from sklearn.linear_model import Ridge

    g = torch.Generator().manual_seed(1)
    z_fit, z_eval = torch.randn(50, 4, generator=g), torch.randn(40, 4, generator=g)
    y_fit, y_eval = z_fit[:, :2] + 0.5 * torch.randn(50, 2, generator=g), z_eval[:, :2] + 0.5 * torch.randn(40, 2, generator=g)
    r = Ridge(alpha=120).fit(z_fit.double().numpy(), y_fit.double().numpy())
    res = torch.from_numpy(r.predict(z_eval.double().numpy())) - y_eval.double()
    b = torch.cov(y_eval.double().T) * 40
    want = float(torch.trace(res.T @ res @ torch.linalg.pinv(b)) / 2)
    assert competition_strength_official(z_fit, y_fit, z_eval, y_eval) == pytest.approx(want, rel=1e-12)
    assert RIDGE_ALPHA == 120.0


def test_calibrated_competition_reads_zero_for_the_concept_and_one_for_noise() -> None:
    y_fit, y_eval, other_fit, other_eval = _features(2)
    concept = competition_strength(torch.cat([y_fit, other_fit], 1), y_fit, torch.cat([y_eval, other_eval], 1), y_eval)
    noise = competition_strength(other_fit, y_fit, other_eval, y_eval)
    assert abs(concept.value) < 0.02
    assert abs(noise.value - 1) < 0.05
    # the run's own controls: a rotated concept and a fresh noise draw
    assert abs(concept.concept_control) < 0.02 and abs(concept.noise_control - 1) < 0.05
    assert concept.floor < 0.05 < 0.9 < concept.ceiling
    # half of the concept's dimensions present: in between, far from both ends
    part = competition_strength(torch.cat([y_fit[:, :4], other_fit], 1), y_fit, torch.cat([y_eval[:, :4], other_eval], 1), y_eval)
    assert 0.1 < part.value < 0.9


def test_calibrated_competition_ignores_the_feature_scale_where_the_official_one_does_not() -> None:
    y_fit, y_eval, other_fit, other_eval = _features(3)
    g = torch.Generator().manual_seed(4)
    # a representation that holds the concept partly (a noisy copy): the case where the scale matters
    z_fit = torch.cat([y_fit + 20 * torch.randn(y_fit.shape, generator=g), other_fit], 1)
    z_eval = torch.cat([y_eval + 20 * torch.randn(y_eval.shape, generator=g), other_eval], 1)
    small = competition_strength(z_fit / 10, y_fit, z_eval / 10, y_eval)
    base = competition_strength(z_fit, y_fit, z_eval, y_eval)
    big = competition_strength(10 * z_fit, y_fit, 10 * z_eval, y_eval)
    assert big.value == pytest.approx(base.value, abs=1e-9) and small.value == pytest.approx(base.value, abs=1e-9)
    official = [competition_strength_official(k * z_fit, y_fit, k * z_eval, y_eval) for k in (0.01, 1)]
    assert max(official) - min(official) > 0.05  # the fixed alpha follows the scale


def test_competition_metrics_names() -> None:
    y_fit, y_eval, other_fit, other_eval = _features(5, 120, 90, 4)
    out = competition_metrics(other_fit, y_fit, other_eval, y_eval, "audio")
    assert set(out) == {"competition/audio", "competition_official/audio", "competition_concept/audio",
                        "competition_noise/audio"}


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
