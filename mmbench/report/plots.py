"""Figures from the results database (matplotlib, Agg: no display needed).

`curves`: per-epoch trajectories, one line per method and setting (the mean over seeds with a ±1
std band). By default one figure per dataset and protocol with the panels a reader compares
methods on: fused accuracy, each modality's accuracy, the imbalance ratio and the competition
strength. Method diagnostics (`--metric 'method/*'`) are method-specific, so they get one figure
per method instead of dozens of mostly empty panels. `bar`: the comparison table as grouped bars
with std error bars.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sqlalchemy.engine import Engine  # noqa: E402

from mmbench.errors import UserError  # noqa: E402
from mmbench.report.aggregate import (ComparisonTable, expand_metrics, load_epochs, load_runs, scale,  # noqa: E402
                                      setting_labels)
from mmbench.report.render import best_rows, header, title  # noqa: E402

CURVE_METRICS = ("acc", "acc/*", "imbalance_ratio", "competition/*")
DIAGNOSTICS = "method/"  # per-method figures
PANEL_NOTES = {"competition": "\n0 = holds the concept, 1 = noise", "competition_official": "\nAGM's formula, ridge alpha 120",
               "imbalance_ratio": "\nmax/min branch score; 1 = balanced"}
TRAIN_ONLY = ("method/", "epoch_", "train_loss")  # logged on the train split only
PLOTS = ("curves", "bar")


def outputs_for(output: Path, keys: list[tuple[str, str]]) -> list[Path]:
    """One file per (dataset, protocol): OUTPUT itself when there is one, else OUTPUT_<ds>_<proto>."""
    if len(keys) == 1:
        return [output]
    return [output.with_name(f"{output.stem}_{ds}_{proto}{output.suffix}") for ds, proto in keys]


def _split_of(name: str, split: str) -> str:
    return "train" if name.startswith(TRAIN_ONLY) else split


def _grid(n: int, legend_rows: int = 0) -> tuple[plt.Figure, list[plt.Axes]]:
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.2 * nrows + 0.7 + 0.22 * legend_rows), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _figure(g: pd.DataFrame, names: list[str], split: str, color: dict, heading: str) -> plt.Figure:
    """One figure: a panel per metric, one line per (method, setting), the legend right below."""
    keys = [k for k in color if ((g["method"] == k[0]) & (g["setting"] == k[1]) & g["name"].isin(names)).any()]
    ncol = 2 if max((len(_line_label(*k)) for k in keys), default=0) > 40 else 3
    legend_rows = math.ceil(len(keys) / ncol)
    fig, axes = _grid(len(names), legend_rows)
    for ax, name in zip(axes, names):
        sub = g[(g["name"] == name) & (g["split"] == _split_of(name, split)) & g["value"].notna()]
        for (meth, sett), line in sub.groupby(["method", "setting"], sort=False):
            piv = line.pivot_table(index="epoch", columns="seed", values="value", aggfunc="mean")
            x = piv.index.to_numpy() + 1
            k = scale(name)
            mean = k * piv.mean(axis=1).to_numpy()
            std = k * piv.std(axis=1, ddof=1).fillna(0).to_numpy() if piv.shape[1] > 1 else np.zeros_like(mean)
            c, ls = color[(meth, sett)]
            ax.plot(x, mean, marker="o" if len(x) < 15 else None, ms=3, color=c, ls=ls,
                    label=f"{_line_label(meth, sett)} (n={piv.shape[1]})")
            ax.fill_between(x, mean - std, mean + std, alpha=0.15, color=c)
        ax.set_title(f"{header(name)} [{_split_of(name, split)}]{PANEL_NOTES.get(name.split('/')[0], '')}", fontsize=10)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if name.startswith("competition/"):  # calibrated: 0 = holds the concept, 1 = noise
            for yv in (0.0, 1.0):
                ax.axhline(yv, color="grey", lw=0.8, ls=":")
    handles, labels = _legend_entries(axes)
    fig.suptitle(heading, fontsize=11)
    # the legend directly under the panels: keep room for it, then let tight_layout place the panels
    bottom = (0.22 * legend_rows + 0.3) / fig.get_figheight()
    fig.tight_layout(rect=(0, bottom, 1, 0.97), h_pad=1.2)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False, bbox_to_anchor=(0.5, 0.0))
    return fig


def line_styles(keys: list, cycle: list[str]) -> dict:
    """(colour, line style) per line: the colour cycle first, then dashed, then dotted, so no two
    lines of a figure look the same."""
    styles = ("-", "--", ":", "-.")
    return {k: (cycle[i % len(cycle)], styles[(i // len(cycle)) % len(styles)]) for i, k in enumerate(keys)}


def _line_label(meth: str, sett: str) -> str:
    return f"{meth} ({sett})" if sett else str(meth)


def curves(engine: Engine, output: Path, sweep: str | None = None, dataset: str | None = None,
           metrics: list[str] | None = None, split: str = "test") -> list[Path]:
    """One figure per dataset and protocol for the metrics asked (default CURVE_METRICS), and one
    per method for its `method/*` diagnostics when those are asked; returns the files written."""
    runs = load_runs(engine, sweep, dataset)
    if runs.empty:
        raise UserError("no runs match the filters; run `mmbench sweep RECIPE` first or check --sweep/--dataset")
    runs = pd.concat([runs, setting_labels(runs)], axis=1)
    ep = load_epochs(engine, list(runs["id"]))
    if ep.empty:
        raise UserError("no per-epoch metrics yet for these runs (they appear when a run finishes); check `mmbench runs`")
    ep = ep.merge(runs[["id", "dataset", "protocol", "method", "setting", "seed"]], left_on="run_id", right_on="id")
    patterns = list(metrics) if metrics else list(CURVE_METRICS)
    figs: list[tuple[plt.Figure, tuple[str, ...]]] = []
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (ds, proto), g in ep.groupby(["dataset", "protocol"], sort=True):
        available = sorted({n for n, s in zip(g["name"], g["split"]) if s == _split_of(n, split)})
        names = expand_metrics(patterns, available)
        keys = list(dict.fromkeys(zip(g["method"], g["setting"])))
        color = line_styles(keys, cycle)  # one look per line in every figure
        main = [n for n in names if not n.startswith(DIAGNOSTICS)]
        if main:
            figs.append((_figure(g, main, split, color, f"{ds} / protocol {proto} — mean ± std over seeds"), (str(ds), str(proto))))
        diag = [n for n in names if n.startswith(DIAGNOSTICS)]
        for meth in dict.fromkeys(g["method"]):
            mine = g[(g["method"] == meth) & g["name"].isin(diag) & g["value"].notna()]
            own = [n for n in diag if n in set(mine["name"])]
            if own:
                sub = g[g["method"] == meth]
                figs.append((_figure(sub, own, split, color, f"{ds} / protocol {proto} — {meth} diagnostics, mean ± std over seeds"),
                             (str(ds), str(proto), str(meth))))
    if not figs:
        raise UserError(f"no per-epoch metric matches {', '.join(patterns)}; pass --metric (e.g. --metric 'acc/*')")
    return _save_named(figs, output)


def _save_named(figs: list[tuple[plt.Figure, tuple[str, ...]]], output: Path) -> list[Path]:
    """OUTPUT itself for a single figure; else OUTPUT_<part>... with only the parts that differ
    (dataset and protocol when several, the method for diagnostics)."""
    keys = [k for _, k in figs]
    multi_ds = len({k[:2] for k in keys}) > 1
    paths = []
    for k in keys:
        parts = (list(k[:2]) if multi_ds else []) + list(k[2:])
        paths.append(output if len(keys) == 1 or not parts else output.with_name(f"{output.stem}_{'_'.join(parts)}{output.suffix}"))
    return _write([f for f, _ in figs], paths, output, dpi=110)


def _legend_entries(axes: list[plt.Axes]) -> tuple[list, list[str]]:
    seen: dict[str, object] = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, h)
    return list(seen.values()), list(seen)


def bar(tables: list[ComparisonTable], output: Path) -> list[Path]:
    figs: list[tuple[plt.Figure, str]] = []
    for t in tables:
        fig, axes = _grid(len(t.columns))
        labels = [r.method + (f"\n{r.setting}" if r.setting else "") for r in t.rows]
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for ax, c in zip(axes, t.columns):
            k = scale(c)
            means = [k * r.cells[c].summary.mean if c in r.cells else np.nan for r in t.rows]
            stds = [k * r.cells[c].summary.std if c in r.cells else 0.0 for r in t.rows]
            bars = ax.bar(range(len(t.rows)), means, yerr=stds, capsize=3,
                          color=[colors[i % len(colors)] for i in range(len(t.rows))])
            for i in best_rows(t, c):
                bars[i].set_edgecolor("black")
                bars[i].set_linewidth(2)
            for i, r in enumerate(t.rows):
                if r.is_baseline:
                    bars[i].set_hatch("//")
            ax.set_xticks(range(len(t.rows)), labels, rotation=30, ha="right", fontsize=8)
            ax.set_title(header(c), fontsize=10)
            ax.grid(axis="y", alpha=0.3)
        fig.suptitle(title(t) + "\nmean ± std over seeds; best outlined" + ("; baseline hatched" if t.baseline else ""),
                     fontsize=10)
        fig.tight_layout()
        figs.append((fig, f"{t.dataset}|{t.protocol}"))
    return _save(figs, output)


def image_formats() -> list[str]:
    from matplotlib.figure import Figure

    return sorted(Figure().canvas.get_supported_filetypes())


def check_output(output: Path) -> None:
    """Before any query: the figure's file name says an image format matplotlib writes
    (`--output table.txt` would otherwise end in matplotlib's ValueError traceback)."""
    ext = output.suffix.lower().lstrip(".")
    formats = image_formats()
    if ext and ext not in formats:
        raise UserError(f"--output {output}: a figure cannot be written as .{ext}; name it .png, .pdf or .svg "
                        f"(matplotlib writes: {', '.join(formats)}), or drop --plot to write a table")


def _save(figs: list[tuple[plt.Figure, str]], output: Path) -> list[Path]:
    keys = [tuple(k.split("|", 1)) for _, k in figs]
    paths = outputs_for(output, keys)  # type: ignore[arg-type]
    return _write([f for f, _ in figs], paths, output, dpi=120)


def _write(figs: list[plt.Figure], paths: list[Path], output: Path, dpi: int) -> list[Path]:
    """Write each figure to its path; an unwritable place is exit 2 naming it, and every figure is closed."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        for fig, p in zip(figs, paths):
            fig.savefig(p, dpi=dpi)
    except OSError as e:
        raise UserError(f"cannot write the figure {e.filename or output}: {e.strerror or e}; "
                        "pass --output a path in a folder you can write to") from None
    finally:
        for fig in figs:
            plt.close(fig)
    return paths
