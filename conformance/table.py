#!/usr/bin/env python
"""Rows of docs/conformance.md's table from the comparison reports.

    python conformance/table.py FILE_OR_DIR...

Reads every `*.json` given (or found in a given folder, recursively): the per-method scripts' `--json`
files (conformance/inforeg.py, reconboost.py, ...) and the shared harness's comparison files that
conformance/six.sh writes (`a/cmp_*.json`, `b/*.json`). Prints `case | official commit | steps | max rel |
bitwise?`, the measured columns; the deviations column of the doc is written by hand.
Per-step verdict data only: the harness's teacher-forced mode ("reset" in set A: grads, params, BN buffers;
"forced" in set B); the per-method scripts: every row including diagnostics.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any


SKIP = {"param_update"}  # set B: informational only, not in the harness's verdict


def walk(x: Any, out: list[tuple[float, bool]]) -> None:
    """Every {abs | max_abs, rel} leaf: (rel, bitwise)."""
    if isinstance(x, dict):
        ab = x.get("abs", x.get("max_abs"))
        if isinstance(x.get("rel"), (int, float)) and isinstance(ab, (int, float)):
            bit = x.get("bit", x.get("bitwise", ab == 0 and (x.get("nbit", 0) == x.get("n", 0))))
            out.append((float(x["rel"]), bool(bit)))
        for k, v in x.items():
            if k not in SKIP:
                walk(v, out)
    elif isinstance(x, list):
        for v in x:
            walk(v, out)


def commit_of(path: Path, doc: dict[str, Any]) -> str:
    if doc.get("official_commit"):
        return str(doc["official_commit"])[:12]
    for cand in (path.with_suffix(".md"), path):
        if cand.is_file():
            m = re.search(r"official commit ([0-9a-f]{7,40})|commit[ =:]+([0-9a-f]{12,40})", cand.read_text(errors="ignore"))
            if m:
                return (m.group(1) or m.group(2))[:12]
    return "?"


def row(path: Path) -> str | None:
    doc = json.loads(path.read_text())
    if not isinstance(doc, dict):
        return None
    name = doc.get("method", path.stem)
    part: Any = doc
    steps: Any = "?"
    if isinstance(doc.get("modes"), dict):
        part = doc["modes"].get("reset") or doc["modes"].get("forced") or doc["modes"]
        if isinstance(part, dict) and isinstance(part.get("steps"), list):
            steps = len(part["steps"])
    elif isinstance(doc.get("result"), dict) and isinstance(doc["result"].get("forced"), dict):  # set B
        part = doc["result"]["forced"]
        if isinstance(part.get("steps"), list):
            steps = len(part["steps"])
    if isinstance(doc.get("rows"), list):
        steps = len({r["step"] for r in doc["rows"] if not str(r["step"]).endswith("end")})
        mode = doc.get("mode", "free")
        name = f"{name} ({mode}{', ' + doc['method_cfg'].get('backward', '') if doc.get('method_cfg') else ''})"
    leaves: list[tuple[float, bool]] = []
    # set A: the harness's per-step verdict quantities (grads, params, buffers); its diagnostics table holds
    # explained differences too (e.g. MMPareto's float32 official cosine), reported in the doc's deviations
    walk(part["steps"] if isinstance(part, dict) and isinstance(part.get("steps"), list) else part, leaves)
    if isinstance(part, dict) and not isinstance(part.get("steps"), list):
        pass
    if not leaves:
        return None
    worst = max(r for r, _ in leaves)
    bitwise = all(b for _, b in leaves)
    return f"| {name} | {commit_of(path, doc)} | {steps} | {worst:.1e} | {'yes' if bitwise else 'no'} | {path.name} |"


def main() -> int:
    files: list[Path] = []
    for a in sys.argv[1:]:
        p = Path(a)
        files += sorted(p.rglob("*.json")) if p.is_dir() else [p]
    print("| case | official commit | steps | max rel | bitwise? | report |")
    print("|---|---|---|---|---|---|")
    for f in files:
        try:
            r = row(f)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            r = f"| {f.stem} | ? | ? | unreadable ({e}) | ? | {f.name} |"
        if r:
            print(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
