"""`mmbench report` and `mmbench runs` on a results database filled by hand (no training): paired
differences to a baseline with markers, confidence intervals, best per column, relative cost, metric
selection, every output format, plots, and filters that match nothing."""
from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest

from mmbench.config import run_id
from mmbench.engine.run import run_row
from mmbench.store import db
from mmbench.store.tables import Sweep

JOINT = {0: 0.60, 1: 0.62, 2: 0.64, 3: 0.61, 4: 0.63}
OGM = {0: 0.65, 1: 0.66, 2: 0.70, 3: 0.64, 4: 0.69}  # mean .668, std .025884; paired diff .048


def config(method: dict, seed: int, dataset: str = "synthetic") -> dict:
    return {"schema": 1, "dataset": {"name": dataset, "protocol": "tiny"},
            "model": {"backbone": "tiny", "fusion": "concat", "init": "repo"},
            "train": {"epochs": 3, "selection": "best-val"}, "metrics": {"competition": False},
            "method": method, "seed": seed}


def add_run(engine, sid: str, cfg: dict, acc: float | None, secs: float, dataset_bonus: float = 0.0) -> str:
    rid = run_id(cfg)
    db.register_runs(engine, sid, [run_row(cfg, rid, Path("runs") / rid)])
    if acc is None:
        return rid  # registered, not finished: the report is partial
    test = {"acc": acc + dataset_bonus, "acc/audio": acc - 0.1, "acc/visual": acc - 0.3,
            "imbalance_ratio": 1.0 + (1 - acc), "macro_f1": acc - 0.02}
    history = []
    for e in range(3):
        f = (e + 1) / 3
        train = {"epoch_seconds": secs, "train_loss": 1.0 / f}
        if cfg["method"]["name"] == "ogm_ge":
            train["method/k_audio"] = 0.5 * f
        history.append({"epoch": e, "metrics": {"train": train, "test": {k: v * f for k, v in test.items()}}})
    finals = {sel: {"test": test} for sel in ("best-val", "last", "oracle-test")}
    db.write_results(engine, rid, history, finals, {"selected_epoch": 2, "epochs_done": 3, "wall_seconds": 3 * secs})
    return rid


@pytest.fixture
def results(tmp_path: Path) -> Path:
    path = tmp_path / "results.db"
    engine = db.get_engine(f"sqlite:///{path}")
    sid = "s1"
    db.upsert_sweep(engine, Sweep(id=sid, name="cmp", recipe_path="r.yaml", recipe_sha256="x", created_at=db.now(),
                                  mmbench_version="0"))
    for s, v in JOINT.items():
        add_run(engine, sid, config({"name": "joint"}, s), v, 1.0)
    for s, v in OGM.items():
        add_run(engine, sid, config({"name": "ogm_ge", "alpha": 0.8}, s), v, 1.5)
    add_run(engine, sid, config({"name": "ogm_ge", "alpha": 0.8}, 5), None, 1.5)  # still pending
    failed = run_id(config({"name": "joint"}, 9))
    db.register_runs(engine, sid, [run_row(config({"name": "joint"}, 9), failed)])
    db.set_status(engine, failed, "failed", error="non-finite training loss at epoch 0; lower the learning rate")
    return path


def norm(text: str) -> str:
    return " ".join(text.split())


def test_markdown_with_baseline_markers_best_and_cost(results: Path, cli) -> None:
    code, md = cli("report", "--compare", "--db", f"sqlite:///{results}", "--baseline", "joint", "--format", "markdown")
    assert code == 0, md
    assert "PARTIAL" in md  # one ogm_ge run is still pending, the failed joint run counts too
    ogm = next(line for line in md.splitlines() if line.startswith("| ogm_ge"))
    joint = next(line for line in md.splitlines() if line.startswith("| joint (baseline)"))
    assert "| 5/6 |" in ogm and "| 5/6 |" in joint  # seeds completed / planned
    assert "**66.80 ± 2.59** (+4.80*)" in ogm  # best acc, +4.80 points, t-test p = .0012
    assert "62.00 ± 1.58" in joint and "(+" not in joint
    assert "| 1.50× |" in ogm and "| 1.00× |" in joint  # time per epoch relative to the baseline
    # imbalance_ratio is never "best": lower is not better when both branches collapsed
    assert "| 1.332 ± 0.026 (-0.048*) |" in ogm
    assert "paired t-test p < 0.05" in md and "relative to joint" in md
    assert "Wilcoxon not run" in md  # 5 paired seeds: only the t-test can mark
    # these runs logged only wall time: the header and the legend say so
    assert "cost (wall)" in md and "follows the machine's load" in md

    code, md = cli("report", "--db", f"sqlite:///{results}", "--baseline", "joint", "--format", "markdown", "--ci")
    assert code == 0 and "**66.80 ± 3.21**" in md and "95 % confidence interval" in md  # 2.776 * 2.588 / sqrt 5
    # the paired difference's bootstrap interval: differences .03 .04 .05 .06 .06 -> inside [+3.00, +6.00]
    ogm = next(line for line in md.splitlines() if line.startswith("| ogm_ge"))
    lo, hi = (float(x) for x in ogm.split("(+4.80* [")[1].split("]")[0].split(", "))
    assert 3.0 <= lo < 4.8 < hi <= 6.0 and "bootstrap 95 % interval" in md


