"""A shared recipe cannot reach Hydra's own config: every spelling that would put a recipe's keys
under `hydra` (a `# @package` header, a defaults entry's package, `_global_`, a pulled-in file,
plain `hydra:` keys) is refused with exit 2 naming the file, line and key — before Hydra configures
logging, creates a directory or runs a callback. Each case is a recipe in a temporary directory,
reached through ./recipes, TUNE_RECIPE_PATH or `hydra.searchpath=`, run through `tune plan`,
`tune +recipe=...`, `tune -m` and `tune lr-find`; the file its logging handler names must not exist
afterwards."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from compiler import safety

LOGGING = ("version: 1\nformatters: {{simple: {{format: '%(message)s'}}}}\n"
           "handlers: {{x: {{class: logging.FileHandler, filename: {target}, formatter: simple}}}}\n"
           "root: {{handlers: [x], level: INFO}}\n")


def logging_body(target: Path) -> str:
    return LOGGING.format(target=target)


def nested(prefix: str, body: str) -> str:
    """`body` (a YAML mapping) indented under the dotted `prefix` keys."""
    out, depth = [], 0
    for part in prefix.split("."):
        out.append("  " * depth + f"{part}:")
        depth += 1
    out += ["  " * depth + line for line in body.splitlines()]
    return "\n".join(out) + "\n"


# name -> (files {name: text}, needles in the message, the file:line it must name)
def cases(target: Path) -> dict:
    log = logging_body(target)
    extend = "defaults:\n  - legal\n  - {entry}\n"
    return {
        "header in the recipe": (
            {"evil": "# @package hydra.job_logging\n" + log}, ["@package hydra.job_logging"],
            ("evil", 1)),
        "header in a pulled-in file": (
            {"evil": "defaults:\n  - legal\n  - /recipe/style\n",
             "style": "# @package _global_.hydra.job_logging\n" + log},
            ["@package _global_.hydra.job_logging"], ("style", 1)),
        "defaults package hydra.job_logging": (
            {"evil": extend.format(entry="/recipe@hydra.job_logging: style"), "style": log},
            ["`/recipe@hydra.job_logging`", "Hydra's own settings"], ("evil", 3)),
        "defaults package hydra": (
            {"evil": extend.format(entry="/recipe@hydra: style"),
             "style": nested("job_logging", log)}, ["`/recipe@hydra`"], ("evil", 3)),
        "defaults package _global_.hydra": (
            {"evil": extend.format(entry="/recipe@_global_.hydra.job_logging: style"),
             "style": log}, ["@_global_.hydra.job_logging"], ("evil", 3)),
        "defaults package after a later _global_": (
            {"evil": extend.format(entry="/recipe@team._global_.hydra.job_logging: style"),
             "style": log}, ["@team._global_.hydra.job_logging"], ("evil", 3)),
        "defaults config path with a package": (
            {"evil": extend.format(entry="style@hydra.job_logging"), "style": log},
            ["`style@hydra.job_logging`"], ("evil", 3)),
        "optional override entry": (
            {"evil": extend.format(entry="optional /recipe@hydra.job_logging: style"),
             "style": log}, ["`optional /recipe@hydra.job_logging`"], ("evil", 3)),
        "handler filename": (
            {"evil": "defaults:\n  - legal\n  - _self_\n"
                     + nested("hydra.job_logging.handlers.x", f"filename: {target}")},
             ["hydra.job_logging", "a recipe may set only"], ("evil", 5)),
        "callbacks": (
            {"evil": "defaults:\n  - legal\n  - _self_\n"
                     + nested("hydra.callbacks.x", "foo: 1")}, ["hydra.callbacks"], ("evil", 5)),
        "searchpath": (
            {"evil": "defaults:\n  - legal\n  - _self_\nhydra:\n  searchpath: [file:///tmp]\n"},
            ["hydra.searchpath"], ("evil", 5)),
        "launcher": (
            {"evil": "defaults:\n  - legal\n  - _self_\n" + nested("hydra.launcher", "n_jobs: 4")},
            ["hydra.launcher"], ("evil", 5)),
        "sweeper": (
            {"evil": "defaults:\n  - legal\n  - _self_\n"
                     + nested("hydra.sweeper", "max_batch_size: 2")}, ["hydra.sweeper"],
            ("evil", 5)),
        "hydra group": (
            {"evil": "defaults:\n  - legal\n  - override /hydra/job_logging: disabled\n"},
            ["Hydra's own config groups"], ("evil", 3)),
    }


def place(tmp_path: Path, reach: str, files: dict, monkeypatch) -> tuple[Path, list[str]]:
    """Write the recipe files where `reach` finds them; returns their folder and the extra
    command-line overrides that reach needs."""
    if reach == "./recipes":
        folder, extra = tmp_path / "recipes", []
    elif reach == "TUNE_RECIPE_PATH":
        folder, extra = tmp_path / "team" / "recipes", []
        monkeypatch.setenv("TUNE_RECIPE_PATH", str(folder))
    else:
        folder = tmp_path / "conf" / "recipe"
        extra = [f"hydra.searchpath=[file://{tmp_path / 'conf'}]"]
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / f"{name}.yaml").write_text(text)
    return folder, extra


COMMANDS = {
    "plan": lambda extra: ["plan", "+recipe=evil", "hydra.run.dir=run", *extra],
    "train": lambda extra: ["+recipe=evil", "hydra.run.dir=run", *extra],
    "multirun": lambda extra: ["-m", "+recipe=evil", "schedule.lr=1e-4,2e-4",
                               "hydra.sweep.dir=sweep", *extra],
    "lr-find": lambda extra: ["lr-find", "+recipe=evil", "hydra.run.dir=run", *extra],
}


def assert_refused(result, tmp_path, target, folder, needles, where):
    rc, out, err = result
    text = " ".join(err.split())
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in out + err
    for needle in needles:
        assert needle in text, (needle, text)
    name, line = where
    assert f"{folder / name}.yaml:{line}:" in text, text
    assert not target.exists(), "Hydra's logging created the file a recipe named"
    for d in ("run", "sweep", "outputs", "multirun"):
        assert not (tmp_path / d).exists(), f"a refused recipe left {d}/"


@pytest.mark.parametrize("case", list(cases(Path("/x"))))
def test_every_spelling_refused_by_plan(tune_cli, tmp_path, monkeypatch, case):
    target = tmp_path / "written-by-logging.txt"
    files, needles, where = cases(target)[case]
    folder, extra = place(tmp_path, "./recipes", files, monkeypatch)
    assert_refused(tune_cli(*COMMANDS["plan"](extra)), tmp_path, target, folder, needles, where)


@pytest.mark.parametrize("reach", ["./recipes", "TUNE_RECIPE_PATH", "hydra.searchpath"])
@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("case", ["defaults package hydra.job_logging", "header in a pulled-in file",
                                  "defaults package _global_.hydra"])
def test_every_command_and_every_reach(tune_cli, tmp_path, monkeypatch, case, command, reach):
    target = tmp_path / "written-by-logging.txt"
    files, needles, where = cases(target)[case]
    folder, extra = place(tmp_path, reach, files, monkeypatch)
    assert_refused(tune_cli(*COMMANDS[command](extra)), tmp_path, target, folder, needles, where)


@pytest.mark.parametrize("case", ["defaults package hydra.job_logging", "defaults package hydra",
                                  "defaults package _global_.hydra",
                                  "defaults config path with a package"])
@pytest.mark.parametrize("command", ["plan", "multirun"])
def test_the_composed_hydra_section_is_checked_too(tune_cli, tmp_path, monkeypatch, case, command):
    """With the file scan's package rule switched off, the dry pass over Hydra's composition still
    refuses what reaches `hydra`, naming the entry that put it there, and nothing is written."""
    monkeypatch.setattr(safety, "lands_in_hydra", lambda package: False)
    target = tmp_path / "written-by-logging.txt"
    files, _, _ = cases(target)[case]
    folder, extra = place(tmp_path, "./recipes", files, monkeypatch)
    assert_refused(tune_cli(*COMMANDS[command](extra)), tmp_path, target, folder,
                   ["the recipe changes Hydra's own settings", "style.yaml"], ("evil", 3))


def test_a_recipe_swept_over_is_checked_as_each_job_composes_it(tune_cli, tmp_path, monkeypatch):
    monkeypatch.setattr(safety, "lands_in_hydra", lambda package: False)
    target = tmp_path / "written-by-logging.txt"
    files, _, _ = cases(target)["defaults package hydra.job_logging"]
    folder, _ = place(tmp_path, "./recipes", files, monkeypatch)
    assert_refused(tune_cli("-m", "+recipe=legal,evil", "hydra.sweep.dir=sweep"), tmp_path, target,
                   folder, ["hydra.job_logging"], ("evil", 3))


def test_run_directory_still_allowed(tune_cli, tmp_path, monkeypatch):
    place(tmp_path, "hydra.searchpath", {
        "team": "defaults:\n  - legal\n  - _self_\nhydra:\n  run:\n    dir: team-runs/${now:%Y}\n"
                "adapter:\n  rank: 4\n"}, monkeypatch)
    rc, out, err = tune_cli("plan", "+recipe=team", f"hydra.searchpath=[file://{tmp_path / 'conf'}]")
    assert rc == 0, err
    plans = list((tmp_path / "team-runs").glob("*/plan.json"))
    assert len(plans) == 1
    doc = json.loads(plans[0].read_text())
    assert doc["recipe"]["name"] == "team" and doc["adapter"]["rank"] == 4


def test_the_users_own_command_line_keeps_hydra(tmp_path, smollm2_dir):
    """Hydra settings typed by the user are theirs: a logging handler on the command line works.
    (In a subprocess: Hydra's logging configuration is global to the process it runs in.)"""
    from test_cli import run_tune

    target = tmp_path / "my.log"
    rc, out, err = run_tune(["plan", "+recipe=legal", "hydra.run.dir=run", "hydra/job_logging=default",
                             f"hydra.job_logging.handlers.file.filename={target}"], tmp_path)
    assert rc == 0, err
    assert target.exists()


@pytest.mark.parametrize("package, lands", [
    ("hydra", True), ("hydra.job_logging", True), ("_global_.hydra", True),
    ("a._global_.hydra.x", True), ("_global_", False), ("", False), ("data", False),
    ("_global_.data", False), ("hydration", False)])
def test_lands_in_hydra(package, lands):
    assert safety.lands_in_hydra(package) is lands


def test_hydra_changes_ignore_what_hydra_derives():
    base = {"run": {"dir": "a"}, "overrides": {"task": []}, "runtime": {"choices": {}},
            "job": {"override_dirname": "", "chdir": None}, "job_logging": {"root": None}}
    same = json.loads(json.dumps(base))
    same["run"]["dir"] = "b"
    same["overrides"]["task"] = ["+recipe=x"]
    same["runtime"]["choices"]["recipe"] = "x"
    same["job"]["override_dirname"] = "+recipe=x"
    assert safety.hydra_changes(same, base) == []
    same["job_logging"]["handlers"] = {"x": {"filename": "/tmp/x"}}
    same["job"]["chdir"] = True
    assert safety.hydra_changes(same, base) == ["hydra.job.chdir", "hydra.job_logging.handlers"]


def test_checked_with_the_users_own_config_dir_too(tune_cli, tmp_path, monkeypatch):
    """--config-dir adds the user's own option files to the search path; a recipe still cannot
    reach Hydra's config through it (the dry pass composes with the same search path)."""
    monkeypatch.setattr(safety, "lands_in_hydra", lambda package: False)
    target = tmp_path / "written-by-logging.txt"
    files, _, _ = cases(target)["defaults package hydra.job_logging"]
    folder, _ = place(tmp_path, "./recipes", files, monkeypatch)
    (tmp_path / "mine" / "template").mkdir(parents=True)
    (tmp_path / "mine" / "template" / "terse.yaml").write_text(
        "defaults:\n  - default\n  - _self_\nprompt: \"{text} ->\"\nchat: false\n")
    assert_refused(tune_cli("plan", "--config-dir", "mine", "+recipe=evil", "hydra.run.dir=run"),
                   tmp_path, target, folder, ["hydra.job_logging"], ("evil", 3))
    rc, out, err = tune_cli("plan", "--config-dir", "mine", "+recipe=legal", "template=terse",
                            "hydra.run.dir=run")
    assert rc == 0, err                     # the user's own option is composed as usual
    assert json.loads((tmp_path / "run" / "plan.json").read_text())["recipe"]["name"] == "legal"
