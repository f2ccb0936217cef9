"""The documentation a new user meets: one page per method, a README that works as written (how to
call mmbench, the CPU-only path at the locked versions, troubleshooting), no references to files
that are not in the repository."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _methods() -> list[str]:
    from mmbench.methods.base import METHODS

    return list(METHODS.names())


@pytest.mark.parametrize("name", _methods())
def test_every_method_has_a_page_linked_from_the_index_and_the_readme(name):
    page = ROOT / "docs" / "methods" / f"{name}.md"
    assert page.is_file(), f"docs/methods/{name}.md is missing"
    text = page.read_text()
    assert f"`{name}`" in text.splitlines()[0]
    assert f"(methods/{name}.md)" in (ROOT / "docs" / "README.md").read_text()
    assert f"(docs/methods/{name}.md)" in README
    if name not in ("joint", "unimodal"):
        assert re.search(r"\b[0-9a-f]{40}\b", text), "the official commit, in full"
        assert "**Deviations.**" in text and "**Conformance.**" in text


def test_no_reference_to_files_outside_the_repository():
    hits = []
    for p in [ROOT / "README.md", *ROOT.glob("docs/**/*.md"), *ROOT.glob("mmbench/**/*.py"), *ROOT.glob("recipes/*.yaml")]:
        if "METHODS.md" in p.read_text():
            hits.append(str(p.relative_to(ROOT)))
    assert not hits


def test_readme_says_how_to_call_mmbench_and_where_to_look_when_it_fails():
    assert ".venv/bin/mmbench" in README and "source .venv/bin/activate" in README
    assert "mmbench doctor" in README and "make lock" in README
    assert "14,884 files" in README and "3 GB" in README
    for term in ("**n**", "**cost**", "**competition strength**", "**imbalance_ratio**"):
        assert term in README


def _locked(name: str) -> str:
    m = re.search(rf"^{name}==(\S+)", (ROOT / "requirements.lock").read_text(), re.M)
    assert m
    return m.group(1)


def test_cpu_only_path_uses_the_locked_versions():
    versions = {n: _locked(n) for n in ("torch", "torchaudio", "torchvision")}
    assert "--index-url https://download.pytorch.org/whl/cpu" in README
    for n, v in versions.items():
        assert f"{n}=={v}" in README, f"README's CPU-only path must install {n}=={v}, the locked version"


def test_cpu_lock_filter_drops_only_the_gpu_packages(tmp_path):
    """The Makefile's `venv-cpu` filter: torch and its CUDA packages out, everything else (with its
    hashes) kept."""
    make = (ROOT / "Makefile").read_text()
    pattern = re.search(r"^GPU_ONLY := (.+)$", make, re.M).group(1)
    out = subprocess.run(["awk", f"/^[^ #]/ {{skip = ($0 ~ /{pattern}/)}} !skip", str(ROOT / "requirements.lock")],
                         capture_output=True, text=True, check=True).stdout
    lock = (ROOT / "requirements.lock").read_text()
    names = lambda t: {ln.split("==")[0] for ln in t.splitlines() if ln and not ln[0].isspace() and "==" in ln}  # noqa: E731
    dropped = names(lock) - names(out)
    assert {"torch", "torchaudio", "torchvision"} <= dropped
    assert all(n in ("torch", "torchaudio", "torchvision", "triton") or n.startswith(("nvidia-", "cuda-")) for n in dropped)
    assert {"numpy", "av", "typer", "scikit-learn"} <= names(out)
    assert out.count("--hash=") + sum(b.count("--hash=") for b in _blocks(lock, dropped)) == lock.count("--hash=")


def _blocks(lock: str, names: set[str]) -> list[str]:
    out, cur, keep = [], [], False
    for ln in lock.splitlines():
        if ln and not ln[0].isspace() and not ln.startswith("#"):
            if keep:
                out.append("\n".join(cur))
            cur, keep = [ln], ln.split("==")[0] in names
        else:
            cur.append(ln)
    if keep:
        out.append("\n".join(cur))
    return out


def test_prepare_help_and_readme_say_every_source_layout(cli):
    from mmbench.data.layouts import SOURCE_LAYOUTS

    code, out = cli("prepare", "--help")
    flat = " ".join(out.split())
    for name, text in SOURCE_LAYOUTS.items():
        assert f"{name}: {text}" in flat or " ".join(f"{name}: {text}".split()) in flat
        table = README[README.index("| dataset | `--source` layout |"):]
        assert f"| `{name}` |" in table.split("\n\n")[0]
