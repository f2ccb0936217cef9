"""`prepare` end to end for ks (CVDF folder), ave (the zip) and avmnist (downloaded archive + IDX files)."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from mmbench.data.fixtures import LoopbackServer, frame_level, write_idx, write_video, write_wav
from mmbench.data.manifest import manifests_dir
from mmbench.data.store import PreparedDataset
from test_data_prepare import cli, offline  # noqa: F401  (offline: autouse network guard)

KS = yaml.safe_load((manifests_dir() / "ks.yaml").read_text())["classes"]
AVE = yaml.safe_load((manifests_dir() / "ave.yaml").read_text())["classes"]


def override(tmp: Path, name: str, sources: dict[str, dict], extra: dict | None = None,
             tables: dict[str, bytes] | None = None) -> Path:
    man = yaml.safe_load((manifests_dir() / f"{name}.yaml").read_text())
    for key, upd in sources.items():
        man["sources"][key].update(upd)
    for k, v in (extra or {}).items():
        man["splits"][k].update(v)
    d = tmp / "manifests"
    d.mkdir(exist_ok=True)
    (d / f"{name}.yaml").write_text(yaml.safe_dump(man, sort_keys=False))
    for fname, data in (tables or {}).items():
        (d / fname).write_bytes(data)
    return d


def pinned(server: LoopbackServer, path: str, data: bytes) -> dict:
    server.files[path] = data
    return {"urls": [server.url + path], "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


# --- Kinetics-Sounds ---------------------------------------------------------------------------

def test_ks_from_a_cvdf_folder(tmp_path, monkeypatch):
    src = tmp_path / "k400"
    clip = dict(seconds=10.0, fps=4, size=(32, 24), audio_rate=16000)
    write_video(src / "train" / "dribbling_basketball" / "aaaaaaaaaaa_000010_000020.mp4", **clip)
    write_video(src / "train" / "playing_drums" / "b_b-bbbbbbb_000000_000010.mp4", **clip)
    write_video(src / "val" / "ccccccccccc_000030_000040.mp4", **clip)
    write_video(src / "val" / "eeeeeeeeeee_000003_000013.mp4", **{**clip, "audio_rate": None})
    write_video(src / "test" / "ddddddddddd_000007_000017.mp4", **clip)
    (src / "readme.txt").write_text("not a clip")
    train = b"aaaaaaaaaaa_000010_000020,10,4\r\nb_b-bbbbbbb_000000_000010,10,11\r\nmissingclip_000005_000015,10,2\r\n"
    test = b"ddddddddddd_7,10,25\r\n"
    bml = json.dumps({"labels": KS, "database": {
        "aaaaaaaaaaa_000010_000020": {"subset": "training", "label": "dribbling_basketball"},
        "ccccccccccc_30": {"subset": "validation", "label": "bowling"},
        "eeeeeeeeeee_3": {"subset": "validation", "label": "tickling"},
        "ddddddddddd_7": {"subset": "testing", "label": "singing"}}}).encode()
    data = tmp_path / "data"
    with LoopbackServer() as server:
        srcs = {"ogm_my_train": pinned(server, "/t", train), "ogm_my_test": pinned(server, "/s", test),
                "bml_train_val": pinned(server, "/b", bml)}
        monkeypatch.setenv("MMBENCH_MANIFESTS", str(override(tmp_path, "ks", srcs)))
        code, out = cli("prepare", "ks", "--data-dir", str(data))
        assert code == 2 and "k400_train_path.txt" in out and "--source" in out
        code, out = cli("prepare", "ks", "--source", str(src), "--data-dir", str(data), "--workers", "1")
    assert code == 0, out
    rep = json.loads((data / "ks" / "fbank" / "prepare_report.json").read_text())
    assert rep["splits"]["train"] == {"expected": 3, "found": 2, "missing": 1, "corrupt": 0, "stored": 2}
    assert rep["splits"]["val"] == {"expected": 2, "found": 2, "missing": 0, "corrupt": 1, "stored": 1}
    assert rep["corrupt"][0]["reason"] == "no audio track" and rep["missing"][0]["id"] == "missingclip_000005_000015"
    ds = PreparedDataset("ks", "fbank", data)
    assert ds.meta.classes == KS and ds.num_classes == 31
    tr = ds.split("train")
    assert tr.labels.tolist() == [4, 11] and ds.split("val").labels.tolist() == [KS.index("bowling")]
    b = tr.__getitems__([0])
    assert b["audio"].shape == (1, 1, 128, 1024) and b["visual"].shape == (1, 3, 3, 224, 224)
    # OGM-GE's rule on a 10-s clip: the 1-fps frames 0, 3, 6 (4 fps: frames 0, 12, 24)
    levels = [int(round(f.mean())) for f in b["visual"][0]]
    assert levels == pytest.approx([frame_level(0), frame_level(12), frame_level(24)], abs=3)


def test_ks_folder_without_clips_is_refused(tmp_path, monkeypatch):
    src = tmp_path / "videos"
    write_video(src / "holiday.mp4", 1.0, 4, (32, 24))
    lists = tmp_path / "lists"
    lists.mkdir()
    data = tmp_path / "data"
    with LoopbackServer() as server:
        bml = json.dumps({"labels": KS, "database": {}}).encode()
        srcs = {"ogm_my_train": pinned(server, "/t", b"xxxxxxxxxxx_000001_000011,10,0\n"),
                "ogm_my_test": pinned(server, "/s", b"yyyyyyyyyyy_3,10,1\n"), "bml_train_val": pinned(server, "/b", bml)}
        monkeypatch.setenv("MMBENCH_MANIFESTS", str(override(tmp_path, "ks", srcs)))
        code, out = cli("prepare", "ks", "--source", str(src), "--data-dir", str(data))
    assert code == 2 and "none of the 2 Kinetics-Sounds clips" in out and "CVDF layout" in out
    assert not (data / "ks" / "fbank").exists()


# --- AVE ---------------------------------------------------------------------------------------

def ave_zip(tmp: Path, extra: dict[str, bytes] | None = None) -> tuple[Path, dict[str, bytes]]:
    lists = {
        "trainSet.txt": b"Category&VideoID&Quality&StartTime&EndTime\nChurch bell&vid_aaaaaaa&good&0&10\n"
                        b"Bark&vid_bbbbbbb&good&2&8\nBanjo&vid_bbbbbbb&good&8&10\nGoat&vid_ccccccc&good&0&10\n",
        "valSet.txt": b"Cat&vid_ddddddd&good&0&10\n",
        "testSet.txt": b"Bus&vid_eeeeeee&good&0&10\nHorse&vid_aaaaaaa&good&0&10\n",
    }
    arc = tmp / "AVE_Dataset.zip"
    with zipfile.ZipFile(arc, "w") as z:
        for vid in ("aaaaaaa", "bbbbbbb", "ddddddd", "eeeeeee"):
            clip = write_video(tmp / "clips" / f"vid_{vid}.mp4", 10.0, 4, (32, 24), audio_rate=16000)
            z.write(clip, f"AVE_Dataset/AVE/vid_{vid}.mp4")
        for name, data in {**lists, **(extra or {})}.items():
            z.writestr(f"AVE_Dataset/{name}", data)
    return arc, lists


def test_ave_from_the_zip_first_row_label(tmp_path, monkeypatch):
    arc, lists = ave_zip(tmp_path)
    data = tmp_path / "data"
    with LoopbackServer() as server:  # serves nothing: the lists must come from inside the zip
        srcs = {k: {"urls": [f"{server.url}/{k}"], "sha256": hashlib.sha256(lists[f]).hexdigest(), "size": len(lists[f])}
                for k, f in (("train", "trainSet.txt"), ("val", "valSet.txt"), ("test", "testSet.txt"))}
        monkeypatch.setenv("MMBENCH_MANIFESTS", str(override(tmp_path, "ave", srcs)))
        code, out = cli("prepare", "ave", "--data-dir", str(data))
        assert code == 2 and "1FjKwe79e0u96vdjIVwfRQ1V6SoDHe7kK" in out and str(data / "ave" / "raw") in out
        code, out = cli("prepare", "ave", "--source", str(arc), "--data-dir", str(data), "--workers", "1")
        assert server.requests == []
    assert code == 0, out
    ds = PreparedDataset("ave", "fbank", data)
    ids = (ds.root / "train" / "ids.txt").read_text().split()
    assert ids == ["vid_aaaaaaa", "vid_bbbbbbb"]
    assert ds.split("train").labels.tolist() == [AVE.index("Church bell"), AVE.index("Bark")]  # first row wins
    rep = ds.report()
    assert rep["splits"]["train"] == {"expected": 3, "found": 2, "missing": 1, "corrupt": 0, "stored": 2}
    assert any("train&test 1" in n for n in rep["notes"])
    assert (data / "ave" / "raw" / "extracted" / "AVE_Dataset" / "AVE" / "vid_aaaaaaa.mp4").is_file()


def test_ave_zip_with_escaping_path_is_refused(tmp_path):
    arc, _ = ave_zip(tmp_path, {"../../../evil.txt": b"pwned"})
    code, out = cli("prepare", "ave", "--source", str(arc), "--data-dir", str(tmp_path / "data"))
    assert code == 2 and "outside the target folder" in out
    assert not list(tmp_path.rglob("evil.txt"))


# --- AV-MNIST ----------------------------------------------------------------------------------

def fsdd_fixture(tmp: Path) -> tuple[bytes, bytes, dict[str, bytes]]:
    """An FSDD-like archive (2 speakers x 10 digits x index 0-3) and its checksum table."""
    buf = io.BytesIO()
    wavs = {}
    rows = ["name\tsize\tsha256"]
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for d in range(10):
            for spk in ("alice", "bob"):
                for i in range(4):
                    name = f"{d}_{spk}_{i}.wav"
                    w = write_wav(tmp / "rec" / name, 0.3, 8000, freq=300 + 50 * d, seed=i)
                    data = w.read_bytes()
                    wavs[name] = data
                    rows.append(f"{name}\t{len(data)}\t{hashlib.sha256(data).hexdigest()}")
                    info = tarfile.TarInfo(f"free-spoken-digit-dataset-abc/recordings/{name}")
                    info.size = len(data)
                    t.addfile(info, io.BytesIO(data))
    return buf.getvalue(), gzip.compress(("\n".join(rows) + "\n").encode()), wavs


def test_avmnist_downloads_archive_and_idx_and_pairs_by_digit(tmp_path, monkeypatch):
    archive, table, _ = fsdd_fixture(tmp_path)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 8).astype(np.uint8)
    images = rng.integers(0, 256, (80, 28, 28)).astype(np.uint8)
    img_gz = write_idx(tmp_path / "i.gz", images).read_bytes()
    lab_gz = write_idx(tmp_path / "l.gz", labels).read_bytes()
    data = tmp_path / "data"
    with LoopbackServer() as server:
        srcs = {"fsdd_archive": {"urls": [server.url + "/gone.tar.gz", server.url + "/fsdd.tar.gz"]},
                "mnist_images": {**pinned(server, "/mnist/i.gz", img_gz), "content_sha256": hashlib.sha256(gzip.decompress(img_gz)).hexdigest()},
                "mnist_labels": {**pinned(server, "/mnist/l.gz", lab_gz), "content_sha256": hashlib.sha256(gzip.decompress(lab_gz)).hexdigest()}}
        server.files["/fsdd.tar.gz"] = archive
        split = {"fsdd": {"test_index": [0, 0], "val_index": [1, 1], "train_index": [2, 3]}}
        monkeypatch.setenv("MMBENCH_MANIFESTS", str(override(tmp_path, "avmnist", srcs, split, {"fsdd_recordings.tsv.gz": table})))
        code, out = cli("prepare", "avmnist", "--data-dir", str(data), "--workers", "1")
    assert code == 0, out
    ds = PreparedDataset("avmnist", "v2", data)  # the default protocol since the padding fix
    assert ds.meta.splits == {"train": 40, "val": 20, "test": 20}
    assert list(ds.meta.modalities) == ["audio", "visual"]
    assert ds.meta.modalities["visual"].shape == [1, 1, 28, 28]
    assert ds.meta.modalities["visual"].transform_args == {"size": 28, "mean": [0.1307], "std": [0.3081], "augment": False}
    used = []
    for s in ("train", "val", "test"):
        sp = ds.split(s)
        ids = (ds.root / s / "ids.txt").read_text().split()
        b = sp.__getitems__(list(range(len(sp))))
        for k, iid in enumerate(ids):
            wav, img = iid.split("+mnist")
            digit, _, index = wav.split("_")
            assert int(digit) == b["label"][k] == labels[int(img)]
            np.testing.assert_array_equal(b["visual"][k, 0, 0], images[int(img)])
            assert {"train": (2, 3), "val": (1, 1), "test": (0, 0)}[s][0] <= int(index) <= {"train": (2, 3), "val": (1, 1), "test": (0, 0)}[s][1]
            used.append(int(img))
        assert b["audio"].shape[1:] == (1, 40, 100)
    assert len(used) == len(set(used)) == 80  # every image used once
    assert (data / "avmnist" / "raw" / "fsdd" / "free-spoken-digit-dataset-abc" / "recordings" / "0_alice_0.wav").is_file()


def test_avmnist_source_without_mnist_or_with_a_bad_file(tmp_path, monkeypatch):
    _, table, wavs = fsdd_fixture(tmp_path)
    src = tmp_path / "mine"
    for name, data in wavs.items():
        (src / "recordings").mkdir(parents=True, exist_ok=True)
        (src / "recordings" / name).write_bytes(data)
    monkeypatch.setenv("MMBENCH_MANIFESTS", str(override(tmp_path, "avmnist", {}, None, {"fsdd_recordings.tsv.gz": table})))
    code, out = cli("prepare", "avmnist", "--source", str(src), "--data-dir", str(tmp_path / "data"))
    assert code == 2 and "does not hold MNIST t10k-images-idx3-ubyte.gz" in out
    write_idx(src / "mnist" / "t10k-images-idx3-ubyte", np.zeros((10, 28, 28), np.uint8))
    write_idx(src / "mnist" / "t10k-labels-idx1-ubyte.gz", np.arange(10, dtype=np.uint8))
    code, out = cli("prepare", "avmnist", "--source", str(src), "--data-dir", str(tmp_path / "data"))
    assert code == 2 and "checksum mismatch" in out and "t10k-images-idx3-ubyte" in out
