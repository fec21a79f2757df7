"""Datasets on the Hugging Face Hub as data: `data.path=hf://datasets/ORG/NAME` (or one file or
folder of the repo, `hf://datasets/ORG/NAME/PATH`) with data.split, data.subset and data.revision
(data.test_split, data.test_subset and data.test_revision for data.test_path).

A split resolves through huggingface_hub's cache (HF_HUB_CACHE, by default under HF_HOME;
HF_HUB_OFFLINE=1 reads only the cache) to local files: the dataset card (README.md) and the repo's
file list first, then the split's files alone, found as the Hub finds them — the card's `configs:`
section (`data_files` per split) when it has one, else the file and folder names that name the
split (`data/train-00000-of-00002.parquet`, `train.jsonl`, `SUBSET/test/0000.parquet`). The files
are then read as one table, one after another, by the same code as a local file
(compiler/compile.py `_read_file`), so a bad row names its file in the cache and its line.

A cache filled by `datasets.load_dataset` holds the same files (it downloads them through
huggingface_hub), sometimes without a `refs/main` for a card-less repo: one cached snapshot is
then taken as the revision.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from compiler.data import FORMATS
from core.errors import PlanError, did_you_mean, listing
from core.files import sha256_file
from core.plan import HUB_KEY_DEFAULTS, HubSource, TableStats

PREFIX = "hf://"
FORM = ("hf://datasets/ORG/NAME (a dataset: data.split picks the split) or "
        "hf://datasets/ORG/NAME/PATH (one file or folder of it)")
# the config keys of each path: its split, subset and revision
KEYS = {"data.path": ("data.split", "data.subset", "data.revision"),
        "data.test_path": ("data.test_split", "data.test_subset", "data.test_revision")}
# the words that name the usual splits in file and folder names (as the Hub's loader reads them)
SPLIT_WORDS = {"train": ("train", "training"), "validation": ("validation", "valid", "dev", "val"),
               "test": ("test", "testing", "eval", "evaluation")}
SUPPORTED = tuple(FORMATS)           # the suffixes compiler/data.py reads
NOT_DATA = {"README.md", "config.json", "dataset_info.json", "dataset_infos.json",
            "dataset_dict.json", "state.json", ".gitattributes"}
_NAME = re.compile(r"[A-Za-z0-9][\w.-]*")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_SEP = r"[-._ 0-9]"                  # what may stand around a split's word in a name
_SHARDED = re.compile(r"data/([\w.-]+?)-\d{5}-of-\d{5}[^/]*")


@dataclass(frozen=True)
class HubData:
    """A Hub dataset's split, resolved: where the plan says it came from, and its files in the local
    cache (in reading order)."""
    url: str
    source: HubSource
    files: tuple[Path, ...]

    def stats(self, **kw) -> TableStats:
        """The TableStats of the split read as one table."""
        return TableStats(file=self.url, sha256=sha256(self.files), hub=self.source, **kw)


def is_hub(value) -> bool:
    return isinstance(value, str) and value.strip().startswith(PREFIX)


def sha256(files) -> str:
    """One file's sha256, or for several the sha256 of their sha256s in order (so a split in one
    file hashes as that file given as a local path)."""
    digests = [sha256_file(f) for f in files]
    if len(digests) == 1:
        return digests[0]
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def check_keys(key: str, value, d: dict) -> None:
    """data.split, data.subset and data.revision (data.test_* for data.test_path) apply to an hf://
    path only: set with a local file they would silently do nothing."""
    if value is None or is_hub(value):
        return
    for k in KEYS[key]:
        name = k.split(".", 1)[1]
        if d.get(name, HUB_KEY_DEFAULTS[name]) != HUB_KEY_DEFAULTS[name]:
            raise PlanError(k, f"applies only to a Hugging Face Hub dataset ({key}=hf://datasets/"
                            f"ORG/NAME), but {key} is the local file `{value}`.",
                            hint=f"remove {k}, or set {key} to {FORM}.")


def parse(key: str, value: str) -> tuple[str, str]:
    """(ORG/NAME, PATH inside the repo or "") of an hf:// URL; a PlanError saying the form."""
    rest = value.strip()[len(PREFIX):].rstrip("/")
    kind, _, rest = rest.partition("/")
    parts = rest.split("/") if rest else []
    bad = None
    if kind != "datasets":
        bad = (f"names the Hub's `{kind}` repos, not a dataset" if kind in ("models", "spaces")
               else "does not start with hf://datasets/")
    elif len(parts) < 2:
        bad = "names no ORG/NAME"
    elif "@" in parts[1]:
        raise PlanError(key, f"`{value}`: a revision is not written in the URL.",
                        hint=f"write {key}=hf://datasets/{parts[0]}/{parts[1].split('@')[0]} and "
                             f"{KEYS[key][2]}={parts[1].split('@', 1)[1] or 'REV'}.")
    elif not all(_NAME.fullmatch(p) for p in parts[:2]) or ".." in parts[1]:
        bad = f"`{parts[0]}/{parts[1]}` is not a Hub repo id"
    elif any(p in ("", ".", "..") for p in parts[2:]):
        bad = "has an empty, `.` or `..` part in its path"
    if bad:
        raise PlanError(key, f"`{value}` is not a Hub dataset URL: it {bad}.",
                        hint=f"write {FORM}.")
    return f"{parts[0]}/{parts[1]}", "/".join(parts[2:])


