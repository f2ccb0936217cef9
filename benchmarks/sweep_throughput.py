"""Sweep throughput (runs per hour): `--jobs 1` (one run after the other in the driver's process,
torch using every core) against `--jobs 2` (two worker processes at once, cores shared out), on
the synthetic quickstart shortened, in one process, side by side.

Each configuration trains the same runs from scratch into its own runs dir and database; the
prepared data is shared and prepared before any timing. Wall time covers the whole `run_sweep`
(planning, worker start-up, training, evaluation, database writes).

The machine's other load moves these figures; --repeat alternates the two configurations.

    python benchmarks/sweep_throughput.py [--epochs 2] [--seeds 0,1] [--protocol default] [--repeat 1]
"""
from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from mmbench.sweep.launch import SweepOptions, run_sweep
from mmbench.sweep.local import cpu_count

RECIPE = """name: throughput
dataset: {{name: synthetic, protocol: {protocol}}}
model: {{backbone: tiny, fusion: concat}}
train:
  epochs: {epochs}
  batch_size: 64
  optimizer: {{name: sgd, lr: 0.01, momentum: 0.9, weight_decay: 1.0e-4}}
methods: [joint, {{name: unimodal, modality: audio}}, {{name: unimodal, modality: visual}}]
seeds: [{seeds}]
"""


def one_sweep(recipe: Path, root: Path, data_dir: str, jobs: int, tag: str) -> tuple[int, float]:
    out = root / tag
    out.mkdir()
    opts = SweepOptions(recipe=recipe, db_url=f"sqlite:///{out / 'results.db'}", runs_dir=out / "runs",
                        data_dir=data_dir, device="cpu", launcher={"jobs": jobs})
    t0 = time.perf_counter()
    res = run_sweep(opts, Console(file=io.StringIO()))
    wall = time.perf_counter() - t0
    if res.failed or res.completed != len(res.planned):
        raise SystemExit(f"jobs={jobs}: {res.completed}/{len(res.planned)} runs completed; failed: {res.failed}")
    return res.completed, wall


WORKER_START = """
import os, time
from mmbench.sweep.local import context
t0 = time.perf_counter(); p = context().Process(target=os.getpid); p.start(); p.join(); t1 = time.perf_counter()
p = context().Process(target=os.getpid); p.start(); p.join(); t2 = time.perf_counter()
print(f"{t1 - t0:.2f} {1000 * (t2 - t1):.0f}")
"""


def worker_start_costs() -> tuple[str, str]:
    """(seconds for the first worker of a sweep: forkserver start and imports, ms for each later one),
    measured in a fresh interpreter so the first is cold like a new `mmbench sweep`."""
    out = subprocess.run([sys.executable, "-c", WORKER_START], capture_output=True, text=True, check=True)
    first, later = out.stdout.split()
    return first, later


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--protocol", default="default")
    ap.add_argument("--repeat", type=int, default=1, help="alternate the two configurations this many times")
    args = ap.parse_args()

    from mmbench.data.base import DATASETS, PrepareRequest

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data_dir = str(root / "data")
        DATASETS.get("synthetic")().prepare(PrepareRequest(Path(data_dir), args.protocol))
        recipe = root / "recipe.yaml"
        recipe.write_text(RECIPE.format(protocol=args.protocol, epochs=args.epochs, seeds=args.seeds))
        results: dict[int, list[tuple[int, float]]] = {1: [], 2: []}
        for i in range(args.repeat):
            for jobs in (1, 2):
                results[jobs].append(one_sweep(recipe, root, data_dir, jobs, f"j{jobs}-{i}"))

    cores = cpu_count()
    tab = Table(title=f"sweep throughput: synthetic/{args.protocol}, {args.epochs} epoch(s), tiny backbone, "
                      f"{cores} CPU cores, torch {torch.__version__}", title_justify="left")
    for c in ("--jobs", "torch threads per run", "runs", "wall s", "runs / hour", "vs --jobs 1"):
        tab.add_column(c, justify="right")
    base = None
    for jobs, rows in results.items():
        n = sum(r[0] for r in rows)
        wall = sum(r[1] for r in rows)
        rate = 3600 * n / wall
        base = base or rate
        threads = torch.get_num_threads() if jobs == 1 else max(1, cores // jobs)
        tab.add_row(str(jobs), str(threads), str(n), f"{wall:.1f}", f"{rate:.0f}", f"{rate / base:.2f}x")
    first, later = worker_start_costs()
    Console().print(tab)
    Console().print(f"--jobs 2 pays a worker start-up: {first} s once per sweep (forkserver, imports), then {later} ms per run")


if __name__ == "__main__":
    main()
