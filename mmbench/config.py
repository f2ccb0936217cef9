"""Recipes: YAML -> validated schema -> fully resolved runs.

A recipe (DESIGN.md §4.2) expands to the cartesian product grid x methods x seeds. Each run is a
fully resolved config with every default filled in; its id is a short hash of its canonical JSON,
so the same run is never trained twice and re-running a sweep resumes it. Errors name the file,
the key and what is allowed.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from mmbench.errors import UserError

RUN_SCHEMA_VERSION = 1


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatasetCfg(Strict):
    name: str = "synthetic"
    protocol: str | None = None  # None: the dataset's default protocol, filled at resolution


class ModelCfg(Strict):
    backbone: str = "tiny"
    fusion: str = "concat"
    init: Literal["repo", "backbone"] = "repo"


class OptimizerCfg(Strict):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0)
    weight_decay: float = Field(1e-4, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    nesterov: bool = False


class SchedulerCfg(Strict):
    name: Literal["none", "step", "cosine"] = "none"
    step_size: int = Field(70, ge=1)
    gamma: float = Field(0.1, gt=0)
    t_max: int | None = None
    eta_min: float = 0.0


class TrainCfg(Strict):
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(64, ge=1)
    eval_batch_size: int | None = Field(None, ge=1)
    drop_last: bool = False
    optimizer: OptimizerCfg = OptimizerCfg()
    scheduler: SchedulerCfg = SchedulerCfg()
    selection: Literal["best-val", "last", "oracle-test"] = "best-val"
    selection_metric: Literal["acc", "macro_f1"] = "acc"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    eval_train: bool = True  # evaluate the train split each epoch (per-modality train trajectories)
    # torch intra-op threads of the run (recorded; not part of the run id: it changes speed, not the
    # experiment). None: the launcher's share (cores / --jobs), or torch's default for one run at a time
    threads: int | None = Field(None, ge=1)
    precise_bn: int = Field(0, ge=0)  # >0: re-estimate BN statistics over this many train batches before each evaluation


class MetricsCfg(Strict):
    competition: bool = False  # AGM competition strength; schedules unimodal reference runs
    probe: bool = False  # linear probes at the end of the run
    probe_every: int = Field(0, ge=0)  # and every N epochs (0: only at the end)


class LauncherCfg(Strict):
    """Where and how a sweep's runs train. Not part of any run's config: the same run has the same
    id wherever it trains, so switching launchers resumes instead of retraining."""

    name: Literal["local", "slurm", "local-submitit"] = "local"
    jobs: int | None = Field(None, ge=1)  # runs at once (local; local-submitit: jobs in flight)
    gpus: list[int] | None = None  # local: GPU ids to place runs on
    jobs_per_gpu: int = Field(1, ge=1)
    partition: str | None = None  # slurm: required
    time: int | str = 60  # per job: minutes, or a SLURM time string ("2:00:00", "1-12")
    gpus_per_job: int = Field(1, ge=0)
    cpus_per_job: int | None = Field(None, ge=1)
    mem_gb: float | None = Field(None, gt=0)
    array_parallelism: int = Field(64, ge=1)  # slurm: array tasks running at once
    sbatch: dict[str, Any] = Field(default_factory=dict)  # extra sbatch options, e.g. {account: abc}
    setup: list[str] = Field(default_factory=list)  # shell lines run before each job (module load ...)
    folder: str | None = None  # submitit logs (default <runs dir>/_submitit; must be shared with the nodes)

    @field_validator("time")
    @classmethod
    def _minutes(cls, v: int | str) -> int:
        """SLURM's own time formats, so a value copied from an sbatch script means the same here."""
        total = v if isinstance(v, int) else _slurm_minutes(v)
        if total < 1:
            raise ValueError("time must be at least 1 minute")
        return total


