"""Hydra composition for `tune`: the overrides checked before Hydra runs, the recipe group
registered, the composed config resolved into a plain dict, one Hydra job per run (several with -m).

Hydra and OmegaConf stay in this module and in compiler/recipes.py (the recipe group); the compiler
proper takes plain dicts and the runtime takes a Plan.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from core.errors import Diverged, PlanError, did_you_mean

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
PROG = "tune"
COMMANDS = ("train", "plan", "eval", "generate", "lr-find", "export", "serve")


def config_error(e: BaseException) -> PlanError | None:
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


# ------------------------------------------------------------------------------ Hydra

def _register() -> None:
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from compiler import recipes, schema

    recipes.register_with_hydra()
    # Each group's default option, and the commands' own keys, are the schema's defaults: declared
    # there once, composed from here; conf/'s option files carry only what differs.
    store = ConfigStore.instance()
    store.store(name="command_keys", node=schema.defaults(""))
    for group, option in schema.DEFAULT_OPTIONS.items():
        store.store(group=group, name=option, node=schema.defaults(group))
    for name, fn in (("tune_recipes", _recipes_help), ("tune_keys", _keys_help)):
        if not OmegaConf.has_resolver(name):
            # Used only by hydra.help.template (never by a user key: compiler.safety refuses
            # resolver calls outside the hydra section).
            OmegaConf.register_new_resolver(name, fn, use_cache=False)


def _keys_help() -> str:
    """Every key of the schema: its default, allowed values and meaning, one line each."""
    from compiler import schema

    rows = [(path, _plain(schema.BY_PATH[path].default), allowed, doc)
            for path, allowed, doc in schema.describe_keys()]
    w0, w1 = max(len(r[0]) for r in rows), min(24, max(len(r[1]) for r in rows))
    text = "\n".join(f"  {p.ljust(w0)}  {d.ljust(w1)}  {a}: {doc}" for p, d, a, doc in rows)
    return text.replace("$", "$$")  # the help template is a string.Template


def _plain(value) -> str:
    import json

    return json.dumps(value) if not isinstance(value, str) else value


def _recipes_help() -> str:
    from compiler import recipes

    rows = recipes.list_recipes()
    if not rows:
        return "  (none found)"
    width = max(len(n) for n, _, _ in rows)
    text = "\n".join(f"  {n.ljust(width)}  {d}" for n, _, d in rows)
    return text.replace("$", "$$")  # the help template is a string.Template


def run_hydra(command: str, argv: list[str], run_job) -> int:
    """Compose the config of `argv` with Hydra (conf/ + recipe + overrides) and call run_job(Job)
    for each job (one, or one per sweep point with -m). Returns the exit code; a single job's
    failure is raised for main() to report."""
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
    from compiler import recipes

    recipes.begin()
    overrides = [] if completing else precheck(args.overrides, check_groups=not own_conf)

    _register()
    if not completing:
        check_hydra_section(overrides, multirun=bool(args.multirun), args=args)
    started, failures, jobs, held = time.perf_counter(), [], [], []

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def task(cfg) -> float | None:
        return _task(lambda out_dir, recipe, sweep_dir, swept: Job(
            command=command, config=command_line_escapes(resolve_config(cfg), overrides),
            out_dir=out_dir, recipe=recipe, started=started, overrides=overrides,
            sweep_dir=sweep_dir, sweep_point=_sweep_point(swept, overrides)),
            run_job, failures, jobs, held)

    saved_argv, saved_env = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    sys.argv = [PROG, *argv]
    os.environ["HYDRA_FULL_ERROR"] = "1"  # exceptions reach main(), which prints them tune's way
    multirun = bool(args.multirun) or any(o.key_or_group == "hydra.mode" and str(o.value()) == "MULTIRUN"
                                          for o in overrides if not o.is_sweep_override())
    try:
        GlobalHydra.instance().clear()
        try:
            task()
        except OSError as e:    # Hydra's own run/sweep directory (the jobs' errors are caught in _task)
            key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
            raise PlanError(key, f"cannot create {e.filename or 'the run directory'}: "
                            f"{e.strerror or e}.",
                            hint=f"choose a directory you can write ({key}=...).") from None
        if multirun and jobs:
            _drop_hydra_files(jobs[0]["dir"].parent)
        if multirun and command == "train" and jobs:
            from runtime.report import write_sweep_report

            path = write_sweep_report(jobs[0]["dir"].parent, jobs)
            from tune.console import console

            console(stderr=True).print(f"[dim]sweep report:[/dim] {path}")
    finally:
        for lock in held:
            lock.release()
        sys.argv = saved_argv
        if saved_env is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved_env
        GlobalHydra.instance().clear()
    if not failures:
        return 0
    if len(failures) == 1 and not args.multirun:
        raise failures[0]
    # a sweep: each failure was printed as it happened; the worst one decides the exit code
    if all(isinstance(e, Diverged) for e in failures):
        return Diverged.exit_code
    return 1 if any(config_error(e) is None and not isinstance(e, Diverged) for e in failures) else 2


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

    parser = OverridesParser.create()
    for line in overrides:
        safety.check_override_size(line)    # bounded before Hydra's parser reads it
    try:
        parsed = parser.parse_overrides(overrides)
    except OverrideParseException as e:
        raise _parse_error(parser, overrides, e) from None
    recipes.begin(searchpath(parsed))
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
        if key in schema.GROUPS and not all(isinstance(v, (str, dict)) for v in values):
            raise PlanError(key, f"`{key}` is a config group: it takes an option's name, got "
                            f"{', '.join(repr(v) for v in values)}. Options: "
                            f"{', '.join(group_options(key))}.",
                            hint=f"to set one key write `{key}.KEY=VALUE`.")
        schema.check_override_text(key, o.input_line, values)
        for v in values:
            safety.check_override_value(key, v)
            schema.check_override(key, v)
    return parsed


def searchpath(parsed: list) -> list[str]:
    """The entries of a `hydra.searchpath=[...]` the command line gives (its recipe/ folders hold
    recipes too)."""
    out: list[str] = []
    for o in parsed:
        if o.key_or_group == "hydra.searchpath" and not o.is_sweep_override():
            value = o.value()
            out += [str(v) for v in (value if isinstance(value, list) else [value])]
    return out


def check_hydra_section(parsed: list, *, multirun: bool, args) -> None:
    """A dry pass of Hydra's composition, before Hydra configures logging, creates a directory or
    runs a callback: the `hydra` section a recipe gives must equal the one tune's conf/ and the
    user's own command line give without it (but for the run/sweep directory). A sweep checks its
    first composition and each recipe it sweeps over, as each of its jobs would compose it."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_automatic_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.utils import JobRuntime
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from compiler import recipes, safety

    chosen = [o for o in parsed if o.key_or_group == recipes.GROUP and not o.is_delete()]
    if not chosen:
        return
    multirun = multirun or any(o.key_or_group == "hydra.mode" and str(o.value()) == "MULTIRUN"
                               for o in parsed if not o.is_sweep_override())
    # the search path and primary config hydra.main will use (--config-path/-name/-dir included)
    search = create_automatic_config_search_path(
        __file__, None, args.config_path or str(CONF_DIR))
    if args.config_dir:
        search.prepend(provider="command-line", path=f"file://{os.path.abspath(args.config_dir)}",
                       anchor=SearchPathQuery(provider="schema"))
    name = args.config_name or "config"
    loader = ConfigLoaderImpl(config_search_path=search)
    JobRuntime().set("name", PROG)

    def hydra_of(lines: list[str], mode) -> dict:
        cfg = loader.load_configuration(config_name=name, overrides=lines, run_mode=mode)
        return OmegaConf.to_container(cfg.hydra, resolve=False)

    def compare(lines: list[str], base: dict, mode) -> None:
        changed = safety.hydra_changes(hydra_of(lines, mode), base)
        if changed:
            found = loader.compute_defaults_list(name, lines, mode).defaults
            triples = [(d.config_path or "", d.package or "", d.parent or "") for d in found]
            raise safety.refuse_hydra_change(changed[0], *recipes.hydra_source(changed[0], triples))

    lines = [o.input_line for o in parsed]
    others = [o.input_line for o in parsed if o.key_or_group != recipes.GROUP]
    mode = RunMode.MULTIRUN if multirun else RunMode.RUN
    compare(lines, hydra_of(others, mode), mode)
    if multirun:   # each job composes again in RUN mode, with one value of each sweep
        fixed = [o.input_line for o in parsed
                 if o.key_or_group != recipes.GROUP and not o.is_sweep_override()]
        base = hydra_of(fixed, RunMode.RUN)
        for o in chosen:
            prefix = "++" if o.is_force_add() else "+" if o.is_add() else ""
            for value in _values(o):
                compare(fixed + [f"{prefix}{recipes.GROUP}={value}"], base, RunMode.RUN)


