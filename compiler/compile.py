"""Config → Plan: every check that needs no accelerator, in the order a reader would ask them.

schema (types, ranges, unknown keys) → safety (no code in the config) → model (found, supported)
→ data (files read, cleaned, sampled, split; test file) → template (placeholders are fields) →
examples (tokenised, cached; over-length and unsupervised rows counted) → adapter (targets are
modules of this model; trainable parameters) → schedule (steps) → resources (devices, mesh, memory
and time estimates) → warnings. The first problem is a PlanError; doubts become plan.warnings.
"""
from __future__ import annotations

import os
from pathlib import Path

from compiler import schema
from compiler.errors import PlanError, did_you_mean
from compiler.plan import PLAN_VERSION, Plan, content_hash

FEW_ROWS = 200                  # fewer usable training rows than this: a warning
MEMORY_WARN = 0.9               # estimated share of device memory above which we warn
MEMORY_ERROR = 1.25             # ... and above which it clearly does not fit (estimates are rough)
TRAIN_COMMANDS = ("train", "plan", "run")


def tune_home() -> Path:
    return Path(os.environ.get("TUNE_HOME") or Path.home() / ".cache" / "tune").expanduser()


def compile_plan(cfg: dict, *, recipe_info: dict | None, command: str = "plan",
                 cwd: Path | None = None) -> Plan:
    """Compile a composed, resolved config (a plain dict) into a Plan. Raises PlanError.

    command: "train"/"plan" need training data; "eval" needs data.test_path and may go without
    training data (the base model is scored); "generate" needs neither."""
    from compiler import safety

    safety.check_config(cfg)
    config, warnings = schema.validate(cfg)
    cwd = Path(cwd or Path.cwd())

    # -- model ---------------------------------------------------------------------------------
    from compiler.models import resolve_model

    info = resolve_model(config["model"])
    model = _model_section(info)

    # -- data files ----------------------------------------------------------------------------
    d, t = config["data"], config["template"]
    need_train = command in TRAIN_COMMANDS
    train_file = _data_file("data.path", d["path"], recipe_info, cwd, required=need_train,
                            command=command)
    test_file = _data_file("data.test_path", d["test_path"], recipe_info, cwd,
                           required=command == "eval", command=command)
    if command == "generate" and train_file is None:
        test_file = None
    if train_file:
        d["path"] = str(train_file)
    if test_file:
        d["test_path"] = str(test_file)

    from compiler import data as data_mod
    from compiler.templates import check_fields, placeholders

    fields_used = _template_fields(t, placeholders)
    data_section: dict = {"path": d["path"], "test_path": d["test_path"], "sha256": {},
                          "format": d["format"], "rows": {}, "fields": {}}
    splits = {"train": [], "val": [], "test": []}
    train_rows_sig: set = set()
    if train_file:
        rows = data_mod.read_table(train_file, key="data.path", fmt=d["format"])
        fields = _fields(rows)
        used = check_fields(t, fields, file=str(train_file))
        kept, dropped = data_mod.clean_rows(rows, fields=used, dedupe=d["dedupe"])
        if not kept:
            raise PlanError("data.path", f"no usable rows: all {len(rows)} rows were dropped "
                            f"({_reasons(dropped)}).", file=str(train_file),
                            hint=f"the template reads {', '.join(used)}; every row needs them "
                                 "non-empty.")
        sampled = data_mod.sample_rows(kept, d["max_rows"], config["schedule"]["seed"])
        train, val = data_mod.split_validation(sampled, d["val_fraction"], config["schedule"]["seed"])
        splits["train"], splits["val"] = train, val
        data_section["sha256"]["train"] = data_mod.file_sha256(train_file)
        data_section["fields"]["train"] = fields
        data_section["rows"]["train"] = {"read": len(rows), "kept": len(kept), "dropped": dropped,
                                         "sampled": len(sampled), "train": len(train),
                                         "val": len(val)}
        prompt_fields = [f for f in used if f in _part_fields(t, placeholders, ("prompt", "system"))]
        train_rows_sig = {tuple(str(r.get(f)) for f in prompt_fields) for r in kept}
    if test_file:
        rows = data_mod.read_table(test_file, key="data.test_path", fmt=d["format"])
        fields = _fields(rows)
        used = check_fields(t, fields, file=str(test_file))
        kept, dropped = data_mod.clean_rows(rows, fields=used, dedupe=False)
        if not kept:
            raise PlanError("data.test_path", f"no usable rows: all {len(rows)} rows were dropped "
                            f"({_reasons(dropped)}).", file=str(test_file))
        splits["test"] = kept
        data_section["sha256"]["test"] = data_mod.file_sha256(test_file)
        data_section["fields"]["test"] = fields
        data_section["rows"]["test"] = {"read": len(rows), "kept": len(kept), "dropped": dropped}
        if train_rows_sig:
            prompt_fields = [f for f in used if f in _part_fields(t, placeholders,
                                                                   ("prompt", "system"))]
            leaked = sum(tuple(str(r.get(f)) for f in prompt_fields) in train_rows_sig for r in kept)
            if leaked:
                warnings.append(f"{leaked} of {len(kept)} test rows also appear in data.path (same "
                                f"{', '.join(prompt_fields)}): the held-out score will flatter the "
                                "adapter.")
    for split, rows in (("train", splits["train"]), ("test", splits["test"])):
        dropped = (data_section["rows"].get(split) or {}).get("dropped") or {}
        if any(dropped.values()):
            warnings.append(f"{split} file: dropped {_reasons(dropped)}.")

    # -- template + examples (tokenised, cached) -------------------------------------------------
    if t["chat"] and not info.chat_template:
        raise PlanError("template.chat", f"{info.name} has no chat template.",
                        hint="set template.chat=false to train on the plain prompt and response.")
    from compiler.examples import build_examples, load_tokenizer

    eos_token = load_tokenizer(info.dir).id_to_token(info.eos_token_id) or ""
    stats, lengths = None, None
    if any(splits.values()):
        stats = build_examples(
            splits, template=t, tokenizer_dir=info.dir,
            chat_template=info.chat_template if t["chat"] else None, eos_token=eos_token,
            max_length=d["max_length"], overlength=d["overlength"],
            cache_dir=tune_home() / "cache" / "examples",
            key_material={"sha256": data_section["sha256"], "max_rows": d["max_rows"],
                          "val_fraction": d["val_fraction"], "seed": config["schedule"]["seed"],
                          "dedupe": d["dedupe"], "tokenizer_hash": info.tokenizer_hash})
        data_section.update(stats)
        lengths = _train_lengths(stats["cache"])
        data_section["mean_tokens"] = float(lengths.mean()) if len(lengths) else 0.0
    else:
        data_section.update({"cache": None, "key": None, "sizes": {"train": 0, "val": 0, "test": 0},
                             "examples": []})
    sizes = data_section.get("sizes") or {}
    n_train = int(sizes.get("train", 0))
    if stats is not None:
        warnings += _example_warnings(stats, d)
    template_section = {"prompt": t["prompt"], "response": t["response"], "system": t["system"],
                        "chat": t["chat"], "fields": fields_used,
                        "chat_template": bool(info.chat_template) if t["chat"] else False,
                        "eos_token": eos_token, "examples": list(data_section.get("examples") or [])}

    # -- adapter ---------------------------------------------------------------------------------
    adapter = _adapter_section(config["adapter"], info)

    # -- schedule + resources --------------------------------------------------------------------
    s = config["schedule"]
    global_batch = s["batch_size"] * s["grad_accum"]
    if need_train:
        if n_train < global_batch:
            raise PlanError("data.path", f"only {n_train} usable training rows, fewer than one "
                            f"optimizer step's batch (schedule.batch_size × schedule.grad_accum = "
                            f"{s['batch_size']} × {s['grad_accum']} = {global_batch}).",
                            file=str(train_file),
                            hint="add rows, or lower schedule.batch_size / schedule.grad_accum.")
        if n_train < FEW_ROWS:
            warnings.append(f"only {n_train} usable training rows (fewer than {FEW_ROWS}): expect a "
                            "noisy adapter; a few hundred or more rows are usual.")
    from compiler import estimates

    devices = estimates.detect_devices()
    mesh = _mesh(config["runtime"]["mesh"], devices, info, s["batch_size"])
    schedule = _schedule_section(s, d, config["runtime"], n_train, data_section, mesh,
                                 lengths=lengths)
    resources = _resources(info, config, adapter, schedule, devices, mesh, warnings,
                           need_train=need_train)

    config["data"] = d
    plan_hash = content_hash(config, data_section, model)
    return Plan(version=PLAN_VERSION, hash=plan_hash, config=config, recipe=recipe_info,
                model=model, data=data_section, template=template_section, adapter=adapter,
                schedule=schedule, resources=resources, warnings=tuple(dict.fromkeys(warnings)))


