"""The training loop: epochs of method steps, evaluation of every split, model selection,
per-epoch checkpoints (resume from the last finished epoch), and the reference metrics
(competition strength, probes) that need more than one pass.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader

from mmbench.data.resample import PlannedSplit
from mmbench.data.store import PreparedDataset, collate
from mmbench.data.transforms import get_transform
from mmbench.engine import checkpoint as ckpt
from mmbench.engine.device import rng_state, seed_everything, set_rng_state
from mmbench.engine.evaluate import (SplitOutputs, batch_stat_accuracy, bn_buffers, collect, metrics_of,
                                     recompute_bn, restore_bn)
from mmbench.errors import RunFailed, UserError
from mmbench.methods.base import METHODS, EpochContext, Method, ModelSpec, StepContext, TrainSpec

Progress = Callable[[dict[str, Any]], None]


@dataclass
class TrainResult:
    history: list[dict[str, Any]]
    finals: dict[str, dict[str, dict[str, float]]]
    selected_epoch: int
    selected: dict[str, int]
    counts: dict[str, int]
    describe: dict[str, Any]
    wall_seconds: float


@dataclass
class Trainer:
    cfg: dict[str, Any]
    run_dir: Path
    device: torch.device
    data_dir: str | None = None
    workers: int | None = None  # data-loader workers; None: 4 on a GPU (keep it fed), 0 on a CPU
    progress: Progress | None = None
    dependencies: dict[str, Path] = field(default_factory=dict)  # modality -> unimodal run dir
    warnings: list[str] = field(default_factory=list)

    # ---------------------------------------------------------------------------------------
    def build_method(self, data: PreparedDataset) -> Method:
        cfg = self.cfg
        cls = METHODS.get(cfg["method"]["name"])
        hp = cls.HParams.model_validate({k: v for k, v in cfg["method"].items() if k != "name"})
        spec = ModelSpec(
            backbone=cfg["model"]["backbone"],
            fusion=cfg["model"]["fusion"],
            input_shapes={m: list(s.shape) for m, s in data.meta.modalities.items()},
            num_classes=data.num_classes,
            init=cfg["model"]["init"],
        )
        cls.check(spec, hp)
        t = cfg["train"]
        train = TrainSpec(epochs=t["epochs"], optimizer=t["optimizer"], scheduler=t["scheduler"], precision=t["precision"])
        cls.check_train(train, hp)
        return cls(spec, hp, train)

    @property
    def num_workers(self) -> int:
        if self.workers is not None:
            return self.workers
        # on a CPU the store's batched memmap reads cost less than worker start-up; on a GPU
        # workers overlap loading with the step (transforms run on the GPU either way)
        return min(4, os.cpu_count() or 1) if self.device.type == "cuda" else 0

    def _loader(self, split: Any, train: bool, batch_size: int, seed: int) -> DataLoader:
        g = torch.Generator()
        g.manual_seed(seed)
        return DataLoader(
            split,
            batch_size=batch_size,
            shuffle=train,
            drop_last=train and self.cfg["train"]["drop_last"],
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if self.num_workers > 0 else None,
            persistent_workers=False,
            collate_fn=collate,
            generator=g,
        )

    # ---------------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        cfg = self.cfg
        t_cfg = cfg["train"]
        seed = int(cfg["seed"])
        seed_everything(seed)
        data = PreparedDataset(cfg["dataset"]["name"], cfg["dataset"]["protocol"], self.data_dir)
        method = self.build_method(data)
        method.setup(self.device)
        mods = method.modalities
        transforms = {m: get_transform(s.transform, **s.transform_args) for m, s in data.meta.modalities.items()}
        aug_gen = torch.Generator()
        if method.needs_unimodal_references:
            method.attach_references(self._references(data, method.modalities, transforms, aug_gen))

        def prepare(raw: dict[str, torch.Tensor], train: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
            inputs = {}
            for m in mods:
                x = raw[m].to(self.device, non_blocking=True)
                inputs[m] = transforms[m](x, train, aug_gen if train else None)
            return inputs, raw["label"].to(self.device, non_blocking=True)

        splits = {s: data.split(s, mods) for s in ("train", "val", "test")}
        counts = {s: len(v) for s, v in splits.items()}
        bs = int(t_cfg["batch_size"])
        ebs = int(t_cfg["eval_batch_size"] or max(bs, 64))
        eval_loaders = {s: self._loader(v, False, ebs, seed) for s, v in splits.items() if len(v) > 0}
        n_train = counts["train"]
        steps = n_train // bs if t_cfg["drop_last"] else math.ceil(n_train / bs)
        epochs = int(t_cfg["epochs"]) if method.trains else 1

        history: list[dict[str, Any]] = []
        best: dict[str, tuple[float, int]] = {}
        start_epoch = 0
        ck_path = self.run_dir / "checkpoint.pt"
        state = self._resume_state(ck_path)
        if state is not None:
            method.load_extra_state(state["extra"])
            method.load_state_dict(state["method"])
            if method.optimizer is not None and state.get("optimizer") is not None:
                method.optimizer.load_state_dict(state["optimizer"])
            if method.scheduler is not None and state.get("scheduler") is not None:
                method.scheduler.load_state_dict(state["scheduler"])
            if method.scaler is not None and state.get("scaler") is not None:
                method.scaler.load_state_dict(state["scaler"])
            set_rng_state(state["rng"])
            history = state["history"]
            best = {k: tuple(v) for k, v in state["best"].items()}  # type: ignore[misc]
            start_epoch = int(state["epoch"]) + 1

        concept = self._concepts(data, transforms) if cfg["metrics"]["competition"] and self.dependencies else None
        sel_metric = t_cfg["selection_metric"]
        wall0 = time.perf_counter()
        for epoch in range(start_epoch, epochs):
            ectx = EpochContext(
                epoch=epoch, num_epochs=epochs, steps_per_epoch=steps, device=self.device,
                loaders={
                    "train": self._loader(splits["train"], True, bs, seed * 100_003 + epoch + 7),  # shuffled; augment via prepare_batch(raw, True)
                    **{("train_eval" if k == "train" else k): v for k, v in eval_loaders.items()},
                },
                prepare_batch=prepare,
            )
            aug_gen.manual_seed(seed * 100_003 + epoch)
            method.train()
            start_logs = method.on_epoch_start(ectx) or {}
            t0, cpu0 = time.perf_counter(), time.process_time()
            gpu_events = _cuda_events(self.device)
            sums: dict[str, Any] = {}
            n = 0
            plan = method.train_plan()
            train_set = PlannedSplit(splits["train"], plan) if plan is not None else splits["train"]
            epoch_steps = steps
            if plan is not None:
                epoch_steps = len(train_set) // bs if t_cfg["drop_last"] else math.ceil(len(train_set) / bs)
            loader = self._loader(train_set, True, bs, seed * 100_003 + epoch)
            for step, raw in enumerate(loader):
                inputs, y = prepare(raw, True)
                tags = raw["tag"].to(self.device) if "tag" in raw else None
                out = method.update(inputs, y, StepContext(epoch, step, epoch_steps, epochs, tags))
                for k, v in out.items():
                    sums[k] = sums.get(k, 0.0) + (v.detach().float() if isinstance(v, torch.Tensor) else float(v))
                n += 1
                if self.progress and (step % 10 == 0 or step == epoch_steps - 1):
                    self.progress({"event": "step", "epoch": epoch, "epochs": epochs, "step": step + 1, "steps": epoch_steps})
            if gpu_events is not None:
                gpu_events[1].record()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            train_seconds = time.perf_counter() - t0
            cpu_seconds = time.process_time() - cpu0
            step_logs = {k: float(v) / max(n, 1) for k, v in sums.items()}
            if not all(math.isfinite(v) for k, v in step_logs.items() if k == "loss" or k.startswith("loss")):
                raise RunFailed(f"non-finite training loss at epoch {epoch} ({step_logs}); lower the learning rate or check the data")
            method.scheduler_step(epoch)
            end_logs = method.on_epoch_end(ectx) or {}

            saved_bn = self._precise_bn(method, splits["train"], prepare, bs, seed * 100_003 + epoch + 11)
            outs: dict[str, SplitOutputs] = {}
            metrics: dict[str, dict[str, float]] = {}
            for s, ld in eval_loaders.items():
                if s == "train" and not t_cfg.get("eval_train", True):
                    continue
                outs[s] = collect(method, ld, prepare)
                metrics[s] = metrics_of(outs[s], data.num_classes)
            if "val" in metrics:  # how far the BN statistics used for evaluation are from the weights'
                metrics["val"]["bn_gap"] = batch_stat_accuracy(method, eval_loaders["val"], prepare) - metrics["val"]["acc"]
            train_m = metrics.setdefault("train", {})
            train_m["epoch_seconds"] = train_seconds
            train_m["epoch_cpu_seconds"] = cpu_seconds  # this process's own CPU time: what load elsewhere does not change
            if gpu_events is not None:
                train_m["epoch_gpu_seconds"] = gpu_events[0].elapsed_time(gpu_events[1]) / 1000.0
            train_m["train_loss"] = step_logs.get("loss", float("nan"))
            for k, v in step_logs.items():
                if k != "loss":
                    train_m[f"method/{k}"] = v
            for k, v in {**start_logs, **end_logs}.items():
                train_m[f"method/{k}"] = float(v)
            if concept is not None and "val" in outs and "test" in outs:
                from mmbench.metrics.competition import competition_metrics

                for m, (cv, ct) in concept.items():
                    metrics["test"].update(competition_metrics(_fused_repr(outs["val"]), cv, _fused_repr(outs["test"]), ct, m))
            pe = int(cfg["metrics"]["probe_every"])
            if pe and (epoch + 1) % pe == 0 and "train" in outs:
                self._probe_into(outs, metrics)
            if saved_bn is not None:
                restore_bn(method, saved_bn)  # training continues with its own statistics
            history.append({"epoch": epoch, "metrics": metrics})

            improved = self._update_best(best, history[-1], sel_metric)
            primary = t_cfg["selection"]
            if primary in improved or primary == "last":
                ckpt.save_atomic({"method": method.state_dict(), "extra": method.extra_state(), "epoch": epoch},
                                 self.run_dir / "model_selected.pt")
            ckpt.save_atomic(
                {
                    "epoch": epoch,
                    "method": method.state_dict(),
                    "extra": method.extra_state(),
                    "optimizer": method.optimizer.state_dict() if method.optimizer is not None else None,
                    "scheduler": method.scheduler.state_dict() if method.scheduler is not None else None,
                    "scaler": method.scaler.state_dict() if method.scaler is not None else None,
                    "rng": rng_state(),
                    "history": history,
                    "best": best,
                },
                ck_path,
                keep_prev=True,
            )
            if self.progress:
                self.progress({"event": "epoch", "epoch": epoch + 1, "epochs": epochs, "metrics": metrics})

        ckpt.prev_path(ck_path).unlink(missing_ok=True)  # finished: the fallback for a damaged checkpoint is not needed
        selected = {
            "best-val": best["best-val"][1] if "best-val" in best else history[-1]["epoch"],
            "last": history[-1]["epoch"],
            "oracle-test": best["oracle-test"][1] if "oracle-test" in best else history[-1]["epoch"],
        }
        primary_epoch = selected[t_cfg["selection"]]
        if cfg["metrics"]["probe"]:
            sel = ckpt.load(self.run_dir / "model_selected.pt", self.device)
            method.load_extra_state(sel["extra"])
            method.load_state_dict(sel["method"])
            self._precise_bn(method, splits["train"], prepare, bs, seed * 100_003 + primary_epoch + 11)
            outs = {s: collect(method, ld, prepare) for s, ld in eval_loaders.items()}
            probe_metrics: dict[str, dict[str, float]] = {s: {} for s in outs}
            self._probe_into(outs, probe_metrics)
            for h in history:
                if h["epoch"] == primary_epoch:
                    for s, vals in probe_metrics.items():
                        h["metrics"].setdefault(s, {}).update(vals)
        by_epoch = {h["epoch"]: h["metrics"] for h in history}
        finals = {rule: by_epoch[e] for rule, e in selected.items()}
        return TrainResult(
            history=history, finals=finals, selected_epoch=primary_epoch, selected=selected, counts=counts,
            describe=method.describe_run(), wall_seconds=time.perf_counter() - wall0,
        )

    # ---------------------------------------------------------------------------------------
    def warn(self, message: str) -> None:
        """Something the user must know that does not stop the run (recorded in summary.json too)."""
        self.warnings.append(message)
        if self.progress:
            self.progress({"event": "warning", "message": message})

    def _resume_state(self, ck_path: Path) -> dict[str, Any] | None:
        """The newest readable checkpoint: `checkpoint.pt`, else the one before it, else None (from
        scratch), with a warning naming the damaged file. An unsafe file is refused, never skipped."""
        prev = ckpt.prev_path(ck_path)
        damaged: list[str] = []
        for p in (ck_path, prev):
            if not p.is_file():
                continue
            try:
                state = ckpt.load(p, self.device)
            except ckpt.CorruptCheckpoint as e:
                aside = p.with_name(f"{p.stem}.damaged{p.suffix}")
                os.replace(p, aside)  # out of the way: the next save must not keep it as the previous one
                damaged.append(f"checkpoint {e} (moved to {aside.name})")
                continue
            if p == prev:
                self.warn("; ".join(damaged + [f"resuming from the previous checkpoint {p} ({int(state['epoch']) + 1} epoch(s) done)"]))
            return state
        if damaged:
            self.warn("; ".join(damaged + ["training from scratch"]))
        return None

    @staticmethod
    def _update_best(best: dict[str, tuple[float, int]], h: dict[str, Any], metric: str) -> set[str]:
        improved = set()
        for rule, split in (("best-val", "val"), ("oracle-test", "test")):
            v = h["metrics"].get(split, {}).get(metric)
            if v is None or not math.isfinite(v):
                continue
            if rule not in best or v > best[rule][0]:  # ties keep the earlier epoch
                best[rule] = (v, h["epoch"])
                improved.add(rule)
        return improved

    def _precise_bn(self, method: Method, train: Any, prepare: Callable[..., Any], bs: int, seed: int) -> list[dict[str, torch.Tensor]] | None:
        """`train.precise_bn` > 0: re-estimate BN statistics for evaluation; returns the training's
        own to restore afterwards (None when off)."""
        n = int(self.cfg["train"].get("precise_bn", 0))
        if n <= 0:
            return None
        saved = bn_buffers(method)
        recompute_bn(method, self._loader(train, True, bs, seed), prepare, n)
        return saved

    def _probe_into(self, outs: dict[str, SplitOutputs], metrics: dict[str, dict[str, float]]) -> None:
        from mmbench.metrics.probe import linear_probe

        if "train" not in outs:
            return
        for m in outs["train"].features:
            evals = {s: (o.features[m], o.labels) for s, o in outs.items() if s != "train"}
            scores = linear_probe(outs["train"].features[m], outs["train"].labels, evals)
            for s, v in scores.items():
                metrics.setdefault(s, {})[f"probe_acc/{m}"] = v

    def _concepts(self, data: PreparedDataset, transforms: dict[str, Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Mono-modal concepts: pooled features of each unimodal reference run (its selected
        weights) on the val and test splits."""
        out = {}
        for m, rdir in self.dependencies.items():
            dep = self._reference(data, rdir)
            def prep(raw: dict[str, torch.Tensor], train: bool, _m: str = m) -> Any:
                return {_m: transforms[_m](raw[_m].to(self.device), False, None)}, raw["label"].to(self.device)

            feats = [collect(dep, self._loader(data.split(s, [m]), False, 128, 0), prep).features[m] for s in ("val", "test")]
            out[m] = (feats[0], feats[1])
        return out


    def _reference(self, data: PreparedDataset, rdir: Path) -> Method:
        """A unimodal reference run's method with its selected weights, in eval mode."""
        from mmbench.engine.run import load_run_config

        dep = Trainer(load_run_config(rdir), rdir, self.device, self.data_dir).build_method(data)
        dep.setup(self.device)
        dep.load_state_dict(ckpt.load(rdir / "model_selected.pt", self.device)["method"])
        return dep.eval()

    def _references(self, data: PreparedDataset, modalities: list[str], transforms: dict[str, Any],
                    aug_gen: torch.Generator) -> dict[str, Method]:
        missing = [m for m in modalities if m not in self.dependencies]
        if missing:
            raise UserError(f"method '{self.cfg['method']['name']}' needs the unimodal reference run of "
                            f"{', '.join(missing)}; run it with `mmbench sweep` or `mmbench train`, which schedule them")
        refs = {m: self._reference(data, self.dependencies[m]) for m in modalities}
        # used as their own runs evaluated them: with precise BN when the recipe asks for it (their
        # checkpoints hold the training's running statistics, which precise BN replaces at evaluation)
        bs, seed = int(self.cfg["train"]["batch_size"]), int(self.cfg["seed"])
        for m, ref in refs.items():
            def prep(raw: dict[str, torch.Tensor], train: bool, _m: str = m) -> Any:
                x = transforms[_m](raw[_m].to(self.device), train, aug_gen if train else None)
                return {_m: x}, raw["label"].to(self.device)

            self._precise_bn(ref, data.split("train", [m]), prep, bs, seed * 100_003 + 17)
            ref.eval()
        return refs


def _cuda_events(device: torch.device) -> tuple[Any, Any] | None:
    """A started pair of CUDA events timing an epoch's steps on the device (None on a CPU)."""
    if device.type != "cuda":
        return None
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    return start, end


def _fused_repr(o: SplitOutputs) -> torch.Tensor:
    """The joint model's fused representation for competition strength: concatenated pooled
    features (late fusion), as AGM's code uses."""
    return torch.cat([o.features[m] for m in sorted(o.features, key=list(o.features).index)], dim=1)
