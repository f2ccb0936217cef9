"""The method interface (DESIGN.md §4.4), in the style of DomainBed's algorithms.

A method owns one training step: forward, loss, backward, any gradient surgery, optimizer step.
It returns scalars to log; the trainer averages them over the epoch under `method/<name>`. The
trainer owns data, evaluation, metrics, selection and checkpoints. A method's hyper-parameters
live beside its code, as a pydantic model (defaults, one-line docs, search ranges), so recipes
are checked before anything runs.
"""
from __future__ import annotations

import contextlib
from abc import ABCMeta, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from mmbench.errors import UserError
from mmbench.models.classifier import ModelOutput, build_classifier
from mmbench.models.encoders import check_backbone
from mmbench.models.fusion import Fusion, check_fusion
from mmbench.registry import Registry


class HParams(BaseModel):
    """Base for a method's hyper-parameters. Unknown keys are errors.

    Declare each as ``name: type = Field(default, description=..., json_schema_extra={"search": [...]})``.
    """

    model_config = ConfigDict(extra="forbid")


def search_space(hp: type[HParams]) -> dict[str, Any]:
    """The search ranges the method declares (for sweeps over a method's own parameters)."""
    out = {}
    for name, f in hp.model_fields.items():
        extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
        if "search" in extra:
            out[name] = extra["search"]
    return out


@dataclass
class ModelSpec:
    """What a method needs to build its model."""

    backbone: str
    fusion: str
    input_shapes: dict[str, list[int]]  # per modality, without the batch dimension
    num_classes: int
    init: str = "repo"

    @property
    def modalities(self) -> list[str]:
        return list(self.input_shapes)


@dataclass
class TrainSpec:
    """The optimisation settings a method needs to build (and, for staged methods, rebuild) its
    optimizer and scheduler."""

    epochs: int
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    precision: str = "fp32"


@dataclass
class StepContext:
    epoch: int  # 0-based
    step: int  # 0-based within the epoch
    steps_per_epoch: int
    num_epochs: int
    tags: torch.Tensor | None = None  # per-sample tags of a method's TrainPlan (None without a plan)

    @property
    def global_step(self) -> int:
        return self.epoch * self.steps_per_epoch + self.step


@dataclass
class TrainPlan:
    """The training set of one epoch, when a method re-samples it (modality valuation): which stored
    train items to use, repeats allowed, and a small integer tag per entry that reaches the method's
    step as `StepContext.tags` (e.g. which modality to drop for that copy). Shuffled like the plain set."""

    indices: list[int]
    tags: list[int]


@dataclass
class EpochContext:
    """What epoch hooks may use.

    `loaders`: "train" (shuffled, like the training loader; pass its batches through
    `prepare_batch(raw, True)` to get training augmentations, as Re-learning's diagnosis does),
    "train_eval" (train split in order, no augmentation), "val", "test". `prepare_batch(raw, train)`
    returns (inputs: dict[modality, Tensor] on the device, labels). Hooks that switch the model to
    eval mode must switch it back."""

    epoch: int
    num_epochs: int
    steps_per_epoch: int
    device: torch.device
    loaders: dict[str, Any] = field(default_factory=dict)
    prepare_batch: Any = None  # (raw_batch, train: bool) -> (inputs: dict[str, Tensor], labels: Tensor)
    dependencies: dict[str, Any] = field(default_factory=dict)


def build_optimizer(params: Any, cfg: dict[str, Any]) -> torch.optim.Optimizer:
    name = cfg.get("name", "sgd")
    lr = float(cfg.get("lr", 1e-3))
    wd = float(cfg.get("weight_decay", 0.0))
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=float(cfg.get("momentum", 0.0)), weight_decay=wd,
                               nesterov=bool(cfg.get("nesterov", False)))
    betas = tuple(cfg.get("betas", (0.9, 0.999)))
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=wd)  # type: ignore[arg-type]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=wd)  # type: ignore[arg-type]
    raise UserError(f"unknown optimizer '{name}'; choose sgd, adam or adamw")


def build_scheduler(opt: torch.optim.Optimizer, cfg: dict[str, Any], epochs: int) -> Any:
    name = cfg.get("name", "none")
    if name == "none":
        return None
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=int(cfg.get("step_size", 70)), gamma=float(cfg.get("gamma", 0.1)))
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=int(cfg.get("t_max") or epochs), eta_min=float(cfg.get("eta_min", 0.0)))
    raise UserError(f"unknown scheduler '{name}'; choose none, step or cosine")


