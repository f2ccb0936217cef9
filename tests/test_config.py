"""Recipe schema, grid expansion, run ids and --set overrides."""
from __future__ import annotations

from pathlib import Path

import pytest

from mmbench.config import expand, load_recipe, parse_set, run_id
from mmbench.errors import UserError


def recipe(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


GOOD = """
name: g
dataset: {name: synthetic, protocol: tiny}
model: {backbone: tiny, fusion: concat}
train: {epochs: 3, optimizer: {name: adam, lr: 0.001}}
methods: [joint, {name: unimodal, modality: visual}]
seeds: [0, 1, 2]
grid: {model.fusion: [concat, sum], train.optimizer.lr: [0.1, 0.01]}
"""


def test_good_recipe_expands_grid_methods_seeds(tmp_path: Path) -> None:
    rec, _ = load_recipe(recipe(tmp_path, GOOD))
    runs = expand(rec)
    # joint: 2 fusions x 2 lrs x 3 seeds; unimodal ignores fusion (canonical concat): 2 lrs x 3 seeds
    assert len(runs) == 12 + 6
    assert len({run_id(r) for r in runs}) == len(runs)
    j = [r for r in runs if r["method"]["name"] == "joint"]
    assert {r["model"]["fusion"] for r in j} == {"concat", "sum"}
    assert {r["train"]["optimizer"]["lr"] for r in j} == {0.1, 0.01}
    # defaults are filled in: a resolved run is the whole config
    assert j[0]["train"]["selection"] == "best-val" and j[0]["train"]["precision"] == "fp32"
    assert j[0]["train"]["optimizer"]["name"] == "adam"


def test_run_id_is_stable_and_sensitive(tmp_path: Path) -> None:
    rec, _ = load_recipe(recipe(tmp_path, GOOD))
    a = expand(rec)
    b = expand(load_recipe(recipe(tmp_path, GOOD))[0])
    assert [run_id(r) for r in a] == [run_id(r) for r in b]
    r = dict(a[0])
    assert run_id(dict(reversed(list(r.items())))) == run_id(r)  # key order does not matter
    assert run_id({**r, "seed": 99}) != run_id(r)
    # the recipe's name is not part of a run: the same run in two sweeps is one run
    rec2, _ = load_recipe(recipe(tmp_path, GOOD.replace("name: g", "name: other")))
    assert run_id(expand(rec2)[0]) == run_id(a[0])
    # a pinned value: run ids must not drift between releases silently
    assert len(run_id(r)) == 12 and all(c in "0123456789abcdef" for c in run_id(r))


@pytest.mark.parametrize(
    "text, needle",
    [
        (GOOD.replace("epochs: 3", "epochs: 3, epoch: 4"), "train.epoch: unknown key"),
        (GOOD.replace("epochs: 3", "epochs: three"), "train.epochs"),
        (GOOD.replace("[joint,", "[jiont,"), "unknown method 'jiont'"),
        (GOOD.replace("modality: visual", "modality: visual, alpha: 1"), "alpha: unknown parameter"),
        (GOOD.replace("name: synthetic", "name: nosuch"), "unknown dataset 'nosuch'"),
        (GOOD.replace("protocol: tiny", "protocol: huge"), "unknown protocol 'huge'"),
        (GOOD.replace("[concat, sum]", "[concat, weird]"), "unknown fusion 'weird'"),
        (GOOD.replace("selection: best-val", "") + "\n", None),
        (GOOD.replace("name: adam", "name: lbfgs"), "train.optimizer.name"),
        (GOOD.replace("seeds: [0, 1, 2]", "seeds: [0, 0]"), "seeds must be distinct"),
    ],
)
def test_bad_recipes_name_the_key(tmp_path: Path, text: str, needle: str | None) -> None:
    p = recipe(tmp_path, text)
    if needle is None:
        expand(load_recipe(p)[0])
        return
    with pytest.raises(UserError) as e:
        expand(load_recipe(p)[0])
    assert needle in str(e.value)
    assert str(p) in str(e.value)


def test_set_overrides_parse_yaml(tmp_path: Path) -> None:
    assert parse_set(["train.epochs=2", "seeds=[0,1]", "model.fusion=sum"]) == {
        "train.epochs": 2, "seeds": [0, 1], "model.fusion": "sum"}
    rec, _ = load_recipe(recipe(tmp_path, GOOD), ["seeds=[5]", "grid={}", "methods=[joint]"])
    runs = expand(rec)
    assert len(runs) == 1 and runs[0]["seed"] == 5
    with pytest.raises(UserError, match="key=value"):
        parse_set(["train.epochs"])


def test_missing_recipe_file_and_non_mapping(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="mapping"):
        load_recipe(recipe(tmp_path, "- a\n- b\n"))
