"""`synthetic`: a procedural multimodal dataset that reproduces modality imbalance on a CPU.

Each class has a fixed random template per modality. The audio "spectrogram" (1 x F x T) shows its
class template at a fixed place with strong signal: easy, learnt in a few steps, but only
`audio_informative` of the items carry their own class's pattern (the rest show a random class).
The visual clip (T x 3 x H x W) shows a small coloured class pattern at a random position in
every frame, under more noise: informative for every item, but slower to learn. Under joint
training the audio branch drives the loss down early and the visual branch stays behind what a
visual-only model reaches: the phenomenon the balancing methods target. Knobs are protocol
parameters, so each variant is its own named protocol and runs never mix them.

Protocol `three` adds a third, 1-D modality `text`: a sequence of `text_len` feature vectors
(text_len x text_dim, like pre-extracted word features), where the class template vector sits
on `text_marked` random tokens under unit noise, for `text_informative` of the items (the rest
show a random class). It is learnt by a feature encoder (MLP / transformer), fast but capped by
its uninformative items, so the three modalities differ in both speed and ceiling. The text
stream is drawn from its own generator, after audio and visual, so a protocol without text
(`text_len` 0) is byte-identical to before and records no text parameters.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
from rich.console import Console

from mmbench.data.base import DatasetBuilder, PrepareRequest, PrepareResult, register_dataset
from mmbench.data.store import ModalitySpec, StoreMeta, StoreWriter, intact, is_prepared, load_meta, store_dir
from mmbench.errors import UserError

console = Console(stderr=True)


@dataclass(frozen=True)
class SyntheticParams:
    num_classes: int = 6
    n_train: int = 1200
    n_val: int = 480
    n_test: int = 480
    audio_shape: tuple[int, int, int] = (1, 24, 24)      # 1 x F x T
    visual_frames: int = 2
    visual_size: int = 24
    audio_snr: float = 1.2          # template amplitude over unit noise
    audio_informative: float = 0.75  # fraction of items whose audio shows their own class
    visual_snr: float = 0.85
    visual_informative: float = 1.0
    visual_patch: int = 8           # side of the class pattern moved around the frame
    text_len: int = 0               # tokens of the 1-D `text` modality; 0: no text modality
    text_dim: int = 16              # feature size of each token
    text_marked: int = 2            # tokens carrying the class template vector
    text_snr: float = 1.0           # template amplitude (unit-norm-per-dim template) over unit noise
    text_informative: float = 0.7   # fraction of items whose text shows their own class
    seed: int = 0


TEXT_FIELDS = ("text_len", "text_dim", "text_marked", "text_snr", "text_informative")


PROTOCOLS: dict[str, SyntheticParams] = {
    "default": SyntheticParams(),
    # tests: a few hundred items, same phenomenon, seconds to train
    "tiny": SyntheticParams(n_train=360, n_val=120, n_test=120, audio_shape=(1, 16, 16), visual_size=16, visual_patch=6),
    # both modalities equally informative: a control where balancing should change little
    "balanced": SyntheticParams(audio_informative=1.0, audio_snr=0.45),
    # three modalities (audio, visual, text sequence 8 x 16), test-sized like `tiny`
    "three": SyntheticParams(n_train=360, n_val=120, n_test=120, audio_shape=(1, 16, 16), visual_size=16,
                             visual_patch=6, text_len=8),
}


def _smooth(rng: np.random.Generator, shape: tuple[int, ...], passes: int = 2) -> np.ndarray:
    x = rng.standard_normal(shape)
    for _ in range(passes):  # cheap low-pass so templates look like blobs, not white noise
        x = (x + np.roll(x, 1, -1) + np.roll(x, -1, -1) + np.roll(x, 1, -2) + np.roll(x, -1, -2)) / 5
    return x / (x.std() + 1e-8)


def generate(p: SyntheticParams, split: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Deterministic per (params, split): templates from `seed`, items from `seed` + split."""
    trng = np.random.default_rng(p.seed)
    a_tmpl = _smooth(trng, (p.num_classes, *p.audio_shape)).astype(np.float32)
    v_tmpl = _smooth(trng, (p.num_classes, 3, p.visual_patch, p.visual_patch), passes=1).astype(np.float32)
    n = {"train": p.n_train, "val": p.n_val, "test": p.n_test}[split]
    rng = np.random.default_rng([p.seed, {"train": 1, "val": 2, "test": 3}[split]])
    labels = np.arange(n) % p.num_classes
    rng.shuffle(labels)

    shown_a = np.where(rng.random(n) < p.audio_informative, labels, rng.integers(0, p.num_classes, n))
    audio = p.audio_snr * a_tmpl[shown_a] + rng.standard_normal((n, *p.audio_shape)).astype(np.float32)

    shown_v = np.where(rng.random(n) < p.visual_informative, labels, rng.integers(0, p.num_classes, n))
    t, s, k = p.visual_frames, p.visual_size, p.visual_patch
    visual = rng.standard_normal((n, t, 3, s, s)).astype(np.float32)
    pos = rng.integers(0, s - k + 1, size=(n, t, 2))
    for i in range(n):
        for f in range(t):
            y0, x0 = pos[i, f]
            visual[i, f, :, y0 : y0 + k, x0 : x0 + k] += p.visual_snr * v_tmpl[shown_v[i]]
    out = {"audio": audio.astype(np.float32), "visual": visual}
    if p.text_len > 0:
        out["text"] = _text(p, split, labels)
    return out, labels.astype(np.int64)


