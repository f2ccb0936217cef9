"""Paper cuts of the command line met on the first day: help text, flags, --version, `methods`."""
from __future__ import annotations

import re

import pytest

COMMANDS = ["prepare", "sweep", "train", "ingest", "runs", "report", "methods", "datasets", "doctor"]


def _help(cli, *cmd: str) -> str:
    code, out = cli(*cmd, "--help")
    assert code == 0, out
    return out


def test_version(cli):
    from mmbench import __version__

    code, out = cli("--version")
    assert code == 0 and out.strip() == f"mmbench {__version__}"


@pytest.mark.parametrize("cmd", COMMANDS)
def test_flags_show_no_value_type(cli, cmd):
    out = _help(cli, cmd)
    assert "<bool>" not in out


@pytest.mark.parametrize("cmd", COMMANDS)
def test_shared_options_have_help_on_every_command(cli, cmd):
    """--db, --runs-dir, --data-dir, --device: wherever a command takes one, it says what it is."""
    out = _help(cli, cmd)
    for opt, words in (("--db", "SQLAlchemy URL"), ("--runs-dir", "run directories"), ("--data-dir", "prepared datasets"),
                       ("--device", "cuda:N")):
        if re.search(rf"{opt}\b", out):
            line = next(ln for ln in out.splitlines() if re.search(rf"{opt}\b", ln))
            block = out[out.index(line):][:400]
            assert words in " ".join(block.split()), (opt, block)


def test_ci_help_shows_a_plain_percent(cli):
    out = _help(cli, "report")
    assert "95 % confidence" in " ".join(out.split()) and "%%" not in out


def test_methods_say_required_not_pydantic_undefined(cli, monkeypatch):
    from pydantic import Field

    from mmbench.methods.base import METHODS, HParams

    class NeedsK(HParams):
        k: int = Field(description="a required parameter")
        lst: list[int] = Field(default_factory=lambda: [1, 2])

    cls = METHODS.get("joint")
    monkeypatch.setattr(cls, "HParams", NeedsK)
    code, out = cli("methods")
    assert code == 0
    assert "PydanticUndefined" not in out
    assert "k=required" in out and "lst=[1, 2]" in out
    assert "epoch_list=[25, 50," in out  # a default from a factory is shown as its value