TEMPLATE_TEXT = ("template.prompt", "template.response", "template.system")


def _parse_error(parser, overrides: list[str], e) -> PlanError:
    """The override Hydra could not parse, named; for a template with {placeholders}, how to quote
    it (Hydra reads an unquoted `{` as the start of a dictionary)."""
    from hydra.errors import OverrideParseException

    bad = None
    for o in overrides:
        try:
            parser.parse_overrides([o])
        except OverrideParseException:
            bad = o
            break
    msg = " ".join(str(e).split())
    if bad is None:
        return PlanError("override", msg, hint="overrides look like key=value, +recipe=NAME, ~key, "
                                                "or key=a,b for a sweep with -m.")
    key, _, value = bad.partition("=")
    if any(c in value for c in "{}[](),'\"") and not value[:1] in ("'", '"'):
        return PlanError(key.lstrip("+~") or "override",
                         f"the override `{bad}` cannot be read: Hydra takes an unquoted {{...}} "
                         "for a dictionary (and , [ ] ( ) for lists and sweeps).",
                         hint=f"quote the value inside the shell's quotes: \"{key}='{value}'\" "
                              "(\\n and \\t in it become a newline and a tab).")
    return PlanError(key.lstrip("+~") or "override", f"the override `{bad}` cannot be read: {msg}",
                     hint="overrides look like key=value, +recipe=NAME, ~key, or key=a,b for a "
                          "sweep with -m.")


