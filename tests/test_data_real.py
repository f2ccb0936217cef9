"""The real split files and small real data in ../shared/data (skipped when that folder is absent).

Counts and label orders are those of DATASETS.md; the last test prepares the real AV-MNIST pairs
and trains on them end to end.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import sqlite3
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mmbench.data.base import PrepareRequest
from mmbench.data.datasets import ave, avmnist, cremad, ks
from mmbench.data.manifest import load_manifest, load_table
from test_data_prepare import cli, offline  # noqa: F401  (offline: autouse network guard)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason=f"no real data at {SHARED}")


def text(p: Path) -> str:
    return p.read_bytes().decode("utf-8-sig")


@pytest.mark.parametrize("dataset,folder", [("cremad", "cremad"), ("ks", "ks"), ("ave", "ave")])
def test_pinned_checksums_match_the_real_files(dataset, folder):
    man = load_manifest(dataset)
    checked = 0
    for src in man.sources.values():
        f = SHARED / folder / src.filename
        if f.is_file():
            assert hashlib.sha256(f.read_bytes()).hexdigest() == src.sha256, src.filename
            assert f.stat().st_size == src.size
            checked += 1
    assert checked >= 3


def test_cremad_lists_counts_and_splits(tmp_path):
    d = SHARED / "cremad"
    train, test = cremad.parse_list(text(d / "ogm_train.csv"), "train"), cremad.parse_list(text(d / "ogm_test.csv"), "test")
    assert (len(train), len(test)) == (6698, 744)
    assert Counter(e for _, e in train) == {"NEU": 973, "HAP": 1148, "SAD": 1131, "FEA": 1138, "DIS": 1142, "ANG": 1166}
    assert Counter(e for _, e in test) == {"NEU": 114, "HAP": 123, "SAD": 140, "FEA": 133, "DIS": 129, "ANG": 105}
    assert [ln.strip() for ln in text(d / "ogm_stat.csv").splitlines()] == load_manifest("cremad").classes
    man = load_manifest("cremad")
    req = PrepareRequest(tmp_path, "ogm-ge", source=d)  # the shared copies carry the manifest's file names
    ogm = cremad.split_rows(man, req, "ogm")
    assert {s: len(r) for s, r in ogm.items()} == man.raw["counts"]["splits"]["ogm"] == {"train": 5954, "val": 744, "test": 744}
    assert Counter(e for _, e in ogm["train"]) == {"NEU": 859, "HAP": 1025, "SAD": 991, "FEA": 1005, "DIS": 1013, "ANG": 1061}
    assert Counter(e for _, e in ogm["val"]) == Counter(e for _, e in test)
    spk = cremad.split_rows(man, req, "speaker")
    assert {s: len(r) for s, r in spk.items()} == man.raw["counts"]["splits"]["speaker"]
    actors = {s: {cremad.actor(x) for x, _ in r} for s, r in spk.items()}
    assert (len(actors["train"]), len(actors["val"]), len(actors["test"])) == (72, 9, 10)
    assert not (actors["train"] & actors["val"]) and not (actors["train"] & actors["test"]) and not (actors["val"] & actors["test"])


def test_cremad_speaker_actors_follow_the_documented_rule():
    sex = {int(r["ActorID"]): r["Sex"] for r in csv.DictReader(open(SHARED / "cremad" / "VideoDemographics.csv"))}
    val, test = set(), set()
    for s in ("Female", "Male"):
        for pos, a in enumerate(sorted(a for a in sex if sex[a] == s)):
            (test if pos % 10 == 0 else val if pos % 10 == 5 else set()).add(a)
    spec = load_manifest("cremad").raw["splits"]["speaker"]
    assert sorted(val) == spec["val_actors"] and sorted(test) == spec["test_actors"]


def test_cremad_media_table_is_the_lfs_facts():
    ours = load_table(load_manifest("cremad").table_path("media"))
    facts = {}
    for line in (SHARED / "cremad" / "media_sha256.tsv").read_text().splitlines()[1:]:
        path, size, sha = line.split("\t")
        facts[path] = (size, sha)
    assert len(ours) == 7442
    for stem, (ws, wh, fs, fh) in ours.items():
        assert facts[f"AudioWAV/{stem}.wav"] == (ws, wh) and facts[f"VideoFlash/{stem}.flv"] == (fs, fh)


KS_COUNTS = {  # DATASETS.md §2.2: train / val / test per class
    "blowing_nose": (268, 44, 81), "bowling": (607, 40, 87), "laughing": (445, 40, 68), "playing_piano": (333, 44, 82),
    "singing": (672, 38, 66), "stomping_grapes": (197, 47, 85), "tickling": (254, 30, 63), "tapping_pen": (354, 42, 76),
}


def test_ks_lists_counts_and_ids():
    man = load_manifest("ks")
    classes = man.classes
    train = ks.parse_ogm_list(text(SHARED / "ks" / "ogm_my_train.txt"), "train")
    test = ks.parse_ogm_list(text(SHARED / "ks" / "ogm_my_test.txt"), "test")
    val = ks.parse_bml(text(SHARED / "ks" / "bml_KS_train_val.json"), "bml", "validation", classes)
    assert (len(train), len(val), len(test)) == (14799, 1320, 2597) and len(classes) == 31 and classes == sorted(classes)
    per = {s: Counter(classes[i] for _, i in r) for s, r in (("train", train), ("val", val), ("test", test))}
    for name, (a, b, c) in KS_COUNTS.items():
        assert (per["train"][name], per["val"][name], per["test"][name]) == (a, b, c)
    keys = {s: [ks.clip_key(c) for c, _ in r] for s, r in (("train", train), ("val", val), ("test", test))}
    assert all(k is not None for v in keys.values() for k in v)
    assert all(ks.CVDF.match(c) for c, _ in train) and not any(ks.CVDF.match(c) for c, _ in test)
    yt = {s: {k[0] for k in v} for s, v in keys.items()}
    assert not (yt["train"] & yt["test"]) and not (yt["train"] & yt["val"]) and not (yt["val"] & yt["test"])
    assert ks.clip_key("--RVKBMp_2M_79") == ("--RVKBMp_2M", 79)  # ids may contain underscores


def test_ave_rows_videos_and_classes():
    man = load_manifest("ave")
    rows = {s: ave.parse_rows(text(SHARED / "ave" / f"{s}Set.txt"), s) for s in ("train", "val", "test")}
    assert {s: len(r) for s, r in rows.items()} == man.raw["counts"]["split_rows"]
    vids = {s: ave.one_per_video(r, "first-row") for s, r in rows.items()}
    assert {s: len(v) for s, v in vids.items()} == man.raw["counts"]["splits"] == {"train": 3312, "val": 401, "test": 402}
    ann = ave.parse_rows(text(SHARED / "ave" / "Annotations.txt"), "ann")
    assert len(ann) == 4143 and len({r[1] for r in ann}) == 4097
    assert sorted({r[0] for r in ann}) == man.classes and len(man.classes) == 28
    assert Counter(r for r in ann) == Counter(r for v in rows.values() for r in v)
    per = {s: Counter(c for c, *_ in r) for s, r in rows.items()}
    assert (per["train"]["Accordion"], per["val"]["Accordion"], per["test"]["Accordion"]) == (124, 15, 15)
    assert (per["train"]["Violin, fiddle"], per["val"]["Violin, fiddle"], per["test"]["Violin, fiddle"]) == (151, 18, 18)
    ids = {s: {v for v, _ in x} for s, x in vids.items()}
    assert (len(ids["train"] & ids["test"]), len(ids["train"] & ids["val"]), len(ids["val"] & ids["test"])) == (8, 10, 0)


def test_avmnist_pairing_on_the_real_files():
    man = load_manifest("avmnist")
    img_src, lab_src = man.source("mnist_images"), man.source("mnist_labels")
    labels = avmnist.read_mnist_file(SHARED / "mnist" / "t10k-labels-idx1-ubyte.gz", lab_src)
    images = avmnist.read_mnist_file(SHARED / "mnist" / "t10k-images-idx3-ubyte.gz", img_src)
    assert images.shape == (10000, 28, 28)
    assert np.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    table = load_table(man.table_path("fsdd"))
    names = sorted(p.name for p in (SHARED / "fsdd" / "recordings").glob("*.wav"))
    assert names == sorted(table) and len(names) == 3000
    pairs = avmnist.pair(names, labels, man.raw["splits"]["fsdd"])
    assert {s: len(v) for s, v in pairs.items()} == man.raw["counts"]["splits"]
    assert all(int(n.split("_")[2][:-4]) <= 4 for n, _ in pairs["test"])  # FSDD's official test recordings
    assert all(int(n.split("_")[2][:-4]) >= 5 for s in ("train", "val") for n, _ in pairs[s])
    imgs = [i for v in pairs.values() for _, i in v]
    assert len(imgs) == len(set(imgs)) == 3000
    assert all(labels[i] == int(n[0]) for v in pairs.values() for n, i in v)
    assert avmnist.pair(names, labels, man.raw["splits"]["fsdd"]) == pairs  # deterministic
    with gzip.open(SHARED / "mnist" / "t10k-images-idx3-ubyte.gz") as f:
        assert hashlib.md5(f.read()).hexdigest() == "2646ac647ad5339dbf082846283269ea"


def test_avmnist_real_end_to_end_prepare_and_train(tmp_path):
    data, db = tmp_path / "data", tmp_path / "r.db"
    code, out = cli("prepare", "avmnist", "--protocol", "tiny", "--source", str(SHARED), "--data-dir", str(data), "--workers", "1")
    assert code == 0, out
    assert "train 300 300 0 0 300" in out and "test 120 120 0 0 120" in out
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: avmnist-smoke\ndataset: {name: avmnist, protocol: tiny}\nmodel: {backbone: tiny, fusion: concat}\n"
        "train: {epochs: 4, batch_size: 32, optimizer: {name: sgd, lr: 0.05, momentum: 0.9, weight_decay: 0.0001}}\n"
        "methods: [joint]\nseeds: [0]\n"
    )
    code, out = cli("sweep", str(recipe), "--data-dir", str(data), "--db", f"sqlite:///{db}", "--runs-dir", str(tmp_path / "runs"))
    assert code == 0, out
    con = sqlite3.connect(db)
    status, n_train, n_val, n_test, protocol = con.execute("select status, n_train, n_val, n_test, protocol from run").fetchone()
    assert (status, n_train, n_val, n_test, protocol) == ("completed", 300, 120, 120, "tiny")
    acc = con.execute("select value from final_metric where split='test' and name='acc' and selection='best-val'").fetchone()[0]
    assert acc > 0.25  # 10 classes: real learning from real digits after four short epochs
