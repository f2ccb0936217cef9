"""Greedy (docs/methods/greedy.md): the MMTM block, the conditional learning speed and d_BDR, the curation
state machine, the step's loss, and the CLI contract."""
from __future__ import annotations

import copy
import sqlite3

import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli, write_recipe
from pydantic import ValidationError

from mmbench.errors import UserError
from mmbench.methods.base import METHODS, ModelSpec, StepContext, TrainSpec
from mmbench.methods.greedy import d_bdr, learning_speed_terms, speed_ratios
from mmbench.models.encoders import ResNet18Trunk, TinyTrunk
from mmbench.models.mmtm import MMTM, MMTMClassifier, trunk_stages

SHAPES = {"audio": [1, 8, 8], "visual": [2, 3, 8, 8]}


def make(lr: float = 0.1, **hp: object):
    torch.manual_seed(0)
    cls = METHODS.get("greedy")
    spec = ModelSpec(backbone="tiny", fusion="mmtm", input_shapes=dict(SHAPES), num_classes=4)
    m = cls(spec, cls.HParams(**hp), TrainSpec(epochs=2, optimizer={"name": "sgd", "lr": lr}, scheduler={"name": "none"}))
    m.setup(torch.device("cpu"))
    m.train()
    return m


def batch(b: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(b, *s, generator=g) for k, s in SHAPES.items()}, torch.randint(0, 4, (b,), generator=g)


def hand_block() -> MMTM:
    """Two 2-channel branches, ratio 2 -> hidden 4, with weights chosen by hand."""
    blk = MMTM({"a": 2, "b": 2}, ratio=2)
    with torch.no_grad():
        blk.fc_squeeze.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [-1, -1, -1, -1]]))
        blk.fc_squeeze.bias.zero_()
        blk.fc_excite["a"].weight.copy_(torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 1]]))
        blk.fc_excite["a"].bias.zero_()
        blk.fc_excite["b"].weight.copy_(torch.tensor([[0.0, 0, 1, 0], [0, 0, 0, 2]]))
        blk.fc_excite["b"].bias.fill_(1.0)
    return blk


# ---- the MMTM block -------------------------------------------------------------------------
def test_excitation_by_hand():
    blk = hand_block().eval()
    sa, sb = torch.tensor([[1.0, -2.0]]), torch.tensor([[3.0, 0.5]])
    # hidden = relu([1, -2, 3, -(1 - 2 + 3 + 0.5)]) = [1, 0, 3, 0]
    exc = blk({"a": sa, "b": sb})
    torch.testing.assert_close(exc["a"], torch.sigmoid(torch.tensor([[1.0 + 3.0, 0.0]])))
    torch.testing.assert_close(exc["b"], torch.sigmoid(torch.tensor([[3.0 + 1.0, 0.0 + 1.0]])))


def test_running_average_is_the_cumulative_mean_over_training_forwards():
    blk = hand_block().train()
    s1 = {"a": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "b": torch.tensor([[0.0, 0.0], [2.0, 0.0]])}
    s2 = {"a": torch.tensor([[3.0, 3.0]]), "b": torch.tensor([[-1.0, 1.0]])}
    e1 = {k: v.detach() for k, v in blk(s1).items()}
    e2 = {k: v.detach() for k, v in blk(s2).items()}
    for m in ("a", "b"):
        torch.testing.assert_close(blk.average(m), (e1[m].mean(0) + e2[m].mean(0)) / 2)
    assert int(blk.avg_count) == 2
    blk.eval()
    blk(s2)
    assert int(blk.avg_count) == 2  # evaluation never moves the training state


def test_official_running_average_copies_the_first_branch_into_the_second():
    blk = MMTM({"a": 2, "b": 2}, ratio=2, average_rule="official").train()
    blk.load_state_dict(hand_block().state_dict())
    exc = blk({"a": torch.tensor([[1.0, -2.0]]), "b": torch.tensor([[3.0, 0.5]])})
    torch.testing.assert_close(blk.average("b"), exc["a"].detach().mean(0))
    assert not torch.allclose(blk.average("b"), exc["b"].detach().mean(0))
    with pytest.raises(UserError, match="equal width"):
        MMTM({"a": 2, "b": 3}, average_rule="official")


def test_curation_replaces_the_cared_excitation_by_its_constant_average():
    blk = hand_block().train()
    s = {"a": torch.randn(5, 2), "b": torch.randn(5, 2)}
    blk(s)  # one plain forward: average = its batch mean
    exc = blk(s, cared="a")
    assert torch.equal(exc["a"], blk.average("a").expand(5, 2))
    (exc["a"].sum() + exc["b"].sum()).backward()
    assert blk.fc_excite["a"].weight.grad is None  # no cross-modal path into the cared branch
    assert blk.fc_excite["b"].weight.grad is not None and blk.fc_squeeze.weight.grad is not None