def command_line_escapes(config: dict, overrides: list) -> dict:
    """Template texts given on the command line with \\n and \\t read as a newline and a tab, as
    in a recipe's double-quoted YAML (a shell cannot easily pass a newline)."""
    given = {o.key_or_group for o in overrides}
    template = config.get("template")
    if not isinstance(template, dict) or not given & set(TEMPLATE_TEXT):
        return config
    template = dict(template)
    for key in TEMPLATE_TEXT:
        part = key.split(".")[1]
        if key in given and isinstance(template.get(part), str):
            template[part] = _unescape(template[part])
    return {**config, "template": template}


def _unescape(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        pair = text[i:i + 2]
        if pair in ("\\n", "\\t", "\\\\"):
            out.append({"\\n": "\n", "\\t": "\t", "\\\\": "\\"}[pair])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _values(o) -> list:
    """An override's value, or a sweep's values (at most safety.MAX_SWEEP: a `range(...)` may
    name any number)."""
    import itertools

    from compiler.safety import MAX_SWEEP

    if not o.is_sweep_override():
        return [o.value()]
    try:
        values = list(itertools.islice(o.sweep_iterator(), MAX_SWEEP + 1))
    except Exception:  # noqa: BLE001 - glob sweeps need the group's options; Hydra expands them
        return []
    if len(values) > MAX_SWEEP:
        raise PlanError(o.key_or_group, f"the sweep `{o.input_line}` has more than {MAX_SWEEP:,} "
                        "values, a run each.", hint="sweep over a few values, e.g. "
                                                    f"{o.key_or_group}=range(0,8).")
    return values


def group_options(group: str) -> list[str]:
    """The options of a group: its default (the schema's) and the option files of conf/."""
    from compiler import schema

    d = CONF_DIR / group
    files = {p.stem for p in d.glob("*.yaml")} if d.is_dir() else set()
    default = {schema.DEFAULT_OPTIONS[group]} if group in schema.DEFAULT_OPTIONS else set()
    return sorted(files | default)


def _check_group_option(group: str, option: str) -> None:
    options = group_options(group)
    if option not in options and not option.startswith("${"):
        raise PlanError(group, f"unknown option `{option}` of the `{group}` group."
                        f"{did_you_mean(option, options)} Options: {', '.join(options)}.",
                        hint=f"to set one key write `{group}.KEY=VALUE`"
                             + (" (e.g. model.path=/ckpts/llama for another model)."
                                if group == "model" else "."))


# ------------------------------------------------------------------------------ one job

@dataclass
class Job:
    """One Hydra job, handed to the command: the composed config as a plain dict, and where."""
    command: str
    config: dict                # composed, checked for code, resolved; no `hydra` section
    out_dir: Path               # Hydra's run directory for this job
    recipe: str | None          # the +recipe= choice, if any
    started: float
    overrides: list             # this command line's parsed overrides
    sweep_dir: Path | None = None   # a multirun's job: the sweep's directory
    sweep_point: str = ""       # ... and the values it sweeps, as `key=value ...` (its overrides)

    def apply_overrides(self, config: dict) -> dict:
        """`config` (e.g. a trained run's) with this command line's key=value overrides applied
        (recipe and group choices are left out: they compose a config, they do not edit one)."""
        from hydra.core.override_parser.types import OverrideType
        from omegaconf import OmegaConf

        from compiler import schema

        base = OmegaConf.create(config)
        for o in self.overrides:
            key = o.key_or_group
            if key.startswith(("hydra", "recipe")) or key in schema.GROUPS or o.is_sweep_override():
                continue
            if o.type == OverrideType.DEL:
                OmegaConf.update(base, key, schema.BY_PATH[key].default if key in schema.BY_PATH
                                 else None, force_add=True)
            else:
                OmegaConf.update(base, key, o.value(), force_add=True, merge=False)
        out = OmegaConf.to_container(base, resolve=True)
        out["run"] = self.config.get("run")
        return out


def _task(make_job, run_job, failures: list, jobs: list, held: list) -> float | None:
    """One Hydra job. Failures are recorded, not raised, so Hydra adds nothing to the message and
    a sweep goes on with its other jobs; main() reports them. Each job's outcome goes to `jobs`
    (for a sweep's report). A run directory the job left empty is removed. Returns the job's
    sweep.metric value in a multirun (what a sweeper plugin such as Optuna optimises). A sweep's
    first job locks the sweep directory for the whole sweep (`held`; a second sweep there stops)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    if hc.mode == RunMode.MULTIRUN and not held:
        from core.processes import is_main_process
        from core.rundir import RunDirLock

        if is_main_process():
            held.append(RunDirLock(Path(hc.sweep.dir), "sweep", key="hydra.sweep.dir").acquire())
    record = {"dir": out_dir, "overrides": list(hc.overrides.task), "status": "ok", "error": None}
    jobs.append(record)
    t0 = time.perf_counter()
    try:
        multirun = hc.mode == RunMode.MULTIRUN
        job = make_job(out_dir, hc.runtime.choices.get("recipe"),
                       Path(hc.sweep.dir) if multirun else None, list(hc.overrides.task))
        record["criterion"] = job.config.get("sweep", {}).get("metric")
        run_job(job)
    except Exception as e:  # noqa: BLE001 - reported by main() with the right exit code
        failures.append(e)
        record["status"] = "diverged" if isinstance(e, Diverged) else "failed"
        record["error"] = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if hc.mode == RunMode.MULTIRUN:
            from tune.console import print_error, print_failure

            job = f"job {hc.job.num} ({' '.join(hc.overrides.task)})"
            err = config_error(e)
            if isinstance(e, Diverged):
                print_failure(f"diverged: {job}: step {e.step}, learning rate {e.lr:.3g}")
            elif err is not None:
                print_error(err)
                print_failure(f"  ↳ in {job}")
            else:
                print_failure(f"error: {job}: {type(e).__name__}: {e}")
    finally:
        record["wall_s"] = time.perf_counter() - t0
        remove_if_empty(out_dir)
    if hc.mode == RunMode.MULTIRUN:
        from runtime.report import sweep_objective

        return sweep_objective(record)
    return None


def _sweep_point(task_overrides: list[str], overrides: list) -> str:
    """This job's values of the keys the command line sweeps (`schedule.lr=0.001 adapter.rank=8`)."""
    swept = {o.key_or_group for o in overrides if o.is_sweep_override()}
    return " ".join(t for t in task_overrides if t.split("=", 1)[0].lstrip("+~") in swept)


def _drop_hydra_files(sweep_dir: Path) -> None:
    """Hydra's sweeper saves the composed config as multirun.yaml in the sweep directory; tune's
    sweep directory holds its own record (sweep.json, sweep.html) and the runs, nothing of Hydra's."""
    try:
        (Path(sweep_dir) / "multirun.yaml").unlink()
    except OSError:
        pass


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


