"""Safe archive extraction: nothing an archive names may land outside the target folder.

Archives from the web can carry `../` paths, absolute paths or links that point elsewhere
("zip slip"); one such member makes the whole archive refused, before anything is written.
Extraction goes to a sibling staging folder renamed into place at the end, so an interrupted
extraction is simply redone and a finished one is never half-overwritten.
"""
from __future__ import annotations

import errno
import os
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from mmbench.data.download import disk_full
from mmbench.errors import UserError


def _check_name(archive: Path, name: str) -> None:
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in p.parts:
        raise UserError(f"{archive}: refusing to extract: member '{name}' would be written outside the target folder")


def members(archive: Path) -> list[str]:
    """Names of the regular files in a zip or tar archive (validated, nothing extracted)."""
    archive = Path(archive)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            infos = z.infolist()
            for i in infos:
                _check_name(archive, i.filename)
                if stat.S_ISLNK(i.external_attr >> 16):
                    raise UserError(f"{archive}: refusing to extract: member '{i.filename}' is a symbolic link")
            return [i.filename for i in infos if not i.is_dir()]
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as t:
            out = []
            for m in t.getmembers():
                _check_name(archive, m.name)
                if m.issym() or m.islnk() or m.isdev():
                    raise UserError(f"{archive}: refusing to extract: member '{m.name}' is a link or device")
                if m.isfile():
                    out.append(m.name)
            return out
    raise UserError(f"{archive}: not a zip or tar archive (or it is truncated); download it again")


def safe_extract(archive: Path, target: Path) -> Path:
    """Extract `archive` into `target` (created); returns `target`. Idempotent via a done-marker."""
    archive, target = Path(archive), Path(target)
    marker = target / ".extracted"
    if marker.is_file() and marker.read_text().strip() == f"{archive.name} {archive.stat().st_size}":
        return target
    members(archive)  # validates every name before writing anything
    staging = target.with_name(f".{target.name}.extracting")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    root = staging.resolve()
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                for info in z.infolist():
                    dest = (staging / info.filename).resolve()
                    if root not in dest.parents and dest != root:
                        raise UserError(f"{archive}: refusing to extract: '{info.filename}' resolves outside the target")
                    if info.is_dir():
                        dest.mkdir(parents=True, exist_ok=True)
                        continue
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with z.open(info) as src, open(dest, "wb") as out:
                        shutil.copyfileobj(src, out, 1 << 20)
        else:
            with tarfile.open(archive) as t:
                t.extractall(staging, filter="data")
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise disk_full(e, target) from None
        raise
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(f"{archive}: corrupt or truncated archive ({e}); download it again") from None
    (staging / ".extracted").write_text(f"{archive.name} {archive.stat().st_size}\n")
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    return target
