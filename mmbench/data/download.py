"""HTTP downloads that survive real networks: resume, retries, mirrors, parallel files, SHA-256.

Only the standard library (urllib), so acquiring data needs no extra dependency. A file is
written to `<dest>.part` and renamed only after its checksum matched, so a `dest` that exists is
always complete; a cut connection resumes from the `.part` with an HTTP Range request.
"""
from __future__ import annotations

import errno
import hashlib
import http.client
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from mmbench import __version__
from mmbench.errors import UserError

CHUNK = 1 << 20
USER_AGENT = f"mmbench/{__version__}"
PERMANENT_HTTP = {400, 401, 403, 404, 405, 410, 451}


class DownloadError(Exception):
    """A file could not be fetched from any of its URLs; the message says why."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def disk_full(e: OSError, where: Path) -> UserError:
    return UserError(
        f"no space left on the device holding {where}; free some space (or point --data-dir elsewhere) and re-run: "
        "finished files and the existing store are kept, the download or preparation resumes"
    )


@dataclass(frozen=True)
class Job:
    urls: tuple[str, ...]
    dest: Path
    sha256: str | None = None
    size: int | None = None


class _Transient(Exception):
    pass


def _fetch(url: str, part: Path, timeout: float, on_bytes: Callable[[int], None] | None) -> None:
    """Append the rest of `url` to `part` (Range request when part has bytes already)."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:
            return  # nothing left to fetch: the checksum decides whether the part is whole
        if e.code in PERMANENT_HTTP:
            raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
        raise _Transient(f"HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as e:
        raise _Transient(str(getattr(e, "reason", e))) from None
    with resp:
        resumed = have > 0 and resp.status == 206
        length = resp.headers.get("Content-Length")
        expected = int(length) if length is not None else None
        got = 0
        try:
            with open(part, "ab" if resumed else "wb") as f:
                while True:
                    chunk = resp.read(CHUNK)
                    if not chunk:
                        break
                    f.write(chunk)
                    got += len(chunk)
                    if on_bytes:
                        on_bytes(len(chunk))
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise disk_full(e, part) from None
            if isinstance(e, (TimeoutError, ConnectionError)):
                raise _Transient(f"connection lost after {got} bytes: {e}") from None
            raise
        except http.client.HTTPException as e:
            raise _Transient(f"connection lost after {got} bytes: {e!r}") from None
        if expected is not None and got < expected:
            raise _Transient(f"connection cut after {got} of {expected} bytes")


def download(
    urls: str | Sequence[str], dest: Path, sha256: str | None = None, size: int | None = None, *,
    retries: int = 4, timeout: float = 60.0, backoff: float = 0.5, on_bytes: Callable[[int], None] | None = None,
) -> Path:
    """Fetch `dest` from the first URL that works; resume cut transfers; verify size and SHA-256.

    Transient failures (timeouts, resets, 5xx, a cut) are retried with exponential backoff from
    where they stopped; 4xx answers move on to the next mirror. A checksum mismatch discards the
    partial file and tries once more from scratch before giving up.
    """
    url_list = [urls] if isinstance(urls, str) else list(urls)
    dest = Path(dest)
    if dest.is_file() and (sha256 is None or sha256_file(dest) == sha256):
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise disk_full(e, dest) from None
        raise
    part = dest.with_name(dest.name + ".part")
    reasons: list[str] = []
    for url in url_list:
        fresh_retry_used = False
        attempt = 0
        while True:
            try:
                _fetch(url, part, timeout, on_bytes)
            except DownloadError as e:
                reasons.append(str(e))
                break
            except _Transient as e:
                attempt += 1
                if attempt > retries:
                    reasons.append(f"{url}: {e} (gave up after {retries} retries)")
                    break
                time.sleep(backoff * 2 ** (attempt - 1))
                continue
            if not part.exists():
                part.touch()
            bad = _verify(part, sha256, size)
            if bad is None:
                os.replace(part, dest)
                return dest
            part.unlink(missing_ok=True)
            if fresh_retry_used:
                reasons.append(f"{url}: {bad}")
                break
            fresh_retry_used = True
    raise DownloadError(f"could not download {dest.name}: " + "; ".join(reasons))


def _verify(path: Path, sha256: str | None, size: int | None) -> str | None:
    n = path.stat().st_size
    if size is not None and n != size:
        return f"size mismatch: expected {size} bytes, got {n}"
    if sha256 is not None:
        got = sha256_file(path)
        if got != sha256:
            return f"checksum mismatch: expected sha256 {sha256}, got {got}"
    return None


def download_many(
    jobs: Iterable[Job], workers: int = 8, on_done: Callable[[Job, str | None], None] | None = None,
    **kw: float | int,
) -> dict[Path, str]:
    """Download many files over parallel connections; returns {dest: error} for those that failed.

    One failing file does not stop the others (a dataset reports what is missing); running out of
    disk does, since nothing after it could succeed.
    """
    jobs = list(jobs)
    errors: dict[Path, str] = {}
    if not jobs:
        return errors
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futs = {pool.submit(download, j.urls, j.dest, j.sha256, j.size, **kw): j for j in jobs}  # type: ignore[arg-type]
        try:
            for fut in as_completed(futs):
                job = futs[fut]
                err: str | None = None
                try:
                    fut.result()
                except DownloadError as e:
                    err = str(e)
                    errors[job.dest] = err
                if on_done:
                    on_done(job, err)
        except BaseException:
            for f in futs:
                f.cancel()
            raise
    return errors
