"""Test and benchmark fixtures: tiny media in the datasets' real raw formats, and a loopback server.

Media are written with PyAV. Each video frame is a flat grey whose level encodes its frame index
(`frame_level`), so a test can tell exactly which frame a decoder picked; the audio is a tone, so
features are non-trivial. `LoopbackServer` is a real HTTP server on 127.0.0.1 with Range support
and injectable faults (cut connections, 404, 500), so network code is tested without a network.
"""
from __future__ import annotations

import threading
import wave
from fractions import Fraction
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import av
import numpy as np


def frame_level(i: int) -> int:
    """Grey level of frame i: distinct for neighbouring frames, far from 0/255 (codec-safe)."""
    return 16 + (i * 23) % 224


def tone(seconds: float, rate: int, freq: float = 440.0, amp: float = 0.3, seed: int = 0) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    rng = np.random.default_rng(seed)
    return (amp * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(t.shape)).astype(np.float32)


def write_wav(path: Path, seconds: float = 1.0, rate: int = 16000, freq: float = 440.0, seed: int = 0,
              samples: np.ndarray | None = None) -> Path:
    """16-bit PCM mono WAV (the CREMA-D / FSDD format)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    x = tone(seconds, rate, freq, seed=seed) if samples is None else samples
    pcm = np.clip(np.round(x * 32767), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


def write_video(path: Path, seconds: float = 1.0, fps: float = 10.0, size: tuple[int, int] = (64, 48),
                audio_rate: int | None = 22050, freq: float = 440.0, container: str | None = None) -> Path:
    """A clip with flat-grey frames (`frame_level`) and, unless `audio_rate` is None, a tone.

    `.flv`: FLV1 (Sorenson) video + MP3 audio, the container of CREMA-D (whose VP6 PyAV cannot
    encode); `.mp4`: MPEG-4 Part 2 video + AAC audio, as YouTube-derived clips.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = container or path.suffix.lstrip(".")
    vcodec, acodec = {"flv": ("flv", "mp3"), "mp4": ("mpeg4", "aac")}[fmt]
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), "w", format=fmt) as c:
        vs = c.add_stream(vcodec, rate=rate)
        vs.width, vs.height = size
        vs.pix_fmt = "yuv420p"
        vs.bit_rate = 400_000
        astream = None
        if audio_rate:
            astream = c.add_stream(acodec, rate=audio_rate)
            astream.layout = "mono"
        n = int(round(seconds * fps))
        for i in range(n):
            img = np.full((size[1], size[0], 3), frame_level(i), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            frame.time_base = 1 / rate
            for p in vs.encode(frame):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
        if astream is not None:
            x = tone(seconds, audio_rate, freq)
            step = 1024
            for k in range(0, len(x), step):
                chunk = x[k:k + step][None]
                af = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp", layout="mono")
                af.sample_rate = audio_rate
                af.pts = k
                af.time_base = Fraction(1, audio_rate)
                for p in astream.encode(af):
                    c.mux(p)
            for p in astream.encode():
                c.mux(p)
    return path


class LoopbackServer:
    """Serves `files` (url path -> bytes) on 127.0.0.1; `faults[path]` is a list of one-shot faults.

    Faults, consumed one per request: "cut" (send half the body, then drop the connection), "404",
    "500", "ignore-range" (answer 200 with the whole body to a Range request). `requests` logs
    (path, Range header) for assertions.
    """

    def __init__(self, files: dict[str, bytes] | None = None) -> None:
        self.files: dict[str, bytes] = dict(files or {})
        self.faults: dict[str, list[str]] = {}
        self.requests: list[tuple[str, str | None]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                path = self.path.split("?")[0]
                rng = self.headers.get("Range")
                outer.requests.append((path, rng))
                fault = outer.faults.get(path, []).pop(0) if outer.faults.get(path) else None
                if fault == "500":
                    return self.send_error(500)
                if fault == "404" or path not in outer.files:
                    return self.send_error(404)
                body = outer.files[path]
                start = 0
                if rng and fault != "ignore-range" and rng.startswith("bytes="):
                    start = int(rng[6:].split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                part = body[start:]
                self.send_header("Content-Length", str(len(part)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if fault == "cut":
                    self.wfile.write(part[: max(1, len(part) // 2)])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(part)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> "LoopbackServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def write_idx(path: Path, array: np.ndarray) -> Path:
    """An MNIST-format IDX file (uint8), gzipped when the name ends in .gz."""
    import gzip

    a = np.ascontiguousarray(array, dtype=np.uint8)
    head = bytes([0, 0, 0x08, a.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in a.shape)
    data = head + a.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)
    return path


def cremad_stem(actor: int, sentence: str, emotion: str, level: str = "XX") -> str:
    return f"{actor}_{sentence}_{emotion}_{level}"


def make_cremad_tree(root: Path, stems: list[str], seconds: float = 1.2, fps: float = 29.97,
                     size: tuple[int, int] = (96, 72)) -> Path:
    """A CREMA-D-layout folder: AudioWAV/<stem>.wav (16 kHz s16) and VideoFlash/<stem>.flv (video + MP3)."""
    for i, stem in enumerate(stems):
        write_wav(root / "AudioWAV" / f"{stem}.wav", seconds, 16000, freq=200 + 40 * i, seed=i)
        write_video(root / "VideoFlash" / f"{stem}.flv", seconds, fps, size, audio_rate=44100, freq=200 + 40 * i)
    return root
