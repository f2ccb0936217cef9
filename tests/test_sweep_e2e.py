"""One sweep end to end on tiny synthetic data: database rows per DESIGN.md §4.5/§4.6, no
duplicates on re-run, reports in every format, and bad input rejected before anything is written."""
from __future__ import annotations

import re
import sqlite3
from pathlib import Path

from conftest import write_recipe

METHODS = "[joint, {name: unimodal, modality: audio}, {name: unimodal, modality: visual}]"


def rows(db: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(db) as c:
        return c.execute(sql).fetchall()


def test_sweep_report_and_rerun(mm_env: Path, cli) -> None:
    r = write_recipe(mm_env / "r.yaml", name="e2e", epochs=2, methods=METHODS, seeds="[0, 1]")
    code, out = cli("sweep", r, "--dry-run")
    assert code == 0 and "6 runs" in out
    assert not (mm_env / "results.db").exists()  # a dry run writes nothing

    code, out = cli("sweep", r)
    assert code == 0, out
    db = mm_env / "results.db"
    assert rows(db, "select count(*) from run") == [(6,)]
    assert rows(db, "select count(*) from sweep_run") == [(6,)]
    assert rows(db, "select distinct status from run") == [("completed",)]
    cols = {r[1] for r in rows(db, "pragma table_info(run)")}
    assert {"id", "dataset", "protocol", "method", "fusion", "backbone", "seed", "config_json", "status", "error",
            "created_at", "started_at", "finished_at", "wall_seconds", "device", "n_train", "n_val", "n_test",
            "selection", "selected_epoch"} <= cols
    assert rows(db, "select distinct n_train, n_val, n_test from run") == [(360, 120, 120)]
    names = {n for (n,) in rows(db, "select distinct name from epoch_metric where split='test'")}
    assert {"loss", "acc", "macro_f1", "acc/audio", "acc/visual", "macro_f1/audio", "score/audio", "score/visual",
            "imbalance_ratio"} <= names
    assert rows(db, "select count(*) from epoch_metric where split='train' and name='epoch_seconds'") == [(12,)]
    assert rows(db, "select count(distinct epoch) from epoch_metric") == [(2,)]
    assert rows(db, "select count(*) from final_metric where selection='best-val' and split='test' and name='acc'") == [(6,)]
    before = rows(db, "select count(*) from epoch_metric")[0][0] + rows(db, "select count(*) from final_metric")[0][0]

    code, out = cli("sweep", r)
    assert code == 0 and "0 trained, 6 already done" in out
    after = rows(db, "select count(*) from epoch_metric")[0][0] + rows(db, "select count(*) from final_metric")[0][0]
    assert after == before and rows(db, "select count(*) from run") == [(6,)]
    assert rows(db, "select count(*) from sweep") == [(1,)]

    code, out = cli("report", "--compare", "--sweep", "e2e")
    assert code == 0
    for needle in ("synthetic / protocol tiny", "joint", "unimodal", "acc/audio", "± "):
        assert needle in out, needle
    assert re.search(r"│ +2 +│", out)  # the seeds column (n)
    code, md = cli("report", "--compare", "--format", "markdown")
    assert code == 0 and md.count("| joint |") == 1 and "imbalance_ratio" in md
    code, _ = cli("report", "--compare", "--format", "latex", "--output", mm_env / "t.tex")
    assert code == 0 and "\\toprule" in (mm_env / "t.tex").read_text()
    code, csv = cli("report", "--compare", "--format", "csv")
    assert code == 0 and csv.startswith("dataset,protocol,selection,method")
    code, out = cli("report", "--compare", "--sweep", "nope")
    assert code == 2 and "no sweep named 'nope'" in out


def test_train_runs_exactly_one(mm_env: Path, cli) -> None:
    r = write_recipe(mm_env / "r.yaml", methods="[joint]", seeds="[0, 1]")
    code, out = cli("train", r)
    assert code == 2 and "expands to 2 runs" in out
    code, out = cli("train", r, "--set", "seeds=[3]", "--set", "train.epochs=1")
    assert code == 0, out
    assert rows(mm_env / "results.db", "select seed, status from run") == [(3, "completed")]


def test_bad_input_exits_2_and_writes_nothing(mm_env: Path, cli, tmp_path: Path) -> None:
    r = write_recipe(mm_env / "r.yaml", methods="[joint, {name: unimodal, modality: smell}]")
    code, out = cli("sweep", r)
    assert code == 2 and "modality 'smell'" in out and "Traceback" not in out
    assert not (mm_env / "results.db").exists()

    r = write_recipe(mm_env / "r2.yaml", extra="bogus: 1\n")
    code, out = cli("sweep", r)
    assert code == 2 and "bogus: unknown key" in out and str(r) in out

    r = write_recipe(mm_env / "r3.yaml")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code, out = cli("sweep", r, "--db", f"sqlite:///{ro / 'x.db'}")
        import os
        if os.geteuid() != 0:  # root can write anywhere; the check is then about a missing folder
            assert code == 2 and "not writable" in out
        (tmp_path / "afile").write_text("")  # a missing folder is created; one under a file cannot be
        code, out = cli("sweep", r, "--db", f"sqlite:///{tmp_path / 'afile' / 'sub' / 'x.db'}")
        assert code == 2 and "cannot be created" in out
    finally:
        ro.chmod(0o700)
    code, out = cli("sweep", mm_env / "nope.yaml")
    assert code == 2 and "recipe not found" in out
    code, out = cli("report", "--compare", "--db", f"sqlite:///{tmp_path / 'none.db'}")
    assert code == 2


def test_methods_and_datasets_listing(mm_env: Path, cli) -> None:
    code, out = cli("methods")
    assert code == 0 and "joint" in out and "unimodal" in out
    code, out = cli("datasets")
    assert code == 0 and "synthetic" in out and "tiny" in out and "yes" in out