def two_seed_results(tmp_path: Path, cpu: bool) -> str:
    """Joint and AGM on 2 seeds, AGM far better; AGM's seed 0 evaluated with stale BN statistics."""
    url = f"sqlite:///{tmp_path / 'two.db'}"
    engine = db.get_engine(url)
    db.upsert_sweep(engine, Sweep(id="s2", name="two", recipe_path="r.yaml", recipe_sha256="x", created_at=db.now(),
                                  mmbench_version="0"))
    for name, accs, secs, gaps in (("joint", (0.50, 0.60), 1.0, (0.0, 0.01)), ("agm", (0.70, 0.801), 3.0, (0.40, 0.02))):
        for seed, (acc, gap) in enumerate(zip(accs, gaps)):
            cfg = config({"name": name}, seed)
            rid = run_id(cfg)
            db.register_runs(engine, "s2", [run_row(cfg, rid, Path("runs") / rid)])
            train = {"epoch_seconds": 10 * secs if seed else secs}  # wall time: seed 1 ran under load
            if cpu:
                train["epoch_cpu_seconds"] = secs
            test = {"acc": acc, "imbalance_ratio": 1.0 if name == "agm" else 1.5}
            history = [{"epoch": 0, "metrics": {"train": train, "test": test, "val": {"acc": acc, "bn_gap": gap}}}]
            finals = {sel: {"test": test, "val": {"acc": acc, "bn_gap": gap}} for sel in ("best-val", "last", "oracle-test")}
            db.write_results(engine, rid, history, finals, {"selected_epoch": 0, "epochs_done": 1, "wall_seconds": secs})
    return url


def test_two_seeds_get_no_markers_and_stale_bn_statistics_are_warned(tmp_path: Path, cli) -> None:
    url = two_seed_results(tmp_path, cpu=True)
    code, md = cli("report", "--db", url, "--baseline", "joint", "--format", "markdown")
    assert code == 0, md
    agm = next(line for line in md.splitlines() if line.startswith("| agm"))
    assert "(+20.05)" in agm and "20.05*" not in agm and "†" not in agm  # a 1-dof t-test alone would mark this (p = 0.0016)
    assert "no significance test at n = 2 paired seeds" in md
    assert "**75.05" in agm and "**" not in agm.split("|")[5]  # acc is bold; imbalance_ratio (1.0) is not
    # cost on the process's own CPU time: 3x, whatever the wall clock said under load
    assert "cost (CPU)" in md and "| 3.00× |" in agm and "CPU time per training epoch" in md
    assert md.count("warning:") == 1 and "agm seed 0" in md and "40.0 points" in md and "precise_bn" in md
    code, text = cli("report", "--db", url, "--baseline", "joint", "--format", "csv")
    row = next(r for r in csv.DictReader(io.StringIO(text)) if r["method"] == "agm" and r["metric"] == "acc")
    assert row["p_ttest"] == "" and row["tests"] == "" and row["cost_basis"] == "CPU time"
    code, out = cli("report", "--db", url, "--baseline", "joint")
    assert code == 0 and "warning:" in out and "no significance test" in norm(out)


