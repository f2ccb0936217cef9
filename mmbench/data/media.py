"""Decoding with PyAV (its bundled FFmpeg): audio tracks as float waveforms, video frames at exact times.

PyAV reads every container the datasets ship (CREMA-D's FLV with VP6 video and MP3 audio, YouTube
MP4 with H.264/AAC, WAV) without a system FFmpeg, which torchaudio's own loaders would need.
Failures become `MediaError` with a short reason the prepare report shows per item.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import av
import numpy as np
from PIL import Image

PickFn = Callable[[int], Sequence[int]]

av.logging.set_level(av.logging.PANIC)  # corrupt input is reported per item, not as FFmpeg log spam


class MediaError(Exception):
    """An item cannot be used; `str(e)` is the reason shown in the prepare report."""


def _open(path: Path) -> av.container.InputContainer:
    try:
        return av.open(str(path), metadata_errors="ignore")
    except FileNotFoundError:
        raise MediaError("file missing") from None
    except (av.FFmpegError, OSError, ValueError) as e:
        raise MediaError(f"undecodable ({type(e).__name__}: {e})") from None


def _wav_declared_seconds(path: Path) -> float | None:
    """Duration the RIFF header promises (data chunk size), to tell a truncated WAV from a short one."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    pos, rate, align = 12, None, None
    while pos + 8 <= len(head):
        cid, size = head[pos:pos + 4], int.from_bytes(head[pos + 4:pos + 8], "little")
        if cid == b"fmt " and pos + 22 <= len(head):
            rate = int.from_bytes(head[pos + 12:pos + 16], "little")
            align = int.from_bytes(head[pos + 20:pos + 22], "little")
        elif cid == b"data":
            if not rate or not align or size in (0, 0xFFFFFFFF):
                return None
            return size / (rate * align)
        pos += 8 + size + (size & 1)
    return None


@dataclass
class Audio:
    samples: np.ndarray  # float32 mono, in [-1, 1] for PCM input
    rate: int
    declared_seconds: float | None  # duration the container claims (to detect truncation)

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.rate


_SCALE = {"s16": 32768.0, "s16p": 32768.0, "s32": 2147483648.0, "s32p": 2147483648.0, "flt": 1.0, "fltp": 1.0,
          "dbl": 1.0, "dblp": 1.0}


def _planar_float(frame: av.AudioFrame) -> np.ndarray | None:
    """(channels, samples) float32 straight from the frame: the exact int -> float map (x / 2^(bits-1))."""
    fmt = frame.format.name
    if fmt not in _SCALE:
        return None
    a = frame.to_ndarray()
    ch = len(frame.layout.channels)
    if not frame.format.is_planar:
        a = a.reshape(-1, ch).T
    return a.astype(np.float32) / np.float32(_SCALE[fmt]) if fmt not in ("flt", "fltp") else a.astype(np.float32, copy=False)


def decode_audio(path: Path) -> Audio:
    """The first audio track, mixed to mono by averaging channels (as librosa does), native rate.

    Integer samples become float exactly as libsndfile / librosa do (int16 / 32768); no resampling
    happens here (see features.resample for that, recorded in the protocol).
    """
    with _open(path) as c:
        if not c.streams.audio:
            raise MediaError("no audio track")
        s = c.streams.audio[0]
        declared = None
        if c.format.name == "wav":
            declared = _wav_declared_seconds(path)  # FFmpeg clamps the header's size to the file's
        elif s.duration is not None and s.time_base is not None:
            declared = float(s.duration * s.time_base)
        elif c.duration is not None:
            declared = c.duration / 1e6
        rate = s.codec_context.sample_rate or s.rate
        chunks: list[np.ndarray] = []
        resampler = None
        try:
            for frame in c.decode(s):
                rate = frame.sample_rate
                x = _planar_float(frame)
                if x is None:  # an unusual sample format: let swresample convert it
                    if resampler is None:
                        resampler = av.AudioResampler(format="fltp", layout=frame.layout, rate=frame.sample_rate)
                    chunks += [f.to_ndarray() for f in resampler.resample(frame)]
                else:
                    chunks.append(x)
            if resampler is not None:
                chunks += [f.to_ndarray() for f in resampler.resample(None)]
        except (av.FFmpegError, ValueError) as e:
            if not chunks:
                raise MediaError(f"undecodable audio ({type(e).__name__}: {e})") from None
    if not chunks:
        raise MediaError("audio track has no decodable samples")
    x = np.concatenate(chunks, axis=1).astype(np.float32)
    mono = x.mean(axis=0) if x.shape[0] > 1 else x[0]
    return Audio(np.ascontiguousarray(mono), int(rate), declared)


