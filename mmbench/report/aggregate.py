"""Results database -> one comparison table per dataset and protocol (numbers only; render.py
formats them).

A row is a method together with its distinct non-seed setting (fusion, parameters, grid values);
a cell summarises a final metric over the row's seeds at the chosen selection rule. Different
datasets or protocols never share a table, so numbers of different pipelines are never put side
by side. Reports read only the database, so they work while a sweep is still running: a table
with unfinished runs is marked partial.
"""
from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from mmbench.errors import UserError
from mmbench.report.stats import Paired, Summary, paired, summarize
from mmbench.store.tables import EpochMetric, FinalMetric, Run, Sweep, SweepRun

DEFAULT_METRICS = ("acc", "macro_f1", "acc/*", "imbalance_ratio")  # imbalance beside the branch accuracies
# The cost column: each run's own time per training epoch, the first basis every row has. CPU and
# GPU time are the process's own (load from other processes on a shared machine does not inflate
# them); wall time, which it does, only for runs logged before the others existed.
COST_BASES = (("epoch_gpu_seconds", "GPU time"), ("epoch_cpu_seconds", "CPU time"), ("epoch_seconds", "wall time"))
COST_METRIC = "epoch_seconds"
BN_GAP_WARN = 0.10  # val accuracy with batch BN statistics this far above the reported one: warn


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list) else v
    return out


def load_runs(engine: Engine, sweep: str | None = None, dataset: str | None = None) -> pd.DataFrame:
    with Session(engine) as s:
        q = select(Run)
        if sweep is not None:
            known = s.exec(select(Sweep.name)).all()
            if sweep not in known:
                raise UserError(f"no sweep named '{sweep}' in the database; known: {', '.join(sorted(set(known))) or '(none)'}")
            ids = select(SweepRun.run_id).join(Sweep, Sweep.id == SweepRun.sweep_id).where(Sweep.name == sweep)  # type: ignore[arg-type]
            q = q.where(Run.id.in_(ids))  # type: ignore[union-attr]
        if dataset is not None:
            q = q.where(Run.dataset == dataset)
        rows = [r.model_dump() for r in s.exec(q).all()]
    return pd.DataFrame(rows)


def load_finals(engine: Engine, run_ids: list[str], selection: str, split: str = "test") -> pd.DataFrame:
    ids = set(run_ids)
    with Session(engine) as s:
        q = select(FinalMetric).where(FinalMetric.selection == selection, FinalMetric.split == split)
        rows = [r.model_dump() for r in s.exec(q).all() if r.run_id in ids]
    return pd.DataFrame(rows, columns=["run_id", "split", "name", "selection", "value"])


def load_epochs(engine: Engine, run_ids: list[str], names: list[str] | None = None) -> pd.DataFrame:
    """Per-epoch metrics of these runs (all splits), optionally only some metric names."""
    ids = set(run_ids)
    with Session(engine) as s:
        q = select(EpochMetric)
        if names is not None:
            q = q.where(EpochMetric.name.in_(names))  # type: ignore[attr-defined]
        rows = [r.model_dump() for r in s.exec(q).all() if r.run_id in ids]
    return pd.DataFrame(rows, columns=["run_id", "epoch", "split", "name", "value"])


def setting_labels(runs: pd.DataFrame) -> pd.DataFrame:
    """Per run: `setting`, a short label of its non-seed configuration, and `context`, the part
    a baseline row must share to be paired (fusion, optimiser, grid values...).

    Method parameters are shown where they vary between runs of the same method (an `alpha`
    grid); other keys where they vary between runs of the table. `metrics.*` only says what is
    measured, not how a model is trained, so it never separates rows; a unimodal run's fusion is
    canonical (it has none), so it is not shown for it.
    """
    cfgs = [json.loads(c) for c in runs["config_json"]]
    flat = pd.DataFrame([_flatten({k: v for k, v in c.items() if k not in ("seed", "schema")}) for c in cfgs],
                        index=runs.index)

    def varies(frame: pd.DataFrame, col: str) -> bool:
        # a key absent from some runs counts as a difference; nunique would drop missing values
        return len({repr(v) if pd.notna(v) else None for v in frame[col]}) > 1

    ctx_cols = [c for c in flat.columns if not c.startswith(("dataset.", "method.", "metrics."))]
    varying_ctx = [c for c in ctx_cols if varies(flat, c)]
    method_of = flat["method.name"]
    settings, contexts = [], []
    for idx, row in flat.iterrows():
        same = flat[method_of == row["method.name"]]
        mcols = [c for c in flat.columns if c.startswith("method.") and c != "method.name" and varies(same, c)]
        mparts = [f"{c.split('.', 1)[1]}={row[c]}" for c in mcols if pd.notna(row[c])]
        if row["method.name"] == "unimodal" and "method.modality" not in mcols:
            mparts.insert(0, f"modality={row['method.modality']}")
        cparts = [f"{c.split('.')[-1] if c.startswith('model.') else c}={row[c]}" for c in varying_ctx
                  if pd.notna(row[c]) and not (row["method.name"] == "unimodal" and c == "model.fusion")]
        settings.append(", ".join(str(p) for p in mparts + cparts))
        contexts.append(", ".join(f"{c}={row[c]}" for c in varying_ctx if c != "model.fusion" or row["method.name"] != "unimodal"))
    return pd.DataFrame({"setting": settings, "context": contexts}, index=runs.index)


