"""A recipe is data, never code.

Hydra and OmegaConf can run code from a config: `_target_` (and its companions) instantiates any
importable callable, a resolver interpolation such as `${oc.env:SECRET}` or a user-registered
`${eval:...}` calls a function with strings from the file, and Hydra's own `hydra.callbacks`,
`hydra.job_logging` (logging's handlers open files, `()` factories import classes), `hydra.searchpath`
or launcher/sweeper groups import classes. tune never instantiates anything from a config, and
refuses all of these, twice:

- `load_recipe_yaml(path)` reads each recipe file with a plain YAML parser (so a syntax error is
  reported as file:line), and refuses instantiation keys anywhere, resolver calls anywhere (except
  Hydra's `${now:...}` in the run/sweep directory), any `hydra:` setting beyond the run/sweep
  directory, a `# @package` header and defaults-list entries that select Hydra's own groups or put a
  config under the `hydra` package (`/recipe@hydra.job_logging: x`, `x@_global_.hydra`, ...).
- `hydra_changes(with_recipe, without)` compares the `hydra` section Hydra composes with the recipe
  against the one tune's conf/ and the user's own command line compose without it, before Hydra
  configures logging, creates a directory or runs a callback (tune/compose.py makes that dry pass);
  `check_config(cfg)` checks the rest of the composed config for instantiation keys and resolver
  calls, wherever they came from.

Plain interpolation (`${data.max_length}`) is a lookup, not a call, and is allowed.

Reading a recipe or an override also takes bounded time and memory, whatever it holds: a recipe's
size, nesting, values (YAML aliases expanded: no "billion laughs"), texts and numbers are checked
from YAML's event stream before a tree is built (`check_shape`), an override's length, brackets,
list items and digits before Hydra's parser reads it (`check_override_size`).
"""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from core.errors import PlanError

INSTANTIATION_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")
# The only Hydra settings a recipe may carry: where its runs go.
RECIPE_HYDRA_KEYS = ("hydra.run.dir", "hydra.sweep.dir", "hydra.sweep.subdir")
_RESOLVER_CALL = re.compile(r"\$\{\s*([A-Za-z_][\w.\-]*)\s*:")
_WHY = "a recipe is data, never code: tune imports, instantiates and evaluates nothing a config says."


def resolver_calls(text: str) -> list[str]:
    """Names of the resolvers an OmegaConf string would call when resolved (`oc.env`, `eval`, ...)."""
    if "${" not in text:
        return []
    names = _grammar_resolvers(text)
    return names if names is not None else _RESOLVER_CALL.findall(text)


def _grammar_resolvers(text: str) -> list[str] | None:
    """Resolver names found by OmegaConf's own grammar (exactly what it would call); None when the
    string does not parse (then the regular expression decides, erring towards refusal)."""
    try:
        from omegaconf.grammar.gen.OmegaConfGrammarParser import OmegaConfGrammarParser
        from omegaconf.grammar_parser import parse
        tree = parse(text)
    except Exception:
        return None
    names: list[str] = []

    def walk(node) -> None:
        if isinstance(node, OmegaConfGrammarParser.InterpolationResolverContext):
            names.append(node.resolverName().getText())
        for i in range(node.getChildCount() if hasattr(node, "getChildCount") else 0):
            walk(node.getChild(i))

    walk(tree)
    # The grammar may miss a call that the regular expression sees (nested quoting): take both.
    return sorted(set(names) | set(_RESOLVER_CALL.findall(text)))


def _refuse_key(path: str, key: str, *, file=None, line=None) -> PlanError:
    return PlanError(path, f"`{key}` is not allowed: {_WHY}", file=file, line=line,
                     hint="describe the setting with tune's own keys (see `tune --help`); "
                          "models, data and templates are named, never constructed.")


def _refuse_resolver(path: str, value: str, names: list[str], *, file=None, line=None) -> PlanError:
    calls = ", ".join(f"`${{{n}:...}}`" for n in names)
    return PlanError(path, f"the value {value!r} calls the resolver {calls}; resolver calls are "
                     f"not allowed: {_WHY}", file=file, line=line,
                     hint="write the value itself, or a plain interpolation of another key "
                          "such as `${data.max_length}`.")


# ------------------------------------------------------------------------------ composed config

