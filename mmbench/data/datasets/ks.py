"""`ks`: Kinetics-Sounds, 31 classes, from a Kinetics-400 copy you already have (CVDF layout).

There is no Kinetics-Sounds archive and Kinetics-400 is ~450 GB of CVDF tar files, so `prepare`
does not download clips: it says what to download, then indexes your folder. The GeWu-Lab lists
name train clips `<ytid>_<start:06d>_<end:06d>` (CVDF's own names) and val/test clips
`<ytid>_<start>`; both are matched on (YouTube id, start second).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

from mmbench.data.base import PrepareRequest, register_dataset
from mmbench.data.builder import (ManifestBuilder, ManifestProtocols, fetch_source, manual_download_error, raw_dir,
                                  read_text)
from mmbench.data.manifest import Manifest
from mmbench.data.pipeline import Item, Plan
from mmbench.errors import UserError

CVDF = re.compile(r"^(?P<yt>.+)_(?P<start>\d{6})_(?P<end>\d{6})$")
SHORT = re.compile(r"^(?P<yt>.+)_(?P<start>\d+)$")
VIDEO_EXT = (".mp4", ".mkv", ".webm", ".avi")


def clip_key(clip_id: str) -> tuple[str, int] | None:
    """(YouTube id, start second) of a CVDF file stem or a GeWu-Lab list id."""
    m = CVDF.match(clip_id) or SHORT.match(clip_id)
    return (m["yt"], int(m["start"])) if m else None


def parse_ogm_list(text: str, where: str) -> list[tuple[str, int]]:
    """OGM-GE `my_train.txt` / `my_test.txt`: `<clip_id>,10,<label_idx>` per line."""
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        parts = line.split(",")
        if len(parts) != 3 or not parts[2].strip().isdigit():
            raise UserError(f"{where}:{n}: expected `<clip_id>,10,<label_idx>`, got {line!r}")
        rows.append((parts[0].strip(), int(parts[2])))
    return rows


def parse_bml(text: str, where: str, subset: str, classes: list[str]) -> list[tuple[str, int]]:
    """BML's KS_train_val.json: the clips of one subset, labels mapped to `classes` indices."""
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e})") from None
    if list(d.get("labels", [])) != classes:
        raise UserError(f"{where}: its `labels` are not the manifest's 31 classes in order")
    return [(cid, classes.index(v["label"])) for cid, v in d["database"].items() if v["subset"] == subset]


def _walk(root: Path) -> Iterator[os.DirEntry[str]]:
    stack = [str(root)]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=True):
                        if not e.name.startswith("."):
                            stack.append(e.path)
                    elif e.name.lower().endswith(VIDEO_EXT):
                        yield e
        except OSError:
            continue


def index_videos(root: Path) -> dict[tuple[str, int], Path]:
    """(YouTube id, start) -> file, over the whole tree (class sub-folders or not); first path wins."""
    out: dict[tuple[str, int], Path] = {}
    for e in sorted(_walk(root), key=lambda e: e.path):
        key = clip_key(e.name.rsplit(".", 1)[0])
        if key is not None and key not in out:
            out[key] = Path(e.path)
    return out


@register_dataset
class KineticsSounds(ManifestBuilder):
    """Kinetics-Sounds: 31 action classes from Kinetics-400 clips (GeWu-Lab lists + BML validation)."""

    name = "ks"
    description = "Kinetics-Sounds (31 classes, 14799/1320/2597) from your Kinetics-400 copy (CVDF layout)"
    protocols = ManifestProtocols("ks")
    default_protocol = "fbank"

    def plan(self, man: Manifest, req: PrepareRequest, params: dict[str, Any]) -> Plan:
        source = Path(req.source) if req.source is not None else raw_dir(req, self.name)
        if req.source is None and not source.is_dir():
            raise self._instructions(man, source)
        spec = man.raw["splits"][params["split"]]
        classes = man.classes
        rows: dict[str, list[tuple[str, int]]] = {}
        for split in ("train", "val", "test"):
            f = fetch_source(man.source(spec[split]), req, self.name)
            text = read_text(f)
            rows[split] = (parse_bml(text, f.name, "validation", classes) if f.suffix == ".json"
                           else parse_ogm_list(text, f.name))
        videos = index_videos(source) if source.is_dir() else {}
        items: dict[str, list[Item]] = {}
        missing: dict[str, list[tuple[str, str]]] = {}
        for split, rs in rows.items():
            items[split], missing[split] = [], []
            for cid, label in rs:
                key = clip_key(cid)
                path = videos.get(key) if key else None
                if path is None:
                    missing[split].append((cid, "not found in the source folder"))
                else:
                    items[split].append(Item(cid, label, audio=path, video=path))
        if not any(items.values()):
            raise UserError(
                f"{source}: none of the {sum(len(r) for r in rows.values())} Kinetics-Sounds clips is there "
                f"({len(videos)} video files indexed). Expected Kinetics-400 clips named "
                "<youtube_id>_<start:06d>_<end:06d>.mp4 (CVDF layout), with or without class sub-folders"
            )
        sources = [man.source(spec[s]).describe() for s in ("train", "val", "test")]
        sources.append({"key": "videos", "used": str(source), "indexed_files": len(videos)})
        notes = [spec["description"], man.raw["counts"]["note"]]
        return Plan(self.name, req.protocol, params, classes, items, missing, sources, notes)

    def _instructions(self, man: Manifest, where: Path) -> UserError:
        raw = man.raw["raw"]
        return manual_download_error("Kinetics-Sounds", [
            "Download the Kinetics-400 train, val and test tar archives listed in "
            + ", ".join(raw["archive_lists"]) + f" (about 450 GB; see {raw['repository']}, k400_downloader.sh), "
            f"and the replacement archive {raw['replacement']}.",
            f"Extract them into one folder, e.g. {where} (files {raw['layout']}).",
            f"Run: mmbench prepare ks --source {where}  (clips that are not there are reported as missing).",
        ])
