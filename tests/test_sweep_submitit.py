"""Cluster launch through submitit. The local executor runs the real path end to end (pickled job,
separate process, run directory, collection by a later driver); SLURM is exercised up to the
scheduler with stand-in `sbatch`/`srun` commands that record the batch scripts they are given."""
from __future__ import annotations

import json
import sqlite3
import stat
from pathlib import Path

import pytest

from conftest import write_recipe

COMPETITION = "metrics: {competition: true}\n"


def norm(s: str) -> str:
    return " ".join(s.split())


def test_local_submitit_no_wait_then_collect(mm_env: Path, cli) -> None:
    """Submit, return, re-run: the second driver adopts the jobs still running instead of submitting
    them again, waits for them and fills the database. (Dependencies through submitit are covered by
    the SLURM test below and, for launchers that wait, by test_sweep_parallel: the driver is shared.)"""
    r = write_recipe(mm_env / "r.yaml", name="sub", epochs=1, methods="[joint, {name: unimodal, modality: audio}]")
    args = ("sweep", r, "--launcher", "local-submitit", "--jobs", "2", "--set", "train.eval_train=false")
    code, out = cli(*args, "--no-wait")
    assert code == 0, out
    assert "0 trained, 0 already done, 0 failed, 2 queued or training, 0 waiting for dependencies" in norm(out)
    runs = mm_env / "runs"
    assert len(list(runs.glob("*/job.json"))) == 2
    db = mm_env / "results.db"
    with sqlite3.connect(db) as c:
        assert c.execute("select count(*) from run where status = 'completed'").fetchone() == (0,)

    code, out = cli(*args)  # collects the two jobs, waiting for them while they run
    assert code == 0, out
    with sqlite3.connect(db) as c:
        assert c.execute("select count(*), count(distinct id) from run where status = 'completed'").fetchone() == (2, 2)
        assert c.execute("select count(*) from sweep").fetchone() == (1,)
        assert c.execute("select count(*) from epoch_metric where name = 'epoch_seconds'").fetchone() == (2,)
    jobs = [json.loads(p.read_text()) for p in runs.glob("*/job.json")]
    assert {j["launcher"] for j in jobs} == {"local-submitit"} and len({j["job_id"] for j in jobs}) == 2
    job_dirs = [d for d in (runs / "_submitit").iterdir() if d.is_dir() and d.name.isdigit()]
    assert len(job_dirs) == 2  # nothing was submitted twice

    code, out = cli(*args)
    assert code == 0 and "0 trained, 2 already done" in out


@pytest.fixture
def fake_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`sbatch` that records each batch script and answers like SLURM; `srun` that exists."""
    bin_dir, record = tmp_path / "bin", tmp_path / "sbatch_scripts"
    bin_dir.mkdir()
    record.mkdir()
    counter = tmp_path / "next_id"
    counter.write_text("4242")
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(f"""#!/bin/sh
id=$(cat {counter}); echo $((id + 1)) > {counter}
cp "$1" {record}/$id.sh
echo "Submitted batch job $id"
""")
    srun = bin_dir / "srun"
    srun.write_text("#!/bin/sh\nexit 0\n")
    for f in (sbatch, srun):
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    return record


def test_slurm_submission_arrays_dependencies_and_options(mm_env: Path, cli, fake_slurm: Path) -> None:
    r = write_recipe(mm_env / "r.yaml", name="slurmy", epochs=1, methods="[joint]", seeds="[0]",
                     extra=COMPETITION + "launcher: {name: slurm, cpus_per_job: 8, sbatch: {qos: high}, setup: [module load cuda]}\n")
    code, out = cli("sweep", r, "--partition", "gpu", "--time", "1:30:00", "--gpus-per-job", "2", "--mem-gb", "32",
                    "--array-parallelism", "4", "--sbatch", "account=proj", "--no-wait")
    assert code == 0, out
    scripts = {p.stem: p.read_text() for p in fake_slurm.iterdir()}
    assert sorted(scripts) == ["4242", "4243"]  # one array for the two references, one job behind them
    refs, joint = scripts["4242"], scripts["4243"]
    for s in (refs, joint):
        for line in ("#SBATCH --partition=gpu", "#SBATCH --time=90", "#SBATCH --gpus-per-node=2",
                     "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32GB", "#SBATCH --account=proj", "#SBATCH --qos=high",
                     "#SBATCH --job-name=mmbench-slurmy", "module load cuda"):
            assert line in s, (line, s)
    assert "#SBATCH --array=0-1%2" in refs and "--dependency" not in refs
    assert "#SBATCH --dependency=afterany:4242_0:4242_1" in joint
    jobs = sorted(json.loads(p.read_text())["job_id"] for p in (mm_env / "runs").glob("*/job.json"))
    assert jobs == ["4242_0", "4242_1", "4243"]
    assert "3 queued or training, 0 waiting" in norm(out)


def test_array_parallelism_caps_running_tasks(tmp_path: Path) -> None:
    from submitit.slurm.slurm import _make_sbatch_string

    from mmbench.config import LauncherCfg
    from mmbench.sweep.slurm import executor_params

    p = executor_params(LauncherCfg(name="slurm", partition="p", array_parallelism=4), "slurm", "mmbench-x")
    params = {"job_name": p["name"], "time": p["timeout_min"], "partition": p["slurm_partition"],
              "array_parallelism": p["slurm_array_parallelism"], "gpus_per_node": p["gpus_per_node"]}
    text = _make_sbatch_string(command="python job.py", folder=tmp_path, map_count=10, **params)
    assert "#SBATCH --array=0-9%4" in text and "#SBATCH --gpus-per-node=1" in text