@dataclass
class Cell:
    values: dict[int, float]  # seed -> value
    summary: Summary
    vs_baseline: Paired | None = None


@dataclass
class Row:
    method: str
    setting: str
    context: str
    label: str  # method with its parameters, e.g. "ogm_ge(alpha=0.8)"
    n_runs: int
    n_done: int
    cells: dict[str, Cell] = field(default_factory=dict)
    epoch_seconds: float | None = None  # mean time per training epoch, on the table's cost_basis
    rel_cost: float | None = None  # epoch_seconds / the reference row's
    is_baseline: bool = False
    unverified: int = 0  # runs trained on a store prepared with --no-verify whose files differ from the canonical ones


@dataclass
class ComparisonTable:
    dataset: str
    protocol: str
    selection: str
    split: str
    columns: list[str]
    rows: list[Row]
    partial: bool  # some runs of the table are not finished
    baseline: str | None = None  # what rows are compared to (method or label), if asked
    cost_reference: str | None = None  # the row rel_cost divides by (baseline, else joint)
    cost_basis: str = "wall time"  # what the cost column measures (COST_BASES)
    warnings: list[str] = field(default_factory=list)  # about runs behind the numbers (stale BN statistics)

    @property
    def has_cost(self) -> bool:
        return any(r.rel_cost is not None for r in self.rows)


def expand_metrics(patterns: tuple[str, ...] | list[str], names: list[str]) -> list[str]:
    """Metric patterns (`acc`, `acc/*`, shell-style wildcards) -> the matching names, in order."""
    out: list[str] = []
    for p in patterns:
        hits = sorted(fnmatch.filter(names, p)) if any(ch in p for ch in "*?[") else ([p] if p in names else [])
        out += [h for h in hits if h not in out]
    return out


def _matching(rows: list[Row], ref: str) -> list[Row]:
    return [r for r in rows if r.method == ref or r.label == ref]


def _reference(row: Row, refs: list[Row]) -> Row | None:
    """The reference row that shares this row's context (fusion, grid values); the only one if
    there is just one."""
    same = [r for r in refs if r.context == row.context]
    if len(same) == 1:
        return same[0]
    return refs[0] if len(refs) == 1 else None


def compare(
    engine: Engine,
    sweep: str | None = None,
    dataset: str | None = None,
    selection: str = "best-val",
    metrics: tuple[str, ...] | list[str] | None = None,
    split: str = "test",
    baseline: str | None = None,
) -> list[ComparisonTable]:
    runs = load_runs(engine, sweep, dataset)
    if runs.empty:
        where = " ".join(x for x in (f"sweep '{sweep}'" if sweep else "", f"dataset '{dataset}'" if dataset else "") if x)
        raise UserError(f"no runs{(' for ' + where) if where else ''} in the database; run `mmbench sweep RECIPE` first")
    runs = pd.concat([runs, setting_labels(runs)], axis=1)
    patterns = list(metrics) if metrics else list(DEFAULT_METRICS)
    tables: list[ComparisonTable] = []
    seen_names: set[str] = set()
    for (ds, proto), grp in runs.groupby(["dataset", "protocol"], sort=True):
        done = grp[grp["status"] == "completed"]
        finals = load_finals(engine, list(done["id"]), selection, split)
        if finals.empty:
            continue
        names = sorted(finals["name"].unique())
        seen_names |= set(names)
        cols = expand_metrics(patterns, names)
        if not cols:
            continue
        merged = finals.merge(done[["id", "seed"]], left_on="run_id", right_on="id")
        cost, basis = _epoch_cost(engine, list(done["id"]))
        rows: list[Row] = []
        for (meth, sett), g in grp.groupby(["method", "setting"], sort=False):
            gdone = g[g["status"] == "completed"]
            if gdone.empty:
                continue
            row = Row(str(meth), str(sett), str(g["context"].iloc[0]), str(g["label"].iloc[0] or meth), len(g), len(gdone))
            mine = merged[merged["run_id"].isin(set(gdone["id"]))]
            for c in cols:
                v = mine[(mine["name"] == c) & mine["value"].notna()]
                values = {int(s): float(x) for s, x in zip(v["seed"], v["value"])}
                if values:
                    row.cells[c] = Cell(values, summarize(list(values.values())))
            row.unverified = sum(1 for e in gdone["env_json"] if unverified_data(e))
            secs = [cost[r] for r in gdone["id"] if r in cost]
            row.epoch_seconds = sum(secs) / len(secs) if secs else None
            rows.append(row)
        if not rows:
            continue
        rows.sort(key=row_order)
        t = ComparisonTable(str(ds), str(proto), selection, split, cols, rows,
                            partial=bool((grp["status"] != "completed").any()), baseline=baseline, cost_basis=basis)
        t.warnings = _bn_warnings(engine, done, selection)
        _compare_to_baseline(t, baseline)
        _relative_cost(t, baseline)
        tables.append(t)
    unmatched = [p for p in (metrics or []) if not expand_metrics([p], sorted(seen_names))]
    if unmatched and seen_names:
        raise UserError(f"--metric {', '.join(unmatched)}: matches no {split} metric of these runs; "
                        f"available: {', '.join(sorted(seen_names))}")
    if not tables:
        raise UserError(f"no completed runs with '{selection}' results match; check `mmbench runs` or the filters")
    if baseline is not None and not any(_matching(t.rows, baseline) for t in tables):
        known = sorted({r.method for t in tables for r in t.rows} | {r.label for t in tables for r in t.rows})
        raise UserError(f"--baseline {baseline}: no completed runs of it in this report; choose one of: {', '.join(known)}")
    return tables


