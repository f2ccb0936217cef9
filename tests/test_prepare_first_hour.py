"""`prepare` on a first day: reasons on every outcome, copies that are not byte-identical
(--no-verify), split lists from --source under any name, the local files used in the report,
and runs/reports that carry an unverified store's mark."""
from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from mmbench.data.fixtures import LoopbackServer, make_cremad_tree
from tests.conftest import write_recipe
from tests.test_data_prepare import OGM, TEST, TRAIN, VAL, cli, lst, make_manifest, media_table, offline  # noqa: F401

STEMS = TRAIN + VAL + TEST


@pytest.fixture(scope="module")
def reencoded(tmp_path_factory):
    """A CREMA-D tree whose every WAV differs from the canonical bytes (a re-encoded copy)."""
    root = make_cremad_tree(tmp_path_factory.mktemp("cremad") / "CREMA-D", STEMS)
    table = media_table(root, STEMS)
    for s in STEMS:
        p = root / "AudioWAV" / f"{s}.wav"
        p.write_bytes(p.read_bytes()[:-2] + b"\x01\x02")
    return root, table


@pytest.fixture
def env(tmp_path, reencoded, monkeypatch):
    root, table = reencoded
    with LoopbackServer() as server:
        files = {"relearn_my_train": lst(TRAIN, crlf=False), "relearn_val": lst(VAL, crlf=False), "ogm_test": lst(TEST),
                 "ogm_train": lst(TRAIN + VAL)}
        monkeypatch.setenv("MMBENCH_MANIFESTS", str(make_manifest(tmp_path, server, files, table)))
        yield root, tmp_path / "data", server, files


def test_failure_prints_reasons_and_writes_the_report(env):
    root, data, _, _ = env
    code, out = cli("prepare", "cremad", "--source", str(root.parent), "--data-dir", str(data))
    assert code == 2
    assert "none of the 10 listed items could be used" in out
    assert "10 checksum mismatch (train 6, val 2, test 2)" in out
    assert f"{TRAIN[0]}: checksum mismatch ({TRAIN[0]}.wav" in out  # the first items, with their full reason
    assert "--no-verify" in out  # what to do about it
    rep_path = data / "cremad" / "prepare_report.ogm-ge.failed.json"
    assert str(rep_path) in out
    rep = json.loads(rep_path.read_text())
    assert rep["reasons"]["train"] == {"checksum mismatch": 6} and len(rep["corrupt"]) == 10
    assert not (data / "cremad" / "ogm-ge").exists()


def test_no_verify_keeps_mismatched_copies_and_says_so(env):
    root, data, _, _ = env
    code, out = cli("prepare", "cremad", "--source", str(root.parent), "--data-dir", str(data), "--no-verify")
    assert code == 0, out
    assert "unverified: 10 stored items differ from the canonical files" in out
    store = data / "cremad" / "ogm-ge"
    rep = json.loads((store / "prepare_report.json").read_text())
    assert rep["verified"] is False and rep["checksum_mismatches"] == 10 and len(rep["unverified"]) == 10
    assert sum(s["stored"] for s in rep["splits"].values()) == 10
    meta = json.loads((store / "meta.json").read_text())
    assert meta["params"]["options"] == {"verify": False}
    assert not (data / "cremad" / "prepare_report.ogm-ge.failed.json").exists()  # the failed attempt's report
    # a verified prepare is another store: it does not reuse the unverified one
    code, out = cli("prepare", "cremad", "--source", str(root.parent), "--data-dir", str(data))
    assert code == 2 and "already prepared" not in out


def test_split_lists_are_taken_from_source_under_any_name(env, tmp_path):
    """Offline: the server is gone; the lists sit in --source as the method repos name them."""
    root, data, server, files = env
    src = tmp_path / "mine"
    shutil.copytree(root, src / "CREMA-D")
    lists = src / "lists"
    lists.mkdir()
    (lists / "train.csv").write_bytes(files["relearn_my_train"])  # the repos' own names, not the manifest's
    (lists / "val.csv").write_bytes(files["relearn_val"])
    (lists / "test.csv").write_bytes(files["ogm_test"])
    server.files.clear()
    code, out = cli("prepare", "cremad", "--source", str(src), "--data-dir", str(data), "--no-verify")
    assert code == 0, out
    rep = json.loads((data / "cremad" / "ogm-ge" / "prepare_report.json").read_text())
    used = rep["local_files"]
    assert used["relearn_my_train.csv"] == str((lists / "train.csv").resolve())
    assert used["relearn_val.csv"] == str((lists / "val.csv").resolve())
    assert used["ogm_test.csv"] == str((lists / "test.csv").resolve())
    assert used["--source"] == str(src.resolve())


def test_missing_split_list_offline_says_source_works_under_any_name(env, tmp_path):
    root, data, server, _ = env
    server.files.clear()
    code, out = cli("prepare", "cremad", "--source", str(root.parent), "--data-dir", str(data))
    assert code == 2 and "under any name" in out


def test_run_on_an_unverified_store_is_recorded_and_marked_in_reports(mm_env: Path, cli_run, tmp_path):
    """A run records its store's verification; the comparison table marks its row and says why."""
    from mmbench.data.base import DATASETS, PrepareRequest

    data = tmp_path / "udata"
    DATASETS.get("synthetic")().prepare(PrepareRequest(data, "tiny"))
    rp = data / "synthetic" / "tiny" / "prepare_report.json"
    rep = json.loads(rp.read_text())
    rp.write_text(json.dumps({**rep, "verified": False, "checksum_mismatches": 3}))
    r = write_recipe(mm_env / "r.yaml", epochs=1)
    code, out = cli_run("sweep", r, "--data-dir", str(data), "--set", "train.eval_train=false")
    assert code == 0, out
    with sqlite3.connect(mm_env / "results.db") as con:
        (env_json,), = con.execute("select env_json from run").fetchall()
    assert json.loads(env_json)["data"] == {"verified": False, "checksum_mismatches": 3}
    code, out = cli_run("report", "--format", "markdown")
    assert code == 0, out
    assert "| joint (unverified data) |" in out and "prepared with --no-verify" in out


@pytest.fixture
def cli_run(cli):
    return cli
