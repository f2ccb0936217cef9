"""Helpers the conformance scripts share (developer tooling; not part of the package, never run by CI).

Each script takes a local checkout (or bare mirror) of the official repository, exports its tree at
the pinned commit to a temporary folder, imports the official step function from there (stubbing
only imports the step never uses: datasets, loggers, Lightning), runs it on small fake batches from
weights identical to mmbench's, runs mmbench's own step on the same batches, and prints per step the
max absolute and relative difference of gradients, parameters after the step, BN buffers and
diagnostics. Nothing official is copied into this repository.

Relative difference of a group: max |a - b| over the group / max |b| over the group (b official).
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
import types
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterable

import torch


def export_tree(repo: str, commit: str) -> Path:
    """`git archive COMMIT` of a checkout or bare mirror into a temporary folder."""
    out = Path(tempfile.mkdtemp(prefix="mmbench-conf-"))
    have = subprocess.run(["git", "-C", repo, "cat-file", "-t", commit], capture_output=True, text=True)
    if have.returncode != 0:
        sys.exit(f"{repo} has no commit {commit}; fetch the official repository at that commit")
    # a mirror may lack some (data) blobs, on which `git archive` aborts: export the present ones
    listing = subprocess.run(["git", "-C", repo, "ls-tree", "-r", commit], capture_output=True, text=True, check=True)
    present = [line.split("\t", 1)[1] for line in listing.stdout.splitlines()
               if subprocess.run(["git", "-C", repo, "cat-file", "-e", line.split()[2]],
                                 capture_output=True).returncode == 0]
    arch = subprocess.Popen(["git", "-C", repo, "archive", commit, "--", *present], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(out)], stdin=arch.stdout, check=True)
    arch.wait()
    return out


class _AnyMeta(type):
    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Any


class _Any(metaclass=_AnyMeta):
    """A harmless class whose every attribute is itself (type hints, base classes of unused imports)."""

    def __init__(self, *a: Any, **k: Any) -> None:
        pass

    def __class_getitem__(cls, item: Any) -> Any:
        return cls


class _Anything(types.ModuleType):
    """A stub module: any attribute is `_Any` (for imports the step never uses)."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Any


def stub_modules(*names: str) -> None:
    for n in names:
        parts = n.split(".")
        for i in range(1, len(parts) + 1):
            key = ".".join(parts[:i])
            if key not in sys.modules:
                sys.modules[key] = _Anything(key)
                sys.modules[key].__path__ = []  # type: ignore[attr-defined]


def load_file(path: Path, name: str, package: str | None = None) -> types.ModuleType:
    """Import one official file as module `name` (optionally inside a stub package, so its
    relative imports resolve against stubs)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    if package:
        mod.__package__ = package
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def fake_batches(n: int, b: int, classes: int, audio_hw: tuple[int, int], visual_hw: tuple[int, int], frames: int = 1,
                 seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Batches in mmbench's layout: audio (B,1,F,T), visual (B,T,3,H,W), label (B,). Labels cover
    every class where the batch allows."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        y = torch.randperm(b, generator=g) % classes
        out.append({"audio": torch.randn(b, 1, *audio_hw, generator=g),
                    "visual": torch.randn(b, frames, 3, *visual_hw, generator=g), "label": y})
    return out


def official_to_mmbench(name: str, rules: Iterable[tuple[str, str]]) -> str | None:
    for pre, rep in rules:
        if name.startswith(pre):
            return rep + name[len(pre):]
    return None


def copy_weights(src: torch.nn.Module, dst: torch.nn.Module, rules: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Load the official model's state into mmbench's; every mmbench key must be covered.
    Returns official name -> mmbench name."""
    rules = list(rules)
    sd, mapping = OrderedDict(), {}
    proj = dst.state_dict()
    for k, v in src.state_dict().items():
        p = official_to_mmbench(k, rules)
        if p is not None and p in proj:
            sd[p] = v.detach().clone()
            mapping[k] = p
    missing = set(proj) - set(sd)
    if missing:
        raise RuntimeError(f"no official counterpart for {sorted(missing)[:5]}")
    dst.load_state_dict(sd, strict=True)
    return mapping


def grad_recorder(opt: torch.optim.Optimizer, named: dict[str, torch.nn.Parameter]) -> list[dict[str, torch.Tensor | None]]:
    """Clone every gradient right before each optimizer step."""
    rec: list[dict[str, torch.Tensor | None]] = []
    by_id = {id(p): n for n, p in named.items()}

    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        g = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) in by_id:
                    g[by_id[id(p)]] = None if p.grad is None else p.grad.detach().clone()
        rec.append(g)

    opt.register_step_pre_hook(hook)
    return rec