def test_latex_html_and_csv(results: Path, cli, tmp_path: Path) -> None:
    url = f"sqlite:///{results}"
    code, _ = cli("report", "--db", url, "--baseline", "joint", "--format", "latex", "--output", tmp_path / "t.tex")
    tex = (tmp_path / "t.tex").read_text()
    assert code == 0
    for needle in (r"\toprule", r"\midrule", r"\bottomrule", r"\textbf{66.80} $\pm$ 2.59", r"$^{*}$", r"1.50$\times$",
                   "ogm\\_ge", "booktabs"):
        assert needle in tex, needle
    code, html = cli("report", "--db", url, "--baseline", "joint", "--format", "html")
    assert code == 0 and html.startswith("<!DOCTYPE html>") and "<b>66.80 ± 2.59</b>" in html and "95% CI [" in html
    code, text = cli("report", "--db", url, "--baseline", "joint", "--format", "csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(text)))
    ogm_acc = next(r for r in rows if r["method"] == "ogm_ge" and r["metric"] == "acc")
    assert float(ogm_acc["diff"]) == pytest.approx(0.048)
    assert float(ogm_acc["p_ttest"]) == pytest.approx(0.0011874, rel=1e-3)
    assert ogm_acc["p_wilcoxon"] == "" and ogm_acc["tests"] == "t"  # 5 seeds: Wilcoxon cannot reach 0.05, not run
    assert 0.03 <= float(ogm_acc["diff_ci95_low"]) < 0.048 < float(ogm_acc["diff_ci95_high"]) <= 0.06
    assert ogm_acc["cost_basis"] == "wall time"
    assert float(ogm_acc["ci95_low"]) == pytest.approx(0.668 - 0.032139, abs=1e-5)
    assert ogm_acc["best"] == "1" and float(ogm_acc["rel_cost"]) == pytest.approx(1.5)
    assert ogm_acc["label"] == "ogm_ge(alpha=0.8)" and ogm_acc["n"] == "5"


def test_metric_choice_and_filters_that_match_nothing(results: Path, cli) -> None:
    url = f"sqlite:///{results}"
    code, md = cli("report", "--db", url, "--metric", "acc/*", "--format", "markdown")
    header = next(line for line in md.splitlines() if line.startswith("| method"))
    assert code == 0 and "acc/audio (%)" in header and "acc/visual (%)" in header
    assert "| acc (%)" not in header and "imbalance" not in header
    code, out = cli("report", "--db", url, "--selection", "oracle-test")
    assert code == 0 and "ORACLE" in out
    for args, needle in ((["--metric", "nope"], "matches no test metric"),
                         (["--baseline", "nope"], "choose one of: joint, ogm_ge, ogm_ge(alpha=0.8)"),
                         (["--dataset", "cremad"], "no runs for dataset 'cremad'"),
                         (["--sweep", "other"], "no sweep named 'other'"),
                         (["--format", "pdf"], "--format pdf"),
                         (["--plot", "pie", "--output", "x.png"], "--plot pie"),
                         (["--plot", "bar"], "pass --output")):
        code, out = cli("report", "--db", url, *args)
        assert code == 2 and needle in norm(out), (args, out)


def test_runs_listing(results: Path, cli) -> None:
    url = f"sqlite:///{results}"
    code, out = cli("runs", "--db", url)
    assert code == 0 and out.count("completed") == 10 and "pending" in out and "0/3" in out and "3/3" in out
    code, out = cli("runs", "--db", url, "--status", "failed")
    assert code == 0 and "non-finite training loss" in out and "1 failed runs" in out and "completed" not in out
    code, out = cli("runs", "--db", url, "--status", "running", "--sweep", "cmp")
    assert code == 0 and "no running runs of sweep cmp" in out
    code, out = cli("runs", "--db", url, "--status", "bogus")
    assert code == 2 and "choose one of pending, running, completed, failed" in out
    code, out = cli("runs", "--db", url, "--sweep", "other")
    assert code == 2 and "no sweep named 'other'" in out


def is_png(p: Path) -> bool:
    return p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000


def test_plots_are_written(results: Path, cli, tmp_path: Path) -> None:
    url = f"sqlite:///{results}"
    code, out = cli("report", "--db", url, "--plot", "curves", "--output", tmp_path / "curves.png")
    assert code == 0 and is_png(tmp_path / "curves.png"), out
    code, out = cli("report", "--db", url, "--plot", "bar", "--baseline", "joint", "--output", tmp_path / "bar.png")
    assert code == 0 and is_png(tmp_path / "bar.png"), out
    code, out = cli("report", "--db", url, "--plot", "curves", "--metric", "nothing/*", "--output", tmp_path / "x.png")
    assert code == 2 and "no per-epoch metric matches" in norm(out)

    engine = db.get_engine(url)
    add_run(engine, "s1", config({"name": "joint"}, 0, dataset="avmnist"), 0.9, 1.0)
    code, out = cli("report", "--db", url, "--plot", "bar", "--output", tmp_path / "b.png")
    assert code == 0 and is_png(tmp_path / "b_avmnist_tiny.png") and is_png(tmp_path / "b_synthetic_tiny.png")


def test_curves_default_figure_and_one_diagnostics_figure_per_method(results: Path, tmp_path: Path) -> None:
    """By default one figure of what methods are compared on (fused acc first); diagnostics only
    when asked, one figure per method that has them."""
    import matplotlib.pyplot as plt

    from mmbench.report import plots

    seen: list[list[str]] = []
    orig = plots._save_named

    def spy(figs, output):  # record the panel titles before the figures are closed
        seen.extend([ax.get_title() for ax in fig.axes if ax.get_visible()] for fig, _ in figs)
        return orig(figs, output)

    plots._save_named = spy
    engine = db.get_engine(f"sqlite:///{results}")
    try:
        files = plots.curves(engine, tmp_path / "c.png")
        assert seen == [["acc (%) [test]", "acc/audio (%) [test]", "acc/visual (%) [test]",
                         "imbalance_ratio [test]\nmax/min branch score; 1 = balanced"]]
        assert files == [tmp_path / "c.png"] and is_png(files[0])
        seen.clear()
        files = plots.curves(engine, tmp_path / "d.png", metrics=["acc", "method/*"])
        assert seen == [["acc (%) [test]"], ["method/k_audio [train]"]]
        assert files == [tmp_path / "d.png", tmp_path / "d_ogm_ge.png"]
    finally:
        plots._save_named = orig
        plt.close("all")
