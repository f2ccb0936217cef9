"""The results database schema (DESIGN.md §4.5). Column names are a contract: reports and
external tools rely on them."""
from __future__ import annotations

from datetime import datetime
from typing import Optional

from sqlmodel import Field, SQLModel


class Sweep(SQLModel, table=True):
    __tablename__ = "sweep"
    id: str = Field(primary_key=True)  # hash of name + recipe content + overrides
    name: str = Field(index=True)
    recipe_path: str
    recipe_sha256: str
    created_at: datetime
    mmbench_version: str
    git_sha: Optional[str] = None
    host: Optional[str] = None
    overrides_json: str = "[]"


class Run(SQLModel, table=True):
    __tablename__ = "run"
    id: str = Field(primary_key=True)  # config hash
    dataset: str = Field(index=True)
    protocol: str
    method: str = Field(index=True)
    fusion: str
    backbone: str
    seed: int
    config_json: str
    status: str = Field(default="pending", index=True)  # pending|running|completed|failed
    error: Optional[str] = None
    created_at: datetime
    started_at: Optional[datetime] = None
    finished_at: Optional[datetime] = None
    wall_seconds: Optional[float] = None
    device: Optional[str] = None
    n_train: Optional[int] = None
    n_val: Optional[int] = None
    n_test: Optional[int] = None
    selection: Optional[str] = None
    selected_epoch: Optional[int] = None
    # beyond the contract: provenance and progress
    label: str = ""  # method with its non-default-relevant parameters, e.g. "ogm_ge(alpha=0.8)"
    run_dir: Optional[str] = None
    epochs_done: int = 0
    epochs_total: Optional[int] = None
    env_json: Optional[str] = None  # package versions, git sha, host, estimator
    depends_on: str = "[]"


class SweepRun(SQLModel, table=True):
    __tablename__ = "sweep_run"
    sweep_id: str = Field(primary_key=True, foreign_key="sweep.id")
    run_id: str = Field(primary_key=True, foreign_key="run.id")


class EpochMetric(SQLModel, table=True):
    __tablename__ = "epoch_metric"
    run_id: str = Field(primary_key=True, foreign_key="run.id")
    epoch: int = Field(primary_key=True)
    split: str = Field(primary_key=True)  # train|val|test
    name: str = Field(primary_key=True)
    value: Optional[float] = None


class FinalMetric(SQLModel, table=True):
    __tablename__ = "final_metric"
    run_id: str = Field(primary_key=True, foreign_key="run.id")
    split: str = Field(primary_key=True)
    name: str = Field(primary_key=True)
    selection: str = Field(primary_key=True)  # best-val|last|oracle-test
    value: Optional[float] = None