def state_of(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    bufs = {k: v.detach().clone() for k, v in model.named_buffers() if v.is_floating_point()}
    return params, bufs


def diff(a: dict[str, Any], b: dict[str, Any], mapping: Callable[[str], str | None]) -> tuple[float, float, int]:
    """(max abs, max rel, count) over tensors of official dict b and their mmbench counterparts in a."""
    mx, scale, n = 0.0, 0.0, 0
    for k, vb in b.items():
        pk = mapping(k)
        if pk is None or pk not in a:
            continue
        va = a[pk]
        if vb is None and va is None:
            continue
        if (vb is None) != (va is None):
            return float("inf"), float("inf"), n + 1
        vb_t, va_t = torch.as_tensor(vb).double(), torch.as_tensor(va).double()
        mx = max(mx, (va_t - vb_t).abs().max().item())
        scale = max(scale, vb_t.abs().max().item())
        n += 1
    return mx, (mx / scale if scale > 0 else mx), n


def report(rows: list[tuple[int, str, float, float, int]], tol: float = 1e-5) -> int:
    """Print the per-step table; exit status 0 when every relative difference is within `tol`."""
    print(f"| step | group | n | max abs diff | max rel diff |\n|---|---|---|---|---|")
    worst = 0.0
    for step, group, a, r, n in rows:
        print(f"| {step} | {group} | {n} | {a:.3e} | {r:.3e} |")
        worst = max(worst, r)
    bitwise = all(a == 0.0 for _, _, a, _, _ in rows)
    print(f"\nmax rel diff {worst:.3e}; bitwise: {'yes' if bitwise else 'no'}; "
          f"{'within' if worst <= tol else 'BEYOND'} {tol:g}")
    return 0 if worst <= tol else 1


# ---- BalanceBenchmark (GeWu-Lab/BalanceBenchmark) trainers ----------------------------------------
BB_COMMIT = "4c1482fca5aaa8d4278af8e26020daa039e3ccf3"
BB_STUBS = ("bbmm.trainer.base_trainer", "bbmm.models.avclassify_model", "bbmm.evaluation.complex",
            "bbmm.evaluation.modalitys", "bbmm.evaluation.precisions", "lightning", "lightning.fabric",
            "lightning.fabric.loggers", "lightning_utilities")


def load_bb_trainer(repo: str, file: str, commit: str = BB_COMMIT) -> types.ModuleType:
    """Import one trainer file of BalanceBenchmark unchanged, its imports (Lightning, the base trainer,
    evaluation helpers: none used by `training_step`) stubbed."""
    tree = export_tree(repo, commit)
    stub_modules(*BB_STUBS)
    stem = Path(file).stem
    return load_file(tree / "balancemm" / "trainer" / file, f"bbmm.trainer.{stem}", package="bbmm.trainer")


class BBModel(torch.nn.Module):
    """mmbench's model behind BalanceBenchmark's model interface (`modalitys`, `encoder_result`,
    `unimodal_result`, `fusion_module.fc_out`, `device`), for a concat head. Its per-modality logits
    re-state BalanceBenchmark's `unimodality_calculate` (W_m phi_m + b/M; 'output' the fused logits);
    its trainers at the pinned commit call that method `Unimodality_Calculate`."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.inner = model
        self.modalitys = list(model.modalities)
        self.fusion_module = types.SimpleNamespace(fc_out=model.fusion.fc)
        self.device = torch.device("cpu")

    def forward(self, batch: dict[str, torch.Tensor], **kw: Any) -> Any:
        feats = self.inner.encode({m: batch[m] for m in self.modalitys})
        self.encoder_result = {**feats, "output": self.inner.fusion(feats)}
        self.unimodality_calculate()
        return self.encoder_result, self.unimodal_result, self.prediction

    def unimodality_calculate(self) -> dict[str, torch.Tensor]:
        fc = self.fusion_module.fc_out
        n, now = len(self.modalitys), 0
        self.unimodal_result, self.prediction = {}, {}
        for m in self.modalitys:
            d = self.encoder_result[m].shape[1]
            self.unimodal_result[m] = torch.mm(self.encoder_result[m], torch.transpose(fc.weight[:, now:now + d], 0, 1)) + fc.bias / n
            now += d
        self.unimodal_result["output"] = self.encoder_result["output"]
        for k, v in self.unimodal_result.items():
            self.prediction[k] = torch.argmax(torch.softmax(v, dim=1), dim=1)
        return self.unimodal_result

    Unimodality_Calculate = unimodality_calculate