def resolve(key: str, value: str, d: dict) -> HubData:
    """The split of the Hub dataset `value` names (d holds the data.* config), as local files.
    Every failure is a PlanError naming the key it is about."""
    split_key, subset_key, rev_key = KEYS[key]
    split, subset, revision = (d.get(k.split(".", 1)[1]) for k in KEYS[key])
    repo, inner = parse(key, value)
    for k, v in ((split_key, split), (subset_key, subset), (rev_key, revision)):
        if v is not None and not str(v).strip():
            raise PlanError(k, "is empty.", hint=f"name one, or leave {k} unset.")
    url = f"{PREFIX}datasets/{repo}" + (f"/{inner}" if inner else "")
    snapshot = _snapshot(key, rev_key, repo, revision, ["README.md", ".gitattributes"])
    commit = snapshot.name
    files, complete = _repo_files(repo, commit, snapshot)
    where = Where(key, split_key, subset_key, repo, complete)
    if inner and inner in files:                # one file of the repo
        for k, v in ((split_key, split), (subset_key, subset)):
            name = k.split(".", 1)[1]
            if v != HUB_KEY_DEFAULTS[name]:
                raise PlanError(k, f"does not apply: {key} names one file of {repo}, `{inner}`.",
                                hint=f"remove {k}, or set {key}=hf://datasets/{repo} to pick a "
                                     "split of the dataset.")
        chosen, split, subset = [inner], None, None
    else:
        chosen, subset = _split_files(where, files, inner, split, subset, snapshot / "README.md")
    _check_size(key, d, files, chosen, snapshot)
    snapshot = _snapshot(key, rev_key, repo, commit, [_literal(f) for f in chosen])
    local = tuple(snapshot / f for f in chosen)
    missing = [f for f, p in zip(chosen, local) if not p.is_file()]
    if missing:
        raise _unreachable(key, repo, revision, f"{len(missing)} of the split's files are "
                           f"missing ({listing(missing, 3)})")
    source = HubSource(repo=repo, split=split, subset=subset, revision=revision, commit=commit,
                       files=tuple(chosen))
    return HubData(url=url, source=source, files=local)


def read_each(path, read_one) -> tuple[list[dict], TableStats]:
    """read_one(file) → (rows, TableStats) over a local file, or over each file of a Hub split with
    the results joined (for readers that take one file at a time: duplicates are then dropped
    within each file)."""
    if not isinstance(path, HubData):
        return read_one(path)
    rows, parts = [], []
    for f in path.files:
        kept, stats = read_one(f)
        rows += kept
        parts.append(stats)
    total = lambda name: {k: sum(getattr(p, name).get(k, 0) for p in parts)      # noqa: E731
                          for k in dict.fromkeys(k for p in parts for k in getattr(p, name))}
    return rows, path.stats(fields=tuple(dict.fromkeys(f for p in parts for f in p.fields)),
                            read=sum(p.read for p in parts), kept=sum(p.kept for p in parts),
                            dropped=total("dropped"), cleaning=total("cleaning"))