def unverified_data(env_json: str | None) -> bool:
    """The run recorded that its store holds files that differ from the canonical ones."""
    try:
        return (json.loads(env_json or "{}").get("data") or {}).get("verified") is False
    except ValueError:
        return False


def row_order(row: "Row") -> tuple[int, str, str]:
    """References first (unimodal, then joint), then the methods alphabetically: a stable order
    that does not depend on when runs were written."""
    rank = {"unimodal": 0, "joint": 1}.get(row.method, 2)
    return rank, row.method, row.setting


def _epoch_cost(engine: Engine, run_ids: list[str]) -> tuple[dict[str, float], str]:
    """Each run's mean time per training epoch on the first basis of COST_BASES that every run has
    (GPU time where all ran on a GPU, else CPU time, else wall time), and that basis's name."""
    ep = load_epochs(engine, run_ids, [name for name, _ in COST_BASES])
    ep = ep[(ep["split"] == "train") & ep["value"].notna()]
    for name, basis in COST_BASES:
        sub = ep[ep["name"] == name]
        if not sub.empty and set(sub["run_id"]) >= set(run_ids):
            return {str(k): float(v) for k, v in sub.groupby("run_id")["value"].mean().items()}, basis
    sub = ep[ep["name"] == COST_METRIC]
    return {str(k): float(v) for k, v in sub.groupby("run_id")["value"].mean().items()}, "wall time"


def _bn_warnings(engine: Engine, done: pd.DataFrame, selection: str) -> list[str]:
    """Runs whose selected epoch's val accuracy with batch BN statistics is far above the reported
    one (running statistics): their accuracy says more about stale statistics than about weights."""
    gaps = load_finals(engine, list(done["id"]), selection, "val")
    gaps = gaps[(gaps["name"] == "bn_gap") & gaps["value"].notna()]
    if gaps.empty:
        return []
    info = done.set_index("id")
    out = []
    for rid, gap in zip(gaps["run_id"], gaps["value"]):
        if gap > BN_GAP_WARN:
            r = info.loc[rid]
            out.append(f"{r['label'] or r['method']} seed {r['seed']} (run {rid}): val accuracy is {100 * gap:.1f} points "
                       f"higher with batch BN statistics than with the running ones it reports; "
                       f"re-run with train.precise_bn (e.g. --set train.precise_bn=20) to see the weights' accuracy")
    return out


def _compare_to_baseline(t: ComparisonTable, baseline: str | None) -> None:
    if baseline is None:
        return
    refs = _matching(t.rows, baseline)
    for r in refs:
        r.is_baseline = True
    for row in t.rows:
        ref = _reference(row, refs)
        if ref is None or ref is row:
            continue
        for c, cell in row.cells.items():
            if c in ref.cells:
                cell.vs_baseline = paired(cell.values, ref.cells[c].values)


def _relative_cost(t: ComparisonTable, baseline: str | None) -> None:
    """Training time per epoch relative to the baseline's (or joint training's when no baseline)."""
    ref_name = baseline if baseline is not None else "joint"
    refs = [r for r in _matching(t.rows, ref_name) if r.epoch_seconds]
    if not refs:
        return
    t.cost_reference = ref_name
    for row in t.rows:
        ref = _reference(row, refs)
        if ref is not None and ref.epoch_seconds and row.epoch_seconds is not None:
            row.rel_cost = row.epoch_seconds / ref.epoch_seconds


def is_percent(metric: str) -> bool:
    return metric.split("/")[0] in ("acc", "macro_f1", "acc_split", "probe_acc")


def scale(metric: str) -> float:
    return 100.0 if is_percent(metric) else 1.0


def decimals(metric: str) -> int:
    return 2 if is_percent(metric) else 3


