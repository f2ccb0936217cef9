"""One run end to end, through its own run directory.

Every run writes `config.json` first, a checkpoint per epoch, and `summary.json` (status,
per-epoch history, final metrics at each selection rule, counts, environment) atomically at the
end. The database is filled from the run directory (`ingest_run_dir`), idempotently, so a run
whose database write failed, or whose driver was killed, is completed by ingesting again.
"""
from __future__ import annotations

import json
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from sqlalchemy.engine import Engine

from mmbench.config import describe_run
from mmbench.data.store import atomic_write_json
from mmbench.engine.trainer import Progress, Trainer
from mmbench.env import environment
from mmbench.errors import RunFailed, UserError
from mmbench.store import db
from mmbench.store.tables import Run


def run_dir_for(runs_dir: Path, rid: str) -> Path:
    return Path(runs_dir) / rid


def load_run_config(run_dir: Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / "config.json").read_text())


def load_summary(run_dir: Path) -> dict[str, Any] | None:
    f = Path(run_dir) / "summary.json"
    return json.loads(f.read_text()) if f.is_file() else None


def run_row(cfg: dict[str, Any], rid: str, run_dir: Path | None = None, depends_on: list[str] | None = None) -> Run:
    return Run(
        id=rid,
        dataset=cfg["dataset"]["name"],
        protocol=cfg["dataset"]["protocol"],
        method=cfg["method"]["name"],
        fusion=cfg["model"]["fusion"],
        backbone=cfg["model"]["backbone"],
        seed=int(cfg["seed"]),
        config_json=db.json_dumps(cfg),
        status="pending",
        created_at=db.now(),
        selection=cfg["train"]["selection"],
        label=describe_run(cfg).split(" ")[0],
        run_dir=str(run_dir) if run_dir else None,
        epochs_total=int(cfg["train"]["epochs"]),
        depends_on=json.dumps(depends_on or []),
    )


def data_verification(dataset: str, protocol: str, data_dir: str | None) -> dict[str, Any]:
    """Whether the store a run trains on was checksum-verified (`prepare --no-verify` keeps copies
    that differ from the canonical files), from its prepare_report.json; recorded with every run so
    a report can mark results trained on unverified data."""
    from mmbench.data.store import store_dir

    rep = store_dir(dataset, protocol, data_dir) / "prepare_report.json"
    try:
        d = json.loads(rep.read_text())
    except (OSError, ValueError):
        return {"verified": None}  # an embedded dataset, or a store from before this was recorded
    return {"verified": d.get("verified", True), "checksum_mismatches": int(d.get("checksum_mismatches", 0) or 0)}


def execute(
    cfg: dict[str, Any],
    rid: str,
    runs_dir: Path,
    device: torch.device,
    data_dir: str | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
    dependencies: dict[str, Path] | None = None,
) -> dict[str, Any]:
    """Train (or resume) one run and write its summary.json. Returns the summary.

    A UserError (bad data, unsupported combination) propagates: it is not the run's fault.
    Any other exception becomes a `failed` summary with the error.
    """
    rdir = run_dir_for(runs_dir, rid)
    rdir.mkdir(parents=True, exist_ok=True)
    if not (rdir / "config.json").is_file():
        atomic_write_json(rdir / "config.json", cfg)
    started = db.now()
    atomic_write_json(rdir / "status.json", {"status": "running", "started_at": started.isoformat(), "device": str(device)})
    t0 = time.perf_counter()
    summary: dict[str, Any] = {
        "id": rid,
        "started_at": started.isoformat(),
        "device": _device_name(device),
        "environment": {**environment(), "threads": torch.get_num_threads(),
                        "data": data_verification(cfg["dataset"]["name"], cfg["dataset"]["protocol"], data_dir)},
    }
    try:
        res = Trainer(cfg, rdir, device, data_dir, workers, progress, dependencies or {}).fit()
    except UserError:
        raise
    except (RunFailed, Exception) as e:  # noqa: BLE001 - a run's crash must not stop the sweep
        msg = str(e) if isinstance(e, RunFailed) else f"{e.__class__.__name__}: {e}"
        summary.update(status="failed", error=msg, traceback=traceback.format_exc(), finished_at=db.now().isoformat(),
                       wall_seconds=time.perf_counter() - t0)
        atomic_write_json(rdir / "summary.json", summary)
        return summary
    summary.update(
        status="completed",
        finished_at=db.now().isoformat(),
        wall_seconds=time.perf_counter() - t0,
        train_wall_seconds=res.wall_seconds,
        counts=res.counts,
        selection=cfg["train"]["selection"],
        selected_epoch=res.selected_epoch,
        selected=res.selected,
        describe=res.describe,
        history=res.history,
        finals=res.finals,
    )
    atomic_write_json(rdir / "summary.json", summary)
    return summary


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def ingest_run_dir(engine: Engine, run_dir: Path, sweep_id: str | None = None) -> str | None:
    """Fill the database from a run directory; safe to repeat (replaces that run's metrics).
    Returns the run's status, or None when the directory holds no finished run."""
    from datetime import datetime

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    rid = run_dir.name
    summary = load_summary(run_dir)
    if db.get_run(engine, rid) is None:
        db.register_runs(engine, sweep_id, [run_row(cfg, rid, run_dir)])
    elif sweep_id is not None:
        db.register_runs(engine, sweep_id, [run_row(cfg, rid, run_dir)])
    if summary is None:
        return None
    fields: dict[str, Any] = {
        "started_at": datetime.fromisoformat(summary["started_at"]),
        "finished_at": datetime.fromisoformat(summary["finished_at"]),
        "wall_seconds": summary.get("wall_seconds"),
        "device": summary.get("device"),
        "run_dir": str(run_dir),
        "env_json": db.json_dumps({**summary.get("environment", {}), "describe": summary.get("describe", {})}),
    }
    if summary["status"] == "failed":
        fields["error"] = summary.get("error")
        db.write_results(engine, rid, [], {}, fields, status="failed")
        return "failed"
    counts = summary["counts"]
    fields.update(
        error=None,
        n_train=counts.get("train"),
        n_val=counts.get("val"),
        n_test=counts.get("test"),
        selection=summary["selection"],
        selected_epoch=summary["selected_epoch"],
        epochs_done=len(summary["history"]),
    )
    db.write_results(engine, rid, summary["history"], summary["finals"], fields, status="completed")
    return "completed"