# ------------------------------------------------------------------------------ choosing files

@dataclass(frozen=True)
class Where:
    """What a message about a split needs: the keys, the repo, and whether the file list is the
    repo's (False: only the files in the local cache were seen)."""
    key: str
    split_key: str
    subset_key: str
    repo: str
    complete: bool

    def seen(self) -> str:
        return "" if self.complete else " (among the files in the local cache)"


def _split_files(w: Where, files: dict, inner: str, split: str, subset: str | None,
                 card: Path) -> tuple[list[str], str | None]:
    """(the split's files in reading order, the subset they belong to)."""
    if inner and not any(f.startswith(inner + "/") for f in files):
        if not w.complete:
            raise _unreachable(w.key, w.repo, None,
                               f"the cache holds no file or folder `{inner}` of it")
        top = sorted({f.split("/")[0] for f in files if f not in NOT_DATA})
        raise PlanError(w.key, f"{w.repo} has no file or folder `{inner}`.",
                        hint=f"its top level holds: {listing(top, 12)}.{did_you_mean(inner, top)}")
    configs = None if inner else _card_configs(w.key, card)
    if configs:
        return _from_card(w, files, configs, split, subset)
    return _by_name(w, files, inner, split, subset), subset


def _card_configs(key: str, card: Path) -> list[dict] | None:
    """The `configs:` of the dataset card's YAML header, or None when it has none."""
    import yaml

    if not card.is_file():
        return None
    text = card.read_text(encoding="utf-8", errors="replace")
    m = re.match(r"---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|$)", text, re.S)
    if not m:
        return None
    try:
        header = yaml.safe_load(m.group(1))
    except yaml.YAMLError as e:
        reason = " ".join(str(e).split())
        raise PlanError(key, f"the dataset card's YAML header cannot be read ({reason}).",
                        file=str(card), hint="fix the card on the Hub, or name the split's file: "
                                             f"{key}=hf://datasets/ORG/NAME/PATH.") from None
    configs = header.get("configs") if isinstance(header, dict) else None
    if not isinstance(configs, list) or not configs:
        return None
    if not all(isinstance(c, dict) for c in configs):
        raise PlanError(key, "the dataset card's `configs:` is not a list of mappings.",
                        file=str(card), hint="fix the card on the Hub, or name the split's file: "
                                             f"{key}=hf://datasets/ORG/NAME/PATH.")
    return configs


def _from_card(w: Where, files: dict, configs: list[dict], split: str, subset: str | None
               ) -> tuple[list[str], str]:
    names = [str(c.get("config_name", "default")) for c in configs]
    if subset is not None:
        if subset not in names:
            raise PlanError(w.subset_key, f"{w.repo} has no subset `{subset}`; its subsets: "
                            f"{listing(names, 12)}.{did_you_mean(subset, names)}",
                            hint=f"set {w.subset_key} to one of them.")
        config = configs[names.index(subset)]
    else:
        marked = [c for c in configs if c.get("default") is True]
        config = (marked[0] if marked else configs[names.index("default")] if "default" in names
                  else configs[0] if len(configs) == 1 else None)
        if config is None:
            raise PlanError(w.subset_key, f"{w.repo} has {len(names)} subsets and none is its "
                            f"default: {listing(names, 12)}.",
                            hint=f"set {w.subset_key} to one of them.")
    name = str(config.get("config_name", "default"))
    data_dir = str(config.get("data_dir") or "").strip("/")
    if config.get("data_files") is None:        # the subset is a folder: its files named by split
        return _by_name(w, files, data_dir, split, None), name
    patterns = _card_splits(config["data_files"])
    if split not in patterns:
        raise PlanError(w.split_key, f"{w.repo} (subset {name}) has no split `{split}`; its "
                        f"splits: {listing(list(patterns), 12)}.{did_you_mean(split, patterns)}",
                        hint=f"set {w.split_key} to one of them.")
    chosen: dict[str, None] = {}
    for p in patterns[split]:
        rx = _glob(f"{data_dir}/{p}" if data_dir else p)
        chosen.update(dict.fromkeys(sorted(f for f in files if rx.fullmatch(f))))
    if not chosen:
        raise _missing(w, f"the dataset card's data_files for split `{split}` (subset {name}: "
                       f"{', '.join(patterns[split])}) match no file of the repo{w.seen()}")
    return _supported(w, list(chosen), split), name


