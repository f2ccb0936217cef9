"""`mmbench doctor`: does this environment actually work?

A version range once resolved to torchaudio 2.11.1 beside torch 2.11.0, which installs cleanly and then
fails at import (an undefined symbol in libtorchaudio.so). Installed versions say nothing about that, so
each native extension is loaded and exercised here, each in its own interpreter (a broken shared library
can abort the process that loads it), and every failure comes with what to do.
"""
from __future__ import annotations

import json
import platform
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

# Each probe runs in a fresh interpreter and prints one JSON line with its facts.
PROBES: dict[str, str] = {
    "torch": """
import json, torch
x = torch.arange(6.0).reshape(2, 3)
assert float((x @ x.T).sum()) == 83.0
cuda = torch.cuda.is_available()
devs = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
print(json.dumps({"version": torch.__version__, "cuda_build": torch.version.cuda, "cuda_available": cuda,
                  "devices": devs, "threads": torch.get_num_threads()}))
""",
    "torchaudio": """
import json, torch, torchaudio
from torchaudio.compliance import kaldi
import torchaudio.functional as F
w = torch.sin(torch.arange(16000.0) * 0.05).unsqueeze(0)
fb = kaldi.fbank(w, num_mel_bins=8, sample_frequency=16000)
r = F.resample(w, 16000, 8000)
assert fb.shape[1] == 8 and r.shape[1] == 8000
print(json.dumps({"version": torchaudio.__version__}))
""",
    "torchvision": """
import json, torch, torchvision
from torchvision.ops import nms
keep = nms(torch.tensor([[0., 0., 1., 1.], [0., 0., 1., 1.]]), torch.tensor([0.9, 0.8]), 0.5)
assert keep.tolist() == [0]
print(json.dumps({"version": torchvision.__version__}))
""",
    "av": """
import io, json, av
import numpy as np
buf = io.BytesIO()
with av.open(buf, "w", format="wav") as out:
    st = out.add_stream("pcm_s16le", rate=8000, layout="mono")
    fr = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
    fr.sample_rate = 8000
    for p in st.encode(fr):
        out.mux(p)
    for p in st.encode():
        out.mux(p)
buf.seek(0)
with av.open(buf) as inp:
    n = sum(f.samples for f in inp.decode(audio=0))
assert n == 800, n
print(json.dumps({"version": av.__version__, "ffmpeg": av.library_versions.get("libavcodec")}))
""",
    "numpy": """
import json, numpy
print(json.dumps({"version": numpy.__version__}))
""",
}

FIXES: dict[str, str] = {
    "torch": "re-create the environment from the lock: `rm -rf .venv && make venv`",
    "torchaudio": ("torchaudio must be built for the installed torch (torchaudio 2.11.1 does not load with torch "
                   "2.11.0); re-create the environment from the lock: `rm -rf .venv && make venv`, or "
                   "`pip install torchaudio==<the locked version>`"),
    "torchvision": "torchvision must match torch (0.26.x for torch 2.11); re-create it: `rm -rf .venv && make venv`",
    "av": "PyAV bundles its own FFmpeg; reinstall it from the lock: `pip install --force-reinstall av==<locked>`",
    "numpy": "re-create the environment from the lock: `rm -rf .venv && make venv`",
}


@dataclass
class Check:
    name: str
    ok: bool
    facts: dict = field(default_factory=dict)
    error: str = ""


def _probe(name: str, timeout: float = 120.0) -> Check:
    try:
        out = subprocess.run([sys.executable, "-c", PROBES[name]], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Check(name, False, error=f"loading {name} took over {timeout:.0f} s")
    if out.returncode != 0:
        lines = [ln for ln in (out.stderr or "").strip().splitlines() if ln.strip()]
        return Check(name, False, error=lines[-1] if lines else f"exit code {out.returncode}")
    try:
        return Check(name, True, json.loads(out.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        return Check(name, False, error=f"unexpected output: {out.stdout[-200:]!r}")


def locked_versions(lock: Path) -> dict[str, str]:
    """name -> version for the lines of a lock that apply to this interpreter (markers are evaluated)."""
    from packaging.markers import Marker

    out: dict[str, str] = {}
    for raw in lock.read_text().splitlines():
        line = raw.strip().rstrip("\\").strip()
        if not line or line.startswith(("#", "--")) or "==" not in line:
            continue
        spec, _, marker = line.partition(";")
        if marker.strip() and not Marker(marker.strip()).evaluate():
            continue
        name, _, ver = spec.strip().partition("==")
        out[name.strip().lower().replace("_", "-")] = ver.strip()
    return out


def find_lock() -> Path | None:
    import mmbench

    cand = Path(mmbench.__file__).resolve().parent.parent / "requirements.lock"
    return cand if cand.is_file() else None


def lock_drift(lock: Path | None) -> list[tuple[str, str, str]]:
    """(package, locked, installed) for every locked package whose installed version differs."""
    if lock is None:
        return []
    drift = []
    for name, want in locked_versions(lock).items():
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = "not installed"
        if have != want:
            drift.append((name, want, have))
    return drift


def run_checks() -> list[Check]:
    py_ok = sys.version_info >= (3, 11)
    checks = [Check("python", py_ok, {"version": platform.python_version(), "executable": sys.executable},
                    "" if py_ok else "mmbench needs Python 3.11 or newer")]
    with ThreadPoolExecutor(max_workers=len(PROBES)) as ex:
        checks += list(ex.map(_probe, PROBES))
    return checks


def fix_for(check: Check) -> str:
    if check.name == "python":
        return "install Python 3.11+ and re-create the environment: `rm -rf .venv && make venv PYTHON=python3.11`"
    return FIXES[check.name]
