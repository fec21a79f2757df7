"""Recipes: shareable YAML files served to Hydra as the config group `recipe` (`+recipe=legal`).

Search order (first match wins): `./recipes/` of the current directory, each directory of
TUNE_RECIPE_PATH (colon-separated), the `recipe/` folder of each local directory the command line
adds with `hydra.searchpath=[...]`, then the recipes installed with tune. A recipe is NAME.yaml; its
first comment line after the `# @package _global_` header is its one-line description. A recipe may
extend another through its defaults list (`- /recipe/legal` then `- _self_`) and pick options of
tune's groups (`- override /template: completion`).

Relative data paths a recipe sets (`data.path: data/legal_train.jsonl`) resolve against the current
directory when the file is there, else against the directory of the recipe that set the value, so a
recipe and its example data travel together.
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from core.errors import PlanError, did_you_mean
from core.files import sha256_file
from core.plan import Recipe, RecipeRef
from compiler.safety import MAX_RECIPE_CHARS, load_recipe_yaml, package_header

INSTALLED_DIR = Path(__file__).resolve().parent.parent / "recipes"
GROUP = "recipe"
DATA_KEYS = ("data.path", "data.test_path")
_NAME = re.compile(r"[A-Za-z0-9][\w.\-]*")


# ------------------------------------------------------------------------------ discovery

# What one `tune` invocation sees: the command line's hydra.searchpath folders, and the text of every
# recipe file as first read, so the checks and Hydra's composition read the same bytes.
_SEARCHPATH: tuple = ()
_TEXTS: dict = {}


def begin(searchpath=()) -> None:
    """Start an invocation: forget what an earlier one read; `searchpath` is the command line's
    hydra.searchpath entries (file:// or plain paths become recipe folders; pkg:// ones are left
    to Hydra, whose composition tune checks all the same)."""
    global _SEARCHPATH
    _TEXTS.clear()
    dirs = []
    for entry in searchpath or ():
        entry = str(entry)
        if entry.startswith("file://"):
            entry = entry[len("file://"):]
        elif "://" in entry:
            continue
        dirs.append(Path(entry).expanduser() / GROUP)
    _SEARCHPATH = tuple(dirs)


def read_text(path: Path) -> str:
    """A recipe file's text, read once per invocation."""
    key = Path(path).resolve()
    if key not in _TEXTS:
        try:
            if Path(path).stat().st_size > 4 * MAX_RECIPE_CHARS:   # UTF-8: up to 4 bytes a character
                raise PlanError("recipe", f"the file is {Path(path).stat().st_size:,} bytes long; "
                                f"a recipe is at most {MAX_RECIPE_CHARS:,} characters.",
                                file=str(path), hint="a recipe is a short YAML mapping of config "
                                                     "keys; data belongs in data files.")
            _TEXTS[key] = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise PlanError("recipe", f"cannot read {path} ({e.strerror}).", file=str(path)) from None
        except UnicodeDecodeError:
            raise PlanError("recipe", "the file is not UTF-8 text.", file=str(path)) from None
    return _TEXTS[key]


def search_dirs(cwd: Path | None = None) -> list[tuple[str, Path]]:
    """(label, absolute dir) in search order, existing or not (errors name them all)."""
    cwd = Path(cwd or Path.cwd())
    dirs = [("./recipes", (cwd / "recipes").resolve())]
    for entry in os.environ.get("TUNE_RECIPE_PATH", "").split(os.pathsep):
        if entry.strip():
            dirs.append(("$TUNE_RECIPE_PATH", (cwd / Path(entry.strip()).expanduser()).resolve()))
    dirs += [("hydra.searchpath", (cwd / d).resolve()) for d in _SEARCHPATH]
    dirs.append(("installed", INSTALLED_DIR))
    seen, unique = set(), []
    for label, d in dirs:
        if d not in seen:
            seen.add(d)
            unique.append((label, d))
    return unique


def _existing_dirs() -> list[Path]:
    return [d for _, d in search_dirs() if d.is_dir()]


