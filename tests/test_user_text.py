"""User text in and out (issue 9 §2, §3): grid keys that name no parameter, user text read as rich
markup, credentials in messages and stored rows, report/plot outputs that cannot be written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlmodel import Session, select

from conftest import write_recipe
from mmbench.config import expand, load_recipe
from mmbench.errors import UserError
from mmbench.redact import mask_credentials


def norm(s: str) -> str:
    return " ".join(s.split())


# ----- grid keys ------------------------------------------------------------------------------
def test_grid_key_typo_is_exit_2_naming_valid_keys(mm_env: Path, cli) -> None:
    r = write_recipe(mm_env / "r.yaml", methods="[ogm_ge]", extra="grid: {method.alhpa: [0.5, 0.8]}\n")
    code, out = cli("sweep", r, "--dry-run")
    assert code == 2, out
    o = norm(out)
    assert "grid key 'method.alhpa' is not a parameter of any method in this recipe (ogm_ge)" in o
    assert "method.alpha" in o and "Traceback" not in out


@pytest.mark.parametrize("grid, needle", [
    ("{train.epoch: [1, 2]}", "train.epoch: unknown key"),
    ("{optimizer.lr: [0.1]}", "grid key 'optimizer.lr' must start with dataset., model., train., metrics. or method."),
    ("{method.alpha.x: [1]}", "alpha"),
])
def test_other_grid_key_typos_already_exit_2(mm_env: Path, cli, grid: str, needle: str) -> None:
    r = write_recipe(mm_env / "r.yaml", methods="[ogm_ge]", extra=f"grid: {grid}\n")
    code, out = cli("sweep", r, "--dry-run")
    assert code == 2 and needle in norm(out) and "Traceback" not in out, out


def test_grid_key_applies_to_the_methods_that_declare_it(tmp_path: Path) -> None:
    r = write_recipe(tmp_path / "r.yaml", methods="[joint, ogm_ge]", extra="grid: {method.alpha: [0.5, 0.8]}\n")
    rec, _ = load_recipe(r)
    runs = expand(rec)
    assert sorted((c["method"]["name"], c["method"].get("alpha")) for c in runs) == [
        ("joint", None), ("ogm_ge", 0.5), ("ogm_ge", 0.8)]
    with pytest.raises(UserError, match="grid key 'method.name'"):
        expand(load_recipe(r, ["grid={method.name: [joint, agm]}"])[0])


# ----- rich markup ----------------------------------------------------------------------------
def test_yaml_error_keeps_brackets_and_caret(mm_env: Path, cli) -> None:
    (mm_env / "bad.yaml").write_text("name: x\nmethods: [joint\nseeds: [0]\n")
    code, out = cli("sweep", "bad.yaml", "--dry-run")
    assert code == 2, out
    assert "methods: [joint" in out and "^" in out, out


def test_train_suggestion_prints_its_brackets(mm_env: Path, cli) -> None:
    r = write_recipe(mm_env / "r.yaml", seeds="[0, 1]")
    code, out = cli("train", r)
    assert code == 2, out
    assert "--set methods=[joint] --set seeds=[0]" in out, out


@pytest.mark.parametrize("args, needle", [
    (["sweep", "missing[/x].yaml"], "recipe not found: missing[/x].yaml"),
    (["sweep", "r.yaml", "--set", "[/x]"], "--set '[/x]': expected key=value"),
    (["sweep", "r.yaml", "--set", "model.fusion=a[/x]"], "unknown fusion 'a[/x]'"),
    (["sweep", "r.yaml", "--set", "methods=[{name: '[/x]'}]"], "unknown method '[/x]'"),
    (["report", "--format", "[/x]"], "--format [/x]: choose one of"),
])
def test_markup_in_user_text_never_crashes(mm_env: Path, cli, args: list[str], needle: str) -> None:
    write_recipe(mm_env / "r.yaml")
    code, out = cli(*args)
    assert code == 2, out
    assert needle in out and "MarkupError" not in out and "Traceback" not in out, out


# ----- credentials ----------------------------------------------------------------------------
def test_mask_credentials() -> None:
    assert mask_credentials("postgresql://user:secret@host/db") == "postgresql://user:***@host/db"
    assert mask_credentials("x postgresql+psycopg://u:p%40ss@h:5432/d?a=1 y") == "x postgresql+psycopg://u:***@h:5432/d?a=1 y"
    assert mask_credentials("host=h password=abc user=u") == "host=h password=*** user=u"
    for keep in ("sqlite:///results.db", "mysql://u@h/db", "see http://example.org:8080/x"):
        assert mask_credentials(keep) == keep


def test_database_password_never_printed(mm_env: Path, cli) -> None:
    r = write_recipe(mm_env / "r.yaml")
    for url in ("postgresql://mmbench:hunter2@127.0.0.1:1/results", "nosuchdialect://mmbench:hunter2@h/db"):
        code, out = cli("sweep", r, "--db", url)
        assert code == 2, out
        assert "hunter2" not in out and "mmbench:***@" in out, out
        code, out = cli("runs", "--db", url)
        assert code == 2 and "hunter2" not in out, out


def test_stored_rows_mask_credentials(tmp_path: Path) -> None:
    from mmbench.engine.run import run_row
    from mmbench.store import db
    from mmbench.store.tables import Run, Sweep

    engine = db.get_engine(f"sqlite:///{tmp_path / 'r.db'}")
    secret = "postgresql://u:hunter2@h/db"
    cfg = {"dataset": {"name": "synthetic", "protocol": "tiny"}, "model": {"backbone": "tiny", "fusion": "concat"},
           "method": {"name": "joint"}, "train": {"selection": "best-val", "epochs": 1}, "seed": 0, "note": secret}
    db.upsert_sweep(engine, Sweep(id="s1", name="n", recipe_path=secret, recipe_sha256="0", created_at=db.now(),
                                  mmbench_version="0", overrides_json=json.dumps([f"x={secret}"])))
    db.register_runs(engine, "s1", [run_row(cfg, "r1")])
    db.set_status(engine, "r1", "failed", error=f"cannot reach {secret}")
    db.write_results(engine, "r1", [], {}, {"env_json": json.dumps({"MMBENCH_DB": secret})}, status="failed")
    with Session(engine) as s:
        rows = [*s.exec(select(Sweep)).all(), *s.exec(select(Run)).all()]
    text = " ".join(json.dumps(r.model_dump(mode="json")) for r in rows)
    assert "hunter2" not in text and text.count("u:***@h/db") == 5


# ----- report outputs -------------------------------------------------------------------------
def test_report_outputs_that_cannot_be_written(mm_env: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    code, out = cli("report", "--plot", "bar", "--output", "fig.txt")  # checked before the database is read
    assert code == 2 and "fig.txt" in out and ".png" in out and "Traceback" not in out, out
    r = write_recipe(mm_env / "r.yaml", name="a[/x]", epochs=1)
    code, out = cli("sweep", r)
    assert code == 0 and "a[/x]" in out, out
    blocker = mm_env / "afile"
    blocker.write_text("")
    for args in (["report", "--format", "csv"], ["report"], ["report", "--plot", "bar"], ["report", "--plot", "curves"]):
        target = blocker / "out" / ("f.png" if "--plot" in args else "t.txt")
        code, out = cli(*args, "--output", str(target))
        assert code == 2, (args, out)
        assert str(blocker) in norm(out) and "--output" in out and "Traceback" not in out, (args, out)

    def denied(self, *a, **k):  # noqa: ANN001 - a read-only file system as root: the writer refuses
        raise PermissionError(13, "Permission denied", str(self))

    write_text = Path.write_text
    monkeypatch.setattr(Path, "write_text", denied)
    code, out = cli("report", "--format", "markdown", "--output", "ro.md")
    assert code == 2 and "ro.md" in out and "Permission denied" in out and "Traceback" not in out, out
    monkeypatch.setattr(Path, "write_text", write_text)
    code, out = cli("runs", "--sweep", "a[/x]")
    assert code == 0 and "runs of sweep a[/x]" in out, out
