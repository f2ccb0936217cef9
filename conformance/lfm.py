"""LFM conformance: the official `train_audio_video` and `getAlpha_Learnable` / `getAlpha_Learnable_Fitted`
(njustkmg/NeurIPS24-LFM, Crema_epoch_learnable.py / Crema_epoch.py) against mmbench's `lfm`, from
identical weights on the same fake batches.

    python conformance/lfm.py /path/to/NeurIPS24-LFM [--strategy learnable|fitted] [--epoch 0] [--steps 3] [--batch 8]

Official side, unchanged: the official `AVClassifier` (ResNet18 audio/visual, one head each, logits
summed) initialised by the official `weight_init`, the official SGD (lr 1e-2, momentum 0.9, wd 1e-4,
data/crema.json). `learnable`: `getAlpha_Learnable(epoch, val_batch, model, [0.05, 0.95], 1e-4)` on
a 16-sample held-out batch (it uses the first 8), the model in train mode at epoch 0 and in eval
mode after (as the official loop leaves it), then `train_audio_video` with the resulting weights;
mmbench runs `on_epoch_start` (alpha_bn=official, the first 8 samples of its held-out loader) and
then its steps. `fitted`: the official polynomial weights of `--epoch`.

Glue, not official logic: `.cuda()` on tensors and modules is made a no-op (the official step calls it
unconditionally); imports the step never uses are stubbed (the dataset module, transformers, geomloss,
tqdm as an identity). Labels are fed to the official side one-hot, as its dataset returns them.
"""
from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import copy_weights, diff, export_tree, fake_batches, grad_recorder, load_file, report, state_of, stub_modules  # noqa: E402

