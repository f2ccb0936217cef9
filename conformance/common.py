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


class StepRecorder:
    """Optimizer pre/post step hooks: per step, the gradients the optimizer used and the parameters it
    left, keyed by `names[id(param)]` (the official or the mmbench name of each parameter)."""

    def __init__(self, opt: torch.optim.Optimizer, names: dict[int, str]) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []
        self.params: list[dict[str, torch.Tensor]] = []
        opt.register_step_pre_hook(lambda o, *a: self.grads.append(
            {names[id(p)]: p.grad.detach().clone() for g in o.param_groups for p in g["params"] if p.grad is not None}))
        opt.register_step_post_hook(lambda o, *a: self.params.append(
            {names[id(p)]: p.detach().clone() for g in o.param_groups for p in g["params"]}))


def per_tensor_diff(official: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(max abs, max rel) over the tensors of `official`, rel taken per tensor (|a - b|max / |b|max)."""
    abs_d, rel_d = 0.0, 0.0
    for k, b in official.items():
        d = (ours[k].double() - b.double()).abs().max().item() if b.numel() else 0.0
        scale = max(b.double().abs().max().item(), 1e-12) if b.numel() else 1.0
        abs_d, rel_d = max(abs_d, d), max(rel_d, d / scale)
    return abs_d, rel_d


def renamer(rules: Iterable[tuple[str, str]]) -> Callable[[str], str]:
    """official name -> mmbench name by prefix rules; an unmatched name is an error (nothing skipped silently)."""
    rules = list(rules)

    def rename(name: str) -> str:
        out = official_to_mmbench(name, rules)
        if out is None:
            raise KeyError(f"no mmbench counterpart for official tensor {name}")
        return out

    return rename


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


# ---- helpers of the scripts that drive an official training loop end to end (inforeg, reconboost) ----

import copy
import importlib.util
import subprocess
import sys
import tarfile
import tempfile
import types
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def export_official(path: str) -> tuple[Path, str]:
    """(folder with the official files, commit or 'working tree')."""
    p = Path(path).resolve()
    is_git_dir = (p / "HEAD").is_file() and (p / "objects").is_dir()
    if not is_git_dir:
        try:
            commit = subprocess.run(["git", "-C", str(p), "rev-parse", "HEAD"], capture_output=True, text=True,
                                    check=True).stdout.strip()
        except (subprocess.CalledProcessError, FileNotFoundError):
            commit = "working tree"
        return p, commit
    commit = subprocess.run(["git", "--git-dir", str(p), "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    # a mirror may lack some blobs (large checkpoints): export exactly the HEAD paths whose blobs are present
    tree = subprocess.run(["git", "--git-dir", str(p), "ls-tree", "-r", "-z", "HEAD"], capture_output=True, check=True).stdout
    entries = [e.split(b"\t", 1) for e in tree.split(b"\0") if e]
    shas = b"\n".join(meta.split()[2] for meta, _ in entries) + b"\n"
    check = subprocess.run(["git", "--git-dir", str(p), "cat-file", "--batch-check"], input=shas, capture_output=True,
                           check=True).stdout.decode().splitlines()
    present = [path.decode() for (meta, path), line in zip(entries, check) if not line.endswith("missing")]
    blob = subprocess.run(["git", "--git-dir", str(p), "archive", "HEAD", "--", *present], capture_output=True,
                          check=True).stdout
    out = Path(tempfile.mkdtemp(prefix="official-"))
    with tarfile.open(fileobj=BytesIO(blob)) as tar:
        tar.extractall(out, filter="data")
    return out, commit


def stub_module(name: str, **attrs: Any) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    mod.__file__ = f"<stand-in {name}>"
    sys.modules[name] = mod
    parent, _, child = name.rpartition(".")
    if parent:
        try:  # a real package of the official repo keeps its other modules
            pkg = importlib.import_module(parent)
        except ImportError:
            pkg = stub_module(parent)
        setattr(pkg, child, mod)
    return mod


def import_official(root: Path, rel: str, as_name: str, stubs: dict[str, dict[str, Any]] | None = None) -> types.ModuleType:
    """Import `root/rel` as `as_name`; `stubs`: module name -> attributes, for imports the repository lacks."""
    sys.path.insert(0, str(root))
    for name, attrs in (stubs or {}).items():
        stub_module(name, **attrs)
    spec = importlib.util.spec_from_file_location(as_name, root / rel)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[as_name] = mod
    argv, sys.argv = sys.argv, [rel]
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.argv = argv
    return mod


def official_args(mod: types.ModuleType, fn: str, argv: list[str]) -> Any:
    """The official argparse defaults (plus `argv`), through the official function."""
    saved, sys.argv = sys.argv, ["main.py", *argv]
    try:
        return getattr(mod, fn)()
    finally:
        sys.argv = saved


def recipe_run(method: str) -> dict[str, Any]:
    """The first run of `method` in recipes/<method>.yaml, resolved as `mmbench sweep` resolves it."""
    from mmbench.config import expand, load_recipe

    rec, _ = load_recipe(REPO / "recipes" / f"{method}.yaml")
    runs = [r for r in expand(rec) if r["method"]["name"] == method]
    return copy.deepcopy(runs[0])


def project_method(cfg: dict[str, Any], input_shapes: dict[str, list[int]], num_classes: int) -> Any:
    from mmbench.engine.trainer import Trainer

    data = types.SimpleNamespace(
        meta=types.SimpleNamespace(modalities={m: types.SimpleNamespace(shape=list(s)) for m, s in input_shapes.items()}),
        num_classes=num_classes)
    method = Trainer(cfg, Path(tempfile.gettempdir()), CPU).build_method(data)
    method.setup(CPU)
    return method


def fake_av(seed: int, n: int, batch: int, audio_hw: tuple[int, int], visual_hw: tuple[int, int], frames: int,
            classes: int = 6) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Class-structured batches in the official layouts: spec (B, F, T), image (B, 3, T, H, W), label (B,),
    from a private generator (the global RNG is left to the models)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    pa = torch.randn(classes, *audio_hw, generator=g)
    pv = torch.randn(classes, 3, 1, *visual_hw, generator=g)
    out = []
    for _ in range(n):
        y = torch.randint(0, classes, (batch,), generator=g)
        spec = torch.randn(batch, *audio_hw, generator=g) + pa[y]
        img = torch.randn(batch, 3, frames, *visual_hw, generator=g) + 0.7 * pv[y]
        out.append((spec, img, y))
    return out


@dataclass
class Diff:
    """Worst abs / rel difference per (step, quantity, group)."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, step: str, quantity: str, group: str, proj: dict[str, torch.Tensor], off: dict[str, torch.Tensor]) -> None:
        if set(proj) != set(off):
            raise RuntimeError(f"{step} {quantity} {group}: tensors differ: {sorted(set(proj) ^ set(off))[:5]}")
        ab, rel, same = 0.0, 0.0, True
        for k, o in off.items():  # rel per tensor (max |p - o| / max |o|), then the worst tensor, as ../shared/conformance
            p = proj[k]
            d = (p.double() - o.double()).abs().max().item() if o.numel() else 0.0
            ref = o.double().abs().max().item() if o.numel() else 0.0
            ab = max(ab, d)
            rel = max(rel, d / ref if ref else (0.0 if d == 0 else float("inf")))
            same = same and torch.equal(p, o)
        self.rows.append({"step": step, "quantity": quantity, "group": group, "abs": ab, "rel": rel, "bitwise": same,
                          "n": len(off)})

    def scalar(self, step: str, name: str, proj: float, off: float) -> None:
        ab = abs(float(proj) - float(off))
        ref = abs(float(off))
        self.rows.append({"step": step, "quantity": "diagnostic", "group": name, "abs": ab,
                          "rel": ab / ref if ref else (0.0 if ab == 0 else float("inf")),
                          "bitwise": float(proj) == float(off), "n": 1, "project": float(proj), "official": float(off)})

    def worst(self) -> float:
        return max((r["rel"] for r in self.rows), default=0.0)

    def bitwise(self) -> bool:
        return all(r["bitwise"] for r in self.rows)


def table(d: Diff) -> str:
    lines = ["| step | quantity | group | tensors | max abs | max rel | bitwise |", "|---|---|---|---|---|---|---|"]
    for r in d.rows:
        extra = f" (project {r['project']:.9g}, official {r['official']:.9g})" if "project" in r else ""
        lines.append(f"| {r['step']} | {r['quantity']} | {r['group']}{extra} | {r['n']} | {r['abs']:.2e} | {r['rel']:.2e} | "
                     f"{'yes' if r['bitwise'] else 'no'} |")
    return "\n".join(lines)
