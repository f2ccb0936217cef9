"""Render comparison tables: rich (terminal), markdown, csv, latex."""
from __future__ import annotations

import io

from rich.table import Table

from mmbench.report.aggregate import ComparisonTable, is_percent

FORMATS = ("table", "markdown", "csv", "latex")


def title(t: ComparisonTable) -> str:
    sel = t.selection + (" (ORACLE: selected on test)" if t.selection == "oracle-test" else "")
    part = " — PARTIAL: some runs unfinished" if t.partial else ""
    return f"{t.dataset} / protocol {t.protocol} — test split, selection {sel}{part}"


def header(metric: str) -> str:
    return metric + (" (%)" if is_percent(metric) else "")


def to_rich(t: ComparisonTable) -> Table:
    tab = Table(title=title(t), title_justify="left")
    tab.add_column("method", style="bold")
    tab.add_column("setting")
    for c in t.columns:
        tab.add_column(header(c), justify="right")
    for (meth, sett), row in t.frame.iterrows():
        tab.add_row(str(meth), str(sett), *[str(row[c]) for c in t.columns])
    return tab


def to_markdown(t: ComparisonTable) -> str:
    cols = ["method", "setting", *[header(c) for c in t.columns]]
    lines = [f"### {title(t)}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for (meth, sett), row in t.frame.iterrows():
        lines.append("| " + " | ".join([str(meth), str(sett), *[str(row[c]) for c in t.columns]]) + " |")
    return "\n".join(lines) + "\n"


def to_csv(tables: list[ComparisonTable]) -> str:
    buf = io.StringIO()
    buf.write("dataset,protocol,selection,method,setting,metric,mean,std,n\n")
    for t in tables:
        for (meth, sett, metric), (mean, std, n) in t.stats.items():
            sett_q = '"' + sett.replace('"', '""') + '"'
            buf.write(f"{t.dataset},{t.protocol},{t.selection},{meth},{sett_q},{metric},{mean:.6g},{std:.6g},{n}\n")
    return buf.getvalue()


def _tex(s: str) -> str:
    return s.replace("\\", r"\textbackslash{}").replace("_", r"\_").replace("%", r"\%").replace("&", r"\&").replace("#", r"\#")


def to_latex(t: ComparisonTable) -> str:
    cols = t.columns
    lines = [
        r"\begin{table}[t]", r"\centering", rf"\caption{{{_tex(title(t))}}}",
        r"\begin{tabular}{ll" + "r" * len(cols) + "}", r"\toprule",
        "Method & Setting & " + " & ".join(_tex(header(c)) for c in cols) + r" \\", r"\midrule",
    ]
    for (meth, sett, ), row in t.frame.iterrows():
        cells = []
        for c in cols:
            st = t.stats.get((meth, sett, c))
            if st is None:
                cells.append("--")
                continue
            mean, std, n = st
            k = 100 if is_percent(c) else 1
            cells.append(f"{k * mean:.2f} $\\pm$ {k * std:.2f}")
        lines.append(f"{_tex(str(meth))} & {_tex(str(sett))} & " + " & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def render_text(tables: list[ComparisonTable], fmt: str) -> str:
    if fmt == "markdown":
        return "\n".join(to_markdown(t) for t in tables)
    if fmt == "csv":
        return to_csv(tables)
    if fmt == "latex":
        return "\n".join(to_latex(t) for t in tables)
    raise ValueError(fmt)
