"""BalanceBenchmark's table as recipes and as a reference: both recipes pass `--dry-run` and every
planned run passes its method's checks; `report --reference` shows published, measured and the gap
per method, lists what was not run, and refuses a bad reference file with exit 2."""
from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest

from mmbench.config import load_recipe, run_id
from mmbench.engine.run import run_row
from mmbench.methods.base import METHODS, ModelSpec, TrainSpec
from mmbench.report.reference import load_reference
from mmbench.store import db
from mmbench.store.tables import Sweep
from mmbench.sweep.plan import plan

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "references" / "balancebench.yaml"
# input shapes of the `fbank` protocols (audio 1 x 1024 x 128; CREMA-D 2 frames, KS 3 frames)
SHAPES = {"cremad": {"audio": [1, 1024, 128], "visual": [2, 3, 224, 224]},
          "ks": {"audio": [1, 1024, 128], "visual": [3, 3, 224, 224]}}


@pytest.mark.parametrize("name", ["cremad", "ks"])
def test_recipe_passes_dry_run_and_every_method_check(name: str, mm_env: Path, cli) -> None:
    path = ROOT / "recipes" / f"balancebench-{name}.yaml"
    code, out = cli("sweep", path, "--dry-run")
    assert code == 0, out
    recipe, _ = load_recipe(path, [])
    runs = plan(recipe, str(path), str(mm_env / "no-data"))
    methods = {r.cfg["method"]["name"] for r in runs}
    assert methods == {"unimodal", "joint", "ogm_ge", "agm", "mmpareto", "relearn", "mmcosine", "cml", "mbsd", "lfm",
                       "umt", "gblending", "pmr", "reconboost", "mla", "opm", "greedy", "amco", "valuation"}
    for r in runs:
        c = r.cfg
        assert c["train"]["selection"] == "oracle-test" and c["train"]["epochs"] == 30
        assert c["train"]["optimizer"]["name"] == "adamw" and c["dataset"]["protocol"] == "fbank"
        cls = METHODS.get(c["method"]["name"])
        hp = cls.HParams.model_validate({k: v for k, v in c["method"].items() if k != "name"})
        cls.check(ModelSpec("resnet18", c["model"]["fusion"], SHAPES[name], 6), hp)
        cls.check_train(TrainSpec(30, c["train"]["optimizer"], c["train"]["scheduler"]), hp)


def test_reference_file_holds_both_tables() -> None:
    ref = load_reference(REFERENCE)
    assert ref.selection == "oracle-test"
    for ds in ("cremad", "ks"):
        assert len(ref.datasets[ds]) == 20
    by = {(e.method, e.modality): e for e in ref.datasets["cremad"]}
    assert (by[("mmpareto", None)].acc, by[("mmpareto", None)].macro_f1) == (79.97, 80.57)
    assert by[("unimodal", "visual")].acc == 58.10
    assert {(e.method, e.acc) for e in ref.datasets["ks"]} >= {("joint", 65.63), ("ogm_ge", 67.04)}


# ----- report --reference on a database filled by hand --------------------------------------
def _config(method: dict, seed: int) -> dict:
    return {"schema": 1, "dataset": {"name": "cremad", "protocol": "fbank"},
            "model": {"backbone": "resnet18", "fusion": "concat", "init": "backbone"},
            "train": {"epochs": 2, "selection": "oracle-test"}, "metrics": {"competition": False},
            "method": method, "seed": seed}


def _add(engine, method: dict, seed: int, acc: float) -> None:
    cfg = _config(method, seed)
    rid = run_id(cfg)
    db.register_runs(engine, "s", [run_row(cfg, rid, Path("runs") / rid)])
    test = {"acc": acc, "macro_f1": acc - 0.01}
    finals = {sel: {"test": test} for sel in ("best-val", "last", "oracle-test")}
    db.write_results(engine, rid, [{"epoch": 0, "metrics": {"test": test}}], finals,
                     {"selected_epoch": 0, "epochs_done": 1, "wall_seconds": 1.0})


@pytest.fixture
def results(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    engine = db.get_engine(url)
    db.upsert_sweep(engine, Sweep(id="s", name="bb", recipe_path="r.yaml", recipe_sha256="x", created_at=db.now(),
                                  mmbench_version="0"))
    for seed, acc in ((0, 0.66), (1, 0.68)):
        _add(engine, {"name": "joint"}, seed, acc)
    _add(engine, {"name": "unimodal", "modality": "audio"}, 0, 0.60)
    _add(engine, {"name": "ogm_ge", "alpha": 0.3}, 0, 0.70)
    return url


def test_gap_per_method_with_not_run_rows(results: str, cli) -> None:
    code, out = cli("report", "--db", results, "--selection", "oracle-test", "--reference", REFERENCE, "--format", "csv")
    assert code == 0, out
    body = out[out.index("reference,dataset"):]
    rows = [r for r in csv.DictReader(io.StringIO(body)) if r["metric"] == "acc"]
    by = {(r["method"], r["modality"]): r for r in rows}
    assert float(by[("joint", "")]["measured_mean"]) == pytest.approx(67.0)
    assert float(by[("joint", "")]["gap"]) == pytest.approx(67.0 - 65.50)
    assert by[("joint", "")]["n"] == "2"
    assert float(by[("unimodal", "audio")]["gap"]) == pytest.approx(60.0 - 59.38)
    assert float(by[("ogm_ge", "")]["gap"]) == pytest.approx(70.0 - 67.76)
    assert by[("unimodal", "visual")]["n"] == "0" and by[("unimodal", "visual")]["gap"] == ""  # not run
    assert by[("mmpareto", "")]["n"] == "0"
    assert len(rows) == 20  # every published method is listed, run or not


def test_markdown_gap_table_says_how_both_sides_were_selected(results: str, cli) -> None:
    code, out = cli("report", "--db", results, "--reference", REFERENCE, "--format", "markdown")
    assert code == 0, out
    assert "published: oracle-test; measured: best-val — SELECTION RULES DIFFER" in out
    assert "| joint [Baseline] |" in out and "not run" in out and "+1.50" in out
    code, out = cli("report", "--db", results, "--reference", REFERENCE, "--selection", "oracle-test")
    assert code == 0, out
    assert "SELECTION RULES DIFFER" not in out and "ORACLE" in out


@pytest.mark.parametrize("text, needle", [
    ("name: x\ndatasets: {cremad: [{method: joint, acc: 120}]}\n", "datasets.cremad.0.acc"),
    ("name: x\ndatasets: {cremad: [{method: joint, accuracy: 60}]}\n", "accuracy"),
    ("name: x\ndatasets: {}\n", "no published results"),
    ("[unclosed\n", "not valid YAML"),
])
def test_bad_reference_file_exits_2(results: str, cli, tmp_path: Path, text: str, needle: str) -> None:
    bad = tmp_path / "ref.yaml"
    bad.write_text(text)
    code, out = cli("report", "--db", results, "--reference", bad)
    assert code == 2, out
    assert needle in out


def test_reference_refuses_plots_formats_and_missing_files(results: str, cli, tmp_path: Path) -> None:
    code, out = cli("report", "--db", results, "--reference", REFERENCE, "--format", "latex")
    assert code == 2 and "--reference" in out
    code, out = cli("report", "--db", results, "--reference", tmp_path / "none.yaml")
    assert code == 2 and "cannot read" in out
    other = tmp_path / "ks-only.yaml"
    other.write_text("name: x\ndatasets: {ks: [{method: joint, acc: 60}]}\n")
    code, out = cli("report", "--db", results, "--reference", other)
    assert code == 2 and "covers ks" in out
