"""`mmbench prepare cremad` end to end on raw-format fixtures: report, store, idempotence, resume, bad input.

Split lists are served by a loopback HTTP server named in a test copy of the manifest
(MMBENCH_MANIFESTS), exactly as the real ones are fetched from their pinned URLs.
"""
from __future__ import annotations

import errno
import gzip
import hashlib
import json
import re
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mmbench.data import features, pipeline
from mmbench.data.fixtures import LoopbackServer, make_cremad_tree, write_wav
from mmbench.data.manifest import load_manifest, manifests_dir
from mmbench.data.store import PreparedDataset
from mmbench.data.transforms import get_transform

OGM = ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]
TRAIN = ["1001_DFA_ANG_XX", "1002_IEO_HAP_HI", "1003_TIE_SAD_XX", "1004_IWL_FEA_XX", "1005_MTI_DIS_XX", "1006_ITS_NEU_XX"]
VAL = ["1001_IOM_HAP_XX", "1008_WSI_ANG_XX"]
TEST = ["1002_TAI_DIS_XX", "1003_IWW_NEU_XX"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Tests never touch the internet: any URL but the loopback server fails the test."""
    real = urllib.request.urlopen

    def guarded(req, *a, **k):  # noqa: ANN001
        url = getattr(req, "full_url", req)
        assert urllib.parse.urlparse(url).hostname == "127.0.0.1", f"test tried the internet: {url}"
        return real(req, *a, **k)

    monkeypatch.setattr(urllib.request, "urlopen", guarded)


def cli(*args: str) -> tuple[int, str]:
    """Run the real entry point (`mmbench.cli.main`) in-process; returns (exit code, all output)."""
    import io

    from rich.console import Console

    import mmbench.cli as c

    out = io.StringIO()
    old = (c.console, c.err_console, sys.argv)
    c.console = c.err_console = Console(file=out, width=400)
    sys.argv = ["mmbench", *args]
    try:
        try:
            c.main()
            code = 0
        except SystemExit as e:
            code = int(e.code or 0)
    finally:
        c.console, c.err_console, sys.argv = old
    return code, " ".join(re.sub("[\u2500-\u257f]", " ", out.getvalue()).split())  # no table borders


def lst(stems: list[str], crlf: bool = True) -> bytes:
    nl = "\r\n" if crlf else "\n"
    return "".join(f"{s},{s.split('_')[2]}{nl}" for s in stems).encode()


def media_table(root: Path, stems: list[str]) -> bytes:
    rows = ["stem\twav_size\twav_sha256\tflv_size\tflv_sha256"]
    for s in stems:
        w, f = root / "AudioWAV" / f"{s}.wav", root / "VideoFlash" / f"{s}.flv"
        rows.append(f"{s}\t{w.stat().st_size}\t{hashlib.sha256(w.read_bytes()).hexdigest()}\t"
                    f"{f.stat().st_size}\t{hashlib.sha256(f.read_bytes()).hexdigest()}")
    return gzip.compress(("\n".join(rows) + "\n").encode())


def make_manifest(tmp: Path, server: LoopbackServer, files: dict[str, bytes], table: bytes, media_url: str | None = None) -> Path:
    """A copy of data_manifests/cremad.yaml whose sources are `files` on the loopback server."""
    man = yaml.safe_load((manifests_dir() / "cremad.yaml").read_text())
    for key, data in files.items():
        server.files[f"/lists/{key}"] = data
        src = man["sources"][key]
        src.update(url=f"{server.url}/lists/{key}", sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    if media_url:
        man["media"]["base_url"] = media_url
    man["splits"]["speaker"].update(val_actors=[1005], test_actors=[1003, 1008])
    d = tmp / "manifests"
    d.mkdir(exist_ok=True)
    (d / "cremad.yaml").write_text(yaml.safe_dump(man, sort_keys=False))
    (d / man["tables"]["media"]).write_bytes(table)
    return d


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """A CREMA-D-layout tree with one item of each failure kind; the media table matches it."""
    root = make_cremad_tree(tmp_path_factory.mktemp("cremad") / "CREMA-D", TRAIN + VAL + TEST)
    stems = TRAIN + VAL + TEST
    junk = root / "VideoFlash" / "1004_IWL_FEA_XX.flv"
    junk.write_bytes(b"FLV\x01\x05" + bytes(300))                      # undecodable (hash listed: it is "official")
    write_wav(root / "AudioWAV" / "1005_MTI_DIS_XX.wav", 0.2, 16000)   # too short
    table = media_table(root, stems)
    (root / "AudioWAV" / "1003_IWW_NEU_XX.wav").unlink()               # missing
    p = root / "AudioWAV" / "1002_TAI_DIS_XX.wav"                      # altered after the table: checksum
    p.write_bytes(p.read_bytes()[:-2] + b"\x01\x02")
    return root, table


@pytest.fixture
def env(tmp_path, raw, monkeypatch):
    root, table = raw
    with LoopbackServer() as server:
        files = {"relearn_my_train": lst(TRAIN, crlf=False), "relearn_val": lst(VAL, crlf=False), "ogm_test": lst(TEST),
                 "ogm_train": lst(TRAIN + VAL)}
        monkeypatch.setenv("MMBENCH_MANIFESTS", str(make_manifest(tmp_path, server, files, table)))
        yield root, tmp_path / "data", server


def test_prepare_cremad_from_source_reports_everything(env):
    root, data, _ = env
    code, out = cli("prepare", "cremad", "--source", str(root.parent), "--data-dir", str(data), "--workers", "2")
    assert code == 0, out
    rep = json.loads((data / "cremad" / "ogm-ge" / "prepare_report.json").read_text())
    assert rep["splits"] == {
        "train": {"expected": 6, "found": 6, "missing": 0, "corrupt": 2, "stored": 4},
        "val": {"expected": 2, "found": 2, "missing": 0, "corrupt": 0, "stored": 2},
        "test": {"expected": 2, "found": 1, "missing": 1, "corrupt": 1, "stored": 0},
    }
    why = {c["id"]: c["reason"] for c in rep["corrupt"] + rep["missing"]}
    assert why["1004_IWL_FEA_XX"].startswith("undecodable")
    assert why["1005_MTI_DIS_XX"].startswith("too short")
    assert why["1002_TAI_DIS_XX"].startswith("checksum mismatch")
    assert "AudioWAV/1003_IWW_NEU_XX.wav" in why["1003_IWW_NEU_XX"]
    assert rep["reasons"]["train"] == {"undecodable": 1, "too short": 1}
    assert rep["params"]["audio"]["hop_length"] == 353 and rep["params"]["visual"]["frames"] == 1
    assert rep["versions"]["av"] and rep["versions"]["ffmpeg_libs"]["libavcodec"]
    assert rep["store_bytes"] > 0 and rep["workers"] == 2
    # the printed summary says the same, with the reasons
    assert re.search(r"train 6 6 0 2 4 .*1 too short", out) and "4 listed items are not in the store" in out

    ds = PreparedDataset("cremad", "ogm-ge", data)
    assert ds.meta.classes == OGM and ds.meta.splits == {"train": 4, "val": 2, "test": 0}
    tr = ds.split("train")
    assert (ds.root / "train" / "ids.txt").read_text().split() == ["1001_DFA_ANG_XX", "1002_IEO_HAP_HI", "1003_TIE_SAD_XX", "1006_ITS_NEU_XX"]
    assert tr.labels.tolist() == [OGM.index(e) for e in ("ANG", "HAP", "SAD", "NEU")]
    batch = tr.__getitems__([3, 0])
    assert batch["audio"].shape == (2, 1, 257, 188) and batch["audio"].dtype == np.float16
    assert batch["visual"].shape == (2, 1, 3, 224, 224) and batch["visual"].dtype == np.uint8
    # rows after the squeezed-out corrupt items are the right clips' features
    p = load_manifest("cremad").protocol("ogm-ge")
    np.testing.assert_array_equal(tr.arrays["audio"][3], features.audio_from_file(root / "AudioWAV" / "1006_ITS_NEU_XX.wav", p["audio"]))
    np.testing.assert_array_equal(tr.arrays["visual"][3], features.frames_from_file(root / "VideoFlash" / "1006_ITS_NEU_XX.flv", p["visual"]))
    vis = ds.meta.modalities["visual"]
    assert (vis.transform, vis.transform_args) == ("frames", {"size": 224})
    x = get_transform(vis.transform, **vis.transform_args)(torch.from_numpy(batch["visual"]), True, torch.Generator())
    assert x.shape == (2, 1, 3, 224, 224)


def test_second_prepare_does_nothing_and_force_redoes(env):
    root, data, _ = env
    args = ("prepare", "cremad", "--source", str(root), "--data-dir", str(data), "--workers", "1")
    assert cli(*args)[0] == 0
    meta = data / "cremad" / "ogm-ge" / "meta.json"
    stamp = meta.stat().st_mtime_ns
    code, out = cli(*args)
    assert code == 0 and "already prepared" in out and meta.stat().st_mtime_ns == stamp
    code, out = cli(*args, "--force")
    assert code == 0 and meta.stat().st_mtime_ns != stamp
    code, out = cli("datasets", "--data-dir", str(data))
    assert re.search(r"cremad .*ogm-ge \(default\) .*yes .*4/2/0", out)


def test_speaker_split_is_actor_disjoint(env):
    root, data, _ = env
    code, out = cli("prepare", "cremad", "--protocol", "ogm-ge-speaker", "--source", str(root), "--data-dir", str(data), "--workers", "1")
    assert code == 0, out
    rep = json.loads((data / "cremad" / "ogm-ge-speaker" / "prepare_report.json").read_text())
    ids = {s: [i for i in (data / "cremad" / "ogm-ge-speaker" / s / "ids.txt").read_text().split()] for s in ("train", "val", "test")}
    actors = {s: {int(i[:4]) for i in v} for s, v in ids.items()}
    assert actors["val"] <= {1005} and actors["test"] <= {1003, 1008}
    assert not (actors["train"] & (actors["val"] | actors["test"]))
    assert rep["splits"]["test"]["expected"] == 3 and rep["splits"]["val"]["expected"] == 1  # 1003 x2 + 1008; 1005


def test_interrupted_prepare_resumes_and_keeps_the_old_store(env, monkeypatch):
    root, data, _ = env
    args = ("prepare", "cremad", "--protocol", "fbank", "--source", str(root), "--data-dir", str(data), "--workers", "1")
    monkeypatch.setattr(pipeline, "CHUNK", 2)
    real = pipeline.featurize
    calls = {"n": 0}

    def dying(item, params, *rest):  # noqa: ANN001
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real(item, params, *rest)

    monkeypatch.setattr(pipeline, "featurize", dying)
    code, out = cli(*args)
    assert code == 130
    store = data / "cremad" / "fbank"
    assert not (store / "meta.json").exists()
    log = (data / "cremad" / ".work" / "fbank" / "train" / "chunks.jsonl").read_text().splitlines()
    assert len(log) == 2  # items 0-3 done in two chunks; the 5th item's chunk was cut
    monkeypatch.setattr(pipeline, "featurize", real)
    code, out = cli(*args)
    assert code == 0, out
    rep = json.loads((store / "prepare_report.json").read_text())
    assert rep["items_featurized"] == 10 - 1 - 4  # 9 found, 4 already done before the kill
    assert rep["splits"]["train"]["stored"] == 4 and not (data / "cremad" / ".work").exists()
    audio = np.load(store / "train" / "audio.npy")
    assert audio.shape == (4, 1, 128, 1024) and np.isfinite(audio.astype(np.float32)).all()
    assert np.abs(audio.astype(np.float32)).sum(axis=(1, 2, 3)).min() > 0  # resumed rows are filled

    # a forced redo that dies leaves the complete store as it was
    before = (store / "train" / "audio.npy").read_bytes()
    calls["n"] = 0
    monkeypatch.setattr(pipeline, "featurize", dying)
    assert cli(*args, "--force")[0] == 130
    assert (store / "meta.json").is_file() and (store / "train" / "audio.npy").read_bytes() == before


def test_full_disk_is_a_clear_error_and_keeps_the_store(env, monkeypatch):
    root, data, _ = env
    args = ("prepare", "cremad", "--source", str(root), "--data-dir", str(data), "--workers", "1")
    assert cli(*args)[0] == 0
    meta = (data / "cremad" / "ogm-ge" / "meta.json").read_text()

    class Usage:
        free = 1000

    real_usage = pipeline.shutil.disk_usage
    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda p: Usage())
    code, out = cli(*args, "--force")
    assert code == 2 and "not enough disk space" in out and "GB" in out
    monkeypatch.setattr(pipeline.shutil, "disk_usage", real_usage)

    def full(fd, off, n):  # noqa: ANN001
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pipeline.os, "posix_fallocate", full)
    code, out = cli(*args, "--force")
    assert code == 2 and "no space left" in out
    assert (data / "cremad" / "ogm-ge" / "meta.json").read_text() == meta


def test_bad_inputs_exit_2_with_a_message(env, tmp_path):
    root, data, server = env
    empty = tmp_path / "not-cremad"
    empty.mkdir()
    (empty / "readme.txt").write_text("hi")
    code, out = cli("prepare", "cremad", "--source", str(empty), "--data-dir", str(data))
    assert code == 2 and "does not look like CREMA-D" in out and "AudioWAV/" in out
    code, out = cli("prepare", "cremad", "--protocol", "nope", "--data-dir", str(data))
    assert code == 2 and "unknown protocol 'nope'" in out and "ogm-ge-speaker" in out
    code, out = cli("prepare", "nosuch", "--data-dir", str(data))
    assert code == 2 and "unknown dataset" in out
    good = server.files["/lists/relearn_val"]
    server.files["/lists/relearn_val"] = good.replace(b"HAP", b"SAD")  # same size, not the pinned bytes
    code, out = cli("prepare", "cremad", "--source", str(root), "--data-dir", str(tmp_path / "d2"))
    assert code == 2 and "checksum mismatch" in out and "relearn_val.csv" in out
    assert not (tmp_path / "d2" / "cremad" / "downloads" / "relearn_val.csv").exists()


def test_download_mode_fetches_media_in_parallel(tmp_path, raw, monkeypatch):
    root, table = raw
    with LoopbackServer() as server:
        for p in root.rglob("*.*"):
            server.files["/media/" + p.relative_to(root).as_posix()] = p.read_bytes()
        server.faults["/media/AudioWAV/1001_DFA_ANG_XX.wav"] = ["cut"]        # resumed
        del server.files["/media/VideoFlash/1008_WSI_ANG_XX.flv"]            # 404: reported missing
        files = {"relearn_my_train": lst(TRAIN, crlf=False), "relearn_val": lst(VAL, crlf=False), "ogm_test": lst(TEST)}
        monkeypatch.setenv("MMBENCH_MANIFESTS", str(make_manifest(tmp_path, server, files, table, server.url + "/media/")))
        data = tmp_path / "data"
        code, out = cli("prepare", "cremad", "--data-dir", str(data), "--workers", "1")
        assert code == 0, out
    got = data / "cremad" / "raw"
    assert (got / "AudioWAV" / "1001_DFA_ANG_XX.wav").read_bytes() == (root / "AudioWAV" / "1001_DFA_ANG_XX.wav").read_bytes()
    rep = json.loads((data / "cremad" / "ogm-ge" / "prepare_report.json").read_text())
    why = {c["id"]: c["reason"] for c in rep["missing"]}
    assert set(why) == {"1008_WSI_ANG_XX", "1003_IWW_NEU_XX", "1002_TAI_DIS_XX"}
    assert why["1008_WSI_ANG_XX"].startswith("download failed") and "404" in why["1008_WSI_ANG_XX"]
    assert "checksum mismatch" in why["1002_TAI_DIS_XX"]  # the served copy differs from the pinned hash
    assert not (got / "AudioWAV" / "1002_TAI_DIS_XX.wav").exists()
    assert rep["splits"]["train"] == {"expected": 6, "found": 6, "missing": 0, "corrupt": 2, "stored": 4}


@pytest.mark.parametrize("n,dtype", [(7, "float16"), (100_001, "uint8")])  # the header's digit count changes too
def test_compact_npy_drops_rows_in_place(tmp_path, n, dtype):
    f = tmp_path / "a.npy"
    a = np.lib.format.open_memmap(f, mode="w+", dtype=dtype, shape=(n, 2, 3))
    a[:] = (np.arange(n * 6).reshape(n, 2, 3) % 250).astype(dtype)
    ref = np.array(a)
    del a
    keep = np.ones(n, bool)
    keep[[0, 3, n - 1]] = False
    pipeline.compact_npy(f, keep)
    np.testing.assert_array_equal(np.load(f, mmap_mode="r"), ref[keep])