def _text(p: SyntheticParams, split: str, labels: np.ndarray) -> np.ndarray:
    """(n, text_len, text_dim): unit noise, the shown class's template vector added on
    `text_marked` distinct random tokens. Own generators, so audio/visual draws are untouched."""
    t_tmpl = np.random.default_rng([p.seed, 7]).standard_normal((p.num_classes, p.text_dim)).astype(np.float32)
    rng = np.random.default_rng([p.seed, {"train": 1, "val": 2, "test": 3}[split], 7])
    n = len(labels)
    shown = np.where(rng.random(n) < p.text_informative, labels, rng.integers(0, p.num_classes, n))
    text = rng.standard_normal((n, p.text_len, p.text_dim)).astype(np.float32)
    marked = np.argsort(rng.random((n, p.text_len)), axis=1)[:, : p.text_marked]  # distinct tokens per item
    rows = np.repeat(np.arange(n), p.text_marked)
    text[rows, marked.reshape(-1)] += p.text_snr * t_tmpl[np.repeat(shown, p.text_marked)]
    return text


def modality_specs(p: SyntheticParams) -> dict[str, ModalitySpec]:
    specs = {
        "audio": ModalitySpec(list(p.audio_shape), "float32"),
        "visual": ModalitySpec([p.visual_frames, 3, p.visual_size, p.visual_size], "float32"),
    }
    if p.text_len > 0:
        specs["text"] = ModalitySpec([p.text_len, p.text_dim], "float32")
    return specs


def recorded_params(p: SyntheticParams) -> dict[str, object]:
    """The parameters stored with (and compared against) a prepared store; text knobs only when
    there is a text modality, so two-modality stores prepared before it existed stay valid."""
    d = asdict(p)
    if p.text_len == 0:
        d = {k: v for k, v in d.items() if k not in TEXT_FIELDS}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


@register_dataset
class Synthetic(DatasetBuilder):
    """Procedural audio+visual(+text) data with a controllable imbalance; no download (the default)."""

    name = "synthetic"
    description = "procedural audio+visual data with a controllable imbalance; no download (the default)"
    protocols = {
        "default": "6 classes, 1200/480/480; audio easy but 75% informative, visual harder, fully informative",
        "tiny": "the default in miniature (360/120/120, 16x16), for tests",
        "balanced": "both modalities fully informative and about equally hard (a control)",
        "three": "audio, visual and a 1-D text sequence (8 x 16), tiny-sized: a three-way imbalance",
    }
    default_protocol = "default"

    @classmethod
    def modalities_of(cls, protocol: str) -> tuple[str, ...]:
        p = PROTOCOLS.get(protocol)
        return tuple(modality_specs(p)) if p is not None else cls.modalities

    def prepare(self, req: PrepareRequest) -> PrepareResult:
        if req.protocol not in PROTOCOLS:
            raise UserError(
                f"unknown protocol '{req.protocol}' for dataset 'synthetic'; choose one of: {', '.join(PROTOCOLS)}"
            )
        p = PROTOCOLS[req.protocol]
        overrides = {k: v for k, v in req.options.items() if k in SyntheticParams.__dataclass_fields__}
        if overrides:
            p = SyntheticParams(**{**asdict(p), **overrides})
        target = store_dir(self.name, req.protocol, req.data_dir)
        params = recorded_params(p)
        if not req.force and is_prepared(self.name, req.protocol, req.data_dir) and intact(target, console):
            meta = load_meta(self.name, req.protocol, req.data_dir)
            if meta.params == params:
                return PrepareResult(target, True, {})
        t0 = time.perf_counter()
        w = StoreWriter(target)
        counts: dict[str, int] = {}
        for split in ("train", "val", "test"):
            arrays, labels = generate(p, split)
            w.write_split(split, arrays, labels, (f"{split}-{i:05d}" for i in range(len(labels))))
            counts[split] = len(labels)
        meta = StoreMeta(
            dataset=self.name,
            protocol=req.protocol,
            classes=[f"class{c}" for c in range(p.num_classes)],
            modalities=modality_specs(p),
            splits=counts,
            params=params,
        )
        report = {
            "dataset": self.name,
            "protocol": req.protocol,
            "splits": {s: {"expected": n, "found": n, "missing": 0, "corrupt": 0} for s, n in counts.items()},
            "missing": [],
            "corrupt": [],
            "params": params,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        store = w.finish(meta, report)
        return PrepareResult(store, False, report)
