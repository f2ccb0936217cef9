"""Downloader and archive safety, against a real HTTP server on 127.0.0.1 (no internet)."""
from __future__ import annotations

import errno
import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from mmbench.data import download as dl
from mmbench.data.archive import members, safe_extract
from mmbench.data.download import DownloadError, Job, download, download_many
from mmbench.data.fixtures import LoopbackServer
from mmbench.errors import UserError

BODY = bytes(range(256)) * 4096  # 1 MiB: several read chunks
SHA = hashlib.sha256(BODY).hexdigest()


@pytest.fixture
def server():
    with LoopbackServer({"/f.bin": BODY, "/g.bin": b"other"}) as s:
        yield s


def test_plain_download_verifies_and_is_idempotent(server, tmp_path):
    dest = download(server.url + "/f.bin", tmp_path / "f.bin", SHA, len(BODY))
    assert dest.read_bytes() == BODY
    n = len(server.requests)
    download(server.url + "/f.bin", dest, SHA)  # present and verified: no request
    assert len(server.requests) == n


def test_resumes_after_a_cut_with_a_range_request(server, tmp_path):
    server.faults["/f.bin"] = ["cut"]
    dest = download(server.url + "/f.bin", tmp_path / "f.bin", SHA, backoff=0.01)
    assert dest.read_bytes() == BODY
    ranges = [r for p, r in server.requests if p == "/f.bin"]
    assert ranges[0] is None and ranges[1] is not None and ranges[1].startswith("bytes=")
    assert int(ranges[1][6:-1]) > 0  # resumed from where the cut left it, not from zero
    assert not (tmp_path / "f.bin.part").exists()


def test_resume_from_a_leftover_part_file(server, tmp_path):
    (tmp_path / "f.bin.part").write_bytes(BODY[:1000])
    download(server.url + "/f.bin", tmp_path / "f.bin", SHA)
    assert server.requests[-1][1] == "bytes=1000-"
    assert (tmp_path / "f.bin").read_bytes() == BODY


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    (tmp_path / "f.bin.part").write_bytes(b"garbage" * 10)
    server.faults["/f.bin"] = ["ignore-range"]
    download(server.url + "/f.bin", tmp_path / "f.bin", SHA)
    assert (tmp_path / "f.bin").read_bytes() == BODY


def test_checksum_mismatch_fails_and_leaves_nothing(server, tmp_path):
    with pytest.raises(DownloadError, match="checksum mismatch"):
        download(server.url + "/g.bin", tmp_path / "g.bin", SHA, backoff=0.01)
    assert not (tmp_path / "g.bin").exists() and not (tmp_path / "g.bin.part").exists()
    assert len([p for p, _ in server.requests if p == "/g.bin"]) == 2  # one fresh retry, then give up


def test_404_is_not_retried_and_mirrors_are_tried(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(server.url + "/nope", tmp_path / "x", backoff=0.01)
    assert len(server.requests) == 1
    dest = download([server.url + "/nope", server.url + "/f.bin"], tmp_path / "y", SHA)
    assert dest.read_bytes() == BODY


def test_transient_500_is_retried(server, tmp_path):
    server.faults["/f.bin"] = ["500", "500"]
    download(server.url + "/f.bin", tmp_path / "f.bin", SHA, backoff=0.01)
    assert len(server.requests) == 3
    server.faults["/g.bin"] = ["500"] * 5
    with pytest.raises(DownloadError, match="gave up after 2 retries"):
        download(server.url + "/g.bin", tmp_path / "g.bin", retries=2, backoff=0.01)


def test_download_many_parallel_reports_failures(server, tmp_path):
    jobs = [Job((server.url + "/f.bin",), tmp_path / f"a{i}.bin", SHA) for i in range(6)]
    jobs.append(Job((server.url + "/missing",), tmp_path / "m.bin"))
    done = []
    errors = download_many(jobs, workers=4, on_done=lambda j, e: done.append(e), backoff=0.01)
    assert list(errors) == [tmp_path / "m.bin"] and "404" in errors[tmp_path / "m.bin"]
    assert len(done) == 7
    assert all((tmp_path / f"a{i}.bin").read_bytes() == BODY for i in range(6))


def test_disk_full_is_a_clear_user_error(server, tmp_path, monkeypatch):
    class Full(io.BytesIO):
        def write(self, b):  # noqa: ANN001
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dl, "open", lambda *a, **k: Full(), raising=False)
    with pytest.raises(UserError, match="no space left"):
        download(server.url + "/f.bin", tmp_path / "f.bin")


# --- archives --------------------------------------------------------------------------------

def _zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return path


@pytest.mark.parametrize("evil", ["../escape.txt", "a/../../escape.txt", "/abs/escape.txt"])
def test_zip_with_escaping_path_is_refused_before_writing(tmp_path, evil):
    arc = _zip(tmp_path / "evil.zip", {"ok.txt": b"fine", evil: b"pwned"})
    target = tmp_path / "out" / "x"
    with pytest.raises(UserError, match="outside the target"):
        safe_extract(arc, target)
    assert not target.exists() and not (tmp_path / "out" / "escape.txt").exists()
    assert not (tmp_path / "escape.txt").exists()


def test_tar_with_symlink_is_refused(tmp_path):
    arc = tmp_path / "l.tar"
    with tarfile.open(arc, "w") as t:
        info = tarfile.TarInfo("link")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        t.addfile(info)
    with pytest.raises(UserError, match="link"):
        members(arc)


def test_safe_extract_zip_and_targz_once(tmp_path):
    arc = _zip(tmp_path / "a.zip", {"top/AVE/v1.mp4": b"1", "top/trainSet.txt": b"x"})
    out = safe_extract(arc, tmp_path / "z")
    assert (out / "top" / "AVE" / "v1.mp4").read_bytes() == b"1"
    (out / "top" / "AVE" / "v1.mp4").write_bytes(b"changed")
    safe_extract(arc, tmp_path / "z")  # already extracted: left alone
    assert (out / "top" / "AVE" / "v1.mp4").read_bytes() == b"changed"
    tgz = tmp_path / "b.tar.gz"
    with tarfile.open(tgz, "w:gz") as t:
        data = b"hello"
        info = tarfile.TarInfo("repo-abc/recordings/0_a_0.wav")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    assert (safe_extract(tgz, tmp_path / "t") / "repo-abc" / "recordings" / "0_a_0.wav").read_bytes() == b"hello"


def test_truncated_archive_is_a_user_error(tmp_path):
    arc = _zip(tmp_path / "a.zip", {"x.bin": bytes(5000)})
    (tmp_path / "cut.zip").write_bytes(arc.read_bytes()[:100])
    with pytest.raises(UserError, match="not a zip or tar|corrupt"):
        safe_extract(tmp_path / "cut.zip", tmp_path / "o")
