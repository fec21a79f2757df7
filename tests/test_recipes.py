"""Recipes: discovery order, `tune recipes`, extension through defaults, data paths next to a recipe,
and the four shipped recipes compiling as they are (and on the full datasets, where present)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from compiler import recipes
from tests.conftest import clf_rows, write_jsonl

SHIPPED = ("legal", "medical", "finance", "customer_support", "medical_rag")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def flat(text: str) -> str:
    return " ".join(text.replace("│", " ").split())


def plan_json(tmp_path, run="run") -> dict:
    return json.loads((tmp_path / run / "plan.json").read_text())


def team_recipe(root: Path, name: str, body: str, *, rows=300) -> Path:
    """A recipe NAME.yaml in root/, with its own data in root/data/NAME_train.jsonl."""
    write_jsonl(root / "data" / f"{name}_train.jsonl", clf_rows(rows, seed=len(name)))
    path = root / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# @package _global_\n# {name}: a team recipe.\n"
                    f"data:\n  path: data/{name}_train.jsonl\n{body}")
    return path


# ------------------------------------------------------------------------------ tune recipes

def test_list_shows_four_with_descriptions(tune_cli):
    rc, out, err = tune_cli("recipes")
    assert rc == 0, err
    text = flat(out)
    for name in SHIPPED:
        assert name in text
    for _, path, description in recipes.list_recipes():
        assert description and description in text
        assert "\n" not in description
    assert "Legal: classify a contract clause" in text
    assert tune_cli("recipes", "list")[0] == 0


def test_show(tune_cli):
    rc, out, err = tune_cli("recipes", "show", "legal")
    assert rc == 0, err
    assert "# @package _global_" in out and "template:" in out and "{text}" in out
    rc, out, err = tune_cli("recipes", "show", "legl")
    assert rc == 2 and "Did you mean `legal`?" in flat(err)


def test_cp_then_use_the_copy(tune_cli, tmp_path):
    rc, out, err = tune_cli("recipes", "cp", "legal", "recipes")
    assert rc == 0, err
    copy = tmp_path / "recipes" / "legal.yaml"
    assert copy.read_text() == (recipes.INSTALLED_DIR / "legal.yaml").read_text()
    assert (tmp_path / "recipes" / "data" / "legal_train.jsonl").is_file()
    # the copy in ./recipes now shadows the installed one, and finds its copied data
    rc, out, err = tune_cli("plan", "+recipe=legal", "hydra.run.dir=run")
    assert rc == 0, err
    doc = plan_json(tmp_path)
    assert doc["recipe"]["path"] == str(copy)
    assert doc["config"]["data"]["path"] == str(tmp_path / "recipes" / "data" / "legal_train.jsonl")
    # never overwrites
    rc, out, err = tune_cli("recipes", "cp", "legal", "recipes")
    assert rc == 2 and "exists" in err


def test_unknown_subcommand(tune_cli):
    rc, out, err = tune_cli("recipes", "shwo", "legal")
    assert rc == 2 and "Did you mean `show`?" in flat(err)


# ------------------------------------------------------------------------------ discovery

def test_team_recipe_in_cwd(tune_cli, tmp_path):
    team_recipe(tmp_path / "recipes", "contracts", "adapter:\n  rank: 8\n")
    rc, out, err = tune_cli("plan", "+recipe=contracts", "hydra.run.dir=run")
    assert rc == 0, err
    doc = plan_json(tmp_path)
    assert doc["recipe"]["name"] == "contracts"
    assert doc["adapter"]["rank"] == 8
    # data.path relative to the recipe's directory (the cwd has no data/ of that name)
    assert doc["config"]["data"]["path"] == str(tmp_path / "recipes" / "data" / "contracts_train.jsonl")
    assert "contracts" in flat(tune_cli("recipes")[1])


def test_tune_recipe_path(tune_cli, tmp_path, monkeypatch):
    team_recipe(tmp_path / "elsewhere" / "a", "alpha", "")
    team_recipe(tmp_path / "elsewhere" / "b", "beta", "")
    monkeypatch.setenv("TUNE_RECIPE_PATH", f"{tmp_path / 'elsewhere' / 'a'}:elsewhere/b")
    for name in ("alpha", "beta"):
        rc, out, err = tune_cli("plan", f"+recipe={name}", f"hydra.run.dir=run-{name}")
        assert rc == 0, err
        assert plan_json(tmp_path, f"run-{name}")["recipe"]["name"] == name
    text = flat(tune_cli("recipes")[1])
    assert "alpha" in text and "beta" in text


def test_search_order_cwd_first(tune_cli, tmp_path, monkeypatch):
    team_recipe(tmp_path / "recipes", "same", "adapter:\n  rank: 4\n")
    team_recipe(tmp_path / "env", "same", "adapter:\n  rank: 12\n")
    monkeypatch.setenv("TUNE_RECIPE_PATH", str(tmp_path / "env"))
    rc, out, err = tune_cli("plan", "+recipe=same", "hydra.run.dir=run")
    assert rc == 0, err
    assert plan_json(tmp_path)["adapter"]["rank"] == 4


def test_recipe_extending_legal(tune_cli, tmp_path):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "legal_big.yaml").write_text(
        "# @package _global_\n# Legal with a bigger adapter.\ndefaults:\n  - /recipe/legal\n"
        "  - _self_\nadapter:\n  rank: 32\n  alpha: 64\n")
    rc, out, err = tune_cli("plan", "+recipe=legal_big", "hydra.run.dir=run")
    assert rc == 0, err
    doc = plan_json(tmp_path)
    assert doc["adapter"]["rank"] == 32 and doc["adapter"]["alpha"] == 64
    assert doc["config"]["template"]["prompt"] == "Clause: {text}\nCategory:"     # from legal
    # legal's relative data path resolves next to legal.yaml, not next to the extending recipe
    assert doc["config"]["data"]["path"] == str(recipes.INSTALLED_DIR / "data" / "legal_train.jsonl")
    assert [c["name"] for c in doc["recipe"]["chain"]] == ["legal", "legal_big"]
    assert "extends legal" in flat(out)


def test_recipe_without_package_header_is_global(tune_cli, tmp_path):
    write_jsonl(tmp_path / "recipes" / "data" / "x_train.jsonl", clf_rows(300))
    (tmp_path / "recipes" / "bare.yaml").write_text("# bare recipe\ndata:\n  path: data/x_train.jsonl\n"
                                                    "schedule:\n  lr: 1.0e-4\n")
    rc, out, err = tune_cli("plan", "+recipe=bare", "hydra.run.dir=run")
    assert rc == 0, err
    assert plan_json(tmp_path)["config"]["schedule"]["lr"] == 1e-4


def test_data_path_cwd_wins_over_recipe_dir(tune_cli, tmp_path):
    team_recipe(tmp_path / "recipes", "both", "")
    write_jsonl(tmp_path / "data" / "both_train.jsonl", clf_rows(260, seed=9))
    rc, out, err = tune_cli("plan", "+recipe=both", "hydra.run.dir=run")
    assert rc == 0, err
    assert plan_json(tmp_path)["config"]["data"]["path"] == str(tmp_path / "data" / "both_train.jsonl")


def test_recipe_data_missing_names_both_places(tune_cli, tmp_path):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "nodata.yaml").write_text("# @package _global_\n# no data\n"
                                                      "data:\n  path: data/gone.jsonl\n")
    rc, out, err = tune_cli("plan", "+recipe=nodata", "hydra.run.dir=run")
    assert rc == 2 and "Traceback" not in err
    text = flat(err)
    assert str(tmp_path / "data" / "gone.jsonl") in text
    assert str(tmp_path / "recipes" / "data" / "gone.jsonl") in text


def test_recipe_cycle(tune_cli, tmp_path):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "a.yaml").write_text("# @package _global_\ndefaults:\n  - /recipe/b\n  - _self_\n")
    (tmp_path / "recipes" / "b.yaml").write_text("# @package _global_\ndefaults:\n  - /recipe/a\n  - _self_\n")
    rc, out, err = tune_cli("plan", "+recipe=a", "hydra.run.dir=run")
    assert rc == 2 and "extends itself" in err and "Traceback" not in err


# ------------------------------------------------------------------------------ shipped recipes

@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_compiles(tune_cli, tmp_path, name):
    rc, out, err = tune_cli("plan", f"+recipe={name}", "hydra.run.dir=run")
    assert rc == 0, err
    doc = plan_json(tmp_path)
    assert doc["recipe"]["name"] == name
    assert doc["data"]["sizes"]["train"] > 0 and doc["data"]["sizes"]["test"] > 0
    assert doc["template"]["chat"] is True and doc["template"]["system"]
    assert doc["config"]["eval"]["metric"] == "accuracy"
    assert len(doc["template"]["examples"]) == 2
    assert doc["schedule"]["total_steps"] > 0


def test_shipped_recipes_read_top_to_bottom():
    for name in SHIPPED:
        text = (recipes.INSTALLED_DIR / f"{name}.yaml").read_text()
        assert text.startswith("# @package _global_\n")
        order = [text.index(f"\n{section}:") for section in
                 ("data", "template", "adapter", "schedule", "eval")]
        assert order == sorted(order), name
        assert "_target_" not in text and "${" not in text


FULL = {
    "legal": "legal/legalbench_overruling",
    "finance": "financial/twitter_financial_news_sentiment",
    "customer_support": "customer_support/banking77",
    "medical": "medical/pubmedqa_pqal",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FULL))
def test_shipped_recipe_on_the_full_dataset(tune_cli, tmp_path, name):
    folder = SHARED / FULL[name]
    if not (folder / "train.jsonl").is_file():
        pytest.skip(f"{folder} not present")
    rc, out, err = tune_cli("plan", f"+recipe={name}", f"data.path={folder / 'train.jsonl'}",
                            f"data.test_path={folder / 'test.jsonl'}", "hydra.run.dir=run")
    assert rc == 0, err
    doc = plan_json(tmp_path)
    assert doc["data"]["train"]["read"] > 400
    assert doc["data"]["sizes"]["test"] > 100


# ------------------------------------------------------------------------------ a recipe is data

def test_run_dir_may_name_the_time_but_nothing_else(tune_cli, tmp_path, monkeypatch):
    (tmp_path / "recipes").mkdir()
    monkeypatch.setenv("TUNE_SECRET_DIR", "leaked-secret")
    (tmp_path / "recipes" / "env.yaml").write_text(
        "# @package _global_\n# e\ndefaults:\n  - /recipe/legal\n  - _self_\n"
        "hydra:\n  run:\n    dir: runs/${oc.env:TUNE_SECRET_DIR}\n")
    rc, out, err = tune_cli("plan", "+recipe=env")
    assert rc == 2 and "oc.env" in err and "Traceback" not in err
    assert not any(tmp_path.rglob("leaked-secret"))
    (tmp_path / "recipes" / "dated.yaml").write_text(
        "# @package _global_\n# d\ndefaults:\n  - /recipe/legal\n  - _self_\n"
        "hydra:\n  run:\n    dir: runs/${now:%Y}\n")
    rc, out, err = tune_cli("plan", "+recipe=dated")
    assert rc == 0, err
    assert len(list((tmp_path / "runs").glob("*/plan.json"))) == 1


def test_cp_never_writes_outside_dest(tune_cli, tmp_path, monkeypatch):
    team = tmp_path / "team" / "recipes"
    (team / "data").mkdir(parents=True)
    (tmp_path / "team" / "evil.pth").write_text("import os  # would run at Python start-up\n")
    (team / "sneaky.yaml").write_text("# @package _global_\n# s\ndata:\n  path: ../evil.pth\n")
    monkeypatch.setenv("TUNE_RECIPE_PATH", str(team))
    dest = tmp_path / "dest" / "recipes"
    rc, out, err = tune_cli("recipes", "cp", "sneaky", str(dest))
    assert rc == 2 and "leaves the recipe's directory" in " ".join(err.split())
    assert not (tmp_path / "dest" / "evil.pth").exists() and not dest.exists()


def test_a_linked_recipe_is_not_followed(tune_cli, tmp_path):
    (tmp_path / "secret.txt").write_text("# top secret token 1234\nkey: value\n")
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "trap.yaml").symlink_to(tmp_path / "secret.txt")
    rc, out, err = tune_cli("recipes", "show", "trap")
    assert rc == 2 and "outside" in err and "1234" not in out + err
    rc, out, err = tune_cli("recipes")
    assert rc == 0 and "trap" not in out and "1234" not in out
    rc, out, err = tune_cli("plan", "+recipe=trap")
    assert rc == 2 and "1234" not in out + err


def test_recipe_pinning(tune_cli, tmp_path):
    import hashlib

    (tmp_path / "recipes").mkdir()
    recipe = tmp_path / "recipes" / "team.yaml"
    recipe.write_text("# @package _global_\n# t\ndefaults:\n  - /recipe/legal\n  - _self_\n"
                      "adapter:\n  rank: 8\n")
    sha = hashlib.sha256(recipe.read_bytes()).hexdigest()
    rc, out, err = tune_cli("recipes")
    assert rc == 0 and sha[:16] in out
    rc, out, err = tune_cli("plan", "+recipe=team", f"recipe_sha256={sha[:12]}", "hydra.run.dir=a")
    assert rc == 0, err
    chain = json.loads((tmp_path / "a" / "plan.json").read_text())["recipe"]["chain"]
    assert [c["name"] for c in chain] == ["legal", "team"] and chain[-1]["sha256"] == sha
    recipe.write_text(recipe.read_text().replace("rank: 8", "rank: 64"))
    rc, out, err = tune_cli("plan", "+recipe=team", f"recipe_sha256={sha[:12]}", "hydra.run.dir=b")
    assert rc == 2 and "has changed" in err and str(recipe) in err and not (tmp_path / "b").exists()
    rc, out, err = tune_cli("plan", "recipe_sha256=abcdef12", "data.path=x.jsonl")
    assert rc == 2 and "no recipe is chosen" in err


def test_package_header_is_honoured(tune_cli, tmp_path):
    write_jsonl(tmp_path / "data" / "train.jsonl", clf_rows(300))
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "rows.yaml").write_text("# @package data\n# rows\nmax_rows: 120\n")
    rc, out, err = tune_cli("plan", "+recipe=rows", "data.path=data/train.jsonl", "hydra.run.dir=a")
    assert rc == 0, err
    assert plan_json(tmp_path, "a")["config"]["data"]["max_rows"] == 120
    (tmp_path / "recipes" / "odd.yaml").write_text("# @package _group_\n# o\nmax_rows: 1\n")
    rc, out, err = tune_cli("plan", "+recipe=odd", "data.path=data/train.jsonl", "hydra.run.dir=b")
    assert rc == 2 and "@package _group_" in err and "not a section" in " ".join(err.split())
