"""Config → Plan: every check that needs no accelerator, in the order a reader would ask them.

schema (types, ranges, unknown keys) → safety (no code in the config) → model (found, supported)
→ data (files read, cleaned, sampled, split; test file) → template (placeholders are fields) →
examples (tokenised, cached; over-length and unsupervised rows counted) → adapter (targets are
modules of this model; trainable parameters) → runtime (devices, dtype, mesh) → schedule (exact
steps) → estimates (memory, time) → warnings. The first problem is a PlanError; doubts become
plan.warnings. Every value the runtime needs is resolved here, once.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from compiler import data as data_mod
from compiler import estimates, safety, schema
from core import packing
from core.packing import PALLAS_BLOCK
from core.processes import processes
from core.errors import PlanError, did_you_mean, listing
from core.files import sha256_file, tune_home
from core.architecture import (ATTENTION_MODULES, FUSED, full_module_names, full_module_params,
                               lora_scale)
from core.labels import RARE_CLASS, is_classification, normalise
from core.plan import (PLAN_VERSION, AdapterSection, DataSection, Devices, EvalSection, Estimates,
                           Label, MeshAxes, ModelSection, ObjectiveSection, Plan, Recipe,
                           RetrievalSection, RuntimeSection, ScheduleSection, TableStats,
                           TemplateSection, TrackingSection, WITH_REFERENCE, with_hash)
from core.templates import check_fields, placeholders, prompt_fields

FEW_ROWS = 200                  # fewer usable training rows than this: a warning
MEMORY_WARN = 0.9               # estimated share of device memory above which we warn
MEMORY_ERROR = 1.25             # ... and above which it clearly does not fit (estimates are rough)
REFERENCE_COST = 4 / 3          # a step with a reference forward pass: forward + backward (≈ 3
                                # forwards) + one more forward
TRAIN_COMMANDS = ("train", "plan", "run")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
_REASONS = {"missing_field": "missing a field", "empty_field": "an empty field",
            "duplicate": "duplicates", "identical": "with chosen identical to rejected"}


def compile_plan(cfg: dict, *, recipe_info: Recipe | None, command: str = "plan",
                 cwd: Path | None = None) -> Plan:
    """Compile a composed, resolved config (a plain dict) into a Plan. Raises PlanError.

    command: "train"/"plan"/"run" need training data; "eval" needs data.test_path and may go without
    training data (the base model is scored); "generate" needs neither."""
    from compiler.models import resolve_model

    from compiler.recipes import check_pin

    safety.check_config(cfg)
    config, warnings = schema.validate(cfg)
    check_pin(config["recipe_sha256"], recipe_info)
    _check_balance(config)
    _check_head(config)
    need_train = command in TRAIN_COMMANDS
    if config["objective"]["kind"] != "sft":
        from compiler.preference import resolve_template

        config = resolve_template(config)
    model = resolve_model(config["model"])
    if config["template"]["chat"] and not model.chat_template:
        raise PlanError("template.chat", f"{model.name} has no chat template.",
                        hint="set template.chat=false to train on the plain prompt and response.")
    policy = _text_policy(config["data"], model)
    cwd = Path(cwd or Path.cwd())
    length = _length_rule(config, model) if config["data"]["max_length"] == "auto" else None
    tables, retrieval, data, examples = _data_stage(config, model, recipe_info, cwd, command,
                                                    warnings, policy, length=length)
    _check_context(data, model)
    data, order = _balance(config["data"], data, examples, config["schedule"]["seed"])
    template = _template_section(config["template"], model, data)
    adapter = _adapter_section(config["adapter"], model)
    adapter = _head(config, adapter, data, model, need_train=need_train, warnings=warnings)
    objective = _objective_section(config, model, adapter, need_train=need_train)
    if need_train:
        _check_row_count(data, config["schedule"], warnings)
    row_length = _row_length(config["runtime"], data.max_length, units=objective.preference)
    lengths = examples.unit_lengths("train") if examples else np.zeros(0, dtype=np.int64)
    if order is not None:           # data.balance=oversample: the epoch's examples, repeats counted
        lengths = lengths[order]
    sched = _rows_per_batch(config["schedule"], config["runtime"], model, lengths, row_length)
    runtime = _runtime_section(config["runtime"], _devices(), model, sched,
                               row_length, examples, segments=objective.preference, order=order)
    schedule = _schedule_section(sched, runtime, lengths, row_length)
    adapter = _head_probe(config["adapter"], adapter, schedule, need_train=need_train,
                          warnings=warnings)
    evaluation = _eval_section(config["eval"], data, objective, examples)
    if command in TRAIN_COMMANDS + ("eval",):
        warnings += _imbalance_warnings(data, evaluation) + _longrope_warnings(model, data,
                                                                               evaluation)
    if need_train:
        warnings += _weighted_lr_warnings(data, float(config["schedule"]["lr"]))
    estimates_ = _estimates(model, adapter, schedule, runtime, data, evaluation, warnings,
                            need_train=need_train, objective=objective, examples=examples,
                            retrieval=retrieval is not None)
    warnings += _schedule_warnings(schedule, estimates_) + _mesh_warnings(runtime.mesh, model)
    plan = Plan(version=PLAN_VERSION, hash="", model=model, data=data, template=template,
                adapter=adapter, schedule=schedule, runtime=runtime,
                eval=evaluation, estimates=estimates_,
                recipe=recipe_info, config=_with_files(config, tables, retrieval),
                warnings=tuple(dict.fromkeys(warnings)), retrieval=retrieval,
                tracking=_tracking_section(config["tracking"], recipe_info), objective=objective)
    return with_hash(plan)


# ------------------------------------------------------------------------------ data files

def _data_stage(config: dict, model: ModelSection, recipe_info, cwd: Path, command: str,
                warnings: list, policy: data_mod.TextPolicy, length=None):
    """Files read, cleaned, split (retrieval filled in) and tokenised: (tables, retrieval, data
    section, token data). Remembered by the files' content and the settings (compiler/datacache.py):
    the same inputs again read no row. `length`: data.max_length=auto's LengthRule (None for a
    given length)."""
    from compiler import datacache

    d = config["data"]
    files = {"data.path": _data_file("data.path", d["path"], recipe_info, cwd,
                                     required=command in TRAIN_COMMANDS, command=command, data=d),
             "data.test_path": _data_file("data.test_path", d["test_path"], recipe_info, cwd,
                                          required=command == "eval", command=command, data=d)}
    key = datacache.key_of(config, model, command, files, length=length)
    hit = datacache.load(key)
    if hit is not None:
        warnings += hit["warnings"]
        tables = _Tables(splits={"train": [], "val": [], "test": []}, train=hit["train"],
                         test=hit["test"])
        data, examples, _ = _tokenise(config, tables, model, warnings, remembered=hit["stats"],
                                      length=length)
        return tables, None, data, examples
    before = len(warnings)
    tables = _read_tables(config, recipe_info, cwd, command, warnings, policy, files)
    tables, retrieval = _retrieve(config, tables, model, policy, recipe_info, cwd, warnings)
    label_warnings: list[str] = []
    data, examples, stats = _tokenise(config, tables, model, warnings,
                                      label_warnings=label_warnings, length=length)
    if retrieval is None:
        datacache.save(key, train=tables.train, test=tables.test, stats=stats,
                       warnings=warnings[before:])
    warnings += label_warnings
    return tables, retrieval, data, examples

@dataclass(frozen=True)
class _Tables:
    """The rows of each split, and what the plan says about the files they came from."""
    splits: dict                # train / val / test → rows
    train: TableStats | None
    test: TableStats | None


def _text_policy(d: dict, model: ModelSection) -> data_mod.TextPolicy:
    from core.tokenizer import control_tokens, load_tokenizer

    return data_mod.TextPolicy(normalize=d["normalize"], whitespace=d["whitespace"],
                               control_tokens=d["control_tokens"],
                               controls=control_tokens(load_tokenizer(model.dir)))


def _read_tables(config: dict, recipe_info, cwd: Path, command: str, warnings: list,
                 policy: data_mod.TextPolicy, files: dict | None = None) -> _Tables:
    """The rows of each split. `files`: data.path and data.test_path as _data_file resolved them
    (resolved here when not given)."""
    d, t, seed = config["data"], config["template"], config["schedule"]["seed"]
    from compiler.retrieval import PLACEHOLDER, check_template

    check_template(config["retrieval"], t)
    extra = [PLACEHOLDER] if config["retrieval"]["corpus"] is not None else []
    if files is None:
        files = {"data.path": _data_file("data.path", d["path"], recipe_info, cwd,
                                         required=command in TRAIN_COMMANDS, command=command,
                                         data=d),
                 "data.test_path": _data_file("data.test_path", d["test_path"], recipe_info, cwd,
                                              required=command == "eval", command=command,
                                              data=d)}
    train_file, test_file = files["data.path"], files["data.test_path"]
    if command == "generate" and train_file is None:
        test_file = None
    splits = {"train": [], "val": [], "test": []}
    train = test = None
    train_sig: set = set()
    objective = config["objective"]["kind"]
    if objective != "sft":
        from compiler import preference

        def read(key, path, *, dedupe, extra):
            from compiler.hub import read_each      # a Hub split: each of its files in turn

            return read_each(path, lambda f: preference.read_file(
                key, f, d, t, objective, policy, dedupe=dedupe, extra=extra,
                test=key == "data.test_path"))

        signature = lambda row: (preference.signature(row),)          # noqa: E731
    else:
        def read(key, path, *, dedupe, extra):
            return _read_file(key, path, d, t, policy, dedupe=dedupe, extra=extra)

        signature = lambda row: _prompt_signature(row, t)             # noqa: E731
    if train_file:
        kept, train = read("data.path", train_file, dedupe=d["dedupe"], extra=extra)
        sampled = data_mod.sample_rows(kept, d["max_rows"], seed)
        splits["train"], splits["val"] = data_mod.split_validation(sampled, d["val_fraction"], seed,
                                                                   d["val_rows"])
        train = replace(train, sampled=len(sampled), train=len(splits["train"]),
                        val=len(splits["val"]))
        train_sig = {signature(r) for r in kept}
    if test_file:
        splits["test"], test = read("data.test_path", test_file, dedupe=False, extra=extra)
        leaked = sum(signature(r) in train_sig for r in splits["test"])
        if leaked:
            warnings.append(f"{leaked} of {len(splits['test'])} test rows also appear in data.path "
                            f"(same {', '.join(prompt_fields(t)) or 'conversation'}): the "
                            "held-out score will flatter the adapter.")
    for name, stats in (("train", train), ("test", test)):
        if stats is not None and any(stats.dropped.values()):
            warnings.append(f"{name} file: dropped {_reasons(stats.dropped)}.")
    return _Tables(splits=splits, train=train, test=test)


def _read_file(key: str, path: Path, d: dict, t: dict, policy: data_mod.TextPolicy, *,
               dedupe: bool, extra: list[str]) -> tuple[list[dict], TableStats]:
    """The usable rows of one data file (every template field present, of the right kind, cleaned
    and non-empty; duplicates dropped when asked) and its stats. `extra`: fields the compiler adds
    later (the retrieved passages), which the template may read but the file need not have.
    `path` may also be a Hub dataset's split (compiler/hub.py): its files are read in order as one
    table, each row remembering its own file and line."""
    from compiler.hub import HubData

    hub = path if isinstance(path, HubData) else None
    files, shown = (hub.files, hub.url) if hub else ((path,), str(path))
    tables = [data_mod.read_table(f, key=key, fmt=d["format"], max_mb=d["max_file_mb"])
              for f in files]
    fields = list(dict.fromkeys(x for table in tables for x in data_mod.table_fields(table)))
    used = [f for f in check_fields(t, fields + [f for f in extra if f not in fields],
                                    file=shown) if f not in extra]
    rows, cleaning = [], {}
    for file, table in zip(files, tables):
        locate = data_mod.row_locator(file, fmt=d["format"])
        table = data_mod.with_origins(table, str(file), locate)   # the token checks name lines
        table, counts = data_mod.prepare_rows(
            table, fields=[f for f in used if f != t["messages"]], messages=t["messages"],
            policy=policy, key=key, file=str(file), locate=locate)
        rows += table
        cleaning = {k: cleaning.get(k, 0) + n for k, n in counts.items()}
    kept, dropped = data_mod.clean_rows(rows, fields=used, dedupe=dedupe)
    if not kept:
        raise PlanError(key, f"no usable rows: all {len(rows)} rows were dropped "
                        f"({_reasons(dropped)}).", file=shown,
                        hint=f"the template reads {', '.join(used)}; every row needs them non-empty.")
    counts = dict(fields=tuple(fields), read=len(rows), kept=len(kept), dropped=dropped,
                  cleaning=cleaning)
    return kept, (hub.stats(**counts) if hub else
                  TableStats(file=shown, sha256=sha256_file(path), **counts))


def _data_file(key, value, recipe_info, cwd, *, required: bool, command: str, data: dict):
    """The data file `value` names (None when unset and not required): a local file, or the split
    of a Hugging Face Hub dataset (hf://datasets/ORG/NAME; compiler/hub.py)."""
    from compiler import hub, recipes

    hub.check_keys(key, value, data)
    if value is None:
        if required:
            if key == "data.path":
                names = ", ".join(n for n, _, _ in recipes.list_recipes()) or "none found"
                raise PlanError(key, "no training data: set data.path=FILE (JSONL, JSON, CSV or "
                                "Parquet), or choose a recipe with +recipe=NAME.",
                                hint=f"recipes: {names}.")
            raise PlanError(key, f"`tune {command}` scores data.test_path, which is not set.",
                            hint="set data.test_path=FILE, or choose a recipe that sets it.")
        return None
    if hub.is_hub(value):
        return hub.resolve(key, str(value).strip(), data)
    return recipes.resolve_data_path(key, value, recipe_info, cwd=cwd)


def _prompt_signature(row: dict, t: dict) -> tuple:
    if t["messages"] is not None:            # a conversation's prompt: the turns before its answer
        from compiler.conversations import last_exchange

        return (json.dumps(last_exchange(row[t["messages"]])[0], sort_keys=True),)
    return tuple(str(row.get(f)) for f in prompt_fields(t))


def _reasons(dropped: dict) -> str:
    parts = [f"{n} {_REASONS.get(k, k)}" for k, n in dropped.items() if n]
    return ", ".join(parts) or "none"


def _with_files(config: dict, tables: _Tables, retrieval: RetrievalSection | None) -> dict:
    """The validated config with the data paths as the files actually read (absolute)."""
    data = dict(config["data"])
    for key, stats in (("path", tables.train), ("test_path", tables.test)):
        if stats is not None:
            data[key] = stats.file
    out = {**config, "data": data}
    if retrieval is not None:
        out["retrieval"] = {**config["retrieval"], "corpus": retrieval.corpus}
    return out


# ------------------------------------------------------------------------------ retrieval

def _retrieve(config: dict, tables: _Tables, model: ModelSection, policy: data_mod.TextPolicy,
              recipe_info, cwd: Path, warnings: list) -> tuple[_Tables, RetrievalSection | None]:
    """With retrieval.corpus: the BM25 index built (or reused) and every row's {retrieved} filled;
    the test rows also without passages (split test_plain). compiler/retrieval.py."""
    r = config["retrieval"]
    if r["corpus"] is None or not any(tables.splits.values()):
        return tables, None
    from compiler import recipes
    from compiler import retrieval as ret
    from core.tokenizer import load_tokenizer

    query = ret.query_format(r, config["template"]["prompt"])
    for stats in (tables.train, tables.test):
        if stats is None:
            continue
        ret.check_query(query, list(stats.fields), file=stats.file)
        if r["gold"] is not None and r["gold"] not in stats.fields:
            raise PlanError("retrieval.gold", f"`{r['gold']}` is not a field of the data.",
                            file=stats.file, hint=f"the fields are: {', '.join(stats.fields)}; "
                                                  "or set retrieval.gold=null.")
    path = recipes.resolve_data_path("retrieval.corpus", r["corpus"], recipe_info, cwd=cwd)
    passages, stats = ret.load_corpus(path, r, policy, load_tokenizer(model.dir),
                                      max_mb=config["data"]["max_file_mb"])
    index = ret.Index.build(passages, key=ret.index_key(stats, r, policy, model.tokenizer_hash),
                            cache_dir=ret.default_cache_dir())
    splits, per_split = dict(tables.splits), {}
    for name in ("train", "val", "test"):
        if splits[name]:
            splits[name], per_split[name] = ret.fill(splits[name], index, query=query, k=r["k"],
                                                     gold=r["gold"])
    splits["test_plain"] = ret.plain(tables.splits["test"])
    matched_none = sum(s["no_match"] for s in per_split.values())
    if matched_none:
        warnings.append(f"retrieval: {matched_none} rows' queries share no word with any passage "
                        f"(their {r['k']} passages are arbitrary); check retrieval.query.")
    section = RetrievalSection(
        corpus=str(path), sha256=stats["sha256"], id_field=r["id_field"],
        text_field=r["text_field"], query=query, k=r["k"], passage_tokens=r["passage_tokens"],
        passages=stats["passages"], cut=stats["cut"], empty=stats["empty"], gold=r["gold"],
        per_split=per_split, index=str(index.path))
    return replace(tables, splits=splits), section


# ------------------------------------------------------------------------------ examples

def _tokenise(config: dict, tables: _Tables, model: ModelSection, warnings: list,
              remembered: dict | None = None, label_warnings: list | None = None, length=None):
    """The data section (token cache built or reused), the token data (None without any), which
    the exact step count and the loss buffer are sized from, and the token data's stats.
    `remembered`: the stats of a remembered data stage (compiler/datacache.py; its warnings are
    already in `warnings`). `label_warnings`: where the label set's warnings go (default
    `warnings`): they are not remembered, since they are derived again each time. `length`:
    data.max_length=auto's LengthRule, the length then chosen from the rows (compiler/examples)."""
    from compiler.examples import build_examples
    from core.token_cache import load_examples

    d, t = config["data"], config["template"]
    sha = {name: s.sha256 for name, s in (("train", tables.train), ("test", tables.test)) if s}
    stats: dict = {"cache": None, "key": None, "sizes": {"train": 0, "val": 0, "test": 0},
                   "tokens": {}, "truncated": 0, "dropped_too_long": 0, "no_supervised": 0,
                   "supervised": {}, "per_split": {}, "n_labels": 0, "answers": [], "examples": [],
                   "truncated_fields": {}, "answers_cut": 0}
    examples = None
    preference = None
    if config["objective"]["kind"] != "sft":
        preference = {"prompt_field": d["fields"]["prompt"], "seed": config["schedule"]["seed"],
                      "objective": config["objective"]["kind"]}
    if remembered is not None:
        stats = remembered
        examples = load_examples(stats["cache"]) if stats.get("cache") else None
    elif any(tables.splits.values()):
        stats = build_examples(
            tables.splits, template=t, tokenizer_dir=model.dir,
            chat_template=model.chat_template if t["chat"] else None, eos_token=model.eos_token,
            bos_token=model.bos_token, max_length=length or d["max_length"],
            overlength=d["overlength"],
            truncate_fields=d["truncate_fields"], cache_dir=tune_home() / "cache" / "examples",
            preference=preference,
            key_material={"sha256": sha, "max_rows": d["max_rows"],
                          "val_fraction": d["val_fraction"], "val_rows": d["val_rows"],
                          "seed": config["schedule"]["seed"],
                          "dedupe": d["dedupe"], "tokenizer_hash": model.tokenizer_hash,
                          "text": [d["normalize"], d["whitespace"], d["control_tokens"]]})
        examples = load_examples(stats["cache"])
        d = _resolved_length(d, stats, length)
        warnings += _pair_warnings(stats, d) if preference else _example_warnings(stats, d)
        warnings += _answer_cut_warnings(stats, d, tables.splits, preference is not None)
    lw = warnings if label_warnings is None else label_warnings
    d = _resolved_length(d, stats, length)
    section = DataSection(
        format=d["format"], max_rows=d["max_rows"], val_fraction=d["val_fraction"],
        val_rows=d["val_rows"], max_length=d["max_length"], overlength=d["overlength"],
        dedupe=d["dedupe"],
        train=tables.train, test=tables.test, cache=stats["cache"], key=stats["key"],
        sizes=dict(stats["sizes"]), tokens=dict(stats["tokens"]), truncated=stats["truncated"],
        truncate_fields=tuple(d["truncate_fields"] or ()),
        truncated_fields=dict(stats["truncated_fields"]),
        dropped_too_long=stats["dropped_too_long"], no_supervised=stats["no_supervised"],
        answers_cut=stats["answers_cut"], supervised=dict(stats["supervised"]),
        per_split=dict(stats["per_split"]), length_choice=stats.get("length_choice"),
        n_labels=stats["n_labels"], turns_dropped=stats.get("turns_dropped", 0),
        normalize=d["normalize"], whitespace=d["whitespace"], control_tokens=d["control_tokens"],
        unit=2 if preference else 1,
        pairs={k: stats[k] for k in ("units", "pair_tokens", "labels") if k in stats},
        **(_label_set("generation", stats, [], lw) if preference else
           _label_set(d["task"], stats, examples.references if examples else [], lw)))
    return section, examples, stats


def _resolved_length(d: dict, stats: dict, length) -> dict:
    """data.* with max_length=auto replaced by the length chosen from the rows (with no rows to
    measure: the schema's default, within the rule's cap)."""
    if d["max_length"] != "auto":
        return d
    chosen = stats.get("max_length") or min(schema.BY_PATH["data.max_length"].default, length.cap)
    return {**d, "max_length": int(chosen)}


def _label_set(task: str, stats: dict, references: list[str], warnings: list) -> dict:
    """task, labels, majority_baseline and unseen_test_labels of the data section: whether the
    training answers form a closed label set (or data.task says so), and what that means for the
    test rows."""
    answers, n_train = stats["answers"], stats["sizes"]["train"]
    none = {"task": "generation", "labels": (), "majority_baseline": None, "unseen_test_labels": ()}
    if task == "generation" or n_train == 0:
        return none
    if task == "classification" and not answers:
        raise PlanError("data.task", f"is classification, but the training answers have "
                        f"{stats['n_labels']} distinct values: not a closed label set.",
                        hint="set data.task=generation (or auto), or check template.response.")
    if task == "auto" and not is_classification(answers, n_train):
        return none
    keys = [a["key"] for a in answers]
    refs = [normalise(r, classification=True) for r in references]
    unseen = sorted(set(refs) - set(keys))
    if unseen:
        warnings.append(f"{len(unseen)} test label(s) never occur in training and will always be "
                        f"scored wrong: {listing(unseen)}.")
    rare = [f"{a['text']} ({a['count']})" for a in answers if a["count"] < RARE_CLASS]
    if rare:
        warnings.append(f"{len(rare)} label(s) have fewer than {RARE_CLASS} training rows: "
                        f"{listing(rare)}; expect them to be predicted poorly.")
    return {"task": "classification",
            "labels": tuple(Label(a["text"], tuple(a["ids"]), a["count"]) for a in answers),
            "majority_baseline": sum(r == keys[0] for r in refs) / len(refs) if refs else None,
            "unseen_test_labels": tuple(unseen)}


# ------------------------------------------------------------------------------ label balance

def _check_balance(config: dict) -> None:
    """data.balance balances a classification task's labels: refused, before any data is read,
    where the config itself rules a label set out (the data's own answers are checked in
    _balance)."""
    b, kind, task = config["data"]["balance"], config["objective"]["kind"], config["data"]["task"]
    if b == "none":
        return
    if kind != "sft":
        raise PlanError("data.balance", f"`{b}` balances the labels of a classification task, but "
                        f"objective.kind={kind} trains on preference data, which has no labels.",
                        hint="set data.balance=none" + (
                            "; objective.desirable_weight and objective.undesirable_weight weigh "
                            "KTO's two kinds of rows." if kind == "kto" else "."))
    if task == "generation":
        raise PlanError("data.balance", f"`{b}` balances the labels of a classification task, but "
                        "data.task=generation has no label set.",
                        hint="set data.task=classification (or auto) if the answers are labels, "
                             "or data.balance=none.")


def _balance(d: dict, data: DataSection, examples, seed: int
             ) -> tuple[DataSection, np.ndarray | None]:
    """data.balance resolved (core/balance.py): (the data section with the balanced counts or the
    class weights, the training examples an epoch holds under oversample — indices into the
    training split, repeats included — else None)."""
    from core import balance

    b, factor = d["balance"], float(d["balance_max_factor"])
    if b == "none" or not data.sizes.get("train"):
        return data, None           # nothing to train on (`tune eval` of a base model): no balance
    if data.task != "classification":
        raise PlanError("data.balance", f"`{b}` balances the labels of a classification task, but "
                        f"the training answers are open-ended ({data.n_labels:,} distinct), not a "
                        "label set.", hint="set data.task=classification if the answers are "
                        "labels, or data.balance=none.")
    counts = [x.count for x in data.labels]
    data = replace(data, balance=b, balance_max_factor=factor)
    if b == "weighted":
        return replace(data, class_weights=balance.class_weights(counts, factor)), None
    order = balance.oversample(examples.classes("train"), len(counts), factor, seed)
    return replace(data, balanced_counts=tuple(balance.oversampled_counts(counts, factor))), order


def _imbalance_warnings(data: DataSection, ev: EvalSection) -> list[str]:
    """Accuracy on imbalanced labels mostly rewards answering the largest class: said once, with
    what would train and score the classes more evenly."""
    from core.balance import is_imbalanced

    counts = [x.count for x in data.labels]
    if data.task != "classification" or ev.metric != "accuracy" or not is_imbalanced(counts):
        return []
    top, low, total = data.labels[0], data.labels[-1], sum(counts)
    baseline = (f" (always answering it scores {data.majority_baseline:.3f} on the test rows)"
                if data.majority_baseline is not None else "")
    fix = ("data.balance=oversample (or weighted) trains on the classes more evenly, and "
           if data.balance == "none" else "")
    return [f"the training labels are imbalanced: `{top.text}` is {top.count / total:.0%} of the "
            f"{total:,} training examples and the smallest class, `{low.text}`, has {low.count:,}; "
            f"eval.metric=accuracy mostly rewards answering `{top.text}`{baseline}. {fix}"
            "eval.metric=macro_f1 scores every class alike."]


# data.balance=weighted: the learning rate above which a strongly weighted run was measured to learn
# nothing (the classification head on LegalBench unfair_tos: weights 0.53 and 5.35, lr 2e-3)
WEIGHTED_LR = 5e-4
WEIGHTED_RATIO = 4.0        # the weights' spread (largest / smallest) from which that applies


def _weighted_lr_warnings(data: DataSection, lr: float) -> list[str]:
    """Strong class weights at a high learning rate: said once, with what was measured."""
    w = data.class_weights
    if data.balance != "weighted" or not w or lr <= WEIGHTED_LR:
        return []
    ratio = max(w) / min(w)
    if ratio < WEIGHTED_RATIO:
        return []
    return [f"data.balance=weighted weighs the smallest classes' examples {ratio:.3g}× the "
            f"largest class's, at schedule.lr={lr:g}: a step that holds one of them mostly follows "
            "that example, and at this learning rate training may learn nothing (measured with the "
            "classification head on LegalBench unfair_tos, 3,057 rows, weights ×10 apart: at "
            "schedule.lr=2e-3 it answered the largest class on every test row, macro-F1 0.105; at "
            f"5e-4 it reached 0.735, against 0.689 unweighted at 2e-3). Use schedule.lr of at most "
            f"{WEIGHTED_LR:g} with data.balance=weighted, or a smaller data.balance_max_factor."]


def _answer_cut_warnings(stats: dict, d: dict, splits: dict, pairs: bool) -> list[str]:
    """data.overlength=truncate_answer: how many answers were cut, and where the first are."""
    from compiler.examples import cut_answer_places

    n = int(stats.get("answers_cut") or 0)
    if not n:
        return []
    places = cut_answer_places(splits, stats.get("answers_cut_rows") or [],
                               stats.get("answers_cut_in_rows") or n)
    longest = stats.get("longest_cut_answer") or 0
    what = ("reply", "replies") if pairs else ("answer", "answers")
    return [f"{n} {what[n != 1]} {'was' if n == 1 else 'were'} cut at their end to fit "
            f"data.max_length={d['max_length']} tokens "
            f"(data.overlength=truncate_answer): the model learns them clipped, without their end "
            f"token: {places}"
            + f"; the longest is {longest} tokens: data.max_length={longest + 1} keeps them whole."]


def _pair_warnings(stats: dict, d: dict) -> list[str]:
    """What over-length did to preference units: prompts cut (the replies stay whole, unless
    data.overlength=truncate_answer cut them: _answer_cut_warnings), units dropped
    (data.overlength=drop)."""
    out = []
    total = sum(int(v) for v in stats["sizes"].values()) + int(stats["dropped_too_long"]) + \
        int(stats["no_supervised"])
    if stats["truncated"]:
        out.append(f"{stats['truncated']} of {total} pairs (KTO: rows) have a prompt and reply "
                   f"longer than data.max_length={d['max_length']} tokens: their prompts were cut "
                   "from the start, " + (f"and {stats['answers_cut']} replies at their end."
                                         if stats.get("answers_cut") else
                                         "the replies kept whole."))
    if stats["dropped_too_long"]:
        out.append(f"{stats['dropped_too_long']} of {total} pairs (KTO: rows) were dropped as too "
                   "long (data.overlength=drop); raise data.max_length to keep them.")
    return out


def _example_warnings(stats: dict, d: dict) -> list[str]:
    out = []
    total = sum(int(v) for v in stats["sizes"].values()) + int(stats["dropped_too_long"]) + \
        int(stats["no_supervised"])
    p95 = stats["tokens"].get("p95")
    if stats["truncated"]:
        fields = stats["truncated_fields"]
        where = ", ".join(f"{f} in {n} rows" for f, n in sorted(fields.items(), key=lambda x: -x[1]))
        out.append(f"{stats['truncated']} of {total} examples are longer than data.max_length="
                   f"{d['max_length']} tokens (train p95 = {p95}) and were truncated: cut "
                   + (f"inside their fields ({where})" if fields else "from the prompt's start")
                   + ("; the rest from the prompt's start" if fields and
                      sum(fields.values()) < stats["truncated"] else "")
                   + (f"; {stats['answers_cut']} of them also at their answer's end"
                      if stats.get("answers_cut") else "") + ".")
    if stats["dropped_too_long"]:
        out.append(f"{stats['dropped_too_long']} of {total} examples are longer than "
                   f"data.max_length={d['max_length']} tokens and were dropped (data.overlength=drop; "
                   f"train p95 = {p95} tokens).")
    if stats["no_supervised"]:
        out.append(f"{stats['no_supervised']} examples had no supervised token and were dropped.")
    return out


def _template_section(t: dict, model: ModelSection, data: DataSection) -> TemplateSection:
    from core.token_cache import load_examples

    fields: list[str] = []
    for part in ("prompt", "response", "system"):
        if t[part] is not None:
            fields += [f for f in placeholders(t[part], key=f"template.{part}") if f not in fields]
    examples = load_examples(data.cache).stats.get("examples", []) if data.cache else []
    if t["messages"] is not None:
        fields.insert(0, t["messages"])
    return TemplateSection(prompt=t["prompt"], response=t["response"], system=t["system"],
                           chat=t["chat"], fields=tuple(fields),
                           chat_template=model.chat_template if t["chat"] else None,
                           examples=tuple(examples), messages=t["messages"])


def _eval_section(ev: dict, data: DataSection, objective: ObjectiveSection,
                  examples=None) -> EvalSection:
    """eval.mode resolved: auto is constrained decoding for classification, else free generation;
    constrained and choices need the closed label set of a classification task. A preference
    objective scores held-out pairs (mode and metric preference / preference_accuracy).
    eval.max_new_tokens=auto resolved from the answers of the token data (`examples`)."""
    ev = {**ev, **_max_new_tokens(ev["max_new_tokens"], data, examples)}
    if objective.preference:
        return EvalSection(**{**ev, "mode": "preference", "metric": "preference_accuracy"})
    mode = ev["mode"]
    if mode == "auto":
        mode = "constrained" if data.task == "classification" else "generate"
    elif mode in ("constrained", "choices") and data.task != "classification" and data.sizes["train"]:
        raise PlanError("eval.mode", f"{mode} needs a closed label set, but the training answers "
                        f"are open-ended ({data.n_labels} distinct).",
                        hint="use eval.mode=generate, or data.task=classification if the answers "
                             "are labels.")
    return EvalSection(**{**ev, "mode": mode})


NEW_TOKENS_MULTIPLE = 8         # eval.max_new_tokens=auto: the longest answer rounded up to this,
NEW_TOKENS_CAP = 1024           # at most this (and data.max_length)
CLASSIFY_NEW_TOKENS = 16        # ... for a label set: free decoding beside the constrained one


def _max_new_tokens(value, data: DataSection, examples) -> dict:
    """eval.max_new_tokens (and what auto chose, and why, for the plan). auto: for a label set,
    CLASSIFY_NEW_TOKENS (constrained decoding follows the labels' own tokens; this bounds the free
    decoding shown beside it); for generation, the longest training answer in tokens, end token
    included (the longest test answer when nothing is trained on), rounded up to a multiple of
    NEW_TOKENS_MULTIPLE, at most NEW_TOKENS_CAP and data.max_length."""
    if value != "auto":
        return {"max_new_tokens": value, "max_new_tokens_choice": None}
    if data.task == "classification":
        return {"max_new_tokens": CLASSIFY_NEW_TOKENS, "max_new_tokens_choice":
                f"eval.max_new_tokens auto → {CLASSIFY_NEW_TOKENS} (classification: constrained "
                "decoding follows the labels' tokens; this bounds the free decoding beside it)"}
    longest = (examples.stats.get("longest_answer") or {}) if examples is not None else {}
    split = "train" if longest.get("train") else "test"
    tokens = int(longest.get(split) or 0)
    top = min(NEW_TOKENS_CAP, data.max_length)
    n = min(top, -(-tokens // NEW_TOKENS_MULTIPLE) * NEW_TOKENS_MULTIPLE) if tokens else top
    what = (f"the longest {'training' if split == 'train' else 'test'} answer: {tokens} tokens "
            f"with its end token, rounded up to a multiple of {NEW_TOKENS_MULTIPLE}" if tokens else
            "no answer to measure")
    if not tokens or n < -(-tokens // NEW_TOKENS_MULTIPLE) * NEW_TOKENS_MULTIPLE:
        what += (f"; at most {NEW_TOKENS_CAP}" if top == NEW_TOKENS_CAP else
                 f"; at most data.max_length={data.max_length}")
    return {"max_new_tokens": n,
            "max_new_tokens_choice": f"eval.max_new_tokens auto → {n} ({what})"}


def _check_row_count(data: DataSection, s: dict, warnings: list) -> None:
    n_train, global_batch = data.sizes["train"], s["batch_size"] * s["grad_accum"]
    if n_train < global_batch:
        raise PlanError("data.path", f"only {n_train} usable training rows, fewer than one "
                        f"optimizer step's batch (schedule.batch_size × schedule.grad_accum = "
                        f"{s['batch_size']} × {s['grad_accum']} = {global_batch}).",
                        file=data.train.file if data.train else None,
                        hint="add rows, or lower schedule.batch_size / schedule.grad_accum.")
    if n_train < FEW_ROWS:
        warnings.append(f"only {n_train} usable training rows (fewer than {FEW_ROWS}): expect a "
                        "noisy adapter; a few hundred or more rows are usual.")


# ------------------------------------------------------------------------------ objective

def _objective_section(config: dict, model: ModelSection, adapter: AdapterSection, *,
                       need_train: bool) -> ObjectiveSection:
    """objective.* resolved: the loss and its settings, and what the reference model is — the base
    (the adapter switched off: fresh LoRA factors compute the base exactly), the model init.run
    trained (training starts from it), or none (orpo, simpo)."""
    o, init = config["objective"], config["init"]["run"]
    kind = o["kind"]
    reference = "base" if kind in WITH_REFERENCE else "none"
    run, sha = None, None
    if init is not None:
        run, sha = _init_run(init, model, adapter, need_train=need_train)
        if run is not None and reference == "base":
            reference = "init"
    return ObjectiveSection(kind=kind, beta=o["beta"], label_smoothing=o["label_smoothing"],
                            gamma=o["gamma"], orpo_lambda=o["orpo_lambda"],
                            desirable_weight=o["desirable_weight"],
                            undesirable_weight=o["undesirable_weight"], reference=reference,
                            init_run=run, init_sha256=sha, router_aux_coef=_router_aux(o, model))


def _router_aux(o: dict, model: ModelSection) -> float | None:
    """The load-balancing loss's weight of a mixture of experts: objective.router_aux_coef, or
    the model's router_aux_loss_coef; None for a dense model (which has no router)."""
    if not model.config.num_experts:
        return None
    given = o.get("router_aux_coef")
    return model.config.router_aux_coef if given is None else float(given)


ADAPTER_SHAPE = ("kind", "rank", "alpha", "targets", "rslora", "train_modules", "quantize", "head")


def _init_run(value: str, model: ModelSection, adapter: AdapterSection, *, need_train: bool
              ) -> tuple[str | None, str | None]:
    """(the run directory, its trained weights' sha256) that init.run names, checked: a finished
    run of this base model with this plan's adapter shape. Outside training a missing run is not
    an error (the plan only scores): (None, None)."""
    from core.plan import Plan
    from core.records import trained_file

    rd = Path(value).expanduser().resolve()
    if not (rd / "plan.json").is_file():
        if not need_train:
            return None, None
        raise PlanError("init.run", f"{rd} is not a run directory: it has no plan.json.",
                        hint="name the hydra.run.dir of a finished `tune` run (its adapter is where "
                             "this run starts).")
    start = Plan.load(rd / "plan.json")
    if start.model.config_hash != model.config_hash:
        raise PlanError("init.run", f"{rd} trained {start.model.name}, not {model.name}.",
                        hint="use the same base model (model.path) as that run.")
    keys = ("kind",) if "full" in (start.adapter.kind, adapter.kind) else ADAPTER_SHAPE
    differ = [(k, getattr(start.adapter, k), getattr(adapter, k)) for k in keys
              if getattr(start.adapter, k) != getattr(adapter, k)]
    if differ:
        listing = "; ".join(f"adapter.{k}: {_plain(a)} there, {_plain(b)} here" for k, a, b in differ)
        raise PlanError("init.run", f"{rd}'s adapter has another shape than this plan's ({listing}).",
                        hint="set " + " ".join(f"adapter.{k}={_plain(a)}" for k, a, _ in differ)
                             + " (the adapter training starts from).")
    weights = trained_file(rd, adapter.kind)
    if not weights.is_file():
        if not need_train:
            return None, None
        raise PlanError("init.run", f"{rd} has not finished training: it has no "
                        f"{weights.relative_to(rd)}.",
                        hint="let that run finish (run its command again to resume it) first.")
    return str(rd), sha256_file(weights)


def _plain(v) -> str:
    if isinstance(v, (tuple, list)):
        return "[" + ",".join(map(str, v)) + "]"
    return str(v).lower() if isinstance(v, bool) else str(v)


# ------------------------------------------------------------------------------ adapter

def _fused_targets(names: list[str], valid: list[str]) -> list[str]:
    """Targets written for separate q/k/v and gate/up layers, on a model that fuses them (Phi-3's
    qkv_proj, gate_up_proj): each names the fused layer that holds it, once — so a recipe's
    targets suit every family. The plan's adapter panel shows the layers adapted."""
    out = []
    for name in names:
        fused = next((f for f, parts in FUSED.items() if name in parts and f in valid), name)
        if fused not in out:
            out.append(fused)
    return out


def _adapter_section(a: dict, model: ModelSection) -> AdapterSection:
    if a["kind"] == "full":
        return _full_section(a, model)
    valid = list(model.module_names)
    if a["targets"] == "all-linear":
        targets = valid
    else:
        targets = []
        for name in _fused_targets(a["targets"], valid):
            if name not in valid:
                raise PlanError("adapter.targets", f"`{name}` is not a linear module of "
                                f"{model.name}.{did_you_mean(name, valid)} Valid modules: "
                                f"{', '.join(valid)} (or all-linear).",
                                hint="LoRA adapts linear layers by their module name.")
            targets.append(name)
    _check_experts(a, targets, model)
    shapes, L, copies = model.linear_shapes, model.config.num_layers, model.config.module_copies
    # LoRA's A [r, in] and B [out, r]; DoRA adds a magnitude [out] per layer; an expert module
    # has one pair per expert
    per_target = {m: L * copies(m) * (a["rank"] * (shapes[m][0] + shapes[m][1]) +
                                      (shapes[m][1] if a["kind"] == "dora" else 0))
                  for m in targets}
    full = _train_modules(a["train_modules"], targets, model)
    full_params = full_module_params(model.config, full)
    trainable = sum(per_target.values()) + sum(full_params.values())
    quantized = 0
    if a["quantize"] != "none":
        quantized = L * sum(n_in * n_out for m, (n_in, n_out) in shapes.items() if m not in full)
    return AdapterSection(rank=a["rank"], alpha=a["alpha"], dropout=a["dropout"],
                          targets=tuple(targets), rslora=a["rslora"],
                          scale=lora_scale(a["alpha"], a["rank"], a["rslora"]),
                          trainable_params=trainable, per_target=per_target,
                          share=trainable / model.params if model.params else 0.0,
                          kind=a["kind"], quantize=a["quantize"], train_modules=tuple(full),
                          full_params=full_params, quantized_params=quantized)


def _check_experts(a: dict, targets: list[str], model: ModelSection) -> None:
    """A mixture of experts: no quantised base (its experts are 3-D parameters); LoRA on the
    experts as PEFT's target_parameters has it — no dropout, no DoRA — so that PEFT loads it."""
    c = model.config
    if not c.num_experts:
        return
    if a["quantize"] != "none":
        raise PlanError("adapter.quantize", f"{model.name} is a mixture of experts; quantising "
                        "its base weights (QLoRA) is not supported for mixtures yet.",
                        hint="set adapter.quantize=none (adapter=lora).")
    experts = [m for m in targets if c.module_copies(m) > 1]
    if not experts:
        return
    why = (f"adapter.targets includes the experts ({', '.join(experts)}), whose LoRA PEFT "
           "stores as target_parameters, which")
    hint = ("adapt the attention only (adapter.targets=[q_proj,k_proj,v_proj,o_proj]), or set "
            "{}.")
    if a["kind"] == "dora":
        raise PlanError("adapter.kind", f"{why} have no DoRA.",
                        hint=hint.format("adapter.kind=lora"))
    if a["dropout"] > 0:
        raise PlanError("adapter.dropout", f"{why} have no dropout (adapter.dropout="
                        f"{a['dropout']:g}).", hint=hint.format("adapter.dropout=0"))


def _full_section(a: dict, model: ModelSection) -> AdapterSection:
    """adapter.kind=full: every module trained in full (optimizer state for every weight), no LoRA
    factors. Quantised base weights cannot be trained."""
    if a["quantize"] != "none":
        raise PlanError("adapter.quantize", f"is {a['quantize']}, but adapter.kind=full trains "
                        "every weight: quantised weights cannot be trained.",
                        hint="use adapter.quantize=none, or adapter.kind=lora for QLoRA.")
    if model.config.num_experts:
        raise PlanError("adapter.kind", f"full fine-tuning of a mixture of experts ({model.name}) "
                        "is not supported: its experts are 3-D parameters that PEFT cannot save "
                        "whole.", hint="use adapter.kind=lora; adapter.train_modules can add "
                                       "the norms, embedding and head.")
    full = list(full_module_names(model.config))
    full_params = full_module_params(model.config, full)
    trainable = sum(full_params.values())
    return AdapterSection(rank=a["rank"], alpha=a["alpha"], dropout=0.0, targets=(),
                          rslora=a["rslora"], scale=0.0, trainable_params=trainable, per_target={},
                          share=trainable / model.params if model.params else 0.0, kind="full",
                          quantize="none", train_modules=tuple(full), full_params=full_params,
                          quantized_params=0)


def _train_modules(names: list[str], targets: list[str], model: ModelSection) -> list[str]:
    valid = full_module_names(model.config)
    for name in names:
        if name not in valid:
            raise PlanError("adapter.train_modules", f"`{name}` is not a module of {model.name}."
                            f"{did_you_mean(name, valid)} Modules that can be trained in full: "
                            f"{', '.join(valid)}.",
                            hint="name existing modules by their Hugging Face names, e.g. "
                                 "[lm_head, norm].")
        if name in targets:
            part = "self_attn" if name in ATTENTION_MODULES else "mlp"
            raise PlanError("adapter.train_modules", f"`{name}` is also a LoRA target "
                            f"(adapter.targets); a module is either adapted or trained in full.",
                            hint=f"drop {name} from adapter.targets (every layer's {part}.{name} "
                                 "is then trained in full), or from adapter.train_modules.")
    return list(names)


# adapter.head=classifier: the adapter's learning rate above which the head was measured not to
# learn (the adapter distorts the features a random head reads: LoRA at 2e-3 on Banking77)
HEAD_ADAPTER_LR = 5e-4
_HEAD_HINT = "set adapter.head=none to train the answer as text (decoded within the label set)."


def _check_head(config: dict) -> None:
    """adapter.head=classifier trains a layer over a classification task's labels with the sft
    objective: refused, before any data is read, where the config itself rules that out (the
    data's own answers are checked in _head)."""
    a, kind = config["adapter"], config["objective"]["kind"]
    if a["head"] == "none":
        return
    if kind != "sft":
        raise PlanError("adapter.head", f"`{a['head']}` learns a label per example by "
                        f"cross-entropy, but objective.kind={kind} trains on preference data, "
                        "which has no labels.", hint=_HEAD_HINT + " Or use objective=sft.")
    if a["kind"] == "full":
        raise PlanError("adapter.head", f"`{a['head']}` is trained beside a LoRA adapter and "
                        "exported with it; adapter.kind=full writes a whole causal language model, "
                        "which has no place for it.", hint="use adapter.kind=lora (or dora), or "
                                                          "adapter.head=none.")
    if config["template"]["messages"] is not None:
        raise PlanError("adapter.head", f"`{a['head']}` reads one prompt and one label per row; "
                        "template.messages trains multi-turn conversations.",
                        hint=_HEAD_HINT + " Or use template.prompt and template.response.")
    if config["data"]["task"] == "generation":
        raise PlanError("adapter.head", f"`{a['head']}` needs a classification task (a closed "
                        "label set), but data.task=generation.",
                        hint=_HEAD_HINT + " Or set data.task=classification (or auto) if the "
                             "answers are labels.")


def _head(config: dict, adapter: AdapterSection, data: DataSection, model: ModelSection, *,
          need_train: bool, warnings: list) -> AdapterSection:
    """adapter.head resolved: classifier is a [labels, hidden] layer over data.labels (in their
    order), counted in the trainable parameters, with its learning rate (adapter.head_lr, else
    schedule.lr). Without training rows outside training (`tune eval` of the base model) there is
    no label set to size it by: it has no rows then (a run's adapter carries its own head)."""
    a = config["adapter"]
    if a["head"] == "none":
        if a["head_lr"] is not None:
            warnings.append(f"adapter.head_lr={a['head_lr']:g} is set, but adapter.head=none: "
                            "there is no head for it to train.")
        return adapter
    if data.task != "classification" and (need_train or data.sizes.get("train")):
        raise PlanError("adapter.head", f"`{a['head']}` needs a classification task (a closed "
                        f"label set), but the training answers are open-ended ({data.n_labels:,} "
                        "distinct), so data.task=auto resolved to generation.",
                        hint=_HEAD_HINT + " Or set data.task=classification if the answers are "
                             "labels.", file=data.train.file if data.train else None)
    n = len(data.labels)
    params = n * model.config.hidden_size
    trainable = adapter.trainable_params + params
    lr = float(config["schedule"]["lr"])
    if need_train and adapter.kind != "full" and lr > HEAD_ADAPTER_LR and not a["head_probe"]:
        warnings.append(
            f"schedule.lr={lr:g} trains the adapter beside a new classification head from the "
            f"first step (adapter.head_probe=0): above {HEAD_ADAPTER_LR:g}, the adapter moves the "
            "hidden states the head reads faster than the head learns them, and the head may "
            "learn nothing (measured on Banking77, 300 rows: at schedule.lr=2e-3 its loss stayed "
            "at chance for 438 steps). Train the head alone first (adapter.head_probe=0.2: "
            "accuracy 0.610 there), or use schedule.lr=2e-4 adapter.head_lr=2e-3 (0.605).")
    return replace(adapter, head=a["head"], head_labels=n, head_params=params,
                   head_lr=float(a["head_lr"]) if a["head_lr"] is not None else lr,
                   trainable_params=trainable,
                   share=trainable / model.params if model.params else 0.0)


def _head_probe(a: dict, adapter: AdapterSection, schedule: ScheduleSection, *, need_train: bool,
                warnings: list) -> AdapterSection:
    """adapter.head_probe resolved to a step count (a share of the schedule's steps, rounded, or a
    count); refused where it would leave the adapter no step."""
    probe = a["head_probe"]
    if adapter.head == "none":
        if probe != schema.BY_PATH["adapter.head_probe"].default:
            warnings.append(f"adapter.head_probe={probe:g} is set, but adapter.head=none: there is "
                            "no head to train first.")
        return adapter
    if not probe:
        return adapter
    total = schedule.total_steps
    steps = int(probe) if probe >= 1 else round(probe * total)
    if need_train and total and steps >= total:
        raise PlanError("adapter.head_probe", f"{probe:g} holds the adapter for {steps:,} of the "
                        f"run's {total:,} steps: it would never train.",
                        hint="give the head a share of the steps below 1, e.g. "
                             "adapter.head_probe=0.2, or fewer steps than schedule.max_steps.")
    return replace(adapter, head_probe_steps=min(steps, total) if total else steps)


# ------------------------------------------------------------------------------ runtime

def _devices() -> Devices:
    found = estimates.detect_devices()
    return Devices(platform=found["platform"], kind=str(found.get("kind") or found["platform"]),
                   count=int(found.get("count") or 1), memory=found.get("memory"),
                   peak_flops=found.get("peak_flops"), cores=found.get("cores"),
                   processes=processes()[0])


def _longrope_warnings(model: ModelSection, data: DataSection, evaluation) -> list[str]:
    """Phi-3's LongRoPE turns a sequence by its short factors up to the pretraining length and by its
    long ones past it. A generation that starts within that length and ends past it keeps the keys
    its cache turned by the short factors (transformers re-runs the whole sequence instead)."""
    scaling = dict(model.config.rope_scaling or ())
    if scaling.get("rope_type") != "longrope":
        return []
    original = scaling["original_max_position_embeddings"]
    prompt = min(int(data.tokens.get("max") or 0), data.max_length)
    if not prompt <= original < prompt + evaluation.max_new_tokens:
        return []
    return [f"examples of up to {prompt} tokens plus eval.max_new_tokens={evaluation.max_new_tokens} "
            f"can pass {model.name}'s pretraining length ({original} tokens), where its LongRoPE "
            "changes factors: answers past it are decoded with the earlier tokens' keys as the "
            "short factors turned them (transformers re-runs the sequence with the long ones). "
            f"Keep prompt + answer within {original} tokens, e.g. a lower data.max_length or "
            "eval.max_new_tokens."]


def _check_context(data: DataSection, model: ModelSection) -> None:
    """An example longer than the model's context would train on positions it was never trained
    for (RoPE past max_position_embeddings): a data.max_length above the context is refused once a
    training example reaches past it."""
    context = int(model.config.max_position_embeddings)
    kept = min(int(data.tokens.get("max") or 0), data.max_length)
    if data.max_length > context and kept > context:
        raise PlanError("data.max_length", f"{data.max_length} tokens is more than {model.name}'s "
                        f"context (max_position_embeddings={context}), and the longest training "
                        f"example keeps {kept} tokens at that length: its tokens past {context} "
                        "would sit at positions the model has never seen.",
                        hint=f"use data.max_length={context} or less (data.overlength decides what "
                             "happens to longer examples), or data.max_length=auto.")


def _length_rule(config: dict, model: ModelSection):
    """What data.max_length=auto may choose (compiler/examples.LengthRule): multiples of 64 (of
    pallas attention's block with runtime.attention=pallas), at most the model's context,
    runtime.row_length when it is set (a row holds an example; a preference pair's two sides), and
    the longest length whose training step the memory estimate keeps within MEMORY_WARN of a
    device's memory."""
    from compiler.examples import AUTO_MULTIPLE, LengthRule

    rt, units = config["runtime"], config["objective"]["kind"] != "sft"
    multiple = PALLAS_BLOCK if rt["attention"] == "pallas" else AUTO_MULTIPLE
    rule = LengthRule(cap=int(model.config.max_position_embeddings),
                      capped_by="max_position_embeddings", multiple=multiple)
    if rt["row_length"] is not None:
        row_cap = rt["row_length"] // (2 if units else 1)
        return replace(rule, cap=row_cap, capped_by="runtime.row_length") \
            if row_cap < rule.cap else rule
    return _memory_cap(config, model, rule, units=units)


def _memory_cap(config: dict, model: ModelSection, rule, *, units: bool):
    """`rule` with its cap lowered to the longest multiple of its grid whose training step (rows of
    it, or twice it for preference pairs) the memory estimate keeps within MEMORY_WARN of a
    device's memory (the shortest when none does: the memory check then says so)."""
    devices = _devices()
    if not devices.memory or rule.cap < rule.multiple:
        return rule
    s, m = config["schedule"], rule.multiple
    adapter = _adapter_section(config["adapter"], model)
    reference = config["objective"]["kind"] in WITH_REFERENCE

    def need(length: int) -> int:
        row = 2 * length if units else length
        rt = _runtime_section(config["runtime"], devices, model, s, row, None, segments=units)
        return _memory(model, adapter, rt, s["batch_size"], row, reference=reference)["total"]

    budget = MEMORY_WARN * devices.memory
    lo, hi = 1, rule.cap // m                      # in multiples of the grid
    if need(hi * m) <= budget:
        return rule
    while lo < hi:                                 # the largest that fits (memory grows with it)
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if need(mid * m) <= budget else (lo, mid - 1)
    above = (lo + 1) * m
    return replace(rule, cap=lo * m, capped_by="memory",
                   cap_note=f"rows of {above} tokens would need about {_gib(need(above))} a "
                            f"device, over {MEMORY_WARN:.0%} of {devices.kind}'s "
                            f"{_gib(devices.memory)}")


def _row_length(rt: dict, max_length: int, *, units: bool = False) -> int:
    """Tokens per training row: runtime.row_length, or data.max_length when it is null (twice it for
    preference data, whose pairs — each side up to max_length — share a row)."""
    row = rt.get("row_length")
    if row is None:
        return 2 * max_length if units else max_length
    if units and row < 2 * max_length:
        raise PlanError("runtime.row_length", f"{row} tokens per row cannot hold a preference pair "
                        f"(chosen and rejected side by side, each up to data.max_length="
                        f"{max_length} tokens).",
                        hint=f"use runtime.row_length={2 * max_length} or more, or null.")
    if row < max_length:
        raise PlanError("runtime.row_length", f"{row} tokens per row cannot hold an example of "
                        f"data.max_length={max_length} tokens.",
                        hint=f"use runtime.row_length={max_length} or more (a multiple of it fills "
                             "well), or null for rows of data.max_length.")
    if row > max_length and not rt["pack"]:
        raise PlanError("runtime.row_length", f"rows of {row} tokens hold one example each when "
                        f"runtime.pack=false; every token past data.max_length={max_length} would be "
                        "padding.", hint="set runtime.pack=true to fill the longer rows, or "
                                         "runtime.row_length=null.")
    return int(row)


def _runtime_section(rt: dict, devices: Devices, model: ModelSection, s: dict, row_length: int,
                     examples, *, segments: bool = False, order=None) -> RuntimeSection:
    """segments: every row holds several examples even unpacked (preference pairs), so attention
    always keeps them apart by their segment ids. order: the training examples an epoch holds
    (data.balance=oversample; None: each once)."""
    dtype = _dtype(rt["dtype"], devices)
    mesh = _mesh(rt["mesh"], devices, model, s["batch_size"])
    return RuntimeSection(
        dtype=dtype, param_dtype=dtype if rt["param_dtype"] == "auto" else rt["param_dtype"],
        matmul_dtype=_matmul_dtype(rt["matmul_dtype"], devices, dtype),
        mesh=mesh, devices=devices, remat=rt["remat"], pack=rt["pack"], ce_chunk=rt["ce_chunk"],
        attention=_attention(rt["attention"], devices, dtype, rt["pack"] or segments,
                             row_length=row_length, model=model, mesh=mesh),
        attention_block=rt["attention_block"],
        loss_tokens=_loss_tokens(examples, s["batch_size"], row_length, rt["pack"], order),
        log_every=rt["log_every"], checkpoint_every=rt["checkpoint_every"],
        progress_every=float(rt["progress_every"]))


TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"),
                    "mlflow": ("mlflow", "mlflow-skinny"), "wandb": ("wandb", "wandb")}


def _tracking_section(t: dict, recipe_info: Recipe | None) -> TrackingSection | None:
    """The trackers a run reports to; each one's library must be installed (checked here, not an
    hour into the run)."""
    import importlib.util

    if not t["backends"]:
        return None
    for name in t["backends"]:
        module, package = TRACKER_PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise PlanError("tracking.backends", f"the {name} tracker needs the `{package}` "
                            "package, which is not installed.",
                            hint=f"pip install 'tune[{name}]' (or pip install {package}), or "
                                 f"leave {name} out of tracking.backends.")
    experiment = t["experiment"] or (recipe_info.name if recipe_info is not None else "tune")
    return TrackingSection(backends=tuple(t["backends"]), experiment=experiment,
                           run_name=t["run_name"], group=t["group"], mlflow_uri=t["mlflow_uri"],
                           wandb_project=t["wandb_project"], wandb_entity=t["wandb_entity"])


def _loss_tokens(examples, batch_size: int, row_length: int, pack: bool, order=None) -> int:
    """Supervised positions one micro-batch (training or validation) can hold at most. order: the
    training examples an epoch holds (an oversampled example may share a micro-batch with its
    copies, so the bound counts every copy)."""
    if examples is None:
        return batch_size * row_length
    lengths, supervised = [], []
    for split in ("train", "val"):
        pick = order if split == "train" and order is not None else slice(None)
        lengths.append(examples.unit_lengths(split)[pick])
        supervised.append(examples.unit_supervised(split)[pick])
    return packing.supervised_capacity(np.concatenate(lengths), np.concatenate(supervised),
                                       row_length, batch_size, pack=pack)


def _attention(name: str, devices: Devices, dtype: str, pack: bool, *, row_length: int,
               model: ModelSection, mesh: MeshAxes) -> str:
    """auto: cuDNN's fused kernel where it applies (a GPU, bfloat16, one sequence per row: plain
    causal attention, scores not soft-capped), else XLA's, which runs everywhere. pallas (asked for by name): a fused
    Triton kernel that keeps packed examples apart by their segment ids."""
    if name in ("cudnn", "pallas") and devices.platform != "gpu":
        raise PlanError("runtime.attention", f"{name} needs an NVIDIA GPU; this plan runs on "
                        f"{devices.platform}.", hint="use runtime.attention=auto or xla.")
    if name == "pallas":
        if row_length % PALLAS_BLOCK:
            rounded = -(-row_length // PALLAS_BLOCK) * PALLAS_BLOCK
            raise PlanError("runtime.attention", f"pallas attention works in blocks of "
                            f"{PALLAS_BLOCK} tokens; rows of {row_length} do not divide "
                            "into them.",
                            hint=f"set data.max_length (or runtime.row_length) to a multiple of "
                                 f"{PALLAS_BLOCK}, e.g. {rounded}.")
        if model.config.sliding_windows:
            raise PlanError("runtime.attention", f"pallas attention has no sliding window, which "
                            f"{model.name} uses.", hint="use runtime.attention=auto or xla.")
        if mesh.data * mesh.fsdp * mesh.tensor > 1:
            raise PlanError("runtime.attention", "pallas attention runs on one device for now; "
                            f"this mesh has {mesh.data * mesh.fsdp * mesh.tensor}.",
                            hint="use runtime.attention=auto (cuDNN or XLA) on several devices.")
    if model.config.attn_softcap and name in ("cudnn", "pallas"):
        raise PlanError("runtime.attention", f"{name} attention has no soft-capping of the "
                        f"attention scores, which {model.name} uses (attn_logit_softcapping).",
                        hint="use runtime.attention=auto or xla.")
    if name != "auto":
        return name
    fused = devices.platform == "gpu" and dtype == "bfloat16" and not pack
    return "cudnn" if fused and not model.config.attn_softcap else "xla"


def _dtype(name: str, devices: Devices) -> str:
    """What dtype=auto means on these devices: bfloat16 on accelerators, float32 on CPU."""
    if name != "auto":
        return name
    return "float32" if devices.platform == "cpu" else "bfloat16"


def _matmul_dtype(name: str, devices: Devices, dtype: str) -> str:
    """What matmul_dtype=auto means: the compute dtype, except on a CPU with native bfloat16 dot
    products (AVX512-BF16 or AMX), where float32 compute still multiplies the frozen weights in
    bfloat16 with float32 results — about 3× XLA:CPU's float32 matmuls (benchmarks/RESULTS.md)."""
    if name != "auto":
        return name
    if dtype == "float32" and devices.platform == "cpu" and estimates.cpu_has_bf16_dot():
        return "bfloat16"
    return dtype


def _mesh(spec: dict, devices: Devices, model: ModelSection, batch_size: int) -> MeshAxes:
    count = devices.count
    axes = {k: int(spec[k]) for k in ("data", "fsdp", "tensor")}
    fixed = 1
    for v in axes.values():
        if v != -1:
            fixed *= v
    for k, v in axes.items():
        if v == -1:
            if count % fixed:
                raise PlanError("runtime.mesh", f"the fixed axes ({_axes(axes)}) multiply to {fixed}, "
                                f"which does not divide the {count} available device(s).",
                                hint="make the product of the axes equal the device count.")
            axes[k] = count // fixed
    product = axes["data"] * axes["fsdp"] * axes["tensor"]
    if product != count:
        raise PlanError("runtime.mesh", f"{_axes(axes)} spans {product} devices, but "
                        f"{count} {devices.kind} device(s) are available.",
                        hint="the product of the axes must equal the device count; "
                             "-1 fills an axis with the remaining devices.")
    shards = axes["data"] * axes["fsdp"]
    if batch_size % shards:
        raise PlanError("schedule.batch_size", f"{batch_size} rows do not divide over the "
                        f"data × fsdp = {shards} devices of the mesh.",
                        hint=f"use a multiple of {shards}, e.g. {shards * max(1, batch_size // shards)}.")
    return MeshAxes(**axes)


def _mesh_warnings(mesh: MeshAxes, model: ModelSection) -> list[str]:
    """A tensor axis that does not divide the heads still computes the same numbers (the layers
    split on feature boundaries that divide), but attention then runs on gathered heads."""
    t, c = mesh.tensor, model.config
    if t <= 1:
        return []
    uneven = [f"{n} {name}" for name, n in (("attention heads", c.num_heads),
                                             ("key/value heads", c.num_kv_heads),
                                             ("experts", c.num_experts) if c.num_experts
                                             else ("MLP features", c.intermediate_size)) if n % t]
    if not uneven:
        return []
    return [f"runtime.mesh.tensor={t} does not divide the model's {' and '.join(uneven)}: those "
            "layers are split where the features divide and gathered where they do not (the same "
            "numbers, less speed-up). A tensor axis that divides the head counts splits cleanly."]


def _axes(axes: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in axes.items())


# ------------------------------------------------------------------------------ schedule

def _rows_per_batch(s: dict, rt: dict, model: ModelSection, lengths: np.ndarray,
                    row_length: int) -> dict:
    """The schedule the runtime follows: as configured, or with schedule.batch_unit=examples and
    packed rows, batch_size in rows — the rows that hold about batch_size training examples (the
    epoch's examples per packed row), at least one and a multiple of the mesh's data × fsdp
    devices — so that a step sees about as many examples as unpacked rows would give it."""
    if s["batch_unit"] != "examples" or not rt["pack"] or not len(lengths):
        return s
    per_row = len(lengths) / max(packing.count_rows(lengths, row_length, pack=True), 1)
    mesh = _mesh(rt["mesh"], _devices(), model, 0)
    shards = mesh.data * mesh.fsdp
    rows = max(1, round(s["batch_size"] / per_row))
    return {**s, "batch_size": -(-rows // shards) * shards, "batch_examples": s["batch_size"]}


def _schedule_section(s: dict, rt: RuntimeSection, lengths: np.ndarray, row_length: int
                      ) -> ScheduleSection:
    global_batch = s["batch_size"] * s["grad_accum"]
    steps = {"rows_per_epoch": 0, "steps_per_epoch": 0, "total_steps": 0, "warmup_steps": 0}
    packed = {"row_fill": 0.0, "examples_per_step": 0.0, "unpacked_total_steps": 0}
    if len(lengths):
        counts = dict(batch_size=s["batch_size"], grad_accum=s["grad_accum"], epochs=s["epochs"],
                      max_steps=s["max_steps"], warmup=s["warmup"], seq_len=row_length)
        steps = estimates.schedule_steps(lengths.tolist(), pack=rt.pack, **counts)
        rows = steps["rows_per_epoch"]
        packed = {"row_fill": round(packing.row_fill(lengths, row_length, rows), 4),
                  "examples_per_step": round(global_batch * len(lengths) / rows, 2),
                  "unpacked_total_steps": estimates.schedule_steps(
                      lengths.tolist(), pack=False, **{**counts, "batch_size": s.get(
                          "batch_examples") or s["batch_size"]})["total_steps"]}
    return ScheduleSection(**s, seq_len=row_length, global_batch=global_batch, **steps,
                           tokens_per_step=global_batch * row_length, **packed)


def _schedule_warnings(s: ScheduleSection, est: Estimates) -> list[str]:
    out = []
    if s.total_steps and s.warmup >= 1 and s.warmup >= s.total_steps:
        out.append(f"schedule.warmup={s.warmup:g} steps is not shorter than the run's "
                   f"{s.total_steps} steps: the learning rate never reaches schedule.lr. A fraction "
                   "(0.03–0.1) scales with the run.")
    train = est.total_time_s if est.train_time_s is None else est.train_time_s
    if train and train > 30 * 86400:
        out.append(f"the run's {s.total_steps:,} steps take about {train / 86400:,.0f} "
                   "days by the plan's estimate: check schedule.max_steps and schedule.epochs.")
    return out


# ------------------------------------------------------------------------------ estimates

def _memory(model: ModelSection, adapter: AdapterSection, rt: RuntimeSection, batch_size: int,
            seq_len: int, *, reference: bool) -> dict:
    """Bytes per device a training step of `batch_size` rows of `seq_len` tokens needs, by part
    (compiler/estimates.memory_per_device), with a reference model's copy when there is one."""
    c, mesh = model.config, rt.mesh
    memory = estimates.memory_per_device(
        params=model.params, trainable=adapter.trainable_params, layers=c.num_layers,
        trained_in_full=sum(adapter.full_params.values()), quantized=adapter.quantized_params,
        quantize=adapter.quantize,
        linear=c.linear_params(),
        hidden=c.hidden_size, intermediate=c.token_intermediate(), heads=c.num_heads,
        kv_heads=c.num_kv_heads, head_dim=c.head_dim, vocab=c.vocab_size,
        batch=batch_size, seq_len=seq_len, param_bytes=DTYPE_BYTES[rt.param_dtype],
        compute_bytes=DTYPE_BYTES[rt.dtype], remat=rt.remat, ce_chunk=rt.ce_chunk,
        devices=mesh.data * mesh.fsdp * mesh.tensor, fsdp=mesh.fsdp, tensor=mesh.tensor,
        loss_tokens=rt.loss_tokens, attention_scores=rt.attention == "xla",
        attention_block=rt.attention_block)
    if reference:
        # the reference is a copy of the trained state as training starts (the frozen weights
        # serve both): LoRA's factors in float32, or a whole model's weights under adapter.kind=full
        full = sum(adapter.full_params.values())
        memory["reference"] = (adapter.trainable_params - full) * 4 + \
            full * DTYPE_BYTES[rt.param_dtype]
        memory["total"] += memory["reference"]
    return memory


def _computed_params(model: ModelSection, rt: RuntimeSection) -> int:
    """The weights a token's step computes with: all of a dense model's; of a mixture's experts,
    on a GPU or TPU the experts_per_token it is routed to (grouped matmuls), on a CPU every expert
    once per routed copy of the token (XLA:CPU's grouped product runs each group over all rows)."""
    c = model.config
    if not c.num_experts:
        return model.params
    experts = c.expert_params()
    used = experts * c.experts_per_token
    return model.params - experts + (used if rt.devices.platform == "cpu" else
                                     used // c.num_experts)


def _estimates(model: ModelSection, adapter: AdapterSection, schedule: ScheduleSection,
               rt: RuntimeSection, data: DataSection, ev: EvalSection, warnings: list, *,
               need_train: bool, objective: ObjectiveSection, examples=None,
               retrieval: bool = False) -> Estimates:
    c = model.config
    memory = _memory(model, adapter, rt, schedule.batch_size, schedule.seq_len,
                     reference=objective.reference != "none")
    head = c.vocab_size * c.hidden_size
    cost = dict(params=_computed_params(model, rt), tokens_per_step=schedule.tokens_per_step,
                device=rt.devices.__dict__, trainable=adapter.trainable_params,
                remat=rt.remat, head_params=head,
                head_tokens=rt.loss_tokens * schedule.grad_accum,
                embedding_params=0 if c.tie_word_embeddings else head,
                bf16_matmul=rt.matmul_dtype == "bfloat16",
                attention_scores=c.num_layers * schedule.global_batch * c.num_heads
                * packing.scores(schedule.seq_len, rt.attention_block),
                head_dim=c.head_dim)
    step = estimates.step_time(**cost)
    # validation and evaluation run the forward pass alone: over batches of the step's shape
    forward = estimates.step_time(**cost, forward_only=True)
    if objective.reference != "none" and step is not None:
        step *= REFERENCE_COST      # the reference model's forward pass in every step
    share = None
    available, need = rt.devices.memory, memory["total"]
    if need_train and available:
        share = need / available
        where = f"{rt.devices.kind} ({_gib(available)} per device)"
        if share > MEMORY_ERROR:
            raise PlanError("runtime", f"the estimated memory per device, {_gib(need)}, clearly "
                            f"exceeds {where}: weights {_gib(memory['weights'])}, activations "
                            f"{_gib(memory['activations'])}, attention {_gib(memory['attention'])}, "
                            f"logits {_gib(memory['logits'])}.",
                            hint="lower schedule.batch_size (raise schedule.grad_accum to keep the "
                                 "step), shorten data.max_length, set runtime.remat=full, or shard "
                                 "the weights with runtime.mesh.fsdp.")
        if share > MEMORY_WARN:
            warnings.append(f"the estimated memory per device, {_gib(need)}, is close to "
                            f"{where}; if it runs out, lower schedule.batch_size or set "
                            "runtime.remat=full.")
    prompt_len = min(data.max_length, data.tokens.get("max") or data.max_length)
    evaluation = _eval_memory(model, rt, ev, prompt_len)
    if available and evaluation > MEMORY_ERROR * available:
        raise PlanError("eval.batch_size", f"scoring {ev.batch_size} test rows at once needs about "
                        f"{_gib(evaluation)} (weights, and the KV cache of prompts of up to "
                        f"{prompt_len} tokens and {ev.max_new_tokens} new ones), more than "
                        f"{rt.devices.kind}'s {_gib(available)}.",
                        hint="lower eval.batch_size (16 is usual).")
    times = _times(step, forward, schedule, rt, data, ev, examples, warnings,
                   need_train=need_train, objective=objective, retrieval=retrieval,
                   head=need_train and adapter.head != "none")
    return Estimates(memory=memory, memory_share=share, step_time_s=step, eval_memory=evaluation,
                     **times)


# eval.limit's default stays null, every test row: the test file is the held-out set the user
# chose, and a sample would make its score another number than the file's (not comparable with
# other tools' scores on it). What a big file costs is said instead, with the sample that would
# cost less: EVAL_SAMPLE rows (an accuracy's standard error on 1,000 rows is at most 1.6 points).
EVAL_SAMPLE = 1000
EVAL_LONG_S = 600               # scoring every test row is estimated longer than this: a warning


def _times(step: float | None, forward: float | None, schedule: ScheduleSection,
           rt: RuntimeSection, data: DataSection, ev: EvalSection, examples, warnings: list, *,
           need_train: bool, objective: ObjectiveSection, retrieval: bool,
           head: bool = False) -> dict:
    """The time estimate's parts — training, the validation passes, the evaluation after training
    — as Estimates fields, and a warning where the last two are out of proportion. head: the tuned
    model answers by its classification head (one forward pass per row), the base one by
    eval.mode."""
    if step is None or forward is None:
        return {"total_time_s": None}
    train = step * schedule.total_steps
    # validation (runtime/run.py): the loss over every batch of the val split, each pass; with a
    # reference model, its forward pass too
    val_lengths = examples.unit_lengths("val") if examples is not None else []
    batches = estimates.validation_batches(val_lengths, seq_len=schedule.seq_len, pack=rt.pack,
                                           rows_per_step=schedule.global_batch)
    passes = estimates.validation_passes(schedule.total_steps, ev.every) if batches else 0
    validation = passes * batches * forward * (2 if objective.reference != "none" else 1)
    # evaluation (tune/commands.train): base and tuned score the test rows after training (each
    # also without the retrieved passages, with retrieval); `tune eval` scores one model
    n_test = int(data.sizes.get("test") or 0)
    rows = min(n_test, ev.limit) if ev.limit else n_test
    models = (2 if need_train else 1) * (2 if retrieval and not objective.preference else 1)
    prompts, unit, starts = [], 0.0, []
    if rows and examples is not None:
        splits = [s for s in ("test", "test_plain")                         # plain: no passages
                  if len(examples.arrays.get(f"{s}_prompt_lens", ()))]
        prompts = [examples.split(s)[1] for s in splits]
        unit = float(np.mean(examples.unit_lengths("test")))
        if head:        # the head computes the tokens every prompt starts with once, packs the rest
            starts = [_shared_start(*examples.split(s)) for s in splits]

    label_tokens = [len(x.ids) for x in data.labels]

    def evaluation_time(n: int) -> float:
        def prefill(mode: str) -> float:
            if not prompts:
                return 0.0
            if mode == "head" and all(starts):      # runtime/head.predict: packed after them
                return float(np.mean([estimates.head_tokens(lens - shared, n, ev.batch_size)
                                      for lens, shared in zip(prompts, starts)]))
            return float(np.mean([estimates.prefill_tokens(lens, n, ev.batch_size)
                                  for lens in prompts]))

        def scored(k: int, mode: str) -> float:
            return estimates.evaluation_time(
                rows=n, models=k, mode=mode, token_s=forward / max(1, schedule.tokens_per_step),
                prefill=prefill(mode), new_tokens=ev.max_new_tokens, batch_size=ev.batch_size,
                label_tokens=label_tokens, unit_tokens=unit)

        if head:            # half the models (the tuned ones) answer by the head
            return scored(models // 2, ev.mode) + scored(models - models // 2, "head")
        return scored(models, ev.mode)

    evaluation = evaluation_time(rows)
    if ev.limit is None and rows > EVAL_SAMPLE and evaluation > EVAL_LONG_S:
        sample = evaluation_time(EVAL_SAMPLE)
        warnings.append(f"scoring all {rows:,} test rows takes about {_time(evaluation)} by the "
                        f"plan's estimate ({models} model(s), eval.limit=null); eval.limit="
                        f"{EVAL_SAMPLE} scores a sample drawn with schedule.seed in about "
                        f"{_time(sample)} (an accuracy's standard error on {EVAL_SAMPLE:,} rows is "
                        "at most 1.6 points).")
    if need_train and train > 0 and validation + evaluation > train:
        warnings.append(
            f"validation and evaluation would take longer than training by the plan's estimate: "
            f"{_time(validation + evaluation)} (validation {passes} pass(es) × "
            f"{data.sizes.get('val', 0):,} rows ≈ {_time(validation)}; evaluation {rows:,} test "
            f"rows × {models} model(s) ≈ {_time(evaluation)}) against {_time(train)} for "
            f"{schedule.total_steps:,} steps. Hold out fewer rows (data.val_rows="
            f"{data.val_rows if data.val_rows is not None else 'null'}), validate less often "
            f"(eval.every={ev.every}; 0 = once, at the end), or score a sample of the test rows "
            f"(eval.limit={ev.limit if ev.limit is not None else 'null'}).")
    return {"total_time_s": train + validation + evaluation, "train_time_s": train,
            "validation_time_s": validation, "validation_passes": passes,
            "validation_batches": batches, "eval_time_s": evaluation, "eval_rows": rows,
            "eval_models": models if rows else 0}


def _shared_start(ids, prompt_lens) -> int:
    """The tokens every one of these prompts starts with, when the classification head computes
    them once and packs the rest (core/prompting.packs_after), else 0."""
    from core.prompting import packs_after, shared_prefix

    prompts = [row[:int(n)] for row, n in zip(ids, prompt_lens)]
    shared = shared_prefix(prompts)
    return shared if packs_after(prompts, shared, estimates.prompt_bucket) else 0


def _time(s: float) -> str:
    """Seconds as a person reads a rough estimate."""
    if s < 120:
        return f"{s:.0f} s" if s >= 10 else f"{s:.2g} s"
    return f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def _eval_memory(model: ModelSection, rt: RuntimeSection, ev: EvalSection, prompt_len: int) -> int:
    c = model.config
    return estimates.eval_memory(
        params=model.params, layers=c.num_layers, hidden=c.hidden_size, heads=c.num_heads,
        kv_heads=c.num_kv_heads, head_dim=c.head_dim, intermediate=c.token_intermediate(),
        vocab=c.vocab_size, batch=ev.batch_size, prompt_len=prompt_len,
        new_tokens=ev.max_new_tokens, param_bytes=DTYPE_BYTES[rt.param_dtype],
        compute_bytes=DTYPE_BYTES[rt.dtype])


def _gib(n) -> str:
    if n is None:
        return "?"
    n = float(n)
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"