class Method(nn.Module, metaclass=ABCMeta):
    """Base class. Subclasses set `name`, `HParams`, and override `update` (and hooks as needed)."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    HParams: ClassVar[type[HParams]] = HParams
    fusions: ClassVar[set[str] | None] = None  # fusions the method can serve; None = any
    fusion_reason: ClassVar[str] = ""  # why only those, for the error message
    n_modalities: ClassVar[tuple[int, int | None]] = (1, None)  # (min, max)
    modality_reason: ClassVar[str] = ""  # why not more (or fewer) modalities, for the error message

    def __init__(self, spec: ModelSpec, hp: HParams, train: TrainSpec) -> None:
        super().__init__()
        self.spec = spec
        self.hp = hp
        self.train_spec = train
        self.model = self.build_model()
        self.device = torch.device("cpu")
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.scaler: torch.amp.GradScaler | None = None

    # ----- validation and construction -------------------------------------------------------
    @classmethod
    def check(cls, spec: ModelSpec, hp: HParams) -> None:
        """Raise UserError if this method cannot serve this model (called before any training)."""
        lo, hi = cls.n_modalities
        n = len(spec.modalities)
        if n < lo or (hi is not None and n > hi):
            want = f"{lo}" if lo == hi else f"{lo}..{hi if hi is not None else 'any'}"
            why = f" ({cls.modality_reason})" if cls.modality_reason else ""
            raise UserError(f"method '{cls.name}' needs {want} modalities, the dataset gives {n} "
                            f"({', '.join(spec.modalities)}){why}")
        check_backbone(spec.backbone, spec.input_shapes)
        if n > 1:
            check_fusion(spec.fusion, spec.modalities)
        if cls.fusions is not None and spec.fusion not in cls.fusions:
            why = f" ({cls.fusion_reason})" if cls.fusion_reason else ""
            raise UserError(
                f"method '{cls.name}' cannot serve fusion '{spec.fusion}'{why}; "
                f"set model.fusion to one of: {', '.join(sorted(cls.fusions))}"
            )

    @classmethod
    def resolve(cls, hp: HParams, train: TrainSpec) -> HParams:
        """Parameters given relative to the training settings (e.g. a stage schedule that scales with
        train.epochs) -> absolute ones. Called when a recipe is expanded, so the run's config records
        what will run, and `--dry-run` sees it."""
        return hp

    @classmethod
    def check_train(cls, train: TrainSpec, hp: HParams) -> None:
        """Raise UserError if the training settings do not fit the method's parameters (e.g. a staged
        schedule that must span train.epochs); called before any training, like `check`."""

    @property
    def modalities(self) -> list[str]:
        """The modalities this method trains on (a unimodal method uses one)."""
        return self.spec.modalities

    def build_model(self) -> nn.Module:
        s = self.spec
        return build_classifier(s.backbone, s.fusion, s.input_shapes, s.num_classes, s.init)

    def parameter_groups(self) -> Any:
        return self.parameters()

    def setup(self, device: torch.device) -> None:
        """Move to the device and build the optimizer, scheduler and (fp16) grad scaler."""
        self.device = device
        self.to(device)
        self.optimizer, self.scheduler = self.make_optimizer()
        if self.train_spec.precision == "fp16" and device.type == "cuda":
            self.scaler = torch.amp.GradScaler("cuda")

    def make_optimizer(self) -> tuple[torch.optim.Optimizer, Any]:
        opt = build_optimizer(self.parameter_groups(), self.train_spec.optimizer)
        return opt, build_scheduler(opt, self.train_spec.scheduler, self.train_spec.epochs)

    # ----- helpers for steps --------------------------------------------------------------
    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        p = self.train_spec.precision
        if p != "fp32" and self.device.type == "cuda":
            dtype = torch.bfloat16 if p == "bf16" else torch.float16
            with torch.autocast("cuda", dtype=dtype):
                yield
        else:
            yield

    def backward(self, loss: torch.Tensor, **kw: Any) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward(**kw)
        else:
            loss.backward(**kw)

    def unscale(self) -> None:
        """Call before reading or editing gradients under fp16 (a no-op otherwise)."""
        if self.scaler is not None and self.optimizer is not None:
            self.scaler.unscale_(self.optimizer)

    def optimizer_step(self) -> None:
        assert self.optimizer is not None
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def zero_grad(self) -> None:
        assert self.optimizer is not None
        self.optimizer.zero_grad(set_to_none=True)

    # ----- the interface ----------------------------------------------------------------------
    @abstractmethod
    def update(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor, ctx: StepContext) -> dict[str, float]:
        """One training step (forward, loss, backward, gradient surgery, optimizer step); returns
        scalars to log, averaged over the epoch as `method/<key>` (`loss` as `train_loss`)."""

    def predict(self, inputs: dict[str, torch.Tensor]) -> ModelOutput:
        """Eval-mode forward. Override to change how the method predicts (e.g. averaged softmaxes)."""
        return self.model(inputs)

    @property
    def estimator_fusion(self) -> Fusion | None:
        """The fusion head whose estimator defines this method's per-modality logits."""
        return getattr(self.model, "fusion", None)

    def on_epoch_start(self, ctx: EpochContext) -> dict[str, float]:
        return {}

    def train_plan(self) -> TrainPlan | None:
        """This epoch's training set, if the method re-samples it (asked after `on_epoch_start`)."""
        return None

    def on_epoch_end(self, ctx: EpochContext) -> dict[str, float]:
        return {}

    def scheduler_step(self, epoch: int) -> None:
        """Called by the trainer after each training epoch."""
        if self.scheduler is not None:
            self.scheduler.step()

    def extra_state(self) -> dict[str, Any]:
        """Method state beyond parameters and buffers (running averages, stage counters...)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def describe_run(self) -> dict[str, Any]:
        """Facts recorded with the run (e.g. which estimator or variant ran)."""
        fusion = self.estimator_fusion
        return {"estimator": fusion.estimator if fusion is not None else "own-heads"}


METHODS: Registry[type[Method]] = Registry("method", "mmbench.methods")


def register_method(cls: type[Method]) -> type[Method]:
    return METHODS.register(cls.name)(cls)


__all__ = [
    "EpochContext", "Field", "HParams", "METHODS", "Method", "ModelSpec", "StepContext", "TrainPlan", "TrainSpec",
    "register_method", "search_space",
]