def check_pin(pin: str | None, info: "Recipe | None") -> None:
    """recipe_sha256=HASH (or a prefix of 8+ hex digits): refuse a recipe file that changed."""
    if pin is None:
        return
    if info is None:
        raise PlanError("recipe_sha256", "pins a recipe, but no recipe is chosen.",
                        hint="add +recipe=NAME, or drop recipe_sha256.")
    pin, top = pin.strip().lower(), info.chain[-1]
    if len(pin) < 8 or any(c not in "0123456789abcdef" for c in pin):
        raise PlanError("recipe_sha256", f"must be the recipe's sha256 (or its first 8+ hex "
                        f"digits), got {pin!r}.", hint="`tune recipes` shows each recipe's hash.")
    if not top.sha256.startswith(pin):
        raise PlanError("recipe_sha256", f"the recipe `{top.name}` has changed: {top.path} has "
                        f"sha256 {top.sha256[:16]}…, the pin says {pin[:16]}….", file=top.path,
                        hint="review the change (`tune recipes show NAME`), then pin the new hash, "
                             "or restore the file you pinned.")


def list_recipes() -> list[tuple[str, Path, str]]:
    """(name, path, description) of every recipe found, first in search order wins, sorted by name."""
    found: dict[str, Path] = {}
    for d in _existing_dirs():
        for f in sorted(d.glob("*.yaml")):
            if f.is_file() and _NAME.fullmatch(f.stem) and f.resolve().is_relative_to(d.resolve()):
                found.setdefault(f.stem, f)
    return [(name, path, description(path)) for name, path in sorted(found.items())]


def looked_in() -> str:
    return ", ".join(f"{d} ({label})" for label, d in search_dirs())


def find_recipe(name: str) -> Path:
    """The file of recipe NAME, or a PlanError with did-you-mean, the recipes found and where."""
    name = str(name)
    if name.endswith(".yaml"):
        name = name[:-5]
    if _NAME.fullmatch(name):
        for d in _existing_dirs():
            path = d / f"{name}.yaml"
            if path.is_file():
                return _contained(path, d)
    names = [n for n, _, _ in list_recipes()]
    raise PlanError("recipe", f"unknown recipe `{name}`.{did_you_mean(name, names)} Recipes found: "
                    f"{', '.join(names) or 'none'}. Looked in: {looked_in()}.",
                    hint="a recipe is NAME.yaml in one of those directories; `tune recipes` lists them.")


def _contained(path: Path, directory: Path) -> Path:
    """path, when it really lies in directory: a recipe that is a link to a file elsewhere (a key,
    a secret) is refused rather than read, shown or copied."""
    real = path.resolve()
    if not real.is_relative_to(directory.resolve()):
        raise PlanError("recipe", f"{path} is a link to {real}, outside {directory}; recipes are "
                        "read only from the recipe directories themselves.", file=str(path),
                        hint="copy the recipe into the directory instead of linking it.")
    return path