def test_squeeze_and_excite_per_sample_for_video():
    y = torch.arange(2 * 3 * 2 * 4, dtype=torch.float32).reshape(2 * 3, 2, 2, 2)  # B=2, T=3, C=2, 2x2
    sq = MMTMClassifier._squeeze(y, 3)
    want = y.reshape(2, 3, 2, 4).permute(0, 2, 1, 3).reshape(2, 2, 12).mean(-1)
    torch.testing.assert_close(sq, want)
    e = torch.tensor([[2.0, 0.0], [1.0, 3.0]])
    out = MMTMClassifier._excite(y, e, 3)
    torch.testing.assert_close(out[:3, 0], 2 * y[:3, 0])  # sample 0's three frames, channel 0
    assert out[:3, 1].abs().sum() == 0
    torch.testing.assert_close(out[3:, 1], 3 * y[3:, 1])


@pytest.mark.parametrize("trunk", [TinyTrunk(3), ResNet18Trunk(3)], ids=["tiny", "resnet18"])
def test_stages_compose_to_the_trunk(trunk):
    trunk.eval()
    x = torch.randn(2, 3, 32, 32)
    y = x
    for stage in trunk_stages(trunk):
        y = stage(y)
    assert torch.equal(y, trunk(x))


def test_mmtm_blocks_sit_after_every_stage_but_the_first():
    m = make()
    assert sorted(m.model.mmtm) == ["1", "2"]  # tiny: three blocks
    torch.manual_seed(0)
    r = METHODS.get("greedy")(ModelSpec("resnet18", "mmtm", {"audio": [1, 32, 32], "visual": [1, 3, 32, 32]}, 3),
                              METHODS.get("greedy").HParams(), TrainSpec(1, {"name": "sgd"}, {"name": "none"}))
    widths = [blk.fc_excite["audio"].out_features for _, blk in sorted(r.model.mmtm.items())]
    assert widths == [128, 256, 512]  # the official mmtm2..4 (after layer2, layer3, layer4)


# ---- conditional learning speed and d_BDR ---------------------------------------------------
def test_speed_ratios_by_hand():
    p1, p2 = torch.nn.Parameter(torch.tensor([1.0, 2.0])), torch.nn.Parameter(torch.tensor([[2.0]]))
    p1.grad, p2.grad = torch.tensor([0.5, 0.5]), torch.tensor([[1.0]])
    p3 = torch.nn.Parameter(torch.tensor([3.0]))  # no gradient: counts 0
    r = speed_ratios({"main:a": [("p1", p1), ("p2", p2)], "bypass:a": [("p2", p2), ("p3", p3)]})
    assert r["main:a"] == pytest.approx((0.25 + 0.25 + 1.0) / (1 + 4 + 4))
    assert r["bypass:a"] == pytest.approx(1.0 / (4 + 9))


def test_d_bdr_sign_and_value():
    speed = {"main:a": 1.0, "bypass:a": 10.0, "main:b": 2.0, "bypass:b": 0.2}
    assert d_bdr(speed, ["a", "b"]) == pytest.approx(1.0 - (-1.0))


def test_learning_speed_groups_follow_the_official_split():
    m = make()
    g = {k: {n for n, _ in v} for k, v in learning_speed_terms(m.model).items()}
    assert "weight" in g["main:audio"] and "bias" in g["main:audio"]  # the audio head is the branch's own
    n_audio = len(list(m.model.encoders["audio"].parameters())) + 2
    assert len(g["main:audio"]) == n_audio
    for blk in ("1", "2"):
        assert f"mmtm.{blk}.fc_squeeze.weight" in g["bypass:audio"] and f"mmtm.{blk}.fc_squeeze.weight" in g["bypass:visual"]
        assert f"mmtm.{blk}.fc_excite.audio.weight" in g["bypass:audio"]
        assert f"mmtm.{blk}.fc_excite.audio.weight" not in g["bypass:visual"]
        assert f"mmtm.{blk}.fc_excite.visual.bias" in g["bypass:visual"]


# ---- the curation state machine -------------------------------------------------------------
def drive(m, values, epoch):
    """advance_curation with d_BDR taken from `values` whenever it is computed; returns the states."""
    it = iter(values)
    computed = []

    def fake():
        m.d_bdr = next(it)
        computed.append(m.d_bdr)

    m.accumulate_speed = fake
    states = []
    for _ in range(len(values) + 20):
        try:
            m.advance_curation(epoch)
        except StopIteration:
            break
        states.append((m.curation, m.caring))
    return states, computed


def test_no_curation_before_the_starting_epoch():
    m = make(starting_epoch=1)
    states, computed = drive(m, [0.5, -0.5, 0.5], epoch=0)
    assert states == [(False, 0)] * 3 and computed == [0.5, -0.5, 0.5]


def test_rebalance_off_measures_but_never_curates():
    m = make(rebalance=False)
    states, computed = drive(m, [0.5, -0.5], epoch=3)
    assert states == [(False, 0)] * 2 and computed == [0.5, -0.5]


def test_curation_window_and_caring_direction():
    m = make(epsilon=0.01, window=3)
    states, computed = drive(m, [0.005, -0.2, 0.3, 0.0], epoch=1)
    assert states == [(False, 0),                            # |d| <= eps
                      (True, 1), (True, 1), (True, 1),       # d < 0 -> care for modality 1, decided + 2 more
                      (False, 1),                            # window reached: leave (caring kept, unused)
                      (True, 0), (True, 0), (True, 0), (False, 0),  # d > 0 -> modality 0
                      (False, 0)]
    assert computed == [0.005, -0.2, 0.3, 0.0]  # d_BDR is not computed during curation


