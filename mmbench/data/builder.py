"""The prepare flow shared by the manifest-driven datasets (cremad, ks, ave, avmnist).

    resolve protocol -> up to date? stop -> acquire (download or --source) -> index (split lists,
    found / missing) -> pipeline.build_store (decode, featurize, report)

A dataset module implements only `plan()`: where its files are and how its lists read.
"""
from __future__ import annotations

import os
import shutil
from abc import abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mmbench.data.base import DatasetBuilder, PrepareRequest, PrepareResult
from mmbench.data.download import DownloadError, Job, download, download_many, sha256_file
from mmbench.data.manifest import Manifest, Source, load_manifest
from mmbench.data.pipeline import Plan, build_store, store_params
from mmbench.data.store import intact, is_prepared, load_meta, store_dir
from mmbench.errors import UserError

CONNECTIONS = 8  # parallel HTTP connections for datasets made of many small files
console = Console(stderr=True)


class ManifestProtocols(Mapping[str, str]):
    """`DatasetBuilder.protocols` read lazily from the manifest (name -> one-line description)."""

    def __init__(self, dataset: str) -> None:
        self.dataset = dataset
        self._d: dict[str, str] | None = None

    def _load(self) -> dict[str, str]:
        if self._d is None:
            self._d = load_manifest(self.dataset).descriptions()
        return self._d

    def __getitem__(self, k: str) -> str:
        return self._load()[k]

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())


class ManifestBuilder(DatasetBuilder):
    """Base for datasets described by `data_manifests/<name>.yaml`."""

    @abstractmethod
    def plan(self, man: Manifest, req: PrepareRequest, params: dict[str, Any]) -> Plan:
        """What to decode for this protocol: items per split with their sources and labels."""

    def prepare(self, req: PrepareRequest) -> PrepareResult:
        man = load_manifest(self.name)
        params = man.protocol(req.protocol)
        target = store_dir(self.name, req.protocol, req.data_dir)
        if not req.force and is_prepared(self.name, req.protocol, req.data_dir) and intact(target, console):
            meta = load_meta(self.name, req.protocol, req.data_dir)
            if meta.params == store_params(self.name, req.protocol, params, req.options or None):
                return PrepareResult(target, True, {})
        if req.source is not None and not Path(req.source).exists():
            raise UserError(f"--source {req.source}: no such file or folder")
        plan = self.plan(man, req, params)
        plan.options = dict(req.options)
        plan.local_files = {**({"--source": str(Path(req.source).resolve())} if req.source is not None else {}),
                            **req.used, **plan.local_files}
        return build_store(plan, req.data_dir, req.workers, console)


def raw_dir(req: PrepareRequest, dataset: str) -> Path:
    return Path(req.data_dir) / dataset / "raw"


def downloads_dir(req: PrepareRequest, dataset: str) -> Path:
    return Path(req.data_dir) / dataset / "downloads"


def find_named(roots: list[Path], name: str, depth: int = 2) -> list[Path]:
    """Files called `name` at most `depth` folders below any root (no full recursive walk)."""
    out: list[Path] = []
    for root in roots:
        if root.is_file():
            if root.name == name:
                out.append(root)
            continue
        level = [root]
        for _ in range(depth + 1):
            nxt = []
            for d in level:
                f = d / name
                if f.is_file():
                    out.append(f)
                nxt += subdirs(d)
            level = nxt
    return out


def subdirs(d: Path) -> list[Path]:
    """Sub-folders via scandir's cached entry types: no stat per file in folders of 100k clips."""
    try:
        with os.scandir(d) as it:
            return sorted(Path(e.path) for e in it if e.is_dir() and not e.name.startswith("."))
    except OSError:
        return []


def find_by_content(roots: list[Path], src: Source, depth: int = 2) -> Path | None:
    """A file of `src`'s size and SHA-256 under any root, whatever its name (a split list saved as
    `train.csv`, or by a browser as `list (1).txt`). Sizes are compared first, so only same-size
    files are hashed; media folders full of clips are not descended into."""
    if src.sha256 is None or src.size is None:
        return None
    level = [r for r in roots if r.is_dir()]
    for _ in range(depth + 1):
        nxt = []
        for d in level:
            try:
                with os.scandir(d) as it:
                    entries = list(it)
            except OSError:
                continue
            if len(entries) > 2000:  # a media folder, not where anyone keeps a split list
                continue
            for e in sorted(entries, key=lambda e: e.name):
                if e.name.startswith("."):
                    continue
                if e.is_dir():
                    nxt.append(Path(e.path))
                elif e.is_file() and e.stat().st_size == src.size and sha256_file(Path(e.path)) == src.sha256:
                    return Path(e.path)
        level = nxt
    return None


def fetch_source(src: Source, req: PrepareRequest, dataset: str, search: list[Path] | None = None) -> Path:
    """A pinned file (split list, metadata): from --source (or `search`) first, found by its name or,
    under any name, by its content; else a cached copy; else a download. The local file used is
    recorded in `req.used` for the report."""
    cache = downloads_dir(req, dataset) / src.filename
    roots = [Path(req.source)] if req.source is not None else []
    roots += search or []
    if roots and src.sha256 is not None:
        named = [c for c in find_named(roots, src.filename) if sha256_file(c) == src.sha256]
        found = named[0] if named else find_by_content(roots, src)
        if found is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            if found.resolve() != cache.resolve():
                shutil.copyfile(found, cache)
            req.used[src.filename] = str(found.resolve())
            return cache
    if cache.is_file() and (src.sha256 is None or sha256_file(cache) == src.sha256):
        req.used[src.filename] = str(cache.resolve())
        return cache
    console.print(f"[dim]downloading {src.filename} ({src.urls[0]})[/dim]")
    try:
        got = download(src.urls, cache, src.sha256, src.size)
        req.used[src.filename] = f"{got.resolve()} (downloaded from {src.urls[0]})"
        return got
    except DownloadError as e:
        raise UserError(
            f"{e}. If this machine is offline, put {src.filename} (from {src.urls[0]}"
            f"{', sha256 ' + src.sha256 if src.sha256 else ''}) "
            f"into the --source folder (under any name, up to two folders deep) or into {cache.parent}, and re-run"
        ) from None


def read_text(path: Path) -> str:
    """Split files as text: UTF-8 with or without BOM, CRLF or LF."""
    return path.read_bytes().decode("utf-8-sig").replace("\r\n", "\n").replace("\r", "\n")


def download_files(jobs: list[Job], label: str) -> dict[Path, str]:
    """Many files over `CONNECTIONS` parallel connections, with a progress bar; {dest: error}."""
    todo = [j for j in jobs if not j.dest.is_file()]
    if not todo:
        return {}
    size = sum(j.size or 0 for j in todo)
    desc = f"download {label}" + (f" ({size / 1e9:.2f} GB)" if size else "")
    cols = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*cols, console=console) as prog:
        task = prog.add_task(desc, total=len(todo))
        return download_many(todo, CONNECTIONS, lambda job, err: prog.update(task, advance=1))


def manual_download_error(what: str, steps: list[str]) -> UserError:
    lines = [f"{what} cannot be downloaded automatically. To prepare it:"]
    lines += [f"  {i}. {s}" for i, s in enumerate(steps, 1)]
    return UserError("\n".join(lines))
