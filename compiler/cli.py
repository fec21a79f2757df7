"""The `tune` command: dispatch, Hydra composition, compile, then the runtime.

    tune [OVERRIDES]                 compile, then train (same as `tune train ...`)
    tune plan|train|eval|generate [OVERRIDES]
    tune run PATH/plan.json [DIR]    re-run a compiled plan exactly (no Hydra)
    tune recipes [list | show NAME | cp NAME DEST]

Everything after the command goes to Hydra unchanged (`--help`, `--cfg job`, `-m`, `hydra.run.dir=`,
shell completion), after a pre-check of the overrides: unknown recipes, invalid recipe files, unknown
keys and wrong types stop here with exit code 2, before Hydra creates a run directory.
Exit codes: 0 ok, 2 a PlanError (one readable paragraph, no traceback), 1 anything else (a short
message; the traceback with TUNE_DEBUG=1), 130 interrupted.
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from compiler.errors import PlanError, did_you_mean

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
COMMANDS = ("train", "plan", "eval", "generate")
OTHER_COMMANDS = ("run", "recipes")
PROG = "tune"
USAGE = """usage: tune [train|plan|eval|generate] [OVERRIDES...] [--help] [--cfg job] [-m]
       tune run PATH/plan.json [RUN_DIR]
       tune recipes [list | show NAME | cp NAME DEST]"""


class ToolError(Exception):
    """Not the user's config: a missing component, an environment problem (exit 1)."""


@dataclass
class _State:
    command: str = "train"
    overrides: list = field(default_factory=list)   # parsed hydra Override objects
    started: float = 0.0
    failures: list = field(default_factory=list)    # exceptions of the jobs of this invocation


_STATE = _State()


# ------------------------------------------------------------------------------ output

def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, soft_wrap=True, highlight=False)


def print_error(err: PlanError) -> None:
    from rich.text import Text

    _console(stderr=True).print(Text("error: " + err.render(), style="bold red"))


def _print_failure(message: str) -> None:
    from rich.text import Text

    _console(stderr=True).print(Text(message, style="red"))


# ------------------------------------------------------------------------------ entry point

