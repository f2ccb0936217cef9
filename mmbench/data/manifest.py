"""Dataset manifests: the facts a preparer relies on, kept as data (`data_manifests/<dataset>.yaml`).

A manifest pins every source (URL at a fixed commit, SHA-256, size), the class order, the canonical
counts and each protocol's full parameter set, so a reader can audit a protocol without reading
code and two machines prepare byte-identical inputs. `MMBENCH_MANIFESTS` points at another folder
(a mirror of the sources, or a test's loopback server) per dataset, without touching the package.
"""
from __future__ import annotations

import copy
import gzip
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmbench.errors import UserError


def manifest_dirs() -> list[Path]:
    """Where manifests are looked up, first match wins: $MMBENCH_MANIFESTS (a mirror of the sources,
    a test's loopback server; per dataset, so it may hold just one), the checkout's
    `data_manifests/`, the installed copy."""
    out = []
    env = os.environ.get("MMBENCH_MANIFESTS")
    if env:
        out.append(Path(env).expanduser())
    out.append(Path(__file__).resolve().parents[2] / "data_manifests")
    out.append(Path(sys.prefix) / "share" / "mmbench" / "data_manifests")
    return out


def manifests_dir() -> Path:
    """The package's own manifests (not an override)."""
    for d in manifest_dirs()[1 if os.environ.get("MMBENCH_MANIFESTS") else 0:]:
        if d.is_dir():
            return d
    raise UserError("cannot find the dataset manifests (data_manifests/); set MMBENCH_MANIFESTS to their folder")


@dataclass(frozen=True)
class Source:
    """One pinned file: where it comes from and what it must hash to."""

    key: str
    filename: str
    urls: tuple[str, ...]
    sha256: str | None  # None only where the bytes are not stable (GitHub archives): contents are checked instead
    size: int | None = None
    commit: str | None = None
    content_sha256: str | None = None  # of the decompressed bytes, for .gz files re-compressed by mirrors
    note: str = ""

    def describe(self) -> dict[str, Any]:
        d = {"key": self.key, "filename": self.filename, "url": self.urls[0], "sha256": self.sha256}
        if self.commit:
            d["commit"] = self.commit
        return d


@dataclass
class Manifest:
    name: str
    raw: dict[str, Any]
    path: Path
    sources: dict[str, Source] = field(default_factory=dict)

    @property
    def classes(self) -> list[str]:
        return list(self.raw["classes"])

    def source(self, key: str) -> Source:
        if key not in self.sources:
            raise UserError(f"{self.path}: no source '{key}'")
        return self.sources[key]

    def protocol(self, name: str) -> dict[str, Any]:
        """A protocol's parameters with `extends` resolved (the parent's, deep-merged with its own)."""
        protos = self.raw.get("protocols", {})
        if name not in protos:
            raise UserError(f"unknown protocol '{name}' for dataset '{self.name}'; choose one of: {', '.join(protos)}")
        chain: list[str] = []
        cur: str | None = name
        while cur is not None:
            if cur in chain or cur not in protos:
                raise UserError(f"{self.path}: protocol '{name}': bad `extends` chain {chain + [str(cur)]}")
            chain.append(cur)
            cur = protos[cur].get("extends")
        out: dict[str, Any] = {}
        for p in reversed(chain):
            out = _deep_merge(out, {k: v for k, v in protos[p].items() if k != "extends"})
        return out

    def descriptions(self) -> dict[str, str]:
        return {k: str(v.get("description", "")) for k, v in self.raw.get("protocols", {}).items()}

    def table_path(self, key: str) -> Path:
        """A checksum table named in the manifest (`tables: {key: file}`), beside the manifest."""
        tables = self.raw.get("tables", {})
        if key not in tables:
            raise UserError(f"{self.path}: no checksum table '{key}'")
        return self.path.parent / tables[key]


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def load_manifest(name: str) -> Manifest:
    found = [d / f"{name}.yaml" for d in manifest_dirs() if (d / f"{name}.yaml").is_file()]
    if not found:
        raise UserError(f"no manifest for dataset '{name}' (looked for {name}.yaml in: "
                        f"{', '.join(map(str, manifest_dirs()))})")
    path = found[0]
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {e}") from None
    m = Manifest(name=name, raw=raw, path=path)
    for key, s in (raw.get("sources") or {}).items():
        urls = s.get("urls") or [s["url"]]
        m.sources[key] = Source(
            key=key, filename=s.get("filename") or Path(urls[0]).name, urls=tuple(urls),
            sha256=s["sha256"].lower() if s.get("sha256") else None,
            size=s.get("size"), commit=s.get("commit"), content_sha256=s.get("content_sha256"), note=s.get("note", ""),
        )
    return m


def load_table(path: Path) -> dict[str, list[str]]:
    """A (gzipped) TSV with a header; returns first column -> the other columns."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:  # type: ignore[operator]
        lines = f.read().splitlines()
    return {parts[0]: parts[1:] for parts in (ln.split("\t") for ln in lines[1:] if ln)}