# ------------------------------------------------------------------------------ pieces

def _model_section(info) -> dict:
    from dataclasses import asdict

    m = asdict(info)
    m["linear_shapes"] = {k: list(v) for k, v in m["linear_shapes"].items()}
    m["module_names"] = list(m["module_names"])
    m["eos_token_ids"] = list(m.get("eos_token_ids") or [])
    return m


def _data_file(key, value, recipe_info, cwd, *, required: bool, command: str):
    from compiler import recipes

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
    return recipes.resolve_data_path(key, value, recipe_info, cwd=cwd)


def _fields(rows: list[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows[:1000]:
        for k in r:
            seen.setdefault(str(k), None)
    return list(seen)


def _template_fields(t: dict, placeholders) -> list[str]:
    return _part_fields(t, placeholders, ("prompt", "response", "system"))


def _part_fields(t: dict, placeholders, parts) -> list[str]:
    out: list[str] = []
    for part in parts:
        if t.get(part) is not None:
            out += [f for f in placeholders(t[part], key=f"template.{part}") if f not in out]
    return out


def _reasons(dropped: dict) -> str:
    names = {"missing_field": "missing a field", "empty_field": "an empty field",
             "duplicate": "duplicates"}
    parts = [f"{n} {names.get(k, k)}" for k, n in dropped.items() if n]
    return ", ".join(parts) or "none"


def _train_lengths(cache: str):
    """Tokens per training example (after truncation), from the token cache."""
    import numpy as np

    with np.load(cache) as npz:
        offsets = npz["train_offsets"]
    return np.diff(offsets)


def _example_warnings(stats: dict, d: dict) -> list[str]:
    out = []
    sizes = stats.get("sizes") or {}
    total = sum(int(v) for v in sizes.values()) + int(stats.get("dropped_too_long", 0)) + \
        int(stats.get("no_supervised", 0))
    p95 = (stats.get("tokens") or {}).get("p95")
    if stats.get("truncated"):
        out.append(f"{stats['truncated']} of {total} examples are longer than data.max_length="
                   f"{d['max_length']} tokens and were truncated from the prompt's start (train "
                   f"p95 = {p95} tokens).")
    if stats.get("dropped_too_long"):
        out.append(f"{stats['dropped_too_long']} of {total} examples are longer than "
                   f"data.max_length={d['max_length']} tokens and were dropped (data.overlength=drop; "
                   f"train p95 = {p95} tokens).")
    if stats.get("no_supervised"):
        out.append(f"{stats['no_supervised']} examples had no supervised token and were dropped.")
    return out


def _adapter_section(a: dict, info) -> dict:
    valid = list(info.module_names)
    if a["targets"] == "all-linear":
        targets = valid
    else:
        targets = []
        for name in a["targets"]:
            if name not in valid:
                raise PlanError("adapter.targets", f"`{name}` is not a linear module of "
                                f"{info.name}.{did_you_mean(name, valid)} Valid modules: "
                                f"{', '.join(valid)} (or all-linear).",
                                hint="LoRA adapts linear layers by their module name.")
            targets.append(name)
    layers = info.dims["layers"]
    per_target = {m: layers * a["rank"] * (info.linear_shapes[m][0] + info.linear_shapes[m][1])
                  for m in targets}
    trainable = sum(per_target.values())
    return {"rank": a["rank"], "alpha": a["alpha"], "dropout": a["dropout"],
            "scale": a["alpha"] / a["rank"], "targets": targets, "trainable_params": trainable,
            "per_target": per_target, "share": trainable / info.params if info.params else 0.0}


def _mesh(spec: dict, devices: dict, info, batch_size: int) -> dict:
    count = int(devices.get("count") or 1)
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
                        f"{count} {devices.get('kind') or devices.get('platform')} device(s) are "
                        "available.", hint="the product of the axes must equal the device count; "
                        "-1 fills an axis with the remaining devices.")
    shards = axes["data"] * axes["fsdp"]
    if batch_size % shards:
        raise PlanError("schedule.batch_size", f"{batch_size} rows do not divide over the "
                        f"data × fsdp = {shards} devices of the mesh.",
                        hint=f"use a multiple of {shards}, e.g. {shards * max(1, batch_size // shards)}.")
    t = axes["tensor"]
    if t > 1:
        d = info.dims
        for name, n in (("attention heads", d["heads"]), ("key/value heads", d["kv_heads"]),
                        ("intermediate size", d["intermediate"])):
            if n % t:
                raise PlanError("runtime.mesh.tensor", f"{t} does not divide the model's {n} {name}.",
                                hint="pick a tensor axis that divides the head counts.")
    return axes


def _axes(axes: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in axes.items())


def _schedule_section(s: dict, d: dict, rt: dict, n_train: int, data_section: dict,
                      mesh: dict, *, lengths=None) -> dict:
    from compiler import estimates

    out = {k: s[k] for k in ("lr", "epochs", "max_steps", "batch_size", "grad_accum", "warmup",
                             "seed", "lr_schedule", "weight_decay", "max_grad_norm")}
    out["seq_len"] = d["max_length"]
    out["global_batch"] = s["batch_size"] * s["grad_accum"]
    out["pack"] = rt["pack"]
    if n_train > 0:
        steps = estimates.schedule_steps(
            n_train, batch_size=s["batch_size"], grad_accum=s["grad_accum"], epochs=s["epochs"],
            max_steps=s["max_steps"], warmup=s["warmup"], pack=rt["pack"],
            mean_tokens=data_section.get("mean_tokens") or 0.0, seq_len=d["max_length"],
            n_data_shards=mesh["data"] * mesh["fsdp"],
            lengths=lengths.tolist() if lengths is not None else None)
        out.update(steps)
    else:
        out.update({"steps_per_epoch": 0, "total_steps": 0, "warmup_steps": 0})
    out["tokens_per_step"] = out["global_batch"] * d["max_length"]
    return out


def _resources(info, config, adapter, schedule, devices, mesh, warnings, *, need_train) -> dict:
    from compiler import estimates

    rt, d = config["runtime"], config["data"]
    dims = info.dims
    compute = _dtype(rt["dtype"], devices)
    weights_dtype = compute if rt["param_dtype"] == "auto" else rt["param_dtype"]
    memory = estimates.memory_per_device(
        params=info.params, trainable=adapter["trainable_params"], layers=dims["layers"],
        hidden=dims["hidden"], intermediate=dims["intermediate"], heads=dims["heads"],
        kv_heads=dims["kv_heads"], head_dim=dims["head_dim"], vocab=dims["vocab"],
        batch=config["schedule"]["batch_size"], seq_len=d["max_length"],
        param_bytes=_BYTES[weights_dtype], compute_bytes=_BYTES[compute], remat=rt["remat"],
        ce_chunk=rt["ce_chunk"], devices=mesh["data"] * mesh["fsdp"] * mesh["tensor"],
        fsdp=mesh["fsdp"], tensor=mesh["tensor"])
    step = estimates.step_time(params=info.params, tokens_per_step=schedule["tokens_per_step"],
                               device=devices, trainable=adapter["trainable_params"],
                               remat=rt["remat"])
    total_steps = int(schedule.get("total_steps") or 0)
    out = {"devices": devices, "mesh": mesh, "dtype": compute, "param_dtype": weights_dtype,
           "memory": memory, "step_time_s": step,
           "total_time_s": step * total_steps if step is not None else None}
    available = devices.get("memory")
    need = memory.get("total")
    if need_train and available and need:
        share = need / available
        out["memory_share"] = share
        where = f"{devices.get('kind') or devices.get('platform')} ({_gib(available)} per device)"
        if share > MEMORY_ERROR:
            raise PlanError("runtime", f"the estimated memory per device, {_gib(need)}, clearly "
                            f"exceeds {where}: weights {_gib(memory.get('weights'))}, activations "
                            f"{_gib(memory.get('activations'))}, logits {_gib(memory.get('logits'))}.",
                            hint="lower schedule.batch_size (raise schedule.grad_accum to keep the "
                                 "step), shorten data.max_length, set runtime.remat=full, or shard "
                                 "the weights with runtime.mesh.fsdp.")
        if share > MEMORY_WARN:
            warnings.append(f"the estimated memory per device, {_gib(need)}, is close to "
                            f"{where}; if it runs out, lower schedule.batch_size or set "
                            "runtime.remat=full.")
    return out


_BYTES = {"float32": 4, "bfloat16": 2}


def _dtype(name: str, devices: dict) -> str:
    """What runtime.dtype=auto means on these devices: bfloat16 on accelerators, float32 on CPU."""
    if name != "auto":
        return name
    return "float32" if devices.get("platform") == "cpu" else "bfloat16"


def _gib(n) -> str:
    if n is None:
        return "?"
    n = float(n)
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"