def main(argv: list[str] | None = None) -> int:
    """Run `tune` with argv (default sys.argv[1:]); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _dispatch(argv)
    except PlanError as e:
        print_error(e)
        return 2
    except KeyboardInterrupt:
        _print_failure("interrupted.")
        return 130
    except SystemExit as e:
        code = e.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        _print_failure(str(code))
        return 1
    except Exception as e:  # noqa: BLE001 - the one place that turns any failure into an exit code
        config_error = _config_error(e)
        if config_error is not None:
            print_error(config_error)
            return 2
        if os.environ.get("TUNE_DEBUG") == "1":
            traceback.print_exc()
        else:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            name = "" if isinstance(e, ToolError) else f"{type(e).__name__}: "
            _print_failure(f"error: {name}{msg}" + ("" if isinstance(e, ToolError) else
                                                    "  (TUNE_DEBUG=1 shows the traceback)"))
        return 1


def _config_error(e: BaseException) -> PlanError | None:
    """Hydra's and OmegaConf's composition errors are config errors: a PlanError for them."""
    from hydra.errors import (ConfigCompositionException, HydraException, MissingConfigException,
                              OverrideParseException)
    from omegaconf.errors import OmegaConfBaseException

    seen = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:   # a PlanError raised inside Hydra's composition
        seen.add(id(cur))
        if isinstance(cur, PlanError):
            return cur
        cur = cur.__cause__ or cur.__context__
    if isinstance(e, (MissingConfigException, ConfigCompositionException, OverrideParseException,
                      HydraException, OmegaConfBaseException)):
        text = " ".join(str(e).split())
        cause = e.__cause__
        if cause is not None and str(cause).strip() and str(cause).strip() not in text:
            text += " " + " ".join(str(cause).split())
        key = "config"
        if isinstance(e, OverrideParseException):
            key = "override"
        return PlanError(key, text or type(e).__name__,
                         hint="`tune --help` lists the config groups and keys; "
                              "`tune recipes` lists the recipes.")
    return None


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] == "recipes":
        return cmd_recipes(argv[1:])
    if argv and argv[0] == "run":
        return cmd_run(argv[1:])
    command = "train"
    if argv and argv[0] in COMMANDS:
        command = argv.pop(0)
    elif argv and argv[0] == "help":
        argv = ["--help"]
    elif argv and not argv[0].startswith(("-", "+", "~")) and "=" not in argv[0]:
        word = argv[0]
        raise PlanError("command", f"unknown command `{word}`."
                        f"{did_you_mean(word, COMMANDS + OTHER_COMMANDS)} Commands: "
                        f"{', '.join(COMMANDS + OTHER_COMMANDS)}; overrides look like key=value.",
                        hint="`tune --help` shows the commands, config groups and keys.")
    return _run_hydra(command, argv)


# ------------------------------------------------------------------------------ Hydra

def _register() -> None:
    from omegaconf import OmegaConf

    from compiler import recipes

    recipes.register_with_hydra()
    if not OmegaConf.has_resolver("tune_recipes"):
        # Used only by hydra.help.template: the recipes found, one line each (never by a user key:
        # compiler.safety refuses resolver calls outside the hydra section).
        OmegaConf.register_new_resolver("tune_recipes", _recipes_help, use_cache=False)


def _recipes_help() -> str:
    from compiler import recipes

    rows = recipes.list_recipes()
    if not rows:
        return "  (none found)"
    width = max(len(n) for n, _, _ in rows)
    text = "\n".join(f"  {n.ljust(width)}  {d}" for n, _, d in rows)
    return text.replace("$", "$$")  # the help template is a string.Template


def _run_hydra(command: str, argv: list[str]) -> int:
    import hydra
    from hydra._internal.utils import get_args_parser
    from hydra.core.global_hydra import GlobalHydra

    args, _ = get_args_parser().parse_known_args(argv)
    if args.experimental_rerun:
        raise PlanError("--experimental-rerun", "re-running from Hydra's config pickle is not "
                        "supported: tune loads no pickles.",
                        hint="re-run a compiled plan with `tune run DIR/plan.json`.")
    completing = bool(args.shell_completion)
    if completing and "COMP_LINE" in os.environ:
        os.environ["COMP_LINE"] = _strip_command(os.environ["COMP_LINE"])
    own_conf = bool(args.config_dir or args.config_path or args.config_name)
    overrides = [] if completing else precheck(args.overrides, check_groups=not own_conf)

    _register()
    _STATE.command, _STATE.overrides, _STATE.started = command, overrides, time.perf_counter()
    _STATE.failures = []

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def task(cfg) -> None:
        _task(cfg)

    saved_argv, saved_env = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    sys.argv = [PROG, *argv]
    os.environ["HYDRA_FULL_ERROR"] = "1"  # exceptions reach main(), which prints them tune's way
    try:
        GlobalHydra.instance().clear()
        task()
    finally:
        sys.argv = saved_argv
        if saved_env is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved_env
        GlobalHydra.instance().clear()
    if not _STATE.failures:
        return 0
    if len(_STATE.failures) == 1 and not args.multirun:
        raise _STATE.failures[0]
    # a sweep: each failure was printed as it happened; the worst one decides the exit code
    return 1 if any(_config_error(e) is None for e in _STATE.failures) else 2


def _strip_command(line: str) -> str:
    words = line.split(" ")
    if len(words) > 1 and words[1] in COMMANDS:
        del words[1]
    return " ".join(words)


def precheck(overrides: list[str], *, check_groups: bool = True) -> list:
    """Check command-line overrides before Hydra composes anything; returns the parsed overrides.
    check_groups=False leaves group options to Hydra (a --config-dir may add options)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import OverrideParseException

    from compiler import recipes, safety, schema

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as e:
        raise PlanError("override", " ".join(str(e).split()),
                        hint="overrides look like key=value, +recipe=NAME, ~key, or "
                             "key=a,b for a sweep with -m.") from None
    for o in parsed:
        key = o.key_or_group
        if key == "hydra" or key.startswith(("hydra.", "hydra/")):
            continue
        values = _values(o)
        if key == recipes.GROUP:
            for v in values:
                if not isinstance(v, str):
                    raise PlanError("recipe", f"a recipe is named by a string, got {v!r}.")
                recipes.recipe_chain(v)   # finds it (did-you-mean) and checks every file it uses
            continue
        if o.type == OverrideType.DEL:
            if key not in schema.BY_PATH and key not in schema.SECTIONS and key not in ("run", "prompt"):
                raise schema.unknown_key(key)
            continue
        if key in schema.GROUPS and o.package is None and all(isinstance(v, str) for v in values):
            if check_groups:
                for v in values:
                    _check_group_option(key, v)
            continue
        for v in values:
            safety.check_override_value(key, v)
            schema.check_override(key, v)
    return parsed


def _values(o) -> list:
    if not o.is_sweep_override():
        return [o.value()]
    try:
        return list(o.sweep_iterator())
    except Exception:  # noqa: BLE001 - glob sweeps need the group's options; Hydra expands them
        return []