def description(path: Path) -> str:
    """The recipe's first comment line after the `# @package` header (one line)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read(1 << 16).splitlines()      # the head is enough, however long the file
    except (OSError, UnicodeDecodeError):
        return ""
    for line in lines:
        s = line.strip()
        if not s:
            continue
        if not s.startswith("#"):
            break
        text = s.lstrip("#").strip()
        if not text or text.startswith("@"):
            continue
        return text
    return ""


# ------------------------------------------------------------------------------ the chain

@dataclass(frozen=True)
class RecipeFile:
    name: str
    path: Path
    data: dict                   # the file's mapping (plain YAML, already checked by safety)
    extends: tuple               # names of recipes in its defaults list, in order
    placed: tuple = ()           # recipes it pulls in under a package (`/recipe@pkg: name`)


def _extends(data: dict, file: Path) -> tuple[tuple, tuple]:
    """The recipes a defaults list names: (extended, placed under a package)."""
    names, placed = [], []
    for entry in data.get("defaults") or []:
        pairs = []
        if isinstance(entry, str):
            e = entry.strip()
            if e.startswith("/" + GROUP + "/"):
                pairs.append(e[len(GROUP) + 2:])
            elif e != "_self_" and "/" not in e and not e.startswith("override"):
                pairs.append(e)  # relative to the recipe group
        elif isinstance(entry, dict):
            for key, value in entry.items():
                k = str(key).split()[-1] if str(key).split() else ""
                if k.partition("@")[0] in ("/" + GROUP, GROUP) and isinstance(value, str):
                    pairs.append(value + ("@" + k.partition("@")[2] if "@" in k else ""))
        for target in pairs:
            name, at, _ = target.partition("@")
            (placed if at else names).append(name.removesuffix(".yaml"))
    return tuple(names), tuple(placed)


def load_recipe(name: str) -> RecipeFile:
    path = find_recipe(name)
    data = _in_package(load_recipe_yaml(path, read_text(path)), package(path), path)
    check_keys(path, data)
    extends, placed = _extends(data, path)
    return RecipeFile(name=path.stem, path=path, data=data, extends=extends, placed=placed)


def package(path: Path) -> str:
    """Where Hydra puts a recipe's keys: its `# @package` header (a recipe without one sets keys
    of the whole config, `_global_`)."""
    try:
        return package_header(read_text(path)) or "_global_"
    except PlanError:
        return "_global_"


def _in_package(data: dict, pkg: str, path: Path) -> dict:
    """The recipe's keys as the whole config sees them: under its package (the defaults list
    stays where it is)."""
    if pkg in ("_global_", ""):
        return data
    prefix = pkg.removeprefix("_global_.")
    if prefix == "_group_" or prefix.startswith("_group_."):
        prefix = GROUP + prefix[len("_group_"):]
    from compiler import schema

    if prefix not in schema.SECTIONS:
        raise PlanError("recipe", f"the `# @package {pkg}` header puts this recipe's keys under "
                        f"`{prefix}`, which is not a section of tune's config.", file=str(path),
                        line=1, hint="use `# @package _global_` (keys of the whole config), or a "
                                     "section such as `# @package data`.")
    body = {k: v for k, v in data.items() if k != "defaults"}
    for part in reversed(prefix.split(".")):
        body = {part: body}
    if "defaults" in data:
        body["defaults"] = data["defaults"]
    return body


def check_keys(path: Path, data: dict) -> None:
    """Every key a recipe sets is one tune knows, with a value of the right type: a PlanError with
    the recipe's file and line otherwise (before Hydra composes anything)."""
    from compiler import schema

    lines = _key_lines(path)

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            dotted = f"{prefix}.{key}" if prefix else str(key)
            if not prefix and key in ("defaults", "hydra"):
                continue
            if isinstance(value, dict) and dotted not in schema.BY_PATH and (
                    dotted in schema.SECTIONS or any(p.startswith(dotted + ".") for p in schema.BY_PATH)):
                walk(value, dotted)
                continue
            try:
                schema.check_override(dotted, value)
            except PlanError as e:
                raise PlanError(e.key, e.message, hint=e.hint, file=str(path),
                                line=lines.get(dotted)) from None

    walk(data, "")


def _key_lines(path: Path) -> dict:
    """dotted key → 1-based line of a YAML mapping file."""
    import yaml

    out: dict = {}
    try:
        root = yaml.compose(read_text(path), Loader=yaml.SafeLoader)
    except (yaml.YAMLError, PlanError):
        return out

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                dotted = f"{prefix}.{k.value}" if prefix else str(k.value)
                out.setdefault(dotted, k.start_mark.line + 1)
                walk(v, dotted)

    walk(root, "")
    return out


def recipe_chain(name: str) -> list[RecipeFile]:
    """The recipe and those it extends, in merge order (extended first, the named recipe last)."""
    order: list[RecipeFile] = []

    def visit(n: str, stack: tuple) -> None:
        if n in stack:
            raise PlanError("recipe", f"recipe `{n}` extends itself through "
                            f"{' → '.join(stack + (n,))}.", hint="remove the cycle from the "
                            "defaults lists.")
        rf = load_recipe(n)
        for parent in rf.extends:
            visit(parent, stack + (n,))
        for other in rf.placed:     # not merged as a recipe, but read and checked all the same
            path = find_recipe(other)
            load_recipe_yaml(path, read_text(path))
        if all(r.path != rf.path for r in order):
            order.append(rf)

    visit(name, ())
    return order


def _get(data: dict, dotted: str):
    node = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def recipe_info(name: str | None) -> Recipe | None:
    """What the Plan records about the recipe: name, file, description, the chain it extends and,
    for each data path key, the recipes that set it (merge order) so relative paths resolve."""
    if not name:
        return None
    chain = recipe_chain(name)
    top = chain[-1]
    sets: dict[str, list] = {}
    for rf in chain:
        for key in DATA_KEYS:
            value = _get(rf.data, key)
            if isinstance(value, str):
                sets.setdefault(key, []).append((value, str(rf.path.parent)))
    return Recipe(name=top.name, path=str(top.path), description=description(top.path),
                  chain=tuple(RecipeRef(rf.name, str(rf.path), sha256_file(rf.path)) for rf in chain),
                  data_sources={k: tuple(v) for k, v in sets.items()})


