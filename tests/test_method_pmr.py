"""PMR (Fan et al., CVPR 2023): prototype logits, class means, the switch, the loss it adds, smoothing."""
from __future__ import annotations

import copy
import sqlite3
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import write_recipe
from method_util import SHAPES3, batch, epoch_ctx, make, step_ctx

from mmbench.methods.pmr import behind_coefficients, class_means, prototype_logits


def test_prototype_logits_are_negative_euclidean_distances():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    c = torch.tensor([[0.0, 0.0], [3.0, 0.0], [6.0, 8.0]])
    assert torch.equal(prototype_logits(x, c), -torch.tensor([[0.0, 3.0, 10.0], [5.0, 4.0, 5.0]]))


def test_class_means_and_empty_class():
    f = torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 0.0]])
    means, counts = class_means(f, torch.tensor([0, 0, 2]), 3)
    assert torch.equal(means, torch.tensor([[2.0, 3.0], [0.0, 0.0], [10.0, 0.0]]))
    assert counts.tolist() == [2, 0, 1]


def test_switch_two_modalities_is_the_codes_ratio_rule():
    assert behind_coefficients({"a": torch.tensor(5.0), "v": torch.tensor(4.0)}, 2.0) == {"a": 0.0, "v": 2.0}
    assert behind_coefficients({"a": torch.tensor(3.0), "v": torch.tensor(4.0)}, 2.0) == {"a": 2.0, "v": 0.0}
    assert behind_coefficients({"a": torch.tensor(4.0), "v": torch.tensor(4.0)}, 2.0) == {"a": 0.0, "v": 0.0}


def test_switch_three_modalities_boosts_every_modality_behind_the_leader():
    c = behind_coefficients({"a": torch.tensor(2.0), "v": torch.tensor(5.0), "d": torch.tensor(1.0)}, 1.5)
    assert c == {"a": 1.5, "v": 0.0, "d": 1.5}


def used_grads(m, inputs, labels, epoch=0):
    seen = {}
    h = m.optimizer.register_step_pre_hook(lambda *_: seen.update(
        {n: p.grad.clone() for n, p in m.model.named_parameters() if p.grad is not None}))
    logs = m.update(inputs, labels, step_ctx(epoch))
    h.remove()
    return seen, logs


def reference_grads(model, protos, inputs, labels, coef):
    ref = copy.deepcopy(model)
    out = ref(inputs)
    loss = F.cross_entropy(out.logits, labels)
    for mod, c in coef.items():
        d = out.features[mod][:, None, :] - protos[mod][None]
        loss = loss + c * F.cross_entropy(-(d * d).sum(-1).sqrt(), labels)
    loss.backward()
    return {n: p.grad for n, p in ref.named_parameters()}


@pytest.mark.parametrize("shapes", [None, SHAPES3])
def test_step_adds_alpha_times_prototype_ce_of_the_modality_behind(shapes):
    m = make("pmr", shapes=shapes, alpha=2.0)
    data = [batch(shapes, seed=s) for s in range(3)]
    m.on_epoch_start(epoch_ctx(data))
    inputs, y = batch(shapes, seed=7)
    with torch.no_grad():
        feats = m.model(inputs).features
    scores = {k: torch.softmax(prototype_logits(feats[k], m.prototypes[k]), 1).gather(1, y[:, None]).sum() for k in feats}
    lead = max(scores.values())
    coef = {k: (2.0 if s < lead else 0.0) for k, s in scores.items()}
    assert sum(coef.values()) > 0
    ref = reference_grads(m.model, m.prototypes, inputs, y, coef)
    got, logs = used_grads(m, inputs, y)
    for n, g in ref.items():
        torch.testing.assert_close(got[n], g, rtol=1e-5, atol=1e-7)
    assert {f"coef_{k}" for k in feats} <= set(logs)


def test_outside_the_window_the_step_is_plain_joint_training():
    m = make("pmr", alpha=2.0, modulation_starts=0, modulation_ends=0)
    data = [batch(seed=s) for s in range(3)]
    m.on_epoch_start(epoch_ctx(data))
    inputs, y = batch(seed=7)
    ref = reference_grads(m.model, m.prototypes, inputs, y, {})
    got, logs = used_grads(m, inputs, y, epoch=1)
    for n, g in ref.items():
        torch.testing.assert_close(got[n], g, rtol=1e-5, atol=1e-7)
    assert logs["coef_audio"] == logs["coef_visual"] == 0.0