def test_curation_runs_window_forward_steps_with_the_cared_average():
    m = make(starting_epoch=0, epsilon=1e-12, window=2)
    x, y = batch()
    seen = []
    real = m.model.mmtm["1"].forward

    def spy(squeezed, cared=None):
        seen.append(cared)
        return real(squeezed, cared)

    m.model.mmtm["1"].forward = spy
    logs = [m.update(x, y, StepContext(0, s, 6, 2)) for s in range(6)]
    cared = m.modalities[m.caring]
    assert seen == [None, cared, cared, None, cared, cared]
    assert [lg["curation"] for lg in logs] == [0.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    assert m.model.cared is None  # never left set for evaluation


# ---- the step -------------------------------------------------------------------------------
def test_loss_is_the_sum_of_the_branch_heads_and_prediction_their_mean():
    m = make()
    x, y = batch()
    ref = copy.deepcopy(m.model)
    logs = m.update(x, y, StepContext(0, 0, 4, 2))
    ref.train()
    feats = ref.encode(x)
    per = {k: ref.fusion.heads[k](feats[k]) for k in ("audio", "visual")}
    want = F.cross_entropy(per["audio"], y) + F.cross_entropy(per["visual"], y)
    assert float(logs["loss"]) == pytest.approx(float(want.detach()), rel=1e-6)
    m.eval()
    out = m.predict(x)
    feats = m.model.encode(x)
    heads = m.model.fusion.heads
    torch.testing.assert_close(out.logits, (heads["audio"](feats["audio"]) + heads["visual"](feats["visual"])) / 2)


def test_extra_state_round_trip():
    m = make(starting_epoch=0, epsilon=1e-12)
    x, y = batch()
    for s in range(3):
        m.update(x, y, StepContext(0, s, 3, 2))
    other = make(starting_epoch=0, epsilon=1e-12)
    other.load_extra_state(m.extra_state())
    assert other.speed == m.speed and other.curation == m.curation and other.curation_step == m.curation_step
    assert other.caring == m.caring and other.d_bdr == m.d_bdr


# ---- bad input ------------------------------------------------------------------------------
def test_refuses_other_fusions_modality_counts_and_bad_values():
    cls = METHODS.get("greedy")
    with pytest.raises(UserError, match="fusion: mmtm"):
        cls.check(ModelSpec("tiny", "concat", dict(SHAPES), 4), cls.HParams())
    three = {**SHAPES, "flow": [1, 3, 8, 8]}
    with pytest.raises(UserError, match="two branches' conditional learning speeds"):
        cls.check(ModelSpec("tiny", "mmtm", three, 4), cls.HParams())
    for bad in ({"epsilon": 0}, {"window": 0}, {"starting_epoch": -1}, {"running_average": "buggy"}, {"alpha": 1}):
        with pytest.raises(ValidationError):
            cls.HParams(**bad)


def test_bad_parameters_exit_2_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("MMBENCH_DATA", str(tmp_path / "data"))
    recipe = write_recipe(tmp_path / "r.yaml", methods="[{name: greedy, model: {fusion: mmtm}, window: 0}]")
    assert run_cli(monkeypatch, "sweep", str(recipe), "--dry-run", "--db", f"sqlite:///{tmp_path / 'r.db'}") == 2
    recipe = write_recipe(tmp_path / "c.yaml", methods="[greedy]")  # the recipe's concat fusion
    assert run_cli(monkeypatch, "sweep", str(recipe), "--db", f"sqlite:///{tmp_path / 'c.db'}",
                   "--runs-dir", str(tmp_path / "runs"), "--device", "cpu") == 2
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("checkpoint.pt"))


# ---- end to end -----------------------------------------------------------------------------
def test_end_to_end_two_epochs_on_synthetic_tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("MMBENCH_DATA", str(tmp_path / "data"))
    recipe = write_recipe(tmp_path / "r.yaml", methods="[{name: joint, model: {fusion: mmtm}}, "
                                                       "{name: greedy, model: {fusion: mmtm}, starting_epoch: 0}]")
    db = tmp_path / "results.db"
    code = run_cli(monkeypatch, "sweep", str(recipe), "--db", f"sqlite:///{db}", "--runs-dir", str(tmp_path / "runs"),
                   "--device", "cpu")
    assert code == 0
    con = sqlite3.connect(db)
    runs = dict(con.execute("select method, fusion from run where status = 'completed'").fetchall())
    names = {n for (n,) in con.execute("select distinct name from epoch_metric e join run r on r.id = e.run_id "
                                      "where r.method = 'greedy'")}
    con.close()
    assert runs == {"joint": "mmtm", "greedy": "mmtm"}
    assert {"acc", "acc/audio", "acc/visual", "method/d_bdr", "method/curation", "method/care_audio",
            "method/care_visual"} <= names
