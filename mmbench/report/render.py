"""Render comparison tables: rich (terminal), markdown, csv, LaTeX (booktabs, for a paper), HTML.

Every format carries the same facts: mean ± spread over seeds (std, or the 95 % CI half-width with
--ci), the seed count, the best value per column in bold, the paired difference to the baseline
with its significance markers, the relative training cost, and what the numbers are (split,
selection rule, oracle and partial warnings) in the title and legend, so a table copied out of
context still says what it shows.
"""
from __future__ import annotations

import html
import io
import math

from rich.markup import escape
from rich.table import Table

from mmbench.report.aggregate import ComparisonTable, Row, decimals, is_percent, scale
from mmbench.report.stats import T_MARK, W_MARK, Summary, best, significance_note

FORMATS = ("table", "markdown", "csv", "latex", "html")
UNVERIFIED_MARK = "(unverified data)"  # after a method: some of its runs trained on data prepared with --no-verify


def title(t: ComparisonTable) -> str:
    sel = t.selection + (" (ORACLE: selected on test)" if t.selection == "oracle-test" else "")
    part = " — PARTIAL: some runs unfinished" if t.partial else ""
    return f"{t.dataset} / protocol {t.protocol} — {t.split} split, selection {sel}{part}"


def legend(t: ComparisonTable, interval: str = "std", with_n: bool = True) -> str:
    spread = "95 % confidence interval (t, over seeds)" if interval == "ci" else "standard deviation over seeds"
    if with_n:
        n = "n: seeds (completed/planned when unfinished)"
    else:  # no n column (a paper table): say how many seeds in the caption
        seeds = [r.cells[c].summary.n for r in t.rows for c in r.cells] or [0]
        lo, hi = min(seeds), max(seeds)
        n = f"{lo} seeds" if lo == hi else f"{lo}-{hi} seeds"
    parts = [f"mean ± {spread}; {n}; best per column in bold where higher (accuracy, F1) or lower (loss) is "
             "unambiguously better (imbalance ratio and competition strength describe a model, they never rank it)"]
    if t.baseline:
        paired_ns = [c.vs_baseline.n for r in t.rows for c in r.cells.values() if c.vs_baseline is not None]
        ci = ", [bootstrap 95 % interval of the paired difference] (n >= 3)" if interval == "ci" else ""
        parts.append(f"(Δ{ci}): difference to {t.baseline} paired by seed; {significance_note(paired_ns)}")
    if t.has_cost:
        parts.append(f"cost: {t.cost_basis} per training epoch (this process's own) relative to {t.cost_reference}"
                     if t.cost_basis != "wall time" else
                     f"cost: wall time per training epoch relative to {t.cost_reference} (follows the machine's load)")
    if any(r.unverified for r in t.rows):
        parts.append(f"{UNVERIFIED_MARK}: trained on data prepared with --no-verify whose files differ from the "
                     "canonical ones (not comparable to published numbers)")
    return "; ".join(parts)


def warnings_text(t: ComparisonTable) -> list[str]:
    return [f"warning: {w}" for w in t.warnings]


def cost_header(t: ComparisonTable) -> str:
    return {"CPU time": "cost (CPU)", "GPU time": "cost (GPU)"}.get(t.cost_basis, "cost (wall)")


def header(metric: str) -> str:
    return metric + (" (%)" if is_percent(metric) else "")


def _num(metric: str, x: float, signed: bool = False) -> str:
    if x is None or math.isnan(x):
        return "–"
    return f"{scale(metric) * x:{'+' if signed else ''}.{decimals(metric)}f}"


def spread(s: Summary, interval: str) -> float:
    """nan (nothing shown) for a single seed: its std of 0 would claim a certainty it has not."""
    if s.n < 2:
        return math.nan
    return s.ci if interval == "ci" else s.std


def best_rows(t: ComparisonTable, metric: str) -> set[int]:
    means = [r.cells[metric].summary.mean if metric in r.cells else math.nan for r in t.rows]
    return best([scale(metric) * m for m in means], metric, decimals(metric))


def cell_parts(row: Row, metric: str, interval: str) -> tuple[str, str]:
    """(value ± spread, difference to the baseline with markers) as plain text; with --ci the
    difference carries its bootstrap interval where there is one."""
    c = row.cells.get(metric)
    if c is None:
        return "–", ""
    sp = spread(c.summary, interval)
    main = _num(metric, c.summary.mean) + ("" if math.isnan(sp) else f" ± {_num(metric, sp)}")
    p = c.vs_baseline
    if p is None:
        return main, ""
    band = ""
    if interval == "ci" and not math.isnan(p.diff_ci_low):
        band = f" [{_num(metric, p.diff_ci_low, signed=True)}, {_num(metric, p.diff_ci_high, signed=True)}]"
    return main, f"({_num(metric, p.diff, signed=True)}{p.marker}{band})"


