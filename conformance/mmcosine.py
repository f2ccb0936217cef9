"""MMCosine conformance: the official `train_epoch` (GeWu-Lab/MMCosine_ICASSP23, main_CD.py) against
mmbench's `mmcosine` step, from identical weights on the same fake batches.

    python conformance/mmcosine.py /path/to/MMCosine_ICASSP23 [--steps 3] [--batch 8] [--scaling 10]

Official side, unchanged: `train_epoch(args, epoch, model, device, loader, optimizer, writer)` with
`args.mmcosine=True`, the official `AVClassifier` (ResNet18 audio/visual, concat head) wrapped in
`DataParallel` as `main()` does, the official SGD settings (lr 1e-3, momentum 0.9, wd 1e-4). The
`writer` is a recorder: the official step logs fy_a / fy_v (mean true-class cosine logit), compared
with mmbench's `logit_audio` / `logit_visual`. Stubbed imports (never called by the step): the
dataset module, the missing `utils.utils`, tensorboard, and
`fusion_modules.Elementwise_addition` (imported by `basic_model.py` at HEAD, defined nowhere). The official `get_arguments()` cannot be
called (`add_argument(..., defult=...)` raises TypeError), so `args` is built with its defaults.
"""
from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import copy_weights, diff, export_tree, fake_batches, grad_recorder, load_file, report, state_of, stub_modules  # noqa: E402

COMMIT = "00ba0a9cbd9b866b5017e972a1266d7b664bf86e"
RULES = (("audio_net.", "encoders.audio.trunk."), ("visual_net.", "encoders.visual.trunk."),
         ("fusion_module.fc_out.", "fusion.base.fc."))


class Writer:
    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def add_scalar(self, tag: str, value: torch.Tensor, it: int) -> None:
        if tag == "data/logit_a":
            self.rows.append({})
        key = {"data/logit_a": "logit_audio", "data/logit_v": "logit_visual"}[tag]
        self.rows[-1][key] = float(value)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("repo")
    ap.add_argument("--commit", default=COMMIT)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--scaling", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    tree = export_tree(a.repo, a.commit)
    sys.path[:0] = [str(tree), str(tree / "models")]
    stub_modules("dataset.dataset", "utils.utils", "torch.utils.tensorboard")
    import fusion_modules  # type: ignore[import-not-found]
    fusion_modules.Elementwise_addition = object  # imported by basic_model at HEAD but defined nowhere; unused
    off = load_file(tree / "main_CD.py", "mmcosine_main")
    from basic_model import AVClassifier  # type: ignore[import-not-found]

    args = types.SimpleNamespace(dataset="CREMAD", fusion_method="concat", mmcosine=True, scaling=a.scaling,
                                 use_tensorboard=True, lam=0.0)
    torch.manual_seed(a.seed)
    from mmbench.models.classifier import weight_init
    official = AVClassifier(args)
    official.apply(weight_init)  # the repo's utils.utils.weight_init is not in the repository; any init will do
    batches = fake_batches(a.steps, a.batch, 6, (64, 48), (64, 64), seed=a.seed)

    from mmbench.methods.base import METHODS, ModelSpec, StepContext, TrainSpec
    cls = METHODS.get("mmcosine")
    spec = ModelSpec("resnet18", "concat", {"audio": [1, 64, 48], "visual": [1, 3, 64, 64]}, 6)
    opt = {"name": "sgd", "lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-4}
    ours = cls(spec, cls.HParams(scaling=a.scaling), TrainSpec(1, opt, {"name": "none"}))
    mapping = copy_weights(official, ours.model, RULES)
    ours.setup(torch.device("cpu"))
    ours.train()

    dp = torch.nn.DataParallel(official, device_ids=[])
    dp.train()
    off_opt = torch.optim.SGD(dp.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    off_grads = grad_recorder(off_opt, dict(official.named_parameters()))
    off_states: list = []
    off_opt.register_step_post_hook(lambda o, x, k: off_states.append(state_of(official)))
    our_grads = grad_recorder(ours.optimizer, dict(ours.model.named_parameters()))
    loader = [(b["audio"][:, 0].clone(), b["visual"].permute(0, 2, 1, 3, 4).contiguous(), b["label"], ["x"] * a.batch)
              for b in batches]
    writer = Writer()
    off.train_epoch(args, 0, dp, torch.device("cpu"), loader, off_opt, writer)

    rows = []
    m = lambda k: mapping.get(k)  # noqa: E731
    for i, b in enumerate(batches):
        logs = ours.update({"audio": b["audio"], "visual": b["visual"]}, b["label"], StepContext(0, i, a.steps, 1))
        p, buf = state_of(ours.model)
        rows.append((i, "grads", *diff(our_grads[i], off_grads[i], m)))
        rows.append((i, "params", *diff(p, off_states[i][0], m)))
        rows.append((i, "bn buffers", *diff(buf, off_states[i][1], m)))
        rows.append((i, "diagnostics", *diff({k: torch.as_tensor(float(v)) for k, v in logs.items()},
                                             {k: torch.tensor(v) for k, v in writer.rows[i].items()}, lambda k: k)))
    print(f"MMCosine: official {a.commit[:12]} vs mmbench, {a.steps} steps, batch {a.batch}, scaling {a.scaling}\n")
    return report(rows)


if __name__ == "__main__":
    sys.exit(main())