def resolve_data_path(key: str, value: str, info: Recipe | None, cwd: Path | None = None) -> Path:
    """An absolute data file path: `value` as given when absolute; else relative to the current
    directory if the file is there, else relative to the recipe that set this value. PlanError
    naming every place it looked otherwise."""
    cwd = Path(cwd or Path.cwd())
    p = Path(str(value)).expanduser()
    candidates = [p] if p.is_absolute() else [cwd / p]
    if not p.is_absolute() and info:
        sources = info.data_sources.get(key) or ()
        dirs = [d for v, d in reversed(sources) if v == str(value)]
        if not dirs:
            dirs = [str(Path(info.path).parent)]
        candidates += [Path(d) / p for d in dirs]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    for c in candidates:
        if c.exists() or c.is_symlink():     # a directory, a pipe, a device, a link loop: say which
            from compiler.data import MAX_FILE_MB, check_file

            check_file(c, key, MAX_FILE_MB)
    looked = ", ".join(str(c.absolute()) for c in dict.fromkeys(candidates))
    raise PlanError(key, f"data file `{value}` not found (looked in: {looked}).",
                    hint="relative paths are tried from the current directory, then from the "
                         "directory of the recipe that names them.")


def hydra_source(key: str, defaults) -> tuple:
    """Where the composed change to Hydra's setting `key` comes from: (file, line, how) of the recipe
    that sets it, given Hydra's defaults list as (config_path, package, parent) triples; (None,
    None, "") when no recipe file is found to hold it."""
    for config_path, pkg, parent in defaults:
        if not config_path.startswith(GROUP + "/"):
            continue
        name = config_path[len(GROUP) + 1:]
        try:
            path = find_recipe(name)
        except PlanError:
            continue
        if pkg and (key == pkg or pkg.startswith(key + ".") or key.startswith(pkg + ".")):
            inner = key[len(pkg) + 1:] if key.startswith(pkg + ".") else ""
            where = _key_lines(path).get(inner) if inner else None
            via = f" (`{inner or pkg}` of {path}{f', line {where}' if where else ''})"
            if parent.startswith(GROUP + "/"):
                try:
                    parent_path = find_recipe(parent[len(GROUP) + 1:])
                except PlanError:
                    parent_path = None
                if parent_path is not None:
                    return (str(parent_path), _defaults_line(parent_path, name),
                            f": its defaults list puts {path.name} under `{pkg}`{via}")
            return str(path), where, via
        if not pkg:
            parts = key.split(".")
            lines = _key_lines(path)
            for n in range(len(parts), 0, -1):
                if ".".join(parts[:n]) in lines:
                    return str(path), lines[".".join(parts[:n])], ""
    return None, None, ""


def _defaults_line(path: Path, name: str) -> int | None:
    """The line of the defaults-list entry in `path` that names the config `name`."""
    import yaml

    try:
        root = yaml.compose(read_text(path), Loader=yaml.SafeLoader)
    except (yaml.YAMLError, PlanError):
        return None
    if not isinstance(root, yaml.MappingNode):
        return None
    for k, v in root.value:
        if k.value == "defaults" and isinstance(v, yaml.SequenceNode):
            for item in v.value:
                texts = ([item.value] if isinstance(item, yaml.ScalarNode) else
                         [str(x.value) for pair in getattr(item, "value", ()) for x in pair
                          if isinstance(x, yaml.ScalarNode)])
                if any(t == name or t.split("@")[0].rstrip("/").endswith(name) for t in texts):
                    return item.start_mark.line + 1
    return None


# ------------------------------------------------------------------------------ tune recipes

def show(name: str) -> tuple[Path, str]:
    path = find_recipe(name)
    return path, path.read_text(encoding="utf-8")