COMMIT = "ad44fa09fee471c9267a7cba526b222c54d45493"
RULES = (("audio_encoder.audio_net.", "encoders.audio.trunk."), ("video_encoder.video_net.", "encoders.visual.trunk."),
         ("cls_a.", "fusion.heads.audio."), ("cls_v.", "fusion.heads.visual."))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("repo")
    ap.add_argument("--commit", default=COMMIT)
    ap.add_argument("--strategy", default="learnable", choices=["learnable", "fitted"])
    ap.add_argument("--epoch", type=int, default=0)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    tree = export_tree(a.repo, a.commit)
    sys.path.insert(0, str(tree))
    stub_modules("dataset.CREMA", "transformers", "geomloss")
    sys.modules["tqdm"] = types.ModuleType("tqdm")
    sys.modules["tqdm"].tqdm = lambda it, *x, **k: it  # type: ignore[attr-defined]
    torch.Tensor.cuda = lambda self, *x, **k: self  # type: ignore[method-assign]
    torch.nn.Module.cuda = lambda self, *x, **k: self  # type: ignore[method-assign]
    name = "Crema_epoch_learnable.py" if a.strategy == "learnable" else "Crema_epoch.py"
    off = load_file(tree / name, "lfm_main")
    torch.autograd.set_detect_anomaly(False)  # the official module switches it on at import; numerics unchanged
    from model.AudioVideo import AVClassifier  # type: ignore[import-not-found]
    from utils.tools import weight_init  # type: ignore[import-not-found]

    cfg = {"text": {"name": "resnet18"}, "visual": {"name": "resnet18"}, "fps": 1, "setting": {"num_class": 6}}
    torch.manual_seed(a.seed)
    official = AVClassifier(config=cfg)
    official.apply(weight_init)

    from mmbench.methods.base import METHODS, EpochContext, ModelSpec, StepContext, TrainSpec
    cls = METHODS.get("lfm")
    spec = ModelSpec("resnet18", "sum", {"audio": [1, 64, 48], "visual": [1, 3, 64, 64]}, 6)
    opt = {"name": "sgd", "lr": 1e-2, "momentum": 0.9, "weight_decay": 1e-4}
    ours = cls(spec, cls.HParams(strategy=a.strategy, alpha_bn="official"), TrainSpec(200, opt, {"name": "none"}))
    mapping = copy_weights(official, ours.model, RULES)
    ours.setup(torch.device("cpu"))
    ours.train()

    batches = fake_batches(a.steps + 2, a.batch, 6, (64, 48), (64, 64), seed=a.seed)
    held = {k: torch.cat([batches[-2][k], batches[-1][k]]) for k in batches[0]}  # 2 batches -> 16 held-out samples
    batches = batches[:a.steps]
    to_off = lambda b: (b["audio"][:, 0].clone(), b["visual"].permute(0, 2, 1, 3, 4).contiguous(),  # noqa: E731
                        torch.eye(6)[b["label"]])
    rows = []
    m = lambda k: mapping.get(k)  # noqa: E731

    # the weights of this epoch
    official.train(a.epoch == 0)  # the official loop leaves the model in eval mode after each test pass
    off_alpha_grad: list[float] = []
    if a.strategy == "learnable":
        real_grad = torch.autograd.grad

        def grad(*x, **k):  # records the official hyper-gradient (the third grad call's first tensor, meaned)
            out = real_grad(*x, **k)
            if "grad_outputs" in k:
                off_alpha_grad.append(out[0].mean().item())
            return out

        torch.autograd.grad = grad  # type: ignore[assignment]
        try:
            cls_k, _ = off.getAlpha_Learnable(a.epoch, to_off(held), official, [0.05, 0.95], 1e-4)
        finally:
            torch.autograd.grad = real_grad  # type: ignore[assignment]
    else:
        cls_k = off.getAlpha_Learnable_Fitted(a.epoch)
    ectx = EpochContext(a.epoch, 200, a.steps, torch.device("cpu"), {"val": [held]},
                        lambda r, train: ({"audio": r["audio"], "visual": r["visual"]}, r["label"]))
    logs0 = ours.on_epoch_start(ectx)
    p_off, b_off = state_of(official)
    p_our, b_our = state_of(ours.model)
    rows.append(("alpha", "alpha (cls, align)", *diff({"a": torch.tensor(ours.alpha, dtype=torch.float64)},
                                                       {"a": torch.tensor(cls_k, dtype=torch.float64)}, lambda k: k)))
    rows.append(("alpha", "bn buffers after the probe", *diff(b_our, b_off, m)))
    if off_alpha_grad:
        rows.append(("alpha", "diagnostics (alpha_grad)", *diff({"g": torch.tensor(logs0["alpha_grad"])},
                                                                 {"g": torch.tensor(off_alpha_grad[0])}, lambda k: k)))
    print(f"alpha after epoch-{a.epoch} weights: official {cls_k}, mmbench {ours.alpha} ({logs0})")

    # the training steps
    official.train()
    off_opt = torch.optim.SGD(official.parameters(), lr=1e-2, momentum=0.9, weight_decay=1e-4)
    off_grads = grad_recorder(off_opt, dict(official.named_parameters()))
    off_states: list = []
    off_opt.register_step_post_hook(lambda o, x, k: off_states.append(state_of(official)))
    our_grads = grad_recorder(ours.optimizer, dict(ours.model.named_parameters()))
    logger = types.SimpleNamespace(info=lambda *x, **k: None)
    off.train_audio_video(a.epoch, [to_off(b) for b in batches], official, off_opt, logger, cls_k)
    for i, b in enumerate(batches):
        ours.update({"audio": b["audio"], "visual": b["visual"]}, b["label"], StepContext(a.epoch, i, a.steps, 200))
        p, buf = state_of(ours.model)
        rows.append((i, "grads", *diff(our_grads[i], off_grads[i], m)))
        rows.append((i, "params", *diff(p, off_states[i][0], m)))
        rows.append((i, "bn buffers", *diff(buf, off_states[i][1], m)))
    print(f"LFM ({a.strategy}, epoch {a.epoch}): official {a.commit[:12]} vs mmbench, {a.steps} steps, batch {a.batch}\n")
    return report(rows)  # type: ignore[arg-type]


if __name__ == "__main__":
    sys.exit(main())
