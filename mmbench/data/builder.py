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


def fetch_source(src: Source, req: PrepareRequest, dataset: str, search: list[Path] | None = None) -> Path:
    """A pinned file (split list, metadata): cached copy, else a file with the same name and hash in
    --source (or `search`), else a download."""
    cache = downloads_dir(req, dataset) / src.filename
    if cache.is_file() and (src.sha256 is None or sha256_file(cache) == src.sha256):
        return cache
    roots = [Path(req.source)] if req.source is not None else []
    roots += search or []
    if roots and src.sha256 is not None:
        for cand in find_named(roots, src.filename):
            if sha256_file(cand) == src.sha256:
                cache.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(cand, cache)
                return cache
    console.print(f"[dim]downloading {src.filename} ({src.urls[0]})[/dim]")
    try:
        return download(src.urls, cache, src.sha256, src.size)
    except DownloadError as e:
        raise UserError(
            f"{e}. If this machine is offline, put {src.filename} (from {src.urls[0]}"
            f"{', sha256 ' + src.sha256 if src.sha256 else ''}) "
            f"into {cache.parent} or into the --source folder, and re-run"
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
