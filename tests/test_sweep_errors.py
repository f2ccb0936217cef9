"""Bad launcher input is rejected with a clear message and exit code 2, before anything is trained,
submitted or written (no database file, no run directory)."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import write_recipe


def norm(s: str) -> str:
    return " ".join(s.split())


@pytest.mark.parametrize("args, needle", [
    (["--gpus", "a,b"], "--gpus a,b: expected comma-separated GPU ids"),
    (["--gpus", "99"], "--gpus"),  # no CUDA here, or no GPU 99 where there is
    (["--jobs", "0"], "--jobs 0: must be at least 1"),
    (["--jobs-per-gpu", "0"], "--jobs-per-gpu 0: must be at least 1"),
    (["--launcher", "pbs"], "--launcher pbs: choose local, slurm or local-submitit"),
    (["--launcher", "slurm"], "--launcher slurm needs a partition: pass --partition NAME"),
    (["--launcher", "slurm", "--partition", "gpu", "--time", "soon"], "time 'soon': expected minutes or a SLURM time"),
    (["--launcher", "slurm", "--partition", "gpu", "--gpus", "0"], "use --gpus-per-job instead"),
    (["--launcher", "slurm", "--partition", "gpu", "--sbatch", "exclusive"], "--sbatch exclusive: expected KEY=VALUE"),
    (["--no-wait"], "--no-wait needs a launcher whose jobs outlive this command"),
    (["--db", "sqlite:////dev/null/folder/results.db"], "folder /dev/null/folder cannot be created"),
    (["--db", "postgresql://mmbench@127.0.0.1:1/results"], "postgresql://mmbench@127.0.0.1:1/results"),
    (["--set", "launcher.name=slurm"], "--launcher slurm needs a partition"),
])
def test_bad_launcher_input_exits_2_and_writes_nothing(mm_env: Path, cli, args: list[str], needle: str) -> None:
    r = write_recipe(mm_env / "r.yaml", name="bad", epochs=1)
    code, out = cli("sweep", r, *args)
    assert code == 2, out
    assert needle in norm(out) and "Traceback" not in out
    assert not (mm_env / "results.db").exists() and not (mm_env / "runs").exists()


def test_slurm_without_slurm_commands(mm_env: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(mm_env))  # no sbatch, no srun
    r = write_recipe(mm_env / "r.yaml", name="bad", epochs=1, extra="launcher: {name: slurm, partition: gpu}\n")
    code, out = cli("sweep", r)
    assert code == 2 and "sbatch and srun not found on PATH" in norm(out) and "--launcher local-submitit" in norm(out)


def test_bad_recipe_launcher_section(mm_env: Path, cli) -> None:
    r = write_recipe(mm_env / "r.yaml", name="bad", extra="launcher: {name: local, jobs: 0, queue: x}\n")
    code, out = cli("sweep", r)
    flat = norm(out)
    assert code == 2 and "launcher.jobs" in flat and "launcher.queue: unknown key" in flat


def test_ingest_needs_run_directories(mm_env: Path, cli) -> None:
    code, out = cli("ingest", mm_env / "nowhere")
    assert code == 2 and "no such folder" in norm(out)
    (mm_env / "empty").mkdir()
    code, out = cli("ingest", mm_env / "empty")
    assert code == 2 and "no run directories in it" in norm(out)
    assert not (mm_env / "results.db").exists()