def n_text(row: Row) -> str:
    return str(row.n_done) if row.n_done == row.n_runs else f"{row.n_done}/{row.n_runs}"


def cost_text(row: Row) -> str:
    return "–" if row.rel_cost is None else f"{row.rel_cost:.2f}×"


def _label(row: Row) -> str:
    return row.method + (" (baseline)" if row.is_baseline else "") + (f" {UNVERIFIED_MARK}" if row.unverified else "")


LOW_VALUE = ("macro_f1",)  # dropped first when a default table does not fit the terminal


def natural_width(t: ComparisonTable, interval: str = "std") -> int:
    """Characters the full one-line-per-row table needs (cells, padding and borders)."""
    cols = [max([6] + [len(_label(r)) for r in t.rows]), max([7] + [len(r.setting) for r in t.rows]),
            max(len(n_text(r)) for r in t.rows)]
    for c in t.columns:
        parts = [cell_parts(r, c, interval) for r in t.rows]
        cols.append(max([len(header(c))] + [len(m) + (len(d) + 1 if d else 0) for m, d in parts]))
    if t.has_cost:
        cols.append(5)
    return sum(cols) + 3 * len(cols) + 1


def _short_header(metric: str) -> str:
    """A header that folds onto short lines: `acc/visual (%)` -> `acc/visual` over `%`."""
    name = metric.replace("imbalance_ratio", "imbalance\nratio").replace("macro_f1", "macro\nF1")
    return name + ("\n%" if is_percent(metric) else "")


def to_rich(t: ComparisonTable, interval: str = "std", width: int | None = None, droppable: bool = False) -> Table:
    """The terminal table. Given the terminal `width`, a table that does not fit on one line per row
    is made compact: method and setting share a column (setting on the next line), each value's
    spread and difference to the baseline go below it, headers fold, and, if `droppable` (the
    default metrics, not ones the user asked for), low-value columns go, said in the caption."""
    if width is None or natural_width(t, interval) <= width:
        return _rich_wide(t, interval)
    return _rich_compact(t, interval, width, droppable)


def _rich_compact(t: ComparisonTable, interval: str, width: int, droppable: bool) -> Table:
    cols = list(t.columns)

    def need(cs: list[str]) -> int:
        label = max([6] + [len(_label(r)) for r in t.rows] + [len(r.setting) for r in t.rows])
        cells = [max(max(len(w) for w in _short_header(c).split("\n")), 8) for c in cs]
        return label + 2 + sum(cells) + (5 if t.has_cost else 0) + 3 * (len(cells) + 2 + t.has_cost) + 1

    dropped = []
    while droppable and need(cols) > width:
        low = [c for c in cols if c.split("/")[0] in LOW_VALUE]
        if not low:
            break
        cols.remove(low[-1])
        dropped.append(low[-1])
    caption = "\n".join([legend(t, interval), *warnings_text(t)])
    if dropped:
        caption += f"; not shown at this width: {', '.join(dropped)} (a wider terminal, or --format markdown, shows all)"
    tab = Table(title=escape(title(t)), title_justify="left", caption=escape(caption), caption_justify="left")
    longest = max([6] + [len(_label(r)) for r in t.rows] + [len(p) for r in t.rows for p in r.setting.split(", ")])
    tab.add_column("method", overflow="fold", min_width=min(longest, 20))
    tab.add_column("n", justify="right")
    for c in cols:
        tab.add_column(_short_header(c), justify="right", overflow="fold")
    if t.has_cost:
        tab.add_column("cost", justify="right")
    bests = {c: best_rows(t, c) for c in cols}
    for i, row in enumerate(t.rows):
        cells = []
        for c in cols:
            main, diff = cell_parts(row, c, interval)
            value, _, sp = main.partition(" ± ")
            text = f"[bold green]{value}[/bold green]" if i in bests[c] else value
            cells.append(text + (f"\n±{sp}" if sp else "") + (f"\n{diff}" if diff else ""))
        label = f"[bold]{escape(_label(row))}[/bold]" + (f"\n[dim]{escape(row.setting.replace(', ', chr(10)))}[/dim]" if row.setting else "")
        tab.add_row(label, n_text(row), *cells, *([cost_text(row)] if t.has_cost else []))
    return tab