def copy(name: str, dest: str | Path) -> list[Path]:
    """Copy recipe NAME into DEST (a directory, or a .yaml file name), with the example data files
    it names by relative path (into DEST/data/...), so the copy works where it lands. Returns the
    files written. Never overwrites."""
    rf = load_recipe(name)
    dest = Path(dest)
    target = dest if dest.suffix == ".yaml" else dest / rf.path.name
    if target.exists():
        raise PlanError("recipes cp", f"{target} exists; not overwriting it.",
                        hint="choose another destination or remove the file.")
    copies = []
    for key in DATA_KEYS:
        value = _get(rf.data, key)
        if not isinstance(value, str) or Path(value).is_absolute():
            continue
        src, out = rf.path.parent / value, target.parent / value
        for p, root in ((src, rf.path.parent), (out, target.parent)):
            if not p.resolve().is_relative_to(root.resolve()):
                raise PlanError(key, f"`{value}` leaves the recipe's directory ({p.resolve()} is "
                                f"outside {root.resolve()}); `tune recipes cp` copies only data that "
                                "lies beside the recipe.", file=str(rf.path),
                                hint="keep a recipe's example data in its own folder (data/...), or "
                                     "give an absolute path, which is not copied.")
        if src.is_file() and not out.exists():
            copies.append((src, out))
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(rf.path, target)
    for src, out in copies:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, out)
    return [target] + [out for _, out in copies]


# ------------------------------------------------------------------------------ Hydra

def register_with_hydra() -> None:
    """Serve the `recipe` group from the recipe directories (a ConfigSource behind a search path
    entry). Idempotent; call before hydra.main runs."""
    from hydra.core.plugins import Plugins

    source, search_path = _hydra_classes()
    plugins = Plugins.instance()
    from hydra.plugins.search_path_plugin import SearchPathPlugin
    if search_path not in plugins.discover(SearchPathPlugin):
        plugins.register(source)
        plugins.register(search_path)


_CLASSES = None


def _hydra_classes():
    global _CLASSES
    if _CLASSES is not None:
        return _CLASSES

    from hydra.core.config_search_path import ConfigSearchPath
    from hydra.core.object_type import ObjectType
    from hydra.plugins.config_source import ConfigLoadError, ConfigResult, ConfigSource
    from hydra.plugins.search_path_plugin import SearchPathPlugin
    from omegaconf import OmegaConf

    class RecipeConfigSource(ConfigSource):
        """Group `recipe` = NAME.yaml of each recipe directory, in search order."""

        def __init__(self, provider: str, path: str) -> None:
            super().__init__(provider=provider, path=path)
            self.dirs = _existing_dirs()

        @staticmethod
        def scheme() -> str:
            return "tune-recipes"

        def _file(self, config_path: str) -> Optional[Path]:
            config_path = config_path.strip("/")
            if not config_path.startswith(GROUP + "/"):
                return None
            name = config_path[len(GROUP) + 1:].removesuffix(".yaml")
            if not _NAME.fullmatch(name):
                return None
            for d in self.dirs:
                f = d / f"{name}.yaml"
                if f.is_file():
                    return f
            return None

        def load_config(self, config_path: str) -> ConfigResult:
            f = self._file(config_path)
            if f is None:
                raise ConfigLoadError(f"Recipe not found: {config_path}")
            text = read_text(f)
            load_recipe_yaml(f, text)  # refuses what is not data, with file:line
            header = ConfigSource._get_header_dict(text[:512])
            if header.get("package") is None:
                header["package"] = "_global_"  # recipes set keys of the whole config
            cfg = OmegaConf.create(text)
            return ConfigResult(config=cfg, path=f"{self.scheme()}://{f.parent}",
                                provider=self.provider, header=header)

        def available(self) -> bool:
            return True

        def is_group(self, config_path: str) -> bool:
            return config_path.strip("/") in ("", GROUP)

        def is_config(self, config_path: str) -> bool:
            return self._file(config_path) is not None

        def list(self, config_path: str, results_filter: Optional[ObjectType]) -> List[str]:
            path = config_path.strip("/")
            out: list[str] = []
            if path == "" and results_filter in (None, ObjectType.GROUP):
                out.append(GROUP)
            if path == GROUP and results_filter in (None, ObjectType.CONFIG):
                out += [n for n, _, _ in list_recipes()]
            return sorted(set(out))

    class RecipeSearchPath(SearchPathPlugin):
        # First, so the group `recipe` is always served (and checked) by this source, hydra.searchpath
        # folders included; it serves nothing else.
        def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
            search_path.prepend(provider="tune-recipes", path="tune-recipes://")

    RecipeConfigSource.__module__ = RecipeSearchPath.__module__ = __name__
    _CLASSES = (RecipeConfigSource, RecipeSearchPath)
    return _CLASSES
