"""The PEFT adapter format: `save_peft_adapter` writes what `peft.PeftModel.from_pretrained(base, dir)`
loads with no missing or unexpected keys; `read_lora_config` and `load_peft_adapter` read such a
directory back (ours or PEFT's).

A multimodal model's adapter (Gemma3ForConditionalGeneration) adapts its text model alone: PEFT
matches a list of target_modules against every module (the vision tower has a q_proj, k_proj and
v_proj too), so its target_modules is a regex over the text model's (TEXT_TARGETS, the form of
PEFT's own default targets for Gemma 4), and its tensors are named as PEFT names them
(`base_model.model.model.language_model.layers.{i}...`).

An adapter with a classification head (adapter.head=classifier, runtime/head.py) is a SEQ_CLS
adapter: its base is `LlamaForSequenceClassification` (num_labels, pad_token_id: labels.json beside
the adapter), the head PEFT's modules_to_save `score` (`base_model.model.score.weight`).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from core.architecture import (ALL_WHOLE_MODULES, EXPERT_MODULES, LINEAR_NAMES, MODULE_NAMES,
                               ModelConfig,
                               peft_module_name)
from core.errors import PlanError
from core.weight_files import read_header
from runtime.head import read_labels, write_labels
from runtime.model import Llama, LoraConfig
from runtime.weights import (adapter_shapes, adapter_state_dict, adapter_variables,
                             from_peft_layout)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
HEAD_MODULES = ("score", "classifier")   # what PEFT's sequence-classification models save whole
# a multimodal model's target_modules: the linear layers named, in its text model alone (PEFT matches
# a string whole, with re.fullmatch, against each module's name in either transformers naming)
TEXT_TARGETS = r".*language_model\..*\.({})"


def modules_to_save(lora: LoraConfig, cfg: ModelConfig) -> list[str] | None:
    """PEFT's `modules_to_save` for the modules trained in full (PEFT matches each name as the end of
    a module's name). A tied head and embedding are one matrix here; PEFT wraps each name
    separately, so both are listed (and both written). A multimodal model's q/k/v projections are
    named layer by layer: its vision tower has layers of the same names."""
    names = list(lora.train_modules)
    if cfg.tie_word_embeddings and ({"lm_head", "embed_tokens"} & set(names)):
        names += [n for n in ("embed_tokens", "lm_head") if n not in names]
    out = []
    for name in names:
        if cfg.multimodal and name in ("q_proj", "k_proj", "v_proj"):
            out += [f"language_model.layers.{i}.self_attn.{name}" for i in range(cfg.num_layers)]
        elif cfg.multimodal and name == "norm":
            # the text model's final norm, `model.language_model.norm`: PEFT ≥ 0.22 matches a
            # name only after a dot, so `model.norm` would no longer reach it
            out.append("language_model.norm")
        else:
            out.append(peft_module_name(name))
    return out + (["score"] if lora.head else []) or None


def peft_config(lora: LoraConfig, base_model_name_or_path: str | None,
                cfg: ModelConfig) -> dict:
    """The adapter_config.json PEFT's LoraConfig accepts, for an adapter of a model of `cfg`. Only
    long-standing fields, so that older PEFT versions read it too — and, for a mixture of experts
    whose experts are adapted, `target_parameters` (PEFT ≥ 0.17) naming them."""
    experts = bool(cfg.num_experts)
    targets = sorted(t for t in lora.targets if not (experts and t in EXPERT_MODULES))
    params = sorted(f"mlp.experts.{t}" for t in lora.targets if experts and t in EXPERT_MODULES)
    return {
        "peft_type": "LORA", "task_type": "SEQ_CLS" if lora.head else "CAUSAL_LM",
        "r": int(lora.rank), "lora_alpha": float(lora.alpha), "lora_dropout": float(lora.dropout),
        "target_modules": TEXT_TARGETS.format("|".join(targets)) if cfg.multimodal else targets,
        **({"target_parameters": params} if params else {}),
        "bias": "none", "base_model_name_or_path": base_model_name_or_path,
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "modules_to_save": modules_to_save(lora, cfg), "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "use_rslora": bool(lora.rslora), "use_dora": lora.kind == "dora",
        "revision": None,
    }


def save_peft_adapter(model: Llama, out_dir, *, base_model_name_or_path: str | None = None,
                      lora: LoraConfig | None = None, labels: list[str] | None = None,
                      pad_token_id: int | None = None) -> Path:
    """adapter_model.safetensors (`base_model.model.` + runtime.weights.adapter_state_dict's names:
    LoRA factors, DoRA magnitudes, modules trained in full, a classification head) +
    adapter_config.json, and for a model with a head labels.json (its rows' label names, `labels`,
    and the model's padding token). Returns the directory."""
    lora = lora or model.lora
    if lora is None or model.lora is None:
        raise ValueError("the model has no LoRA parameters to save")
    if model.score is not None and (labels is None or len(labels) != model.score.shape[0]):
        raise ValueError(f"a head of {model.score.shape[0]} labels needs their names, got {labels!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {PEFT_PREFIX + name: value for name, value in adapter_state_dict(model).items()}
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    if model.score is not None:
        write_labels(out, labels, pad_token_id)
    config = peft_config(lora, base_model_name_or_path, model.cfg)
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


_DAMAGED_HINT = ("the adapter is damaged or is not this run's: train the run again, or copy its "
                 "adapter/ folder again from where it was trained.")


def read_lora_config(adapter_dir, *, key: str = "run",
                     model_config: ModelConfig | None = None) -> LoraConfig:
    """The LoraConfig of a PEFT adapter directory (to build the model that load_peft_adapter fills).
    PlanError(key, file=adapter_config.json) when it is unreadable or not a LoRA config tune reads.
    PEFT's `"all-linear"` targets every linear layer of the model's blocks: cfg's (Phi-3's fused
    ones, a mixture's attention — its experts are parameters, not layers), the Llama family's
    without a cfg."""
    path = Path(adapter_dir) / ADAPTER_CONFIG

    def bad(message: str, hint: str = _DAMAGED_HINT) -> PlanError:
        return PlanError(key, f"{ADAPTER_CONFIG}: {message}", file=str(path), hint=hint)

    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise bad("missing.") from None
    except (OSError, ValueError, RecursionError) as e:
        raise bad(f"not readable as JSON ({e}).") from None
    if not isinstance(cfg, dict):
        raise bad(f"must hold a JSON object, got {type(cfg).__name__}.")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise bad(f"peft_type {cfg.get('peft_type')!r}: only LORA adapters are supported.",
                  hint="use a LoRA (or DoRA) adapter.")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise bad("per-module rank/alpha patterns are not supported.",
                  hint="use an adapter with one rank and alpha.")
    full = []
    modules = cfg.get("modules_to_save") or []
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise bad(f"modules_to_save must be a list of module names, got {modules!r}.")
    head = _head_labels(adapter_dir, key=key) if "score" in modules else 0
    for name in modules:
        if name in HEAD_MODULES:        # a classification head (`classifier`: PEFT lists it too)
            continue
        short = "norm" if name == "model.norm" else name.rsplit(".", 1)[-1]
        if short not in ALL_WHOLE_MODULES + LINEAR_NAMES:
            raise bad(f"modules_to_save names {name!r}, which is not a module tune trains.")
        if short not in full:
            full.append(short)
    targets = cfg.get("target_modules")
    if targets == "all-linear":
        targets = list(MODULE_NAMES) if model_config is None else \
            [m for m in model_config.linear_names() if model_config.module_copies(m) == 1]
    text = re.fullmatch(re.escape(TEXT_TARGETS).replace(r"\{\}", r"([\w|]+)"), targets) \
        if isinstance(targets, str) else None
    if text:                            # a multimodal model's (TEXT_TARGETS)
        targets = text.group(1).split("|")
    if isinstance(targets, str):
        raise bad(f"target_modules as a regex ({targets!r}) is not supported.",
                  hint="list the target modules by name.")
    params = cfg.get("target_parameters") or []
    experts = [f"mlp.experts.{m}" for m in EXPERT_MODULES]
    if not isinstance(params, list) or not all(isinstance(p, str) and p in experts
                                               for p in params):
        raise bad(f"target_parameters may name a mixture's experts ({', '.join(experts)}); "
                  f"got {params!r}.")
    if targets is None and params:
        targets = []
    if not isinstance(targets, list) or not (targets or params) or \
            not all(isinstance(t, str) and t in LINEAR_NAMES for t in targets):
        raise bad(f"target_modules must list modules of {', '.join(LINEAR_NAMES)}; got "
                  f"{targets!r}.")
    targets = targets + [p.rsplit(".", 1)[-1] for p in params]
    rank, alpha, dropout = cfg.get("r"), cfg.get("lora_alpha"), cfg.get("lora_dropout", 0.0)
    if not (isinstance(rank, int) and not isinstance(rank, bool) and 1 <= rank <= 2**16):
        raise bad(f"r must be a positive integer rank, got {rank!r}.")
    for name, value in (("lora_alpha", alpha), ("lora_dropout", dropout)):
        if not (isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value)):
            raise bad(f"{name} must be a number, got {value!r}.")
    return LoraConfig(rank=rank, alpha=float(alpha), dropout=float(dropout),
                      targets=tuple(sorted(targets)), rslora=bool(cfg.get("use_rslora", False)),
                      kind="dora" if cfg.get("use_dora") else "lora", train_modules=tuple(full),
                      head=head)


def _head_labels(adapter_dir, *, key: str) -> int:
    """The labels of an adapter's classification head: the rows of its `score.weight` (the weights
    file's header), checked against labels.json's names where there is one."""
    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise PlanError(key, f"{ADAPTER_WEIGHTS} is missing.", file=str(path), hint=_DAMAGED_HINT)
    info = read_header(path, key=key, hint=_DAMAGED_HINT).get(PEFT_PREFIX + "score.weight")
    if info is None or len(info.shape) != 2:
        raise PlanError(key, f"{ADAPTER_CONFIG}: modules_to_save names `score` (a classification "
                        f"head), but {ADAPTER_WEIGHTS} holds no [labels, hidden] score.weight.",
                        file=str(path), hint=_DAMAGED_HINT)
    names = read_labels(adapter_dir, key=key)
    if names is not None and len(names) != info.shape[0]:
        raise PlanError(key, f"the head scores {info.shape[0]} labels, but labels.json names "
                        f"{len(names)}.", file=str(Path(adapter_dir) / "labels.json"),
                        hint=_DAMAGED_HINT)
    return int(info.shape[0])


def verify_adapter(adapter_dir, model: Llama, *, key: str = "run") -> dict[str, np.ndarray]:
    """The tensors of adapter_dir/adapter_model.safetensors (PEFT's prefix and adapter name taken
    off), checked whole against what `model` (built with the adapter's LoraConfig; an abstract
    `nnx.eval_shape` model will do) has a place for: a complete safetensors file
    (core/weight_files.py), no tensor missing or unexpected, the right shapes, floats, every value
    finite. PlanError(key, file=the weights file) naming what is wrong otherwise, before anything
    is loaded or copied."""
    path = Path(adapter_dir) / ADAPTER_WEIGHTS

    def bad(message: str) -> PlanError:
        return PlanError(key, f"{ADAPTER_WEIGHTS} {message}", file=str(path), hint=_DAMAGED_HINT)

    if not path.is_file():
        raise bad("is missing.")
    header = read_header(path, key=key, hint=_DAMAGED_HINT)
    # PEFT checkpoints saved with an explicit adapter name carry it: `lora_A.default.weight`.
    names = {k.removeprefix(PEFT_PREFIX).replace(".default.weight", ".weight"): k for k in header}
    want = adapter_shapes(model)
    optional = {model.cfg.hf_name("lm_head.weight")} if model.cfg.tie_word_embeddings else set()
    problems = (
        ("lacks", [n for n in want if n not in names and n not in optional]),
        ("holds tensors this model has no place for:", [n for n in names if n not in want]),
        ("holds tensors of the wrong shape:",
         [f"{n} {list(header[k].shape)} (expected {list(want[n])})" for n, k in names.items()
          if n in want and header[k].shape != want[n]]),
        ("holds tensors that are not floats:",
         [f"{n} ({header[k].dtype})" for n, k in names.items() if header[k].dtype not in
          ("F32", "F16", "BF16")]))
    said = [f"{what} {', '.join(found[:3])}" + (f" and {len(found) - 3} more" if len(found) > 3
                                                  else "") for what, found in problems if found]
    if said:
        raise bad("; ".join(said) + ".")
    tensors = {}
    try:
        with safe_open(str(path), framework="np") as f:
            for n, k in names.items():
                tensors[n] = f.get_tensor(k)
    except Exception as e:  # noqa: BLE001 - whatever the reader finds wrong, the file is unusable
        raise bad(f"cannot be read ({type(e).__name__}: {e}).") from None
    broken = [n for n, a in tensors.items() if not np.isfinite(a).all()]
    if broken:
        raise bad(f"holds values that are not finite in {', '.join(broken[:3])}.")
    return tensors


def load_peft_adapter(model: Llama, adapter_dir, *, key: str = "run") -> Llama:
    """Overwrite the model's LoRA factors with those of a PEFT adapter directory (in place; the model is
    also returned). The model must have been built with the adapter's rank and targets — see
    read_lora_config. A damaged adapter, or one of another shape, raises PlanError(key) naming its
    file (verify_adapter)."""
    adapter_dir = Path(adapter_dir)
    want = read_lora_config(adapter_dir, key=key, model_config=model.cfg)
    have = model.lora
    config = str(adapter_dir / ADAPTER_CONFIG)
    if have is None or have.rank != want.rank or set(have.targets) != set(want.targets) or \
            have.kind != want.kind or _full_set(have, model) != _full_set(want, model) or \
            have.head != want.head:
        shape = lambda c: (c.kind, c.rank, sorted(c.targets), sorted(_full_set(c, model)),  # noqa: E731
                           c.head)
        raise PlanError(key, f"the adapter is {shape(want)} (kind, rank, targets, trained modules, "
                        f"head labels); the model was built with "
                        f"{None if have is None else shape(have)}.", file=config, hint=_DAMAGED_HINT)
    if have.alpha != want.alpha:
        raise PlanError(key, f"the adapter's lora_alpha {want.alpha} != the model's {have.alpha}.",
                        file=config, hint=_DAMAGED_HINT)
    tensors = verify_adapter(adapter_dir, model, key=key)

    new = []
    for path, var, names, stacked, _, layout in adapter_variables(model):
        if path == ("embed_tokens", "weight"):
            names = names[:1]           # a tied head's copy is checked below
        parts = [tensors[n] if layout is None else
                 from_peft_layout(tensors[n], layout, model.cfg.num_experts) for n in names]
        value = np.stack(parts) if stacked else parts[0]
        new.append((path, var.copy(jnp.asarray(value, var.dtype))))
    head, embedding = (model.cfg.hf_name(n) for n in ("lm_head.weight", "model.embed_tokens.weight"))
    if model.cfg.tie_word_embeddings and head in tensors:
        # a tied head saved beside its embedding: one matrix here, so the two copies must agree
        if not np.array_equal(tensors[head], tensors[embedding]):
            raise PlanError(key, f"{ADAPTER_WEIGHTS} holds an output head that differs from the "
                            "embedding, but this model ties them.",
                            file=str(adapter_dir / ADAPTER_WEIGHTS), hint=_DAMAGED_HINT)
    nnx.update(model, nnx.from_flat_state(new))
    return model


def _full_set(lora: LoraConfig, model: Llama) -> set[str]:
    """The trained-in-full modules as the model builds them (a tied head is its embedding)."""
    names = set(lora.train_modules)
    if model.cfg.tie_word_embeddings and names & {"lm_head", "embed_tokens"}:
        names |= {"lm_head", "embed_tokens"}
    return names