def check_config(cfg: dict) -> None:
    """Refuse instantiation keys and resolver calls outside the `hydra` section of a composed,
    unresolved config (a plain dict/list tree from OmegaConf.to_container(resolve=False))."""

    def walk(node, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                key = str(key)
                sub = f"{path}.{key}" if path else key
                if not path and key == "hydra":
                    continue
                if key in INSTANTIATION_KEYS:
                    raise _refuse_key(sub, key)
                walk(value, sub)
        elif isinstance(node, (list, tuple)):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]")
        elif isinstance(node, str):
            names = resolver_calls(node)
            if names:
                raise _refuse_resolver(path, node, names)

    walk(cfg, "")


def check_override_value(key: str, value) -> None:
    """A command-line override's value: refuse resolver calls outside hydra.* keys."""
    if key == "hydra" or key.startswith("hydra."):
        return
    for text in _strings(value):
        names = resolver_calls(text)
        if names:
            raise _refuse_resolver(key, text, names)


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


# ------------------------------------------------------------------------------ recipe files

def load_recipe_yaml(path: Path, text: str) -> dict:
    """Parse a recipe file's text with a plain YAML parser and check it; returns the mapping (no
    Hydra, no OmegaConf). Raises PlanError with file and line for invalid YAML or anything unsafe."""
    path = Path(path)
    if len(text) > MAX_RECIPE_CHARS:
        raise PlanError("recipe", f"the file is {len(text):,} characters long; a recipe is at "
                        f"most {MAX_RECIPE_CHARS:,} characters.", file=str(path), hint=_BOUNDS_HINT)
    node = None
    try:
        check_shape(text, str(path))     # bounded before anything walks the tree
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.load(text, Loader=yaml.SafeLoader)  # noqa: S506 - SafeLoader
    except PlanError:
        raise
    except (ValueError, OverflowError) as e:     # a value YAML reads but cannot build (2024-13-45)
        raise PlanError("recipe", f"YAML cannot build the value on this line ({e}).",
                        file=str(path), line=_unbuildable_line(node),
                        hint="quote the value to keep it as text.") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = " ".join(filter(None, [e.context, e.problem])) or "invalid YAML"
        raise PlanError("recipe", f"not valid YAML: {problem}.", file=str(path), line=line,
                        hint="a recipe is a YAML mapping of config keys (see `tune recipes show legal`)."
                        ) from None
    except yaml.YAMLError as e:
        raise PlanError("recipe", f"not valid YAML: {e}.", file=str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise PlanError("recipe", f"a recipe is a YAML mapping of config keys, not a "
                        f"{type(data).__name__}.", file=str(path), line=1)
    check_package_header(text, str(path))
    _scan_node(node, "", str(path))
    return data


# ------------------------------------------------------------------------------ bounds

# A recipe or an override may come from a careless or hostile colleague: whatever it holds, reading
# and checking it takes bounded time and memory. Each limit is far beyond any real recipe.
MAX_RECIPE_CHARS = 1 << 18      # characters of a recipe file
MAX_DEPTH = 64                  # levels of nested mappings and lists
MAX_VALUES = 5_000              # values (keys, scalars, lists, mappings) of a recipe, aliases expanded
MAX_TEXT = 1 << 16              # characters of one value (a template, a path)
MAX_ITEMS = 256                 # items of one list value, or one override's list or sweep
MAX_NUMBER_CHARS = 100          # characters of a number (Python refuses to read > 4,300 digits)
MAX_OVERRIDE_CHARS = 1 << 17    # characters of one command-line override
MAX_SWEEP = 1_000               # values of one swept key (`-m key=range(...)`)
_BOUNDS_HINT = "a recipe is a short YAML mapping of config keys; data belongs in data files."
_INT_TAG, _FLOAT_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"


def check_shape(text: str, file: str) -> None:
    """Refuse a recipe nested deeper than MAX_DEPTH, holding more than MAX_VALUES values once its
    aliases are expanded (`b: &b [*a, *a, ...]` over a few levels is a "billion laughs"), an alias
    to a value that contains it, a value over MAX_TEXT characters or a number over MAX_NUMBER_CHARS
    — from YAML's event stream, in time linear in the text, before any tree is built or walked."""
    resolver = yaml.SafeLoader("")       # types a plain scalar as the loader will
    total, opened, sizes = 0, [], {}     # opened: (anchor, total before it) of each open collection
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        line = event.start_mark.line + 1
        if isinstance(event, yaml.CollectionEndEvent):
            anchor, before = opened.pop()
            if anchor is not None:
                sizes[anchor] = total - before
            continue
        if isinstance(event, yaml.AliasEvent):
            if any(anchor == event.anchor for anchor, _ in opened):
                raise PlanError("recipe", f"the alias *{event.anchor} refers to a value that "
                                "contains it: the recipe would be infinitely deep.", file=file,
                                line=line, hint=_BOUNDS_HINT)
            total += sizes.get(event.anchor, 1)
        elif isinstance(event, yaml.CollectionStartEvent):
            if len(opened) >= MAX_DEPTH:
                raise PlanError("recipe", f"nested more than {MAX_DEPTH} levels deep.", file=file,
                                line=line, hint=_BOUNDS_HINT)
            opened.append((event.anchor, total))
            total += 1
        elif isinstance(event, yaml.ScalarEvent):
            _check_scalar(event, resolver, file, line)
            if event.anchor is not None:
                sizes[event.anchor] = 1
            total += 1
        else:
            continue
        if total > MAX_VALUES:
            expanded = (f"once the alias *{event.anchor} is expanded (aliases that repeat "
                        "aliases grow exponentially)" if isinstance(event, yaml.AliasEvent)
                        else "")
            raise PlanError("recipe", f"the recipe holds more than {MAX_VALUES:,} values"
                            f"{' ' + expanded if expanded else ''}.", file=file, line=line,
                            hint=_BOUNDS_HINT)


def _check_scalar(event, resolver, file: str, line: int) -> None:
    value = event.value
    if len(value) > MAX_TEXT:
        raise PlanError("recipe", f"a value of {len(value):,} characters; a recipe's values are "
                        f"at most {MAX_TEXT:,} characters.", file=file, line=line,
                        hint=_BOUNDS_HINT)
    tag = event.tag
    if tag in (None, "!"):
        tag = resolver.resolve(yaml.ScalarNode, value, event.implicit)
    if tag in (_INT_TAG, _FLOAT_TAG) and len(value) > MAX_NUMBER_CHARS:
        raise PlanError("recipe", f"the number {value[:12]}... is {len(value):,} characters long; "
                        f"tune reads numbers of at most {MAX_NUMBER_CHARS} characters.",
                        file=file, line=line,
                        hint="write the number in plain decimal or with an exponent (1e-4).")


def check_override_size(line: str) -> None:
    """One command-line override, before Hydra's parser reads it (its time grows with the square
    of a list's length, and it recurses into brackets and reads numbers whole): at most
    MAX_OVERRIDE_CHARS characters, MAX_DEPTH levels of brackets, MAX_ITEMS values and numbers of at
    most MAX_NUMBER_CHARS digits, counted outside quotes."""
    key, _, value = line.partition("=")
    key = key.lstrip("+~") or "override"
    if len(line) > MAX_OVERRIDE_CHARS:
        raise PlanError(key, f"the override is {len(line):,} characters long; tune reads "
                        f"overrides of at most {MAX_OVERRIDE_CHARS:,}.",
                        hint="a text or a list this long belongs in the data, not in the config.")
    depth = commas = digits = 0
    quote, escaped = None, False
    for ch in value:
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = None
            continue
        if ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
            if depth > MAX_DEPTH:
                raise PlanError(key, f"the override nests brackets more than {MAX_DEPTH} levels "
                                "deep.", hint="a config value is a name, a number, a text or a "
                                              "short list.")
        elif ch in "]})":
            depth -= 1
        elif ch == ",":
            commas += 1
            if commas >= MAX_ITEMS:
                raise PlanError(key, f"the override lists more than {MAX_ITEMS} values; a list or "
                                f"a sweep is at most {MAX_ITEMS}.",
                                hint="`all-linear` adapts every linear layer."
                                if key == "adapter.targets" else None)
        digits = digits + 1 if ch in "0123456789" else digits if ch == "_" else 0
        if digits > MAX_NUMBER_CHARS:
            raise PlanError(key, f"the override has a number of more than {MAX_NUMBER_CHARS} "
                            "digits.", hint="write the number with an exponent (1e-4), or quote "
                                            "it to keep it as text.")


def _unbuildable_line(node) -> int | None:
    """The line of the first scalar YAML cannot build a value from (a date like 2024-13-45), or
    None. `node` is the composed (and bounded) tree."""
    loader, stack = yaml.SafeLoader(""), [node] if node is not None else []
    while stack:
        n = stack.pop()
        if isinstance(n, yaml.ScalarNode):
            try:
                loader.construct_object(n)
            except (ValueError, OverflowError, yaml.YAMLError):
                return n.start_mark.line + 1
        elif isinstance(n, yaml.SequenceNode):
            stack.extend(reversed(n.value))
        elif isinstance(n, yaml.MappingNode):
            stack.extend(v for pair in reversed(n.value) for v in reversed(pair))
    return None


def package_header(text: str) -> str | None:
    """The `# @package X` of a config file's leading comment lines (Hydra reads only those), or None."""
    for line in text.splitlines():
        s = line.strip()
        if s and not s.startswith("#"):
            return None
        body = s.lstrip("#").strip()
        if body.startswith("@package"):
            return body[len("@package"):].strip()
    return None


def lands_in_hydra(package: str) -> bool:
    """Whether a package Hydra would place a config at can be Hydra's own `hydra` node. Hydra joins
    an entry's package onto its parent's and keeps what follows the last `_global_`, so any
    `hydra` component (`hydra`, `_global_.hydra.x`, `a._global_.hydra`) can land there; none of
    tune's own keys is called `hydra`, so every such spelling is refused."""
    return "hydra" in package.replace("_global_", ".").split(".")


def check_package_header(text: str, file: str) -> None:
    header = package_header(text)
    if header is not None and lands_in_hydra(header):
        line = next(i for i, l in enumerate(text.splitlines(), 1) if "@package" in l)
        raise _refuse_hydra(f"# @package {header}", file, line)


def _scan_node(node, path: str, file: str) -> None:
    line = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = str(key_node.value)
            sub = f"{path}.{key}" if path else key
            kline = key_node.start_mark.line + 1
            if key in INSTANTIATION_KEYS:
                raise _refuse_key(sub, key, file=file, line=kline)
            if not path and key == "defaults":
                _scan_defaults(value_node, file)
                continue
            if sub == "hydra" or sub.startswith("hydra."):
                inner = any(k.startswith(sub + ".") for k in RECIPE_HYDRA_KEYS)
                ok = ((inner and isinstance(value_node, yaml.MappingNode))
                      or (sub in RECIPE_HYDRA_KEYS and isinstance(value_node, yaml.ScalarNode)))
                if not ok:
                    raise _refuse_hydra(sub, file, kline)
            _scan_node(value_node, sub, file)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _scan_node(item, f"{path}[{i}]", file)
    elif isinstance(node, yaml.ScalarNode) and isinstance(node.value, str):
        _check_number(node, path, file, line)
        names = resolver_calls(node.value)
        if path in RECIPE_HYDRA_KEYS:      # a run directory may name the time (${now:...}), no more
            names = [n for n in names if n != "now"]
        if names:
            raise _refuse_resolver(path, node.value, names, file=file, line=line)


_NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
# Numbers as a recipe or the command line may write them: plain decimal only (no 1_6, 010, 0x10).
INT_TEXT = re.compile(r"[+-]?(0|[1-9][0-9]*)")
FLOAT_TEXT = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")


def _check_number(node, path: str, file: str, line: int) -> None:
    """A plain scalar YAML reads as a number is written in plain decimal: YAML 1.1 also reads 1_6
    as 16, 010 as 8, 0x10 as 16 and 1:30 as 90, which no one means in a recipe."""
    if node.tag not in _NUMBER_TAGS or node.style is not None:
        return
    if (INT_TEXT if node.tag == _NUMBER_TAGS[0] else FLOAT_TEXT).fullmatch(node.value):
        return
    if node.value.lstrip("+-").lower() in (".inf", ".nan"):
        return                      # not a number at all: the key's own check says so
    number = yaml.safe_load(node.value)
    raise PlanError(path, f"`{node.value}` is read by YAML as the number {number}; tune takes "
                    "numbers only in plain decimal.", file=file, line=line,
                    hint="write the number you mean in plain decimal digits, or quote it to keep "
                         f"it as text: '{node.value}'.")


def _refuse_hydra(key: str, file: str, line: int) -> PlanError:
    return PlanError(key, f"a recipe may set only {', '.join(RECIPE_HYDRA_KEYS)} of Hydra's "
                     "settings; the others (callbacks, logging, launcher, sweeper, ...) can import "
                     f"and run code, and {_WHY}", file=file, line=line,
                     hint="pass Hydra settings on your own command line instead.")


def _scan_defaults(node, file: str) -> None:
    if not isinstance(node, yaml.SequenceNode):
        raise PlanError("defaults", "the defaults list must be a YAML list.", file=file,
                        line=node.start_mark.line + 1)
    for item in node.value:
        line = item.start_mark.line + 1
        if isinstance(item, yaml.ScalarNode):
            entries = [str(item.value)]
        elif isinstance(item, yaml.MappingNode):
            entries = [str(k.value) for k, _ in item.value]
            for _, v in item.value:
                if isinstance(v, yaml.ScalarNode) and resolver_calls(str(v.value)):
                    raise _refuse_resolver("defaults", str(v.value), resolver_calls(str(v.value)),
                                           file=file, line=line)
        else:
            raise PlanError("defaults", "a defaults-list entry is a config name or a "
                            "`group: option` pair.", file=file, line=line)
        for entry in entries:
            words = entry.split()          # `[optional] [override] group[@package]`
            target = words[-1] if words else ""
            group, _, pkg = target.partition("@")
            if group.lstrip("/").split("/")[0] == "hydra":
                raise PlanError("defaults", f"the entry `{entry}` selects one of Hydra's own config "
                                f"groups; {_WHY}", file=file, line=line, hint=_DEFAULTS_HINT)
            if lands_in_hydra(pkg):
                raise PlanError("defaults", f"the entry `{entry}` puts a config under Hydra's own "
                                f"settings (the package `@{pkg}`), where logging, callbacks, the "
                                f"search path, launcher and sweeper can create files and import "
                                f"code; {_WHY}", file=file, line=line, hint=_DEFAULTS_HINT)
            if resolver_calls(entry):
                raise _refuse_resolver("defaults", entry, resolver_calls(entry), file=file, line=line)


_DEFAULTS_HINT = ("a recipe's defaults list may pick tune's groups (model, data, template, adapter, "
                  "schedule, runtime, eval) and other recipes, under tune's own keys; Hydra's "
                  "settings belong on your own command line.")


# ------------------------------------------------------------------------------ the hydra section

# Keys of the composed `hydra` section that Hydra derives from the command line (the recipe's name
# among the overrides and the group choices), not settings a config file makes.
DERIVED_HYDRA_KEYS = ("hydra.overrides.task", "hydra.job.override_dirname", "hydra.runtime.choices")


def hydra_changes(with_recipe: dict, without: dict) -> list[str]:
    """Dotted keys where the `hydra` section composed with the recipe differs from the one composed
    without it (plain unresolved trees), leaving out the run/sweep directory a recipe may set and
    what Hydra derives from the command line. Empty when the recipe left Hydra alone."""
    out: list[str] = []

    def walk(a, b, path: str) -> None:
        if path in RECIPE_HYDRA_KEYS or path.startswith(DERIVED_HYDRA_KEYS):
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for key in list(a) + [k for k in b if k not in a]:
                walk(a.get(key, _ABSENT), b.get(key, _ABSENT), f"{path}.{key}")
        elif a != b:
            out.append(path)

    walk(with_recipe, without, "hydra")
    return out


_ABSENT = object()


def refuse_hydra_change(key: str, file: str | None, line: int | None, via: str = "") -> PlanError:
    return PlanError(key, f"the recipe changes Hydra's own settings{via}; a recipe may set only "
                     f"{', '.join(RECIPE_HYDRA_KEYS)} of them, since the others (logging "
                     f"handlers, callbacks, search path, launcher, sweeper, ...) can create files "
                     f"and import code, and {_WHY}", file=file, line=line,
                     hint="pass Hydra settings on your own command line instead; nothing was run "
                          "or written.")