def _card_splits(data_files) -> dict[str, list[str]]:
    """A card's data_files as split → patterns (a bare pattern, or a list of them: the train
    split)."""
    def listed(v):
        return [str(x) for x in v] if isinstance(v, list) else [str(v)]

    if isinstance(data_files, dict):
        return {str(k): listed(v) for k, v in data_files.items()}
    if isinstance(data_files, list) and all(isinstance(x, dict) for x in data_files):
        return {str(x.get("split", "train")): listed(x.get("path", [])) for x in data_files}
    return {"train": listed(data_files)}


def _by_name(w: Where, files: dict, root: str, split: str, subset: str | None) -> list[str]:
    """The split's files under `root` (and the subset's folder), found by name as the Hub's loader
    finds them: data/SPLIT-00000-of-00002.*, then folders named for the split, then file names."""
    base = "/".join(p for p in (root, subset) if p)
    names = {f[len(base) + 1:] if base else f: f for f in files
             if (not base or f.startswith(base + "/")) and not _hidden(f)
             and f.rsplit("/", 1)[-1] not in NOT_DATA}
    if subset is not None and not names:
        under = [f[len(root) + 1:] if root else f for f in files
                 if not root or f.startswith(root + "/")]
        folders = sorted({f.split("/")[0] for f in under if "/" in f and not _hidden(f)})
        raise PlanError(w.subset_key, f"{w.repo} has no subset folder `{subset}`{w.seen()}; its "
                        f"folders: {listing(folders, 12)}.{did_you_mean(subset, folders)}",
                        hint=f"set {w.subset_key} to one of them, or leave it unset.")
    sharded = {n: m.group(1) for n in names if (m := _SHARDED.fullmatch(n))}
    if sharded:
        found = {s: [n for n, t in sharded.items() if t == s] for s in sharded.values()}
    else:
        found = {}
        for kind in ("folder", "file"):
            for s in dict.fromkeys([*SPLIT_WORDS, split]):
                hits = [n for n in names if _names_split(n, SPLIT_WORDS.get(s, (s,)), kind)]
                if hits:
                    found[s] = hits
            if found:
                break
        if not found and names:             # no split named anywhere: every file is training data
            found = {"train": list(names)}
    if split not in found:
        where = f" (subset {subset})" if subset else f" (under {root})" if root else ""
        if not found:
            raise _missing(w, f"{w.repo}{where} holds no data files{w.seen()}")
        named = [s for s in SPLIT_WORDS if s in found] + sorted(set(found) - set(SPLIT_WORDS))
        raise PlanError(w.split_key, f"{w.repo}{where} has no split `{split}`{w.seen()}; its "
                        f"splits: {listing(named, 12)}.{did_you_mean(split, named)}",
                        hint=f"set {w.split_key} to one of them.")
    chosen = sorted(found[split])
    if subset is None:
        _one_subset(w, chosen)
    return _supported(w, [names[n] for n in chosen], split)


def _names_split(name: str, words, kind: str) -> bool:
    parts = name.split("/")
    if kind == "folder":
        return any(re.search(rf"(^|{_SEP}){re.escape(w)}({_SEP}|$)", p) for p in parts[:-1]
                   for w in words)
    return any(re.search(rf"(^|{_SEP}){re.escape(w)}{_SEP}", parts[-1]) for w in words)