def test_prototypes_from_a_tenth_of_the_batches_in_eval_mode_and_smoothed_from_the_second_refresh():
    m = make("pmr", momentum_coef=0.25)
    data = [batch(seed=s) for s in range(20)]  # 20 // 10 = 2 batches
    m.on_epoch_start(epoch_ctx(data))
    assert m.model.training

    def means():
        m.model.eval()
        with torch.no_grad():
            f = [m.model(x).features for x, _ in data[:2]]
        m.model.train()
        y = torch.cat([y for _, y in data[:2]])
        return {k: class_means(torch.cat([ff[k] for ff in f]), y, 4)[0] for k in f[0]}

    first = means()
    for k in first:
        torch.testing.assert_close(m.prototypes[k], first[k])
    with torch.no_grad():  # move the model so that new prototypes differ
        for p in m.model.encoders.parameters():
            p.add_(0.05)
    m.on_epoch_end(epoch_ctx(data, epoch=0))  # the code passes epoch 0 here: no smoothing
    second = means()
    for k in first:
        torch.testing.assert_close(m.prototypes[k], second[k])
    with torch.no_grad():
        for p in m.model.encoders.parameters():
            p.add_(0.05)
    m.on_epoch_end(epoch_ctx(data, epoch=1))
    third = means()
    for k in first:
        torch.testing.assert_close(m.prototypes[k], 0.75 * third[k] + 0.25 * second[k])


def test_prototypes_survive_a_checkpoint():
    m = make("pmr")
    m.on_epoch_start(epoch_ctx([batch(seed=s) for s in range(3)]))
    state = m.extra_state()
    m2 = make("pmr")
    m2.load_extra_state(state)
    for k in m.prototypes:
        assert torch.equal(m.prototypes[k], m2.prototypes[k])


def test_end_to_end_two_epochs(mm_env: Path, cli):
    code, out = cli("sweep", write_recipe(mm_env / "r.yaml", methods="[{name: pmr, alpha: 2.0, momentum_coef: 0.5}]"))
    assert code == 0, out
    con = sqlite3.connect(mm_env / "results.db")
    names = {n for (n,) in con.execute("select distinct name from epoch_metric where name like 'method/%'")}
    status = con.execute("select status from run where method = 'pmr'").fetchall()
    con.close()
    assert status == [("completed",)]
    assert {"method/ratio", "method/coef_audio", "method/loss_proto_visual", "method/empty_classes"} <= names


@pytest.mark.parametrize("entry, needle", [
    ("{name: pmr, alpha: -1}", "alpha"),
    ("{name: pmr, momentum_coef: 1.5}", "momentum_coef"),
    ("{name: pmr, modulation_starts: 9, modulation_ends: 3}", "modulation_ends"),
    ("{name: pmr, prototype_fraction: 0}", "prototype_fraction"),
])
def test_bad_parameters_exit_2(mm_env: Path, cli, entry: str, needle: str):
    code, out = cli("sweep", write_recipe(mm_env / "r.yaml", methods=f"[{entry}]"), "--dry-run")
    assert code == 2, out
    assert needle in out
    assert not (mm_env / "runs").exists()


def test_prototype_split_val_uses_the_whole_validation_split_without_augmentation():
    m = make("pmr", prototype_split="val")
    val = [batch(seed=s) for s in (11, 12, 13)]
    seen = []
    ctx = epoch_ctx([batch(seed=1)], val=val)
    ctx.prepare_batch = lambda raw, train: (seen.append(train), raw)[1]
    m.on_epoch_start(ctx)
    assert seen == [False, False, False]
    m.model.eval()
    with torch.no_grad():
        f = [m.model(x).features for x, _ in val]
    y = torch.cat([y for _, y in val])
    for k in f[0]:
        torch.testing.assert_close(m.prototypes[k], class_means(torch.cat([ff[k] for ff in f]), y, 4)[0])