def _rich_wide(t: ComparisonTable, interval: str = "std") -> Table:
    # rich reads cell text as markup: labels and settings are user text (method parameters), escaped
    caption = "\n".join([legend(t, interval), *warnings_text(t)])
    tab = Table(title=escape(title(t)), title_justify="left", caption=escape(caption), caption_justify="left")
    tab.add_column("method", style="bold")
    tab.add_column("setting")
    tab.add_column("n", justify="right")
    for c in t.columns:
        tab.add_column(escape(header(c)), justify="right")
    if t.has_cost:
        tab.add_column(cost_header(t), justify="right")
    bests = {c: best_rows(t, c) for c in t.columns}
    for i, row in enumerate(t.rows):
        cells = []
        for c in t.columns:
            main, diff = cell_parts(row, c, interval)
            text = f"[bold green]{main}[/bold green]" if i in bests[c] else main
            cells.append(text + (f" {diff}" if diff else ""))
        tab.add_row(escape(_label(row)), escape(row.setting), n_text(row), *cells, *([cost_text(row)] if t.has_cost else []))
    return tab


def to_markdown(t: ComparisonTable, interval: str = "std") -> str:
    cols = ["method", "setting", "n", *[header(c) for c in t.columns]] + ([cost_header(t)] if t.has_cost else [])
    lines = [f"### {title(t)}", "", "| " + " | ".join(cols) + " |",
             "|" + "|".join("---" if i < 2 else "---:" for i in range(len(cols))) + "|"]
    bests = {c: best_rows(t, c) for c in t.columns}
    for i, row in enumerate(t.rows):
        cells = []
        for c in t.columns:
            main, diff = cell_parts(row, c, interval)
            cells.append((f"**{main}**" if i in bests[c] else main) + (f" {diff}" if diff else ""))
        extra = [cost_text(row)] if t.has_cost else []
        lines.append("| " + " | ".join([_label(row), row.setting, n_text(row), *cells, *extra]) + " |")
    notes = [f"> {w}" for w in warnings_text(t)]
    return "\n".join(lines + ["", f"_{legend(t, interval)}_", "", *notes, *([""] if notes else [])]) + "\n"


def _g(x: float | None) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.6g}"


def to_csv(tables: list[ComparisonTable]) -> str:
    """Long format, raw (unscaled) values: one line per table row and metric. The first nine
    columns keep their original order, so scripts reading them by position still work."""
    buf = io.StringIO()
    buf.write("dataset,protocol,selection,method,setting,metric,mean,std,n,split,label,ci95_low,ci95_high,"
              "baseline,diff,p_ttest,p_wilcoxon,best,epoch_seconds,rel_cost,unverified_runs,diff_ci95_low,diff_ci95_high,tests,cost_basis\n")

    def q(s: str) -> str:
        return '"' + s.replace('"', '""') + '"'

    for t in tables:
        bests = {c: best_rows(t, c) for c in t.columns}
        for i, row in enumerate(t.rows):
            for c in t.columns:
                cell = row.cells.get(c)
                if cell is None:
                    continue
                s, p = cell.summary, cell.vs_baseline
                buf.write(",".join([
                    q(t.dataset), q(t.protocol), t.selection, q(row.method), q(row.setting), q(c),
                    _g(s.mean), _g(s.std), str(s.n), t.split, q(row.label), _g(s.ci_low), _g(s.ci_high),
                    q(t.baseline or ""), _g(p.diff if p else None), _g(p.p_ttest if p else None),
                    _g(p.p_wilcoxon if p else None), "1" if i in bests[c] else "0", _g(row.epoch_seconds),
                    _g(row.rel_cost), str(row.unverified), _g(p.diff_ci_low if p else None), _g(p.diff_ci_high if p else None),
                    q("+".join(p.tests) if p else ""), q(t.cost_basis if row.epoch_seconds is not None else ""),
                ]) + "\n")
    return buf.getvalue()


def _tex(s: str) -> str:
    out = s.replace("\\", r"\textbackslash{}")
    for a, b in (("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#"), ("$", r"\$"), ("{", r"\{"), ("}", r"\}"),
                 ("~", r"\textasciitilde{}"), ("^", r"\textasciicircum{}"), ("±", r"$\pm$"), ("×", r"$\times$"),
                 ("—", "---"), ("Δ", r"$\Delta$"), ("†", r"$^\dagger$"), ("<", r"$<$")):
        out = out.replace(a, b)
    return out