def _one_subset(w: Where, chosen: list[str]) -> None:
    """A split found by name in several top-level folders (SUBSET/train-*.parquet) would mix the
    subsets: ask which one."""
    words = {x for ws in SPLIT_WORDS.values() for x in ws}
    tops = sorted({n.split("/")[0] for n in chosen if "/" in n} - words - {"data"})
    if len(tops) > 1 or (tops and any("/" not in n for n in chosen)):
        raise PlanError(w.subset_key, f"{w.repo} holds this split in {len(tops)} folders, its "
                        f"subsets: {listing(tops, 12)}; reading them all would mix them.",
                        hint=f"set {w.subset_key} to one of them.")


def _supported(w: Where, chosen: list[str], split: str) -> list[str]:
    ok = [f for f in chosen if f.lower().endswith(SUPPORTED)]
    if not ok:
        kinds = sorted({Path(f).name.partition(".")[2] or "(no suffix)" for f in chosen})
        raise PlanError(w.key, f"the split `{split}` of {w.repo} is {len(chosen)} file(s) of a "
                        f"format tune does not read (.{', .'.join(kinds)}): {listing(chosen, 3)}.",
                        hint="tune reads .jsonl, .json, .csv and .parquet files; convert the split "
                             "(e.g. with `datasets`: load_dataset(...).to_parquet(FILE)) and give "
                             "the file as a local path.")
    return ok


def _glob(pattern: str) -> re.Pattern:
    """A data_files pattern as the Hub reads it: ** crosses folders, * and ? do not."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "[":
            j = pattern.find("]", i + 1)
            if j > i:
                body = pattern[i + 1:j]
                out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
                i = j + 1
                continue
        out.append("[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c))
        i += 1
    return re.compile("".join(out).lstrip("/") if pattern.startswith("/") else "".join(out))


def _literal(name: str) -> str:
    """A file name as an allow_patterns pattern that matches only it (fnmatch)."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def _hidden(name: str) -> bool:
    return any(p.startswith(".") for p in name.split("/"))


def _check_size(key: str, d: dict, files: dict, chosen: list[str], snapshot: Path) -> None:
    """The split as a whole against data.max_file_mb (all of it is held in memory), before any of it
    is downloaded when the Hub said the sizes."""
    sizes = [files.get(f) for f in chosen]
    sizes = [s if s is not None else _size(snapshot / f) for f, s in zip(chosen, sizes)]
    total, limit = sum(sizes), d.get("max_file_mb", 1024)
    if total > limit * 2**20:
        raise PlanError(key, f"the split is {total / 2**20:,.3g} MB in {len(chosen)} file(s), more "
                        f"than data.max_file_mb={limit:g}; it is refused before it is read (the "
                        "whole table is held in memory).",
                        hint="pick a smaller split or subset, one file of it "
                             f"({key}=hf://datasets/ORG/NAME/PATH), or raise data.max_file_mb if "
                             "this machine has the memory.")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# ------------------------------------------------------------------------------ the cache, the Hub

