"""Helpers the project's conformance scripts share (developer tooling, not part of the package).

- `export_official`: a checkout folder is used as is; a git directory (a bare mirror) is exported at HEAD
  into a temporary folder, so the official code runs unedited and nothing of it enters this repository.
- `import_official`: imports one official file as a module with the export on `sys.path`, after placing
  stand-ins for imports the official repository lacks (each stand-in is listed in the report).
- `project_method`: mmbench's method exactly as `Trainer.fit` builds it, from the method's own recipe.
- `Diff` / `table`: max abs and rel differences per parameter group and step; rel = max |project -
  official| / max |official| per tensor, the worst tensor of the group (0 when both are 0), as in
  ../shared/conformance.
"""
from __future__ import annotations

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
