"""`ave`: the Audio-Visual Event dataset as 28-way clip classification (official split).

The dataset zip is on Google Drive, which needs a browser confirmation, so `prepare` says where
to put it; `--source` takes the zip itself (extracted safely under the data folder) or its
extracted folder. Split lists are the pinned official files (also inside the zip).
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

from mmbench.data.archive import safe_extract
from mmbench.data.base import PrepareRequest, register_dataset
from mmbench.data.builder import (ManifestBuilder, ManifestProtocols, fetch_source, manual_download_error, raw_dir,
                                  read_text)
from mmbench.data.manifest import Manifest
from mmbench.data.pipeline import Item, Plan
from mmbench.errors import UserError

HEADER = "Category&VideoID&Quality&StartTime&EndTime"


def parse_rows(text: str, where: str) -> list[tuple[str, str, int, int]]:
    """`Category&VideoID&Quality&Start&End` rows (the zip's copies start with a header line)."""
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line == HEADER:
            continue
        parts = line.split("&")
        if len(parts) != 5:
            raise UserError(f"{where}:{n}: expected `Category&VideoID&Quality&Start&End`, got {line!r}")
        cat, vid, _, start, end = parts
        rows.append((cat, vid, int(start), int(end)))
    return rows


def one_per_video(rows: list[tuple[str, str, int, int]], rule: str) -> list[tuple[str, str]]:
    """(video id, category), one per video: its first row (`first-row`) or its last (`last-row`)."""
    chosen: dict[str, str] = {}
    for cat, vid, _, _ in rows:
        if rule == "last-row" or vid not in chosen:
            chosen[vid] = cat
    return list(chosen.items())


def unpack(source: Path, work: Path) -> Path:
    """A zip is extracted (safely, once) under the data folder; a folder is used as it is."""
    if source.is_file():
        if not zipfile.is_zipfile(source):
            raise UserError(f"--source {source}: not a zip file (expected AVE_Dataset.zip or its extracted folder)")
        return safe_extract(source, work / "extracted")
    return source


@register_dataset
class AVE(ManifestBuilder):
    """AVE: 28 audio-visual event classes, 10-s YouTube clips, official train/val/test."""

    name = "ave"
    description = "AVE events (28 classes, 3312/401/402 videos), official split, from AVE_Dataset.zip"
    protocols = ManifestProtocols("ave")
    default_protocol = "fbank"

    def plan(self, man: Manifest, req: PrepareRequest, params: dict[str, Any]) -> Plan:
        raw = raw_dir(req, self.name)
        if req.source is not None:
            folder = unpack(Path(req.source), raw)
        else:
            zips = sorted(raw.glob("*.zip")) if raw.is_dir() else []
            if zips:
                folder = unpack(zips[0], raw)
            elif raw.is_dir() and any(raw.iterdir()):
                folder = raw
            else:
                raise self._instructions(man, raw)
        spec = man.raw["splits"][params["split"]]
        classes = man.classes
        videos: dict[str, Path] = {}
        for p in _plain_videos(folder):
            videos.setdefault(p.stem, p)
        items: dict[str, list[Item]] = {}
        missing: dict[str, list[tuple[str, str]]] = {}
        cross: dict[str, set[str]] = {}
        for split in ("train", "val", "test"):
            f = fetch_source(man.source(spec[split]), req, self.name, search=[folder])  # the zip has them too
            rows = parse_rows(read_text(f), f.name)
            unknown = sorted({c for c, *_ in rows} - set(classes))
            if unknown:
                raise UserError(f"{f}: categories not in the manifest's 28 classes: {unknown}")
            items[split], missing[split] = [], []
            cross[split] = set()
            for vid, cat in one_per_video(rows, spec["label_rule"]):
                cross[split].add(vid)
                path = videos.get(vid)
                if path is None:
                    missing[split].append((vid, "not found in the source folder"))
                else:
                    items[split].append(Item(vid, classes.index(cat), audio=path, video=path))
        if not any(items.values()):
            raise UserError(f"{folder}: none of the AVE videos is there ({len(videos)} video files found); "
                            "expected AVE/<video_id>.mp4 from AVE_Dataset.zip")
        notes = [" ".join(spec["description"].split()),
                 f"videos in two splits: train&test {len(cross['train'] & cross['test'])}, "
                 f"train&val {len(cross['train'] & cross['val'])}, val&test {len(cross['val'] & cross['test'])}"]
        sources = [man.source(spec[s]).describe() for s in ("train", "val", "test")]
        sources.append({"key": "videos", "used": str(folder), "drive_id": man.raw["raw"]["google_drive_id"]})
        return Plan(self.name, req.protocol, params, classes, items, missing, sources, notes)

    def _instructions(self, man: Manifest, raw: Path) -> UserError:
        r = man.raw["raw"]
        return manual_download_error("AVE", [
            f"Download {r['filename']} from Google Drive: {r['url']} "
            f"(or: pip install gdown && gdown {r['google_drive_id']}).",
            f"Put the zip into {raw} (or extract it there).",
            f"Run: mmbench prepare ave   (or: mmbench prepare ave --source /path/to/{r['filename']})",
        ])


def _plain_videos(folder: Path) -> list[Path]:
    """AVE names videos `<YouTubeID>.mp4` (no start/end in the name)."""
    return sorted(p for p in folder.rglob("*.mp4") if not p.name.startswith("."))
