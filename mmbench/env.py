"""Provenance recorded with every sweep and run: versions, git sha, host."""
from __future__ import annotations

import functools
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import mmbench

PACKAGES = ("torch", "torchaudio", "torchvision", "numpy", "av", "scikit-learn", "sqlmodel", "pandas")


@functools.lru_cache(maxsize=1)
def git_sha() -> str | None:
    root = Path(mmbench.__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    sha = out.stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=5)
    return sha + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


@functools.lru_cache(maxsize=1)
def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "mmbench": mmbench.__version__}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pass
    return out


def host() -> str:
    return socket.gethostname()


def environment() -> dict[str, Any]:
    return {"versions": versions(), "git_sha": git_sha(), "host": host(), "platform": platform.platform()}