def group_options(group: str) -> list[str]:
    d = CONF_DIR / group
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def _check_group_option(group: str, option: str) -> None:
    options = group_options(group)
    if option not in options and not option.startswith("${"):
        raise PlanError(group, f"unknown option `{option}` of the `{group}` group."
                        f"{did_you_mean(option, options)} Options: {', '.join(options)}.",
                        hint=f"to set one key write `{group}.KEY=VALUE`"
                             + (" (e.g. model.path=/ckpts/llama for another model)."
                                if group == "model" else "."))


# ------------------------------------------------------------------------------ the task

def _task(cfg) -> None:
    """One Hydra job. Failures are recorded, not raised, so Hydra adds nothing to the message and
    a sweep goes on with its other jobs; main() reports them."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    recipe = hc.runtime.choices.get("recipe")
    command = _STATE.command
    ok = False
    try:
        run_command(command, cfg, out_dir=out_dir, recipe=recipe)
        ok = True
    except Exception as e:  # noqa: BLE001 - reported by main() with the right exit code
        _STATE.failures.append(e)
        if hc.mode == RunMode.MULTIRUN:
            job = f"job {hc.job.num} ({' '.join(hc.overrides.task)}): "
            err = _config_error(e)
            if err is not None:
                print_error(err)
                _print_failure(f"  ↳ in {job.rstrip(': ')}")
            else:
                _print_failure(f"error: {job}{type(e).__name__}: {e}")
    finally:
        if not ok or command == "generate" or (command == "eval" and _selected_run(cfg)):
            remove_if_empty(out_dir)


def _selected_run(cfg):
    run = cfg.get("run") if hasattr(cfg, "get") else None
    return run


def resolve_config(cfg) -> dict:
    """The composed DictConfig as a plain dict: checked for code first, then resolved."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from compiler import safety

    raw = OmegaConf.to_container(cfg, resolve=False)
    safety.check_config(raw)
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "config"
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PlanError(str(key), f"cannot resolve an interpolation: {msg}.",
                        hint="a plain interpolation names another key, e.g. ${data.max_length}.") \
            from None
    resolved.pop("hydra", None)
    return resolved


def run_command(command: str, cfg, *, out_dir: Path, recipe: str | None) -> None:
    from compiler import recipes
    from compiler.compile import compile_plan
    from compiler.summary import print_plan

    resolved = resolve_config(cfg)
    run_dir = resolved.get("run")

    if command == "generate":
        generate = _runtime("runtime.generate", "generate")
        if run_dir:
            rd = _existing_run(run_dir, need_adapter=False)
            generate(str(rd), resolved.get("prompt"))
            return
        plan = compile_plan(resolved, recipe_info=recipes.recipe_info(recipe), command=command)
        generate(plan, resolved.get("prompt"))
        return

    if command == "eval" and run_dir:
        rd = _existing_run(run_dir, need_adapter=True)
        if recipe is None:
            resolved = _run_config_with_overrides(rd, resolved)
        plan = compile_plan(resolved, recipe_info=recipes.recipe_info(recipe) if recipe else
                            _run_recipe(rd), command=command)
        _check_same_model(plan, rd)
        print_plan(plan, run_dir=rd)
        evaluate = _runtime("runtime.evaluate", "evaluate")
        evaluate(plan, str(rd), str(rd / "adapter"))
        _runtime("runtime.report", "write_report")(str(rd))
        return

    plan = compile_plan(resolved, recipe_info=recipes.recipe_info(recipe), command=command)
    path = plan.write(out_dir / "plan.json")
    print_plan(plan, run_dir=out_dir, elapsed=time.perf_counter() - _STATE.started)
    _console().print(f"[dim]plan written to[/dim] {path}")
    if command == "plan":
        return
    if command == "eval":
        evaluate = _runtime("runtime.evaluate", "evaluate")
        evaluate(plan, str(out_dir), None)
        return
    train = _runtime("runtime.run", "train")
    train(plan, str(out_dir))


def _runtime(module: str, name: str):
    """A runtime entry point, imported only when a command needs it."""
    import importlib

    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (e.name == module or module.startswith(e.name + ".") or e.name == "runtime"):
            raise ToolError(f"{module} is not built yet: `tune {_STATE.command}` needs "
                            f"{module}.{name}().") from None
        raise ToolError(f"{module} cannot be imported: {e}.") from None
    fn = getattr(mod, name, None)
    if fn is None:
        raise ToolError(f"{module}.{name} is not built yet.")
    return fn