def _video_stream(c: av.container.InputContainer) -> av.video.stream.VideoStream:
    if not c.streams.video:
        raise MediaError("no video track")
    return c.streams.video[0]


def _duration(c: av.container.InputContainer, s: av.video.stream.VideoStream) -> float | None:
    if s.duration is not None and s.time_base is not None:
        return float(s.duration * s.time_base)
    if c.duration is not None:
        return c.duration / 1e6
    return None


def _to_rgb(frame: av.VideoFrame, size: int | None) -> np.ndarray:
    img = frame.to_image()  # RGB, PIL
    if size is not None:
        # PIL's bilinear resize is antialiased: the same as torchvision's Resize on a PIL image
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()


def one_fps_frames(
    path: Path, pick: PickFn, size: int | None = None, seek_over: float = 4.0
) -> np.ndarray:
    """The frames shown at t = 0, 1, 2, ... s (1 fps, the first frame of each second), then `pick`.

    `pick(n_available)` returns indices into that 1-fps list (a protocol's frame rule); only those
    frames are converted. The frame "shown at t" is the last one whose timestamp is <= t. Clips
    longer than `seek_over` seconds are read by seeking to each wanted time instead of decoding
    everything (10-s YouTube clips); both paths select the same frames.
    Returns uint8 (len(picked), 3, H, W).
    """
    with _open(path) as c:
        s = _video_stream(c)
        s.thread_type = "NONE"
        dur = _duration(c, s)
        try:
            if dur is not None and dur > seek_over:
                n_avail = max(1, math.ceil(dur - 1e-6))
                wanted = [float(i) for i in pick(n_avail)]
                frames = _frames_by_seek(c, s, wanted)
            else:
                frames = _frames_sequential(c, s, pick)
            return np.stack([_to_rgb(f, size) for f in frames])
        except (av.FFmpegError, ValueError) as e:
            raise MediaError(f"undecodable video ({type(e).__name__}: {e})") from None


def _rel_time(frame: av.VideoFrame, start: float) -> float:
    return float(frame.time) - start if frame.time is not None else 0.0


def _stream_start(s: av.video.stream.VideoStream) -> float:
    return float(s.start_time * s.time_base) if s.start_time is not None and s.time_base is not None else 0.0


def _frames_sequential(c: av.container.InputContainer, s: av.video.stream.VideoStream, pick: PickFn) -> list[av.VideoFrame]:
    start = _stream_start(s)
    shown: list[av.VideoFrame] = []  # shown[k] = frame displayed at t = k
    prev: av.VideoFrame | None = None
    for frame in c.decode(s):
        t = _rel_time(frame, start)
        while t > len(shown) + 1e-6:
            shown.append(prev if prev is not None else frame)
        prev = frame
    if prev is None:
        raise MediaError("no decodable video frames")
    last_t = _rel_time(prev, start)
    while len(shown) <= last_t + 1e-6:
        shown.append(prev)
    return [shown[min(i, len(shown) - 1)] for i in pick(len(shown))]


def _frames_by_seek(c: av.container.InputContainer, s: av.video.stream.VideoStream, times: Sequence[float]) -> list[av.VideoFrame]:
    start = _stream_start(s)
    out: list[av.VideoFrame] = []
    for t in times:
        c.seek(int((t + start) / s.time_base), stream=s, backward=True, any_frame=False)
        chosen: av.VideoFrame | None = None
        for frame in c.decode(s):
            ft = _rel_time(frame, start)
            if ft > t + 1e-6:
                if chosen is None:
                    chosen = frame
                break
            chosen = frame
        if chosen is None:
            if out:
                chosen = out[-1]
            else:
                raise MediaError("no decodable video frames")
        out.append(chosen)
    return out