def to_latex(t: ComparisonTable, interval: str = "std") -> str:
    """A booktabs table ready for a paper: best in bold, mean $\\pm$ spread, Δ to the baseline with
    significance as superscripts; needs \\usepackage{booktabs}."""
    cols = t.columns
    extra = 1 if t.has_cost else 0
    spec = "ll" + "r" * (len(cols) + extra)
    head = ["Method", "Setting", *[_tex(header(c)) for c in cols]] + ([_tex(cost_header(t)).capitalize()] if t.has_cost else [])
    lines = [
        "% requires \\usepackage{booktabs}",
        r"\begin{table}[t]", r"\centering", r"\small",
        rf"\caption{{{_tex(title(t))}. {_tex(legend(t, interval, with_n=False))}.{''.join(' ' + _tex(w) + '.' for w in warnings_text(t))}}}",
        rf"\begin{{tabular}}{{{spec}}}", r"\toprule", " & ".join(head) + r" \\", r"\midrule",
    ]
    bests = {c: best_rows(t, c) for c in cols}
    for i, row in enumerate(t.rows):
        cells = []
        for c in cols:
            cell = row.cells.get(c)
            if cell is None:
                cells.append("--")
                continue
            sp = spread(cell.summary, interval)
            mean = _num(c, cell.summary.mean)
            val = rf"\textbf{{{mean}}}" if i in bests[c] else mean
            if not math.isnan(sp):
                val += rf" $\pm$ {_num(c, sp)}"
            p = cell.vs_baseline
            if p is not None:
                marks = p.marker.replace(T_MARK, "*").replace(W_MARK, r"\dagger")
                val += rf" {{\scriptsize ({_num(c, p.diff, signed=True)}{('$^{' + marks + '}$') if marks else ''})}}"
            cells.append(val)
        if t.has_cost:
            cells.append("--" if row.rel_cost is None else f"{row.rel_cost:.2f}$\\times$")
        lines.append(f"{_tex(_label(row))} & {_tex(row.setting)} & " + " & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


HTML_STYLE = """body{font-family:system-ui,sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}
th,td{padding:.3em .7em;border-bottom:1px solid #ddd;text-align:right}th{border-bottom:2px solid #333}
td.l,th.l{text-align:left}caption{text-align:left;font-weight:600;margin-bottom:.4em}.d{color:#555;font-size:.9em}
p.note{color:#555;font-size:.9em;max-width:60em}.partial{color:#b00}"""


def to_html(tables: list[ComparisonTable], interval: str = "std") -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", '<html><head><meta charset="utf-8"><title>mmbench report</title>',
           f"<style>{HTML_STYLE}</style></head><body>"]
    for t in tables:
        cap = e(title(t))
        if t.partial:
            cap = cap.replace("PARTIAL", '<span class="partial">PARTIAL</span>')
        out.append(f"<table><caption>{cap}</caption><thead><tr>")
        heads = ["method", "setting", "n", *[header(c) for c in t.columns]] + ([cost_header(t)] if t.has_cost else [])
        out.append("".join(f'<th class="{"l" if i < 2 else ""}">{e(h)}</th>' for i, h in enumerate(heads)))
        out.append("</tr></thead><tbody>")
        bests = {c: best_rows(t, c) for c in t.columns}
        for i, row in enumerate(t.rows):
            tds = [f'<td class="l">{e(_label(row))}</td>', f'<td class="l">{e(row.setting)}</td>', f"<td>{n_text(row)}</td>"]
            for c in t.columns:
                main, diff = cell_parts(row, c, interval)
                cell = row.cells.get(c)
                tip = ""
                if cell is not None and cell.summary.n > 1:
                    tip = f' title="95% CI [{_num(c, cell.summary.ci_low)}, {_num(c, cell.summary.ci_high)}]"'
                val = f"<b>{e(main)}</b>" if i in bests[c] else e(main)
                tds.append(f"<td{tip}>{val}" + (f' <span class="d">{e(diff)}</span>' if diff else "") + "</td>")
            if t.has_cost:
                tds.append(f"<td>{e(cost_text(row))}</td>")
            out.append("<tr>" + "".join(tds) + "</tr>")
        out.append(f'</tbody></table><p class="note">{e(legend(t, interval))}</p>')
        out += [f'<p class="note partial">{e(w)}</p>' for w in warnings_text(t)]
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def render_text(tables: list[ComparisonTable], fmt: str, interval: str = "std") -> str:
    if fmt == "markdown":
        return "\n".join(to_markdown(t, interval) for t in tables)
    if fmt == "csv":
        return to_csv(tables)
    if fmt == "latex":
        return "\n".join(to_latex(t, interval) for t in tables)
    if fmt == "html":
        return to_html(tables, interval)
    raise ValueError(fmt)
