"""The protocols' deterministic features, computed once at prepare time.

Each function reproduces one published recipe with every parameter taken from the protocol (see
data_manifests/*.yaml and DATASETS.md §4): OGM-GE's log-STFT, the kaldi fbank of OGM-GE's
`process_audio.py` (used by MMPareto / Re-learning / BalanceBenchmark), and 1-fps frame picking.
Only torch / torchaudio DSP functions are used (no torchaudio I/O, which needs a system FFmpeg).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchaudio

from mmbench.data.media import Audio, MediaError, decode_audio, one_fps_frames

# torchaudio's equivalent of resampy's `kaiser_best` (librosa's default filter before 0.10; since
# then librosa uses soxr_hq, which is not available without an extra native dependency)
RESAMPLERS: dict[str, dict[str, Any]] = {
    "kaiser_best": {"lowpass_filter_width": 64, "rolloff": 0.9475937167399596,
                    "resampling_method": "sinc_interp_kaiser", "beta": 14.769656459379492},
    "kaiser_fast": {"lowpass_filter_width": 16, "rolloff": 0.85,
                    "resampling_method": "sinc_interp_kaiser", "beta": 8.555504641634386},
}


def resample(x: np.ndarray, orig: int, new: int, method: str = "kaiser_best") -> np.ndarray:
    if orig == new:
        return x
    if method not in RESAMPLERS:
        raise ValueError(f"unknown resampler '{method}'; known: {sorted(RESAMPLERS)}")
    y = torchaudio.functional.resample(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), orig, new, **RESAMPLERS[method])
    return y.numpy()


def ogm_stft(x: np.ndarray, sr: int, p: dict[str, Any]) -> np.ndarray:
    """OGM-GE's CREMA-D audio: tile, keep `seconds`, clip to [-1, 1], centred STFT, log(|S| + eps).

    OGM-GE tiles exactly `tile` times (3 s from clips >= 1 s); a shorter clip is tiled further so
    the shape holds. Returns float32 (1, n_fft // 2 + 1, 1 + n // hop).
    """
    n = int(round(p["seconds"] * sr))
    reps = max(int(p.get("tile", 3)), math.ceil(n / max(len(x), 1)))
    y = np.tile(x, reps)[:n]
    lo, hi = p.get("clip", [-1.0, 1.0])
    y = np.clip(y, lo, hi).astype(np.float32)
    n_fft, hop = int(p["n_fft"]), int(p["hop_length"])
    win = torch.hann_window(n_fft, periodic=True, dtype=torch.float32)  # scipy get_window('hann', fftbins=True)
    spec = torch.stft(torch.from_numpy(y), n_fft, hop, n_fft, win, center=bool(p.get("center", True)),
                      pad_mode=p.get("pad_mode", "constant"), return_complex=True)
    return torch.log(spec.abs() + float(p["log_eps"])).numpy()[None]


def kaldi_fbank(x: np.ndarray, sr: int, p: dict[str, Any]) -> np.ndarray:
    """OGM-GE's `process_audio.py`: mean-removed waveform, kaldi fbank, pad/cut, AudioSet normalisation.

    Padding adds zero rows after the log (as `ZeroPad2d` there), or the log floor with `pad: floor`. Stored as (1, mel bins, frames):
    the (1, F, T) layout of every audio input here, i.e. the transpose of the repo's (T, F).
    """
    w = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None]
    w = w - w.mean()
    try:
        fb = torchaudio.compliance.kaldi.fbank(
            w, htk_compat=True, sample_frequency=sr, use_energy=False, window_type=p.get("window", "hanning"),
            num_mel_bins=int(p["num_mel_bins"]), dither=0.0, frame_shift=float(p["frame_shift_ms"]),
            frame_length=float(p.get("frame_length_ms", 25.0)),
        )
    except (RuntimeError, AssertionError, ValueError) as e:
        raise MediaError(f"too short for one fbank frame ({e})") from None
    if fb.shape[0] == 0:
        raise MediaError("too short for one fbank frame")
    target = int(p["target_length"])
    if fb.shape[0] < target:
        fb = torch.nn.functional.pad(fb, (0, 0, 0, target - fb.shape[0]), value=FBANK_PAD[p.get("pad", "zero")])
    fb = fb[:target]
    fb = (fb - float(p["norm_mean"])) / (2.0 * float(p["norm_std"]))
    return fb.T.contiguous().numpy()[None]


# `pad` of the fbank protocols: OGM-GE's zero rows of log energy (louder than most speech once the
# AudioSet normalisation is applied: +0.44 vs a mean speech frame of -0.16 on FSDD), or kaldi's
# log floor, log(float32 eps), the value fbank itself gives silence.
FBANK_PAD = {"zero": 0.0, "floor": float(np.log(np.finfo(np.float32).eps))}

AUDIO_FEATURES = {"ogm-stft": ogm_stft, "fbank": kaldi_fbank}


def audio_shape(p: dict[str, Any]) -> list[int]:
    if p["features"] == "ogm-stft":
        n = int(round(p["seconds"] * p["sample_rate"]))
        return [1, int(p["n_fft"]) // 2 + 1, 1 + n // int(p["hop_length"])]
    if p["features"] == "fbank":
        return [1, int(p["num_mel_bins"]), int(p["target_length"])]
    raise ValueError(f"unknown audio features '{p['features']}'")


def check_audio(a: Audio, p: dict[str, Any]) -> None:
    """Reject what would silently poison training: empty, too short, or truncated audio."""
    if a.seconds < float(p.get("min_seconds", 0.0)):
        raise MediaError(f"too short: {a.seconds:.2f} s of audio (< {p['min_seconds']} s)")
    if a.declared_seconds and a.declared_seconds > 0.5 and a.seconds < 0.9 * a.declared_seconds:
        raise MediaError(f"truncated: decoded {a.seconds:.2f} s of {a.declared_seconds:.2f} s declared")
    if not np.isfinite(a.samples).all():
        raise MediaError("audio contains NaN/inf samples")


def audio_from_waveform(x: np.ndarray, sr: int, p: dict[str, Any]) -> np.ndarray:
    y = resample(x, sr, int(p["sample_rate"]), p.get("resampler", "kaiser_best"))
    return AUDIO_FEATURES[p["features"]](y, int(p["sample_rate"]), p).astype(p.get("dtype", "float32"))


def audio_from_file(path: Path, p: dict[str, Any]) -> np.ndarray:
    a = decode_audio(path)
    check_audio(a, p)
    return audio_from_waveform(a.samples, a.rate, p)


def pick_frames(n_avail: int, n: int, rule: str) -> list[int]:
    """Indices into a clip's 1-fps frames: `n` segments, the first or the middle frame of each.

    segment-start: OGM-GE's KS/AVE loader (1-based `seg*i+1`, seg = n_avail // n: 0, 3, 6 of 10);
    segment-middle: MMPareto / BalanceBenchmark test-time rule (`i*seg + seg//2`).
    A clip with fewer frames than asked repeats its last one.
    """
    seg = max(n_avail // n, 1)
    off = {"segment-start": 0, "segment-middle": seg // 2}[rule]
    return [min(i * seg + off, n_avail - 1) for i in range(n)]


def visual_shape(p: dict[str, Any]) -> list[int]:
    if p["features"] == "frames":
        return [int(p["frames"]), 3, int(p["size"]), int(p["size"])]
    if p["features"] == "image":
        return [1, int(p.get("channels", 1)), int(p["size"]), int(p["size"])]
    raise ValueError(f"unknown visual features '{p['features']}'")


def frames_from_file(path: Path, p: dict[str, Any]) -> np.ndarray:
    n, rule = int(p["frames"]), p["rule"]
    return one_fps_frames(path, lambda avail: pick_frames(avail, n, rule), size=int(p["size"]),
                          seek_over=float(p.get("seek_over_seconds", 4.0)))


def transform_for(modality: str, p: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The per-batch transform (mmbench.data.transforms) and its arguments, from the protocol."""
    if modality == "visual":
        args: dict[str, Any] = {"size": int(p.get("crop", p["size"]))}
        if "mean" in p:
            args["mean"], args["std"] = list(p["mean"]), list(p["std"])
        if p.get("augment") is False:
            args["augment"] = False
        return "frames", args
    return "identity", {}


def spec_shapes(protocol: dict[str, Any]) -> dict[str, tuple[list[int], str]]:
    out = {}
    if "audio" in protocol:
        out["audio"] = (audio_shape(protocol["audio"]), protocol["audio"].get("dtype", "float32"))
    if "visual" in protocol:
        out["visual"] = (visual_shape(protocol["visual"]), "uint8")
    return out