def _existing_run(run_dir, *, need_adapter: bool) -> Path:
    rd = Path(str(run_dir)).expanduser().resolve()
    if not (rd / "plan.json").is_file():
        raise PlanError("run", f"{rd} is not a run directory (it has no plan.json).",
                        hint="give the hydra.run.dir of a `tune` or `tune plan` run.")
    if need_adapter and not (rd / "adapter" / "adapter_model.safetensors").is_file():
        raise PlanError("run", f"{rd} has no trained adapter (adapter/adapter_model.safetensors).",
                        hint="train it first (`tune ... hydra.run.dir=DIR`), or leave out run= to "
                             "score the base model.")
    return rd


def _run_recipe(rd: Path):
    from compiler.plan import Plan

    try:
        return Plan.load(rd / "plan.json").recipe
    except Exception:  # noqa: BLE001
        return None


def _run_config_with_overrides(rd: Path, composed: dict) -> dict:
    """The run's own config, with the key=value overrides of this command line applied."""
    from hydra.core.override_parser.types import OverrideType
    from omegaconf import OmegaConf

    from compiler import schema
    from compiler.plan import Plan

    try:
        plan = Plan.load(rd / "plan.json")
    except Exception as e:  # noqa: BLE001
        raise PlanError("run", f"{rd / 'plan.json'} cannot be read ({e}).") from None
    base = OmegaConf.create(plan.config)
    for o in _STATE.overrides:
        key = o.key_or_group
        if key.startswith(("hydra", "recipe")) or key in schema.GROUPS or o.is_sweep_override():
            continue
        if o.type == OverrideType.DEL:
            OmegaConf.update(base, key, schema.BY_PATH[key].default if key in schema.BY_PATH
                             else None, force_add=True)
        else:
            OmegaConf.update(base, key, o.value(), force_add=True, merge=False)
    out = OmegaConf.to_container(base, resolve=True)
    out["run"] = composed.get("run")
    return out


def _check_same_model(plan, rd: Path) -> None:
    from compiler.plan import Plan

    trained = Plan.load(rd / "plan.json")
    if trained.model.get("config_hash") != plan.model.get("config_hash"):
        raise PlanError("model", f"the adapter in {rd} was trained on {trained.model.get('name')} "
                        f"({trained.model.get('dir')}), not on {plan.model.get('name')} "
                        f"({plan.model.get('dir')}).",
                        hint="evaluate with the model the run was trained on.")
    if list(trained.adapter.get("targets") or []) != list(plan.adapter.get("targets") or []) or \
            trained.adapter.get("rank") != plan.adapter.get("rank"):
        raise PlanError("adapter", f"the adapter in {rd} has rank {trained.adapter.get('rank')} on "
                        f"{', '.join(trained.adapter.get('targets') or [])}; this config says rank "
                        f"{plan.adapter.get('rank')} on {', '.join(plan.adapter.get('targets') or [])}.",
                        hint="leave the adapter settings as the run had them.")


def remove_if_empty(out_dir: Path, cwd: Path | None = None) -> None:
    """Remove a run directory that holds nothing, and its empty parents up to (not including) the
    current directory or its outputs/ or multirun/ folder. Never touches a directory with files."""
    cwd = Path(cwd or Path.cwd()).resolve()
    stops = {cwd, cwd / "outputs", cwd / "multirun", Path(cwd.anchor)}
    d = Path(out_dir).resolve()
    try:
        d.rmdir()  # only succeeds when empty
    except OSError:
        return
    d = d.parent
    while d not in stops and cwd in d.parents:
        try:
            d.rmdir()
        except OSError:
            return
        d = d.parent


# ------------------------------------------------------------------------------ tune run

