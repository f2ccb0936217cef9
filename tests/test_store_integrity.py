"""A damaged prepared store is found, named and rebuilt, never read as data (issue 9 §2).

Each test prepares its own copy of synthetic/tiny, damages one file the way a user or a disk would
(delete, truncate, flip a byte, garble meta.json), then checks what `sweep` (cheap check: exit 2
naming the file and `mmbench prepare ... --force`) and `prepare` (full check: rebuild) do.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import write_recipe
from mmbench.data.base import DATASETS, PrepareRequest
from mmbench.data.store import PreparedDataset, verify_store
from mmbench.errors import UserError

FIX = "mmbench prepare synthetic --protocol tiny --force"


def norm(s: str) -> str:
    return " ".join(s.split())


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private synthetic/tiny store with MMBENCH_* pointed at temporary places; returns its folder."""
    data = tmp_path / "data"
    DATASETS.get("synthetic")().prepare(PrepareRequest(data, "tiny"))
    monkeypatch.setenv("MMBENCH_DATA", str(data))
    monkeypatch.setenv("MMBENCH_DB", f"sqlite:///{tmp_path / 'results.db'}")
    monkeypatch.setenv("MMBENCH_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("MMBENCH_DEVICE", "cpu")
    monkeypatch.chdir(tmp_path)
    write_recipe(tmp_path / "r.yaml", name="dmg", epochs=1)
    return data / "synthetic" / "tiny"


def truncate(p: Path, keep: int) -> None:
    with open(p, "r+b") as f:
        f.truncate(keep)


def test_store_records_size_and_checksum_of_every_array(store: Path) -> None:
    meta = json.loads((store / "meta.json").read_text())
    files = meta["files"]
    for split in ("train", "val", "test"):
        for name in ("audio.npy", "visual.npy", "labels.npy", "ids.txt"):
            rec = files[f"{split}/{name}"]
            assert rec["bytes"] == (store / split / name).stat().st_size
            assert len(rec["sha256"]) == 64
    assert verify_store(store, full=True).ok


@pytest.mark.parametrize("damage, needle", [
    (lambda s: (s / "train" / "audio.npy").unlink(), "train/audio.npy is missing"),
    (lambda s: truncate(s / "train" / "audio.npy", 4000), "train/audio.npy is truncated: 4000 bytes"),
    (lambda s: (s / "meta.json").write_text('{"dataset": "synthetic", '), "meta.json is unreadable"),
    (lambda s: truncate(s / "val" / "labels.npy", 5), "val/labels.npy has no readable .npy header"),
    (lambda s: (s / "test" / "ids.txt").write_text("x\n"), "test/ids.txt has 2 bytes"),
])
def test_sweep_names_damaged_file_and_fix(store: Path, cli, damage, needle: str) -> None:
    damage(store)
    for args in (["--dry-run"], []):
        code, out = cli("sweep", "r.yaml", *args)
        assert code == 2, out
        assert needle in norm(out) and FIX in norm(out), out
        assert "Traceback" not in out
    assert not Path("runs").exists()


@pytest.mark.parametrize("damage, needle", [
    (lambda s: (s / "train" / "audio.npy").unlink(), "train/audio.npy is missing"),
    (lambda s: truncate(s / "train" / "visual.npy", 9000), "train/visual.npy is truncated"),
    (lambda s: (s / "meta.json").write_text("{not json"), "meta.json is unreadable"),
])
def test_prepare_rebuilds_a_damaged_store(store: Path, cli, damage, needle: str) -> None:
    before = json.loads((store / "meta.json").read_text())["files"]
    damage(store)
    code, out = cli("prepare", "synthetic", "--protocol", "tiny")
    assert code == 0, out
    assert "damaged store" in out and needle in norm(out) and "already prepared" not in out, out
    assert json.loads((store / "meta.json").read_text())["files"] == before  # deterministic: same bytes again
    code, out = cli("prepare", "synthetic", "--protocol", "tiny")
    assert code == 0 and "already prepared" in out, out


def test_changed_bytes_are_caught_by_prepare_checksum(store: Path, cli) -> None:
    """Same size, other contents: the cheap check cannot see it, prepare's checksum does."""
    p = store / "train" / "audio.npy"
    with open(p, "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x00\xc0\x7f")  # a NaN where a feature was
    assert verify_store(store).ok
    assert not verify_store(store, full=True).ok
    code, out = cli("prepare", "synthetic", "--protocol", "tiny")
    assert code == 0 and "checksum differs" in norm(out) and "already prepared" not in out, out
    assert verify_store(store, full=True).ok


def test_store_without_recorded_checksums_still_loads(store: Path, cli) -> None:
    """Stores prepared before this change have no "files" in meta.json: sizes checked, they load."""
    meta = json.loads((store / "meta.json").read_text())
    del meta["files"]
    (store / "meta.json").write_text(json.dumps(meta))
    res = verify_store(store, full=True)
    assert res.ok and not res.checksums
    code, out = cli("prepare", "synthetic", "--protocol", "tiny")
    assert code == 0 and "already prepared" in out and "before mmbench recorded checksums" in norm(out), out
    code, out = cli("sweep", "r.yaml", "--dry-run")
    assert code == 0, out
    truncate(store / "test" / "audio.npy", 3000)  # headers still tell a truncated file
    code, out = cli("sweep", "r.yaml", "--dry-run")
    assert code == 2 and "test/audio.npy is truncated" in norm(out), out


def test_training_names_a_file_damaged_after_the_check(store: Path) -> None:
    """The last line of defence (a file damaged while a sweep runs): numpy's error plus the file."""
    ds = PreparedDataset("synthetic", "tiny")
    truncate(store / "train" / "audio.npy", 4000)
    split = ds.split("train")
    with pytest.raises(UserError, match=r"train/audio\.npy is damaged .*mmap length.*--force"):
        split.arrays


def test_auto_prepare_into_unwritable_data_dir(tmp_path: Path, mm_env: Path, cli, monkeypatch) -> None:
    """Running as root, chmod does not stop writes: a data dir below a regular file does."""
    blocker = tmp_path / "afile"
    blocker.write_text("")
    monkeypatch.setenv("MMBENCH_DATA", str(blocker / "data"))
    r = write_recipe(tmp_path / "r.yaml", name="ro", epochs=1)
    code, out = cli("sweep", r)
    assert code == 2, out
    assert str(blocker / "data") in out and "--data-dir" in out and "Traceback" not in out


def test_auto_prepare_permission_denied(tmp_path: Path, mm_env: Path, cli, monkeypatch) -> None:
    import mmbench.data.store as store_mod

    def denied(self, final_dir):  # noqa: ANN001
        raise PermissionError(13, "Permission denied", str(final_dir))

    monkeypatch.setenv("MMBENCH_DATA", str(tmp_path / "ro"))
    monkeypatch.setattr(store_mod.StoreWriter, "__init__", denied)
    r = write_recipe(tmp_path / "r.yaml", name="ro", epochs=1)
    code, out = cli("sweep", r)
    assert code == 2, out
    assert "Permission denied" in out and str(tmp_path / "ro") in norm(out) and "--data-dir" in out
    assert "Traceback" not in out
    code, out = cli("prepare", "synthetic", "--protocol", "tiny")
    assert code == 2 and "Permission denied" in out and "--data-dir" in out, out


def test_npy_check_matches_numpy(tmp_path: Path) -> None:
    """The header arithmetic agrees with numpy on a file it wrote (version 1 and 2 headers)."""
    from mmbench.data.store import _npy_problem

    a = np.zeros((3, 2, 5), dtype=np.float32)
    np.save(tmp_path / "a.npy", a)
    assert _npy_problem(tmp_path / "a.npy", 3, [2, 5], "float32") is None
    assert "rows" in _npy_problem(tmp_path / "a.npy", 4, [2, 5], "float32")
    assert "shape" in _npy_problem(tmp_path / "a.npy", 3, [5, 2], "float32")
    with open(tmp_path / "b.npy", "wb") as f:
        np.lib.format.write_array(f, a, version=(2, 0))
    assert _npy_problem(tmp_path / "b.npy", 3, [2, 5], "float32") is None


def test_datasets_lists_a_damaged_store(store: Path, cli) -> None:
    (store / "meta.json").write_text("{")
    code, out = cli("datasets")
    assert code == 0 and "damaged" in out, out
