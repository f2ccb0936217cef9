"""Out-of-range method parameters are refused by the CLI with exit code 2, before anything runs."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import write_recipe


@pytest.mark.parametrize("entry, needle", [
    ("{name: agm, alpha: -1}", "alpha"),
    ("{name: agm, modulation_starts: 9, modulation_ends: 3}", "modulation_ends"),
    ("{name: ogm_ge, alpha: -0.5}", "alpha"),
    ("{name: ogm_ge, modulation_starts: 5, modulation_ends: 2}", "modulation_ends"),
])
def test_cli_bad_parameters_exit_2(mm_env: Path, cli, entry: str, needle: str) -> None:
    code, out = cli("sweep", write_recipe(mm_env / "r.yaml", methods=f"[{entry}]"), "--dry-run")
    assert code == 2, out
    assert needle in out
    assert not (mm_env / "runs").exists() and not (mm_env / "results.db").exists()
