"""Results database -> tidy frames -> one comparison table per dataset and protocol.

A table row is a method together with its distinct non-seed setting (fusion, parameters, grid
values); its cells are `mean ± std (n seeds)` of a final metric at the chosen selection rule.
Different datasets or protocols never share a table, so numbers of different pipelines are never
put side by side.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pandas as pd
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from mmbench.errors import UserError
from mmbench.store.tables import FinalMetric, Run, Sweep, SweepRun

DEFAULT_METRICS = ("acc", "macro_f1", "acc/*", "imbalance_ratio")


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
    with Session(engine) as s:
        q = select(FinalMetric).where(FinalMetric.selection == selection, FinalMetric.split == split)
        rows = [r.model_dump() for r in s.exec(q).all() if r.run_id in set(run_ids)]
    return pd.DataFrame(rows, columns=["run_id", "split", "name", "selection", "value"])


def setting_labels(runs: pd.DataFrame) -> pd.Series:
    """A short label of each run's non-seed setting: the config keys that differ between runs of
    the same dataset (method parameters always shown)."""
    flat = [_flatten({k: v for k, v in json.loads(c).items() if k not in ("seed", "schema")}) for c in runs["config_json"]]
    fdf = pd.DataFrame(flat, index=runs.index)
    varying = [c for c in fdf.columns if fdf[c].astype(str).nunique() > 1
               and not c.startswith(("dataset.", "method.name"))]
    labels = []
    for i, row in fdf.iterrows():
        parts = [f"{c.split('.', 1)[1]}={row[c]}" for c in varying if c.startswith("method.") and pd.notna(row[c])]
        parts += [f"{c}={row[c]}" for c in varying if not c.startswith("method.") and pd.notna(row[c])]
        labels.append(", ".join(str(p) for p in parts))
    return pd.Series(labels, index=runs.index)


@dataclass
class ComparisonTable:
    dataset: str
    protocol: str
    selection: str
    columns: list[str]
    frame: pd.DataFrame  # index: (method, setting); columns: metric -> cell string; plus raw stats
    stats: dict[tuple[str, str, str], tuple[float, float, int]]  # (method, setting, metric) -> mean, std, n
    partial: bool  # some runs of the table are not finished


def _expand_metrics(patterns: tuple[str, ...] | list[str], names: list[str]) -> list[str]:
    out: list[str] = []
    for p in patterns:
        if p.endswith("/*"):
            out += sorted(n for n in names if n.startswith(p[:-1]) and n not in out)
        elif p not in out:
            out.append(p)
    return out


def compare(
    engine: Engine,
    sweep: str | None = None,
    dataset: str | None = None,
    selection: str = "best-val",
    metrics: tuple[str, ...] | list[str] = DEFAULT_METRICS,
    split: str = "test",
) -> list[ComparisonTable]:
    runs = load_runs(engine, sweep, dataset)
    if runs.empty:
        where = " ".join(x for x in (f"sweep '{sweep}'" if sweep else "", f"dataset '{dataset}'" if dataset else "") if x)
        raise UserError(f"no runs{(' for ' + where) if where else ''} in the database; run `mmbench sweep RECIPE` first")
    runs = runs.copy()
    runs["setting"] = setting_labels(runs)
    tables = []
    for (ds, proto), grp in runs.groupby(["dataset", "protocol"], sort=True):
        done = grp[grp["status"] == "completed"]
        finals = load_finals(engine, list(done["id"]), selection, split)
        if finals.empty:
            continue
        names = sorted(finals["name"].unique())
        cols = [c for c in _expand_metrics(metrics, names) if c in names]
        merged = finals.merge(done[["id", "method", "setting", "seed"]], left_on="run_id", right_on="id")
        stats: dict[tuple[str, str, str], tuple[float, float, int]] = {}
        cells: dict[tuple[str, str], dict[str, str]] = {}
        order = list(dict.fromkeys(zip(grp["method"], grp["setting"])))
        for (meth, sett), g in merged.groupby(["method", "setting"], sort=False):
            row = cells.setdefault((meth, sett), {})
            for c in cols:
                v = g.loc[g["name"] == c, "value"].dropna()
                if len(v) == 0:
                    row[c] = "–"
                    continue
                mean, std, n = float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, int(len(v))
                stats[(meth, sett, c)] = (mean, std, n)
                row[c] = format_cell(c, mean, std, n)
        idx = [k for k in order if k in cells]
        frame = pd.DataFrame([cells[k] for k in idx], index=pd.MultiIndex.from_tuples(idx, names=["method", "setting"]), columns=cols)
        tables.append(ComparisonTable(str(ds), str(proto), selection, cols, frame.fillna("–"), stats,
                                      partial=bool((grp["status"] != "completed").any())))
    if not tables:
        raise UserError(f"no completed runs with '{selection}' results match; check `mmbench runs` or the filters")
    return tables


def is_percent(metric: str) -> bool:
    return metric.split("/")[0] in ("acc", "macro_f1", "acc_split", "probe_acc")


def format_cell(metric: str, mean: float, std: float, n: int) -> str:
    if is_percent(metric):
        return f"{100 * mean:.2f} ± {100 * std:.2f} ({n})"
    return f"{mean:.3f} ± {std:.3f} ({n})"
