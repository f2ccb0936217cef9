"""At 80 columns `report`, `runs`, `datasets` and a sweep's progress stay readable: nothing runs off
the line, and rows that differ (the two unimodal references) read differently."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_cli, write_recipe

METHODS = ("[joint, {name: unimodal, modality: audio}, {name: unimodal, modality: visual}, "
           "{name: ogm_ge, alpha: 0.5, modulation_starts: 0, modulation_ends: 0}]")


@pytest.fixture
def narrow(capsys, monkeypatch):
    from rich.console import Console

    import mmbench.cli as c

    def run(*args: str) -> tuple[int, str]:
        capsys.readouterr()
        # consoles of an 80-column terminal (the module's own read COLUMNS once, at import)
        monkeypatch.setattr(c, "console", Console(width=80))
        monkeypatch.setattr(c, "err_console", Console(stderr=True, width=80))
        code = run_cli(monkeypatch, *args)
        out = capsys.readouterr()
        return code, out.out + out.err

    return run


@pytest.fixture
def swept(mm_env: Path, narrow):
    r = write_recipe(mm_env / "r.yaml", epochs=1, methods=METHODS, seeds="[0, 1]")
    code, out = narrow("sweep", r, "--set", "train.eval_train=false")
    assert code == 0, out
    return out


def _fits(out: str, width: int = 80) -> None:
    long = [ln for ln in out.splitlines() if len(ln) > width]
    assert not long, "\n".join(long)


def test_sweep_output_fits(swept):
    _fits(swept)
    assert "ogm_ge(alpha=0.5,modulation_ends=0) s0" in swept  # only the non-default parameters


def test_report_fits_and_tells_the_unimodal_rows_apart(swept, narrow):
    code, out = narrow("report")
    assert code == 0, out
    _fits(out)
    assert "modality=audio" in out and "modality=visual" in out
    assert "not shown at this width: macro_f1" in " ".join(out.split())
    code, out = narrow("report", "--metric", "macro_f1", "--metric", "acc/*")  # asked for: never dropped
    assert code == 0 and "macro" in out


def test_runs_fits(swept, narrow):
    code, out = narrow("runs")
    assert code == 0, out
    _fits(out)
    assert "unimodal(modality=audio)" in out and "unimodal(modality=visual)" in out


def test_datasets_fits(mm_env: Path, narrow):
    code, out = narrow("datasets")
    assert code == 0, out
    _fits(out)
    assert "synthetic/tiny" in out


def test_wide_terminal_keeps_the_full_table(swept, capsys, monkeypatch):
    from rich.console import Console

    import mmbench.cli as c

    monkeypatch.setattr(c, "console", Console(width=250))
    capsys.readouterr()
    code = run_cli(monkeypatch, "report")
    out = capsys.readouterr().out
    assert code == 0 and "macro_f1 (%)" in out and "setting" in out
