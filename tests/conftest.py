"""Shared fixtures: every test gets its own data dir, database and runs dir (never the user's)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

torch.set_num_threads(1)  # the suite runs on 2 cores; one thread per test process is fastest overall


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic `tiny` protocol, prepared once per session."""
    from mmbench.data.base import DATASETS, PrepareRequest

    d = tmp_path_factory.mktemp("data")
    DATASETS.get("synthetic")().prepare(PrepareRequest(d, "tiny"))
    return d


@pytest.fixture
def mm_env(tmp_path: Path, tiny_data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """MMBENCH_* pointed at temporary places; returns the working folder."""
    monkeypatch.setenv("MMBENCH_DATA", str(tiny_data_dir))
    monkeypatch.setenv("MMBENCH_DB", f"sqlite:///{tmp_path / 'results.db'}")
    monkeypatch.setenv("MMBENCH_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("MMBENCH_DEVICE", "cpu")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_cli(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    """`mmbench ARGS...` in-process; returns the exit code (output stays in capsys)."""
    from mmbench.cli import main

    monkeypatch.setattr(sys, "argv", ["mmbench", *map(str, args)])
    try:
        main()
    except SystemExit as e:
        return int(e.code or 0)
    return 0


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Callable[..., tuple[int, str]]:
    """Run `mmbench ARGS...` in-process; returns (exit code, stdout+stderr)."""

    def run(*args: str) -> tuple[int, str]:
        capsys.readouterr()
        monkeypatch.setenv("COLUMNS", "250")
        code = run_cli(monkeypatch, *args)
        out = capsys.readouterr()
        return code, out.out + out.err

    return run


TINY_RECIPE = """
name: {name}
dataset: {{name: synthetic, protocol: tiny}}
model: {{backbone: tiny, fusion: concat}}
train:
  epochs: {epochs}
  batch_size: 32
  optimizer: {{name: sgd, lr: 0.01, momentum: 0.9, weight_decay: 1.0e-4}}
methods: {methods}
seeds: {seeds}
"""


def write_recipe(path: Path, name: str = "t", epochs: int = 2, methods: str = "[joint]", seeds: str = "[0]", extra: str = "") -> Path:
    path.write_text(TINY_RECIPE.format(name=name, epochs=epochs, methods=methods, seeds=seeds) + extra)
    return path
