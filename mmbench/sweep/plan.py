"""Recipe -> ordered runs, with run dependencies (unimodal references for competition strength)."""
from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmbench.config import Recipe, canonical_json, expand, run_id
from mmbench.data.base import DATASETS
from mmbench.data.store import is_prepared, load_meta


@dataclass
class PlannedRun:
    id: str
    cfg: dict[str, Any]
    deps: dict[str, str] = field(default_factory=dict)  # modality -> run id of its unimodal reference
    requested: bool = True  # False: added only as a dependency


def dataset_modalities(name: str, protocol: str, data_dir: str | None) -> list[str]:
    if is_prepared(name, protocol, data_dir):
        return list(load_meta(name, protocol, data_dir).modalities)
    return list(DATASETS.get(name).modalities_of(protocol))


def unimodal_reference(cfg: dict[str, Any], modality: str) -> dict[str, Any]:
    """The competition-free reference of a run: same data, backbone, training and seed, one modality."""
    dep = copy.deepcopy(cfg)
    dep["method"] = {"name": "unimodal", "modality": modality}
    dep["model"]["fusion"] = "concat"
    dep["metrics"]["competition"] = False
    return dep


def plan(recipe: Recipe, where: str | None = None, data_dir: str | None = None) -> list[PlannedRun]:
    runs = [PlannedRun(run_id(c), c) for c in expand(recipe, where)]
    by_id = {r.id: r for r in runs}
    deps_first: list[PlannedRun] = []
    for r in runs:
        c = r.cfg
        if c["metrics"]["competition"] and c["method"]["name"] != "unimodal":
            for m in dataset_modalities(c["dataset"]["name"], c["dataset"]["protocol"], data_dir):
                dep = unimodal_reference(c, m)
                did = run_id(dep)
                r.deps[m] = did
                if did not in by_id:
                    by_id[did] = PlannedRun(did, dep, requested=False)
                    deps_first.append(by_id[did])
    # dependencies (and explicitly requested unimodal runs that others depend on) go first
    needed = {d for r in runs for d in r.deps.values()}
    first = [r for r in runs if r.id in needed] + deps_first
    rest = [r for r in runs if r.id not in needed]
    return first + rest


def sweep_id(name: str, recipe_path: Path, overrides: list[str] | None) -> tuple[str, str]:
    """(sweep id, recipe sha256): one sweep row per name + recipe content + overrides. Launcher
    overrides are left out: where the runs train does not make it another sweep."""
    sha = hashlib.sha256(Path(recipe_path).read_bytes()).hexdigest()
    kept = sorted(o for o in overrides or [] if not o.strip().startswith(("launcher.", "train.threads=")))
    sid = hashlib.sha256(canonical_json([name, sha, kept]).encode()).hexdigest()[:12]
    return sid, sha