def _slurm_minutes(v: str) -> int:
    """`M`, `M:S`, `H:M:S`, `D-H`, `D-H:M`, `D-H:M:S` (sbatch --time) -> whole minutes, rounded up."""
    bad = ValueError(f"time '{v}': expected minutes or a SLURM time (M:S, H:M:S, D-H, D-H:M, D-H:M:S)")
    days, dash, rest = v.strip().rpartition("-")
    try:
        nums = [int(x) for x in rest.split(":")]
        d = int(days) if dash else 0
    except ValueError:
        raise bad from None
    if dash:
        if len(nums) > 3:
            raise bad
        h, m, sec = (nums + [0, 0])[:3]
    elif len(nums) == 1:
        h, m, sec = 0, nums[0], 0
    elif len(nums) == 2:
        h, (m, sec) = 0, nums
    elif len(nums) == 3:
        h, m, sec = nums
    else:
        raise bad
    return d * 1440 + h * 60 + m + (1 if sec else 0)


class Recipe(Strict):
    name: str
    description: str = ""
    dataset: DatasetCfg = DatasetCfg()
    model: ModelCfg = ModelCfg()
    train: TrainCfg = TrainCfg()
    metrics: MetricsCfg = MetricsCfg()
    methods: list[str | dict[str, Any]] = Field(default_factory=lambda: ["joint"], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    launcher: LauncherCfg = LauncherCfg()  # how runs are launched; never part of a run's id
    _source: str = PrivateAttr("recipe")  # the file it came from, for error messages

    @field_validator("grid")
    @classmethod
    def _grid_lists(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for k, vals in v.items():
            if not vals:
                raise ValueError(f"grid key '{k}' has no values")
        return v

    @model_validator(mode="after")
    def _unique_seeds(self) -> "Recipe":
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds must be distinct")
        return self


# ---------------------------------------------------------------------------------------------
def parse_set(items: list[str] | None) -> dict[str, Any]:
    """`key=value` pairs; values parsed as YAML (`train.epochs=2`, `seeds=[0,1]`)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"--set '{item}': expected key=value, e.g. --set train.epochs=2")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v)
        except yaml.YAMLError as e:
            raise UserError(f"--set '{item}': value is not valid YAML ({e})") from None
    return out


def set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.get(p)
        if nxt is None:
            nxt = cur[p] = {}
        if not isinstance(nxt, dict):
            raise UserError(f"cannot set '{key}': '{p}' is not a mapping")
        cur = nxt
    cur[parts[-1]] = value


def _format_validation(err: ValidationError, where: str, section: str = "") -> str:
    lines = [f"{where}: invalid recipe"]
    for e in err.errors():
        loc = ".".join(str(p) for p in ([section] if section else []) + list(e["loc"])) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        ctx = e.get("ctx") or {}
        if "expected" in ctx:
            msg += f" (allowed: {ctx['expected']})"
        lines.append(f"  - {loc}: {msg}; got {e.get('input')!r}")
    return "\n".join(lines)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> tuple[Recipe, dict[str, Any]]:
    """Load and validate a recipe. Returns the schema object and the raw (overridden) mapping."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"recipe not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{p}: a recipe is a mapping with at least 'name' and 'methods'")
    for k, v in parse_set(overrides).items():
        set_dotted(raw, k, v)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        raise UserError(_format_validation(e, str(p))) from None
    recipe._source = str(p)
    return recipe, raw


# ---------------------------------------------------------------------------------------------
def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


ID_EXCLUDED = (("train", "threads"),)  # settings recorded with a run that do not make it another run


def run_id(config: dict[str, Any]) -> str:
    keyed = copy.deepcopy(config)
    for section, key in ID_EXCLUDED:
        if isinstance(keyed.get(section), dict):
            keyed[section].pop(key, None)
    return hashlib.sha256(canonical_json(keyed).encode()).hexdigest()[:12]


def resolve_method(entry: str | dict[str, Any], where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A recipe's method entry -> (validated params with defaults, per-method train overrides)."""
    from mmbench.methods.base import METHODS

    if isinstance(entry, str):
        entry = {"name": entry}
    entry = dict(entry)
    name = entry.pop("name", None)
    if not isinstance(name, str):
        raise UserError(f"{where}: each method entry needs a 'name' (one of: {', '.join(METHODS.names())})")
    if name not in METHODS:
        raise UserError(f"{where}: unknown method '{name}'; choose one of: {', '.join(METHODS.names())}")
    train_over = entry.pop("train", {}) or {}
    cls = METHODS.get(name)
    try:
        hp = cls.HParams.model_validate(entry)
    except ValidationError as e:
        lines = [f"{where}: invalid parameters for method '{name}'"]
        known = ", ".join(cls.HParams.model_fields) or "(none)"
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"])
            msg = "unknown parameter" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"  - {loc}: {msg}; got {err.get('input')!r} (parameters of '{name}': {known})")
        raise UserError("\n".join(lines)) from None
    return {"name": name, **hp.model_dump(mode="json")}, train_over


def split_model_override(entry: str | dict[str, Any], where: str) -> tuple[str | dict[str, Any], dict[str, Any]]:
    """A method entry may carry its own `model:` (e.g. MLA's shared head) beside its own `train:`."""
    if not isinstance(entry, dict) or "model" not in entry:
        return entry, {}
    over = entry.get("model") or {}
    if not isinstance(over, dict):
        raise UserError(f"{where}.model: expected a mapping such as {{fusion: shared}}")
    return {k: v for k, v in entry.items() if k != "model"}, over


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def expand(recipe: Recipe, where: str | None = None) -> list[dict[str, Any]]:
    """Recipe -> list of fully resolved run configs (grid x methods x seeds), deduplicated."""
    from mmbench.data.base import DATASETS

    where = where or recipe._source

    if recipe.dataset.name not in DATASETS:
        raise UserError(f"{where}: dataset.name: unknown dataset '{recipe.dataset.name}'; choose one of: {', '.join(DATASETS.names())}")
    builder = DATASETS.get(recipe.dataset.name)
    base = {
        "schema": RUN_SCHEMA_VERSION,
        "dataset": recipe.dataset.model_dump(mode="json"),
        "model": recipe.model.model_dump(mode="json"),
        "train": recipe.train.model_dump(mode="json"),
        "metrics": recipe.metrics.model_dump(mode="json"),
    }
    if base["dataset"]["protocol"] is None:
        base["dataset"]["protocol"] = builder.default_protocol
    grid_keys = list(recipe.grid)
    combos = list(itertools.product(*(recipe.grid[k] for k in grid_keys))) or [()]
    entries, model_overs = zip(*(split_model_override(e, f"{where}: methods[{mi}]") for mi, e in enumerate(recipe.methods)))
    resolved = [resolve_method(entry, f"{where}: methods[{mi}]") for mi, entry in enumerate(entries)]
    check_grid_keys(grid_keys, [m["name"] for m, _ in resolved], where)
    runs: list[dict[str, Any]] = []
    seen: set[str] = set()
    for (method, train_over), model_over in zip(resolved, model_overs):
        for combo in combos:
            cfg = copy.deepcopy(base)
            cfg["train"] = _deep_merge(cfg["train"], train_over)
            cfg["model"] = _deep_merge(cfg["model"], model_over)
            cfg["method"] = dict(method)
            for k, v in zip(grid_keys, combo):
                if k.startswith("method."):
                    pname = k.split(".")[1]
                    from mmbench.methods.base import METHODS

                    if pname not in METHODS.get(method["name"]).HParams.model_fields:
                        continue  # a method's own grid key applies only to methods that declare it
                top = k.split(".")[0]
                if top not in ("dataset", "model", "train", "metrics", "method"):
                    raise UserError(f"{where}: grid key '{k}' must start with dataset., model., train., metrics. or method.")
                set_dotted(cfg, k, v)
            cfg = validate_run(cfg, where)
            for seed in recipe.seeds:
                run = {**cfg, "seed": int(seed)}
                rid = run_id(run)
                if rid not in seen:
                    seen.add(rid)
                    runs.append(run)
    return runs


def check_grid_keys(keys: list[str], methods: list[str], where: str) -> None:
    """A `method.X` grid key must be a parameter of at least one of the recipe's methods (it then
    applies to the methods that declare it). Otherwise a typo (`method.alhpa`) would silently plan
    fewer runs: the key would apply to no method at all."""
    from mmbench.methods.base import METHODS

    params = {m: list(METHODS.get(m).HParams.model_fields) for m in dict.fromkeys(methods)}
    for k in keys:
        if not k.startswith("method."):
            continue
        pname = k.split(".")[1]
        if not any(pname in ps for ps in params.values()):
            valid = sorted({f"method.{p}" for ps in params.values() for p in ps})
            raise UserError(
                f"{where}: grid key '{k}' is not a parameter of any method in this recipe "
                f"({', '.join(params)}); valid method keys: {', '.join(valid) or '(none: these methods have no parameters)'}"
            )


def validate_run(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """Re-validate a run after grid/overrides so a bad grid value fails like a bad recipe key."""
    from mmbench.data.base import DATASETS
    from mmbench.models.encoders import BACKBONES
    from mmbench.models.fusion import FUSIONS

    for section, schema in (("dataset", DatasetCfg), ("model", ModelCfg), ("train", TrainCfg), ("metrics", MetricsCfg)):
        try:
            cfg[section] = schema.model_validate(cfg[section]).model_dump(mode="json")
        except ValidationError as e:  # named in full: the key came from a grid or a method's train override
            raise UserError(_format_validation(e, where, section)) from None
    method, _ = resolve_method(cfg["method"], where)
    cfg["method"] = resolve_for_training(method, cfg["train"], where)
    if method["name"] == "unimodal":
        # a unimodal run has no fusion and no competition: canonical values, so the same
        # reference run is shared across fusions and with the dependencies of competition
        cfg["model"]["fusion"] = "concat"
        cfg["metrics"]["competition"] = False
    ds = DATASETS.get(cfg["dataset"]["name"])
    if ds.protocols and cfg["dataset"]["protocol"] not in ds.protocols:
        raise UserError(
            f"{where}: dataset.protocol: unknown protocol '{cfg['dataset']['protocol']}' for '{ds.name}'; "
            f"choose one of: {', '.join(ds.protocols)}"
        )
    if cfg["model"]["backbone"] not in BACKBONES:
        raise UserError(f"{where}: model.backbone: unknown backbone '{cfg['model']['backbone']}'; choose one of: {', '.join(BACKBONES.names())}")
    if cfg["model"]["fusion"] not in FUSIONS:
        raise UserError(f"{where}: model.fusion: unknown fusion '{cfg['model']['fusion']}'; choose one of: {', '.join(FUSIONS.names())}")
    return cfg


def resolve_for_training(method: dict[str, Any], train: dict[str, Any], where: str) -> dict[str, Any]:
    """A method's parameters against the run's training settings: relative forms (MIE's scaled stage
    schedule) become absolute, then every check a trainer makes before training runs here, so
    `--dry-run` fails exactly where a real run would."""
    from mmbench.methods.base import METHODS, TrainSpec

    cls = METHODS.get(method["name"])
    spec = TrainSpec(train["epochs"], train["optimizer"], train["scheduler"], train["precision"])
    hp = cls.HParams.model_validate({k: v for k, v in method.items() if k != "name"})
    try:
        hp = cls.resolve(hp, spec)
        cls.check_train(spec, hp)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    return {"name": method["name"], **hp.model_dump(mode="json")}


def short_label(cfg: dict[str, Any]) -> str:
    """A label that fits a terminal line: the method with only the parameters that differ from its
    defaults, and the seed (progress bars and `done` lines; the full label is in describe_run)."""
    from mmbench.methods.base import METHODS

    m = cfg["method"]
    try:
        fields = METHODS.get(m["name"]).HParams.model_fields
    except Exception:  # noqa: BLE001 - an unknown method (an old database) keeps its full label
        fields = {}
    parts = []
    for k, v in m.items():
        f = fields.get(k)
        if k == "name" or (k != "modality" and f is not None and not f.is_required()
                           and f.get_default(call_default_factory=True) == v):  # which modality is never implied
            continue
        parts.append(f"{k}={json.dumps(v, separators=(',', ':')) if isinstance(v, (list, dict)) else v}")
    return m["name"] + (f"({','.join(parts)})" if parts else "") + f" s{cfg['seed']}"


def describe_run(cfg: dict[str, Any]) -> str:
    """Short human label: method(+params) fusion seed."""
    m = cfg["method"]
    params = ",".join(f"{k}={json.dumps(v, separators=(',', ':')) if isinstance(v, (list, dict)) else v}"
                      for k, v in m.items() if k != "name")
    label = m["name"] + (f"({params})" if params else "")
    return f"{label} {cfg['model']['backbone']}/{cfg['model']['fusion']} seed={cfg['seed']}"
