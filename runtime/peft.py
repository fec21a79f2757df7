"""The PEFT adapter format: `save_peft_adapter` writes what `peft.PeftModel.from_pretrained(base, dir)`
loads with no missing or unexpected keys; `read_lora_config` and `load_peft_adapter` read such a
directory back (ours or PEFT's).
"""
from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from core.architecture import MODULE_NAMES, WHOLE_MODULES, peft_module_name
from runtime.model import FullParam, Llama, LoraConfig, LoRAParam
from runtime.weights import adapter_state_dict, hf_names

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."


def modules_to_save(lora: LoraConfig, tied: bool) -> list[str] | None:
    """PEFT's `modules_to_save` for the modules trained in full. A tied head and embedding are one
    matrix here; PEFT wraps each name separately, so both are listed (and both written)."""
    names = list(lora.train_modules)
    if tied and ({"lm_head", "embed_tokens"} & set(names)):
        names += [n for n in ("embed_tokens", "lm_head") if n not in names]
    return [peft_module_name(n) for n in names] or None


def peft_config(lora: LoraConfig, base_model_name_or_path: str | None, *, tied: bool = False) -> dict:
    """The adapter_config.json PEFT's LoraConfig accepts. Only long-standing fields, so that older PEFT
    versions read it too."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "r": int(lora.rank), "lora_alpha": float(lora.alpha), "lora_dropout": float(lora.dropout),
        "target_modules": sorted(lora.targets), "bias": "none",
        "base_model_name_or_path": base_model_name_or_path,
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "modules_to_save": modules_to_save(lora, tied), "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "use_rslora": bool(lora.rslora), "use_dora": lora.kind == "dora",
        "revision": None,
    }


def save_peft_adapter(model: Llama, out_dir, *, base_model_name_or_path: str | None = None,
                      lora: LoraConfig | None = None) -> Path:
    """adapter_model.safetensors (`base_model.model.` + runtime.weights.adapter_state_dict's names:
    LoRA factors, DoRA magnitudes, modules trained in full) + adapter_config.json. Returns the
    directory."""
    lora = lora or model.lora
    if lora is None or model.lora is None:
        raise ValueError("the model has no LoRA parameters to save")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {PEFT_PREFIX + name: value for name, value in adapter_state_dict(model).items()}
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = peft_config(lora, base_model_name_or_path, tied=model.cfg.tie_word_embeddings)
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


def read_lora_config(adapter_dir) -> LoraConfig:
    """The LoraConfig of a PEFT adapter directory (to build the model that load_peft_adapter fills)."""
    cfg = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{adapter_dir}: peft_type {cfg.get('peft_type')!r}, only LORA adapters are supported")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ValueError(f"{adapter_dir}: per-module rank/alpha patterns are not supported")
    full = []
    for name in cfg.get("modules_to_save") or ():
        short = "norm" if name == "model.norm" else name.rsplit(".", 1)[-1]
        if short not in WHOLE_MODULES + ("q_norm", "k_norm") + MODULE_NAMES:
            raise ValueError(f"{adapter_dir}: modules_to_save names {name!r}, which is not a "
                             f"module of the Llama family")
        if short not in full:
            full.append(short)
    targets = cfg["target_modules"]
    if targets == "all-linear":
        targets = list(MODULE_NAMES)
    if isinstance(targets, str):
        raise ValueError(f"{adapter_dir}: target_modules as a regex ({targets!r}) is not supported")
    return LoraConfig(rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]),
                      dropout=float(cfg.get("lora_dropout", 0.0)), targets=tuple(sorted(targets)),
                      rslora=bool(cfg.get("use_rslora", False)),
                      kind="dora" if cfg.get("use_dora") else "lora", train_modules=tuple(full))


def load_peft_adapter(model: Llama, adapter_dir) -> Llama:
    """Overwrite the model's LoRA factors with those of a PEFT adapter directory (in place; the model is
    also returned). The model must have been built with the adapter's rank and targets — see
    read_lora_config. Missing or unexpected adapter tensors raise ValueError."""
    adapter_dir = Path(adapter_dir)
    want = read_lora_config(adapter_dir)
    have = model.lora
    if have is None or have.rank != want.rank or set(have.targets) != set(want.targets) or \
            have.kind != want.kind or _full_set(have, model) != _full_set(want, model):
        shape = lambda c: (c.kind, c.rank, sorted(c.targets), sorted(_full_set(c, model)))  # noqa: E731
        raise ValueError(f"{adapter_dir}: adapter is {shape(want)} (kind, rank, targets, trained "
                         f"modules); the model was built with {None if have is None else shape(have)}")
    if have.alpha != want.alpha:
        raise ValueError(f"{adapter_dir}: adapter lora_alpha {want.alpha} != the model's {have.alpha}")
    with safe_open(str(adapter_dir / ADAPTER_WEIGHTS), framework="np") as f:
        tensors = {k.removeprefix(PEFT_PREFIX): f.get_tensor(k) for k in f.keys()}
    # PEFT checkpoints saved with an explicit adapter name carry it: `lora_A.default.weight`.
    tensors = {k.replace(".default.weight", ".weight"): v for k, v in tensors.items()}

    used, new = set(), []
    for path, var in nnx.to_flat_state(nnx.state(model, LoRAParam)):
        names = hf_names(path, model.cfg.num_layers)
        if not isinstance(var, FullParam) and str(path[-1]) != "lora_magnitude_vector":
            names = [n + ".weight" for n in names]
        missing = [n for n in names if n not in tensors]
        if missing:
            raise ValueError(f"{adapter_dir}: adapter lacks {missing[:3]}")
        stacked = str(path[0]) == "layers"
        value = np.stack([tensors[n] for n in names]) if stacked else tensors[names[0]]
        if value.shape != var.shape:
            raise ValueError(f"{adapter_dir}: {names[0]} has shape {value.shape[1:] if stacked else value.shape}, "
                             f"expected {var.shape[1:] if stacked else var.shape}")
        new.append((path, var.copy(jnp.asarray(value, var.dtype))))
        used.update(names)
    if model.cfg.tie_word_embeddings and "lm_head.weight" in tensors:
        # a tied head saved beside its embedding: one matrix here, so the two copies must agree
        if "model.embed_tokens.weight" not in used or not np.array_equal(
                tensors["lm_head.weight"], tensors["model.embed_tokens.weight"]):
            raise ValueError(f"{adapter_dir}: the adapter holds an output head that differs from "
                             "the embedding, but this model ties them")
        used.add("lm_head.weight")
    unexpected = set(tensors) - used
    if unexpected:
        raise ValueError(f"{adapter_dir}: adapter has tensors this model has no place for: {sorted(unexpected)[:3]}")
    nnx.update(model, nnx.from_flat_state(new))
    return model


def _full_set(lora: LoraConfig, model: Llama) -> set[str]:
    """The trained-in-full modules as the model builds them (a tied head is its embedding)."""
    names = set(lora.train_modules)
    if model.cfg.tie_word_embeddings and names & {"lm_head", "embed_tokens"}:
        names |= {"lm_head", "embed_tokens"}
    return names
