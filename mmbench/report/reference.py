"""Published numbers beside measured ones: `mmbench report --reference FILE`.

A reference file (YAML) lists a paper's or benchmark's published results per dataset, in percent,
and says how they were selected. Each entry is matched to the comparison table's rows of that
dataset (same method; for an entry that names a modality, the unimodal row of that modality), and
the gap table shows published, measured (mean ± std over seeds, n) and the gap measured − published
per metric. Entries with no measured row are listed too ("not run"): a table that silently drops
the methods it could not reproduce would overstate agreement. When the selection rules differ
(published numbers picked on test, measured on validation) the title says so.

    name: BalanceBenchmark (Xu et al., arXiv 2502.10816)
    source: https://github.com/GeWu-Lab/BalanceBenchmark (README results table), commit 4c1482f
    selection: oracle-test
    datasets:
      cremad:
        - {method: joint, label: Baseline, acc: 65.50, macro_f1: 65.07}
        - {method: unimodal, modality: audio, label: Unimodal-1, acc: 59.38}
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from rich.markup import escape
from rich.table import Table

from mmbench.errors import UserError
from mmbench.report.aggregate import ComparisonTable, Row, scale

METRICS = ("acc", "macro_f1")


class RefEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: str = Field(min_length=1)
    modality: str | None = None
    label: str | None = None  # the name the source uses (e.g. "Unimodal-1", "OGM")
    acc: float | None = Field(None, ge=0, le=100)
    macro_f1: float | None = Field(None, ge=0, le=100)

    def published(self, metric: str) -> float | None:
        return getattr(self, metric)


class ReferenceFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    source: str = ""
    selection: Literal["best-val", "last", "oracle-test", "unknown"] = "unknown"
    note: str = ""
    datasets: dict[str, list[RefEntry]]

    @field_validator("datasets")
    @classmethod
    def _non_empty(cls, v: dict[str, list[RefEntry]]) -> dict[str, list[RefEntry]]:
        if not v or not any(v.values()):
            raise ValueError("lists no published results")
        return v


def load_reference(path: Path) -> ReferenceFile:
    """Read and check a reference file; every problem is a UserError naming the file and the key."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise UserError(f"--reference {path}: cannot read it ({e.strerror or e}); pass an existing YAML file") from None
    except yaml.YAMLError as e:
        raise UserError(f"--reference {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise UserError(f"--reference {path}: expected a mapping with name, selection, datasets")
    try:
        return ReferenceFile.model_validate(raw)
    except ValidationError as e:
        lines = [f"--reference {path}: invalid reference file"]
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            lines.append(f"  - {loc}: {err['msg']}")
        raise UserError("\n".join(lines)) from None


@dataclass
class GapRow:
    entry: RefEntry
    row: Row | None  # the measured row, None when the method was not run
    gaps: dict[str, float | None] = field(default_factory=dict)  # metric -> measured - published (pp)

    @property
    def name(self) -> str:
        m = self.entry.method + (f" ({self.entry.modality})" if self.entry.modality else "")
        return m + (f" [{self.entry.label}]" if self.entry.label else "")


@dataclass
class GapTable:
    reference: ReferenceFile
    table: ComparisonTable
    metrics: list[str]
    rows: list[GapRow]

    @property
    def title(self) -> str:
        t = self.table
        sel = f"measured: {t.selection}" + (" (ORACLE: selected on test)" if t.selection == "oracle-test" else "")
        pub = f"published: {self.reference.selection}"
        warn = "" if self.reference.selection == t.selection else " — SELECTION RULES DIFFER"
        return f"{t.dataset} / protocol {t.protocol} vs {self.reference.name} — {pub}; {sel}{warn}"


def _matches(entry: RefEntry, row: Row) -> bool:
    if row.method != entry.method:
        return False
    if entry.modality is None:
        return True
    return f"modality={entry.modality}" in [p.strip() for p in row.setting.split(",")]


def gap_tables(tables: list[ComparisonTable], ref: ReferenceFile) -> list[GapTable]:
    """One gap table per comparison table whose dataset the reference covers."""
    out = []
    for t in tables:
        entries = ref.datasets.get(t.dataset)
        if not entries:
            continue
        metrics = [m for m in METRICS if any(e.published(m) is not None for e in entries)]
        rows: list[GapRow] = []
        for e in entries:
            found = [r for r in t.rows if _matches(e, r)] or [None]
            for r in found:
                gaps: dict[str, float | None] = {}
                for m in metrics:
                    pub = e.published(m)
                    cell = r.cells.get(m) if r is not None else None
                    gaps[m] = None if pub is None or cell is None else scale(m) * cell.summary.mean - pub
                rows.append(GapRow(e, r, gaps))
        out.append(GapTable(ref, t, metrics, rows))
    if not out:
        covered = ", ".join(sorted(ref.datasets))
        shown = ", ".join(sorted({t.dataset for t in tables}))
        raise UserError(f"--reference: it covers {covered}, the report shows {shown}; no table to compare")
    return out


def _measured(g: GapRow, metric: str) -> str:
    cell = g.row.cells.get(metric) if g.row is not None else None
    if cell is None:
        return "not run" if g.row is None else "–"
    s = cell.summary
    sd = "" if s.n < 2 or math.isnan(s.std) else f" ± {scale(metric) * s.std:.2f}"
    return f"{scale(metric) * s.mean:.2f}{sd} (n={s.n})"


def _num(x: float | None, signed: bool = False) -> str:
    return "–" if x is None else f"{x:{'+' if signed else ''}.2f}"


def _legend(gt: GapTable) -> str:
    src = f"; source: {gt.reference.source}" if gt.reference.source else ""
    note = f"; {gt.reference.note}" if gt.reference.note else ""
    return f"percent; measured: mean ± std over seeds; gap = measured − published (points){src}{note}"


def _cells(g: GapRow, metrics: list[str]) -> list[str]:
    out = []
    for m in metrics:
        out += [_num(g.entry.published(m)), _measured(g, m), _num(g.gaps[m], signed=True)]
    return out


def _heads(metrics: list[str]) -> list[str]:
    return [h for m in metrics for h in (f"{m} published", f"{m} measured", f"{m} gap")]


def to_rich(gt: GapTable) -> Table:
    tab = Table(title=escape(gt.title), title_justify="left", caption=escape(_legend(gt)), caption_justify="left")
    tab.add_column("method [source name]", style="bold")
    tab.add_column("setting")
    for h in _heads(gt.metrics):
        tab.add_column(h, justify="right")
    for g in gt.rows:
        tab.add_row(escape(g.name), escape(g.row.setting if g.row else ""), *_cells(g, gt.metrics))
    return tab


def to_markdown(gt: GapTable) -> str:
    cols = ["method [source name]", "setting", *_heads(gt.metrics)]
    lines = [f"### {gt.title}", "", "| " + " | ".join(cols) + " |",
             "|" + "|".join("---" if i < 2 else "---:" for i in range(len(cols))) + "|"]
    for g in gt.rows:
        lines.append("| " + " | ".join([g.name, g.row.setting if g.row else "", *_cells(g, gt.metrics)]) + " |")
    return "\n".join(lines + ["", f"_{_legend(gt)}_", ""]) + "\n"


def to_csv(gts: list[GapTable]) -> str:
    """Long format: one line per entry, measured row and metric; values in percent."""
    buf = io.StringIO()
    buf.write("reference,dataset,protocol,selection_published,selection_measured,method,modality,source_label,"
              "setting,metric,published,measured_mean,measured_std,n,gap\n")

    def q(s: str) -> str:
        return '"' + s.replace('"', '""') + '"'

    def g6(x: float | None) -> str:
        return "" if x is None or math.isnan(x) else f"{x:.6g}"

    for gt in gts:
        for g in gt.rows:
            for m in gt.metrics:
                cell = g.row.cells.get(m) if g.row is not None else None
                mean = scale(m) * cell.summary.mean if cell else None
                std = scale(m) * cell.summary.std if cell else None
                buf.write(",".join([
                    q(gt.reference.name), q(gt.table.dataset), q(gt.table.protocol), gt.reference.selection,
                    gt.table.selection, q(g.entry.method), q(g.entry.modality or ""), q(g.entry.label or ""),
                    q(g.row.setting if g.row else ""), m, g6(g.entry.published(m)), g6(mean), g6(std),
                    str(cell.summary.n) if cell else "0", g6(g.gaps[m]),
                ]) + "\n")
    return buf.getvalue()


REFERENCE_FORMATS = ("table", "markdown", "csv")