def _snapshot(key: str, rev_key: str, repo: str, revision: str | None, patterns: list[str]) -> Path:
    """The snapshot folder (named for its commit) holding `patterns` of the repo at `revision`,
    fetched when the Hub is reachable, else from the cache."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise PlanError(key, "reading a Hub dataset needs the huggingface_hub package, which is "
                        "not installed.", hint="pip install huggingface_hub") from None
    try:
        return Path(snapshot_download(repo, repo_type="dataset", revision=revision,
                                      allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 — network, auth, missing repo: all the user's to fix
        kinds = {c.__name__ for c in type(e).__mro__}
        if "RevisionNotFoundError" in kinds:
            raise PlanError(rev_key, f"`{revision}` is not a branch, tag or commit of the Hub "
                            f"dataset {repo}.", hint="leave it unset for main, or name one "
                            "that exists (the repo's page lists them).") from None
        if "GatedRepoError" in kinds:
            raise PlanError(key, f"the Hub dataset {repo} is gated: its page asks to accept its "
                            "terms first.", hint="accept them on the dataset's page, then log in "
                            "here (`hf auth login`, or set HF_TOKEN).") from None
        if "RepositoryNotFoundError" in kinds:
            raise PlanError(key, f"the Hub has no dataset {repo} (or it is private).",
                            hint="check the name on huggingface.co/datasets; for a private one "
                                 "log in (`hf auth login`, or set HF_TOKEN).") from None
        if revision is None and "LocalEntryNotFoundError" in kinds:
            commit = _only_snapshot(key, rev_key, repo)
            if commit is not None:
                return _snapshot(key, rev_key, repo, commit, patterns)
        raise _unreachable(key, repo, revision, cause=e) from None


def _only_snapshot(key: str, rev_key: str, repo: str) -> str | None:
    """With no ref for main in the cache (a card-less repo cached by `datasets`), its one cached
    snapshot; None when there is none; a PlanError when there are several to choose from."""
    if (_cache_folder(repo) / "refs" / "main").exists():    # main is known, just not cached
        return None
    folder = _cache_folder(repo) / "snapshots"
    commits = sorted(p.name for p in folder.iterdir() if _COMMIT.fullmatch(p.name)) \
        if folder.is_dir() else []
    if len(commits) > 1:
        raise PlanError(rev_key, f"the local cache holds {len(commits)} snapshots of the Hub "
                        f"dataset {repo} and no ref says which is main: {listing(commits, 4)}.",
                        hint=f"set {rev_key} to one of these commits.")
    return commits[0] if commits else None


def _cache_folder(repo: str) -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / ("datasets--" + repo.replace("/", "--"))


def _repo_files(repo: str, commit: str, snapshot: Path) -> tuple[dict[str, int | None], bool]:
    """(file → size in bytes (None: unknown) of the repo at `commit`, whether that is the repo's
    whole list): the listing huggingface_hub cached, or the Hub's; else the files in the cache."""
    from huggingface_hub import constants

    try:
        from huggingface_hub import get_cached_repo_tree
        return {f.path: f.size for f in get_cached_repo_tree(
            repo, repo_type="dataset", revision=commit)}, True
    except Exception:  # noqa: BLE001 — not cached (or an older huggingface_hub): ask, or walk
        pass
    if not constants.HF_HUB_OFFLINE:
        try:
            from huggingface_hub import HfApi
            from huggingface_hub.hf_api import RepoFile

            return {f.path: f.size for f in HfApi().list_repo_tree(
                repo, repo_type="dataset", revision=commit, recursive=True)
                if isinstance(f, RepoFile)}, True
        except Exception:  # noqa: BLE001 — unreachable: what the cache holds is all we know
            pass
    out = {}
    for top, dirs, names in os.walk(snapshot, followlinks=True):
        dirs.sort()
        for n in sorted(names):
            rel = (Path(top) / n).relative_to(snapshot).as_posix()
            out[rel] = None
    return out, False


def _missing(w: Where, what: str) -> PlanError:
    if not w.complete:
        return _unreachable(w.key, w.repo, None, what)
    return PlanError(w.key, f"{what}.", hint="name the split's file: "
                     f"{w.key}=hf://datasets/{w.repo}/PATH.")


def _unreachable(key: str, repo: str, revision: str | None, detail: str | None = None,
                 cause: Exception | None = None) -> PlanError:
    """The dataset (or some of the split's files) is not in the local cache, and the Hub cannot be
    asked."""
    from huggingface_hub import constants

    at = f" at revision {revision}" if revision else ""
    if constants.HF_HUB_OFFLINE:
        hub = "HF_HUB_OFFLINE=1 is set, so the Hub is not asked"
    else:
        reason = (str(cause).strip().splitlines() or [""])[0].rstrip(".") if cause else ""
        hub = ("the Hugging Face Hub could not be reached"
               + (f" ({type(cause).__name__}: {reason})" if cause else ""))
    return PlanError(key, f"the Hub dataset {repo}{at} is not in the local Hugging Face cache "
                     f"(HF_HUB_CACHE={constants.HF_HUB_CACHE})" + (f": {detail}" if detail else "")
                     + f", and {hub}.",
                     hint=f"on a connected machine run `hf download {repo} --repo-type dataset` "
                          f"(older huggingface_hub: `huggingface-cli download --repo-type dataset "
                          f"{repo}`) with HF_HUB_CACHE (or HF_HOME) set to the cache this machine "
                          "reads, then run here with HF_HUB_OFFLINE=1 and that cache.")