def cmd_run(args: list[str]) -> int:
    """tune run PATH/plan.json [RUN_DIR]: train a compiled plan exactly as it was compiled."""
    from compiler.data import file_sha256
    from compiler.plan import Plan
    from compiler.summary import print_plan

    if not args or args[0] in ("-h", "--help") or len(args) > 2:
        _console().print("usage: tune run PATH/plan.json [RUN_DIR]\n\nTrain a compiled plan exactly "
                         "as compiled (no Hydra, no recompilation). RUN_DIR defaults to the plan's "
                         "directory; checkpoints there with the same plan hash are resumed.")
        return 0 if args and args[0] in ("-h", "--help") else 2
    path = Path(args[0]).expanduser()
    if path.is_dir():
        path = path / "plan.json"
    if not path.is_file():
        raise PlanError("plan", f"{path} not found.", hint="give the plan.json that `tune plan` wrote.")
    try:
        plan = Plan.load(path)
    except (ValueError, KeyError, TypeError) as e:
        raise PlanError("plan", f"cannot read the plan: {e}.", file=str(path),
                        hint="recompile it with `tune plan`.") from None
    if not plan.is_consistent():
        raise PlanError("plan", "the plan's hash does not match its content (was it edited?).",
                        file=str(path), hint="change the config and recompile with `tune plan`.")
    for key, name in (("path", "train"), ("test_path", "test")):
        file = (plan.config.get("data") or {}).get(key)
        want = (plan.data.get("sha256") or {}).get(name)
        if not file or not want:
            continue
        if not Path(file).is_file():
            raise PlanError(f"data.{key}", f"{file} is gone since the plan was compiled.",
                            hint="restore it, or recompile with `tune plan`.")
        if file_sha256(file) != want:
            raise PlanError(f"data.{key}", f"{file} changed since the plan was compiled.",
                            hint="recompile with `tune plan` to train on the new data.")
    if not Path(plan.model.get("dir", "")).is_dir():
        raise PlanError("model.path", f"the model directory {plan.model.get('dir')} is gone.",
                        hint="recompile with `tune plan`.")
    cache = plan.data.get("cache")
    if cache and not Path(cache).is_file():
        # The token cache is derived data (deleted, or another machine): rebuild it from the plan.
        from compiler.compile import compile_plan

        rebuilt = compile_plan(plan.config, recipe_info=plan.recipe, command="plan")
        if rebuilt.data.get("key") != plan.data.get("key"):
            raise PlanError("plan", "the token cache is missing and rebuilding it gave different "
                            "tokens (another tokenizer or tune version?).", file=str(path),
                            hint="recompile with `tune plan`.")
        if rebuilt.data.get("cache") != cache:   # another $TUNE_HOME: same tokens, other place
            import dataclasses

            plan = dataclasses.replace(plan, data={**plan.data, "cache": rebuilt.data["cache"]})
    run_dir = Path(args[1]) if len(args) == 2 else path.parent
    if run_dir.resolve() != path.parent.resolve():
        plan.write(run_dir / "plan.json")
    _STATE.command = "run"
    print_plan(plan, run_dir=run_dir)
    train = _runtime("runtime.run", "train")
    train(plan, str(run_dir))
    return 0


# ------------------------------------------------------------------------------ tune recipes

def cmd_recipes(args: list[str]) -> int:
    from rich.markup import escape
    from rich.syntax import Syntax

    from compiler import recipes

    console = _console()
    sub = args[0] if args else "list"
    if sub in ("-h", "--help", "help"):
        console.print("usage: tune recipes [list | show NAME | cp NAME DEST]\n\n"
                      "Recipes are found in ./recipes, then each directory of $TUNE_RECIPE_PATH, then "
                      f"the installed ones ({recipes.INSTALLED_DIR}).")
        return 0
    if sub == "list":
        if len(args) > 1:
            raise PlanError("recipes", "`tune recipes list` takes no arguments.")
        rows = recipes.list_recipes()
        width = max((len(n) for n, _, _ in rows), default=0)
        console.print("[bold]recipes[/bold] [dim](use with +recipe=NAME)[/dim]")
        for name, path, desc in rows:
            console.print(f"  [bold cyan]{escape(name.ljust(width))}[/bold cyan]  {escape(desc)}  "
                          f"[dim]{escape(str(path))}[/dim]")
        console.print(f"[dim]looked in: {recipes.looked_in()}[/dim]")
        return 0
    if sub == "show":
        if len(args) != 2:
            raise PlanError("recipes", "usage: tune recipes show NAME.")
        path, text = recipes.show(args[1])
        console.print(f"[dim]# {path}[/dim]")
        if sys.stdout.isatty():
            console.print(Syntax(text, "yaml", theme="ansi_dark", background_color="default"))
        else:
            sys.stdout.write(text if text.endswith("\n") else text + "\n")
        return 0
    if sub == "cp":
        if len(args) != 3:
            raise PlanError("recipes", "usage: tune recipes cp NAME DEST (a directory or a .yaml file).")
        written = recipes.copy(args[1], args[2])
        for p in written:
            console.print(f"wrote {p}")
        return 0
    raise PlanError("recipes", f"unknown subcommand `{sub}`.{did_you_mean(sub, ('list', 'show', 'cp'))}",
                    hint="tune recipes [list | show NAME | cp NAME DEST].")


if __name__ == "__main__":
    sys.exit(main())
