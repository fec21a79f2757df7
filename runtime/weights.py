"""Hugging Face safetensors ⇄ the stacked NNX model.

Reading never goes through torch or pickle: safetensors' numpy API memory-maps each file and copies
out one tensor at a time. The model is first built abstractly (`nnx.eval_shape`: shapes only, no random
weights), then every frozen variable is filled from the checkpoint — layer i of `layers/...` from
`model.layers.{i}....` — and only the LoRA factors are drawn (A) or zeroed (B).
"""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from core.architecture import (ModelConfig, expert_legacy_names, is_vision_tensor, legacy_names,
                               read_config)
from core.errors import PlanError
from core.weight_files import index_shards, read_header
from runtime import quant
from runtime.model import (EXACT, ComputeSpec, FullParam, Llama, LoraConfig, LoRAParam, head_init,
                           lora_a_init, row_norms)

# Buffers some checkpoints carry that are recomputed, not loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_WEIGHTS_HINT = "are config.json and the weights of the same model, and the weights complete?"
HEAD = ("score",)           # the classification head's state path: new, never in a checkpoint


def hf_names(path: tuple, num_layers: int) -> list[str]:
    """HF tensor name(s) of one model variable: one per layer for the stacked `layers/...` variables."""
    path = tuple(str(p) for p in path)
    if path == ("unembed",):
        return ["lm_head.weight"]
    if path == HEAD:                    # LlamaForSequenceClassification's head, beside `model.`
        return ["score.weight"]
    if path[0] == "layers":
        rest = ".".join(path[1:])
        if path[1:3] == ("mlp", "experts") and path[-1] == "weight":
            rest = rest.removesuffix(".weight")     # a 3-D parameter, not a module's weight
        return [f"model.layers.{i}.{rest}" for i in range(num_layers)]
    return ["model." + ".".join(path)]


def checkpoint_names(path: tuple, cfg: ModelConfig, *, legacy: bool = False) -> list[str]:
    """hf_names as cfg's checkpoint names them: a multimodal one's text tower under its own names
    (ModelConfig.hf_name; legacy: the older ones)."""
    return [cfg.hf_name(n, legacy=legacy) for n in hf_names(path, cfg.num_layers)]


class _Checkpoint:
    """name → numpy array over one or many safetensors files (model.safetensors.index.json).

    The compiler checked the files; they are checked again here (the index's shards inside the
    directory, each header against its file's size), since weights may change between a plan and
    its run: a bad file ends in a PlanError naming it, and a shard outside the directory is never
    opened."""

    def __init__(self, model_dir: Path, cfg: ModelConfig | None = None):
        weight_map = index_shards(model_dir, key="model.path")
        if weight_map is not None:
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(model_dir.glob("*.safetensors"))
            if not files:
                raise PlanError("model.path", f"{model_dir} has no *.safetensors (weights load from "
                                "safetensors only).", file=str(model_dir), hint=_WEIGHTS_HINT)
        for f in files:
            if not f.is_file():
                raise PlanError("model.path", f"{f.name} is missing.", file=str(f),
                                hint="finish downloading the checkpoint.")
            read_header(f, key="model.path")
        self.handles = {str(f): safe_open(str(f), framework="np") for f in files}
        self.where = {}
        for f, h in self.handles.items():
            for name in h.keys():
                self.where[name] = f
        if weight_map is not None:
            missing_files = {n: f for n, f in weight_map.items() if n not in self.where}
            if missing_files:
                raise PlanError("model.path", f"the index lists tensors absent from the shards: "
                                f"{sorted(missing_files)[:5]}.", file=str(model_dir),
                                hint=_WEIGHTS_HINT)
        # a mixture's experts stored one tensor per expert: read as the 3-D tensors they make
        self.virtual = {}
        if cfg is not None:
            for fused, parts in expert_legacy_names(cfg).items():
                if fused not in self.where and all(n in self.where for p in parts for n in p):
                    self.virtual[fused] = parts
        self.folded = {n for parts in self.virtual.values() for p in parts for n in p}

    def names(self) -> set[str]:
        return {n for n in self.where if not n.endswith(_IGNORED_SUFFIXES)
                and n not in self.folded} | set(self.virtual)

    def has(self, name: str) -> bool:
        return name in self.where or name in self.virtual

    def get(self, name: str) -> np.ndarray:
        parts = self.virtual.get(name)
        if parts is None:
            return self.handles[self.where[name]].get_tensor(name)
        if name.endswith(".mlp.gate.weight"):          # a router under its older name
            return self._read(parts[0][0])
        # expert j's parts (gate, up) joined along the output; the experts stacked
        return np.stack([np.concatenate([self._read(p[j]) for p in parts])
                         for j in range(len(parts[0]))])

    def _read(self, name: str) -> np.ndarray:
        return self.handles[self.where[name]].get_tensor(name)


def load_pretrained(model_dir, *, config: ModelConfig | None = None, lora: LoraConfig | None = None,
                    compute: ComputeSpec = EXACT, rngs: nnx.Rngs | None = None,
                    place=None) -> Llama:
    """The model of an HF checkpoint directory (*.safetensors; config.json unless `config`, the
    plan's, is given), computing as `compute` says (a plan's spec, from runtime/build.py; EXACT, the
    float32 reference, outside a plan), base weights cast to its param_dtype (or quantised, lora.quantize), LoRA factors
    (if lora) freshly initialised from rngs (A random, B zero, float32), DoRA magnitudes set to the
    base weight's row norms, a classification head (lora.head) drawn small (model.head_init).
    Damaged files, missing or unexpected tensors raise PlanError (a ValueError) naming them.
    place(names, value, trained, dense) -> array, if given, puts each base weight (a numpy array in
    its stored dtype; names = its state path; trained: a module trained in full; dense: False for
    flat nf4 codes and their scales) where it belongs — straight to its devices' shards, so a model
    larger than one device still loads. Default: the default device."""
    model_dir = Path(model_dir)
    cfg = config if config is not None else read_config(model_dir)
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    fmt = "none" if lora is None else lora.quantize

    abstract = nnx.eval_shape(lambda: Llama(cfg, lora=lora, compute=compute, rngs=nnx.Rngs(0)))
    graphdef, full_abstract, lora_abstract, frozen_abstract = nnx.split(abstract, FullParam,
                                                                        LoRAParam, ...)
    ckpt = _Checkpoint(model_dir, cfg)
    legacy = cfg.multimodal and legacy_names(ckpt.where)
    expected = set()
    loaded = {}                 # path → value, for every weight the checkpoint fills
    stored = dict(nnx.to_flat_state(frozen_abstract))
    stored.update(nnx.to_flat_state(full_abstract))
    for path, var in stored.items():
        if path[-1] == "weight_scale" or path == HEAD:
            continue            # filled with its weight's codes; the head is drawn below
        names = checkpoint_names(path, cfg, legacy=legacy)
        expected.update(names)
        missing = [n for n in names if not ckpt.has(n)]
        if missing:
            raise PlanError("model.path", f"the checkpoint lacks {len(missing)} tensor(s) the model "
                            f"needs, e.g. {missing[:3]}.", file=str(model_dir), hint=_WEIGHTS_HINT)
        arrays = [ckpt.get(n) for n in names]
        value = np.stack(arrays) if path[0] == "layers" else arrays[0]
        scale_path = path[:-1] + ("weight_scale",)
        want = var.shape
        if scale_path in stored:            # stored quantised: codes [L, ...] from float [L, out, in]
            want = var.shape[:1] + _module_at(abstract, path[:-1]).shape
        if value.shape != want:
            layered = path[0] == "layers"
            raise PlanError("model.path", f"{names[0]} has shape "
                            f"{value.shape[1:] if layered else value.shape}, the config implies "
                            f"{want[1:] if layered else want}.", file=str(model_dir),
                            hint=_WEIGHTS_HINT)
        if scale_path in stored:
            codes, scales = quant.quantize(value, fmt)
            loaded[scale_path] = scales
            value = codes
        loaded[path] = value
    unexpected = {n for n in ckpt.names() - expected
                  if not (cfg.multimodal and is_vision_tensor(n))}     # the vision tower: not ours
    if cfg.tie_word_embeddings:         # tied checkpoints sometimes store the copy anyway
        unexpected.discard(cfg.hf_name("lm_head.weight", legacy=legacy))
    if unexpected:
        raise PlanError("model.path", f"the checkpoint has {len(unexpected)} tensor(s) this model "
                        f"does not use, e.g. {sorted(unexpected)[:3]} — is it really a {cfg.family} "
                        "model?", file=str(model_dir), hint=_WEIGHTS_HINT)

    if place is None:
        def place(names, value, trained, dense):
            return jnp.asarray(value)
    def put(p, v, trained):
        value = np.asarray(loaded[p]).astype(v.dtype, copy=False)
        # flat nf4 codes (and their scales) are not [out, in]: only fsdp may split them
        dense = fmt != "nf4" or p[:-1] + ("weight_scale",) not in stored
        return v.copy(place([str(x) for x in p], value, trained, dense))

    frozen = [(p, put(p, v, False)) for p, v in nnx.to_flat_state(frozen_abstract)]
    # LoRA factors: A drawn as PEFT does (one key per stacked variable), B zero; DoRA's magnitude is
    # ‖W‖ per output row (of the weight as the model computes with it: dequantised if quantised).
    lora_vars = []
    for k, (path, var) in enumerate(nnx.to_flat_state(lora_abstract)):
        if path[-1] == "lora_A":
            value = lora_a_init(jax.random.fold_in(rngs.params(), k), var.shape)
        elif path[-1] == "lora_magnitude_vector":
            value = row_norms(_dense(loaded, path[:-1] + ("weight",), fmt,
                                     _module_at(abstract, path[:-1]).shape))
        else:
            value = jnp.zeros(var.shape, jnp.float32)
        lora_vars.append((path, var.copy(value)))
    if lora is not None and lora.head:      # a new classification head, drawn after the factors
        loaded[HEAD] = np.asarray(head_init(rngs.params(), (lora.head, cfg.hidden_size)))
    full = [(p, put(p, v, True)) for p, v in nnx.to_flat_state(full_abstract)]
    return nnx.merge(graphdef, nnx.from_flat_state(full), nnx.from_flat_state(lora_vars),
                     nnx.from_flat_state(frozen))


def _module_at(model, path: tuple):
    for name in path:
        model = getattr(model, str(name))
    return model


def _dense(loaded: dict, path: tuple, fmt: str, shape) -> np.ndarray:
    """A loaded weight [..., out, in] in float32, dequantised if it was quantised (shape: its
    [out, in])."""
    value = loaded[path]
    scale = loaded.get(path[:-1] + ("weight_scale",))
    if scale is None:
        return np.asarray(value, np.float32)
    return np.asarray(quant.dequantize(value, scale, fmt, tuple(shape)))


def to_hf_state_dict(model: Llama, merged: bool = False, *,
                     legacy: bool = False) -> dict[str, np.ndarray]:
    """The base weights (and modules trained in full, as trained) under their HF names (numpy, param
    dtype; quantised weights dequantised; a multimodal model's text tower as checkpoint_names names
    it, `legacy`: the older way). merged=True folds each adapter into its weight, computed in
    float32 — the state dict of PEFT's merge_and_unload(): W + s·B A for LoRA, and for DoRA
    (m / ‖W + s·B A‖) ⊙ (W + s·B A) row by row."""
    cfg = model.cfg
    _, full_state, factor_state, frozen_state = nnx.split(model, FullParam, LoRAParam, ...)
    factors = {tuple(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(factor_state)}
    weights = {tuple(map(str, p)): v for p, v in nnx.to_flat_state(frozen_state)}
    weights.update({tuple(map(str, p)): v for p, v in nnx.to_flat_state(full_state)})
    out = {}
    for path, var in weights.items():
        if path[-1] == "weight_scale":
            continue
        module = path[:-1]
        if module + ("weight_scale",) in weights:
            value = np.asarray(_module_at(model, module).dense_weight(jnp.float32)).astype(
                np.dtype(model.compute.param_dtype))
        else:
            value = np.asarray(var[...])
        if merged and path[-1] == "weight" and module + ("lora_A",) in factors:
            a = factors[module + ("lora_A",)].astype(np.float32)           # [L, r, in]
            b = factors[module + ("lora_B",)].astype(np.float32)           # [L, out, r]
            w = value.astype(np.float32) + model.lora.scale * np.einsum("...or,...ri->...oi",
                                                                        b, a)
            magnitude = factors.get(module + ("lora_magnitude_vector",))  # [L, out]
            if magnitude is not None:
                w = w * (magnitude / np.sqrt(np.sum(w * w, axis=-1)))[..., None]
            value = w.astype(value.dtype)
        names = checkpoint_names(path, cfg, legacy=legacy)
        if path[0] == "layers":
            for i, n in enumerate(names):
                out[n] = np.ascontiguousarray(value[i])
        else:
            out[names[0]] = value
    return out


def _expert_factor(path: tuple, lora) -> tuple[str, str] | None:
    """(name suffix, "A" | "B") of an expert module's LoRA factor under PEFT's target_parameters,
    None for any other variable. PEFT wraps `mlp.experts` once per targeted parameter, in the
    order the module defines them: with both targeted, gate_up_proj's factors sit under
    `experts.base_layer.` and down_proj's under `experts.`; with one, under `experts.`."""
    if path[1:3] != ("mlp", "experts") or path[-1] not in ("lora_A", "lora_B"):
        return None
    inner = path[3] == "gate_up_proj" and "down_proj" in lora.targets
    return ("base_layer." if inner else "") + path[-1] + ".weight", path[-1][-1]


def to_peft_layout(value: np.ndarray, factor: str) -> np.ndarray:
    """One layer's expert LoRA factor as PEFT stores it: A [E, r, in] → [E·r, in] (expert-major);
    B [E, out, r] → [out, r·E] (expert-minor)."""
    if factor == "A":
        return value.reshape(-1, value.shape[-1])
    return np.transpose(value, (1, 2, 0)).reshape(value.shape[1], -1)


def from_peft_layout(value: np.ndarray, factor: str, experts: int) -> np.ndarray:
    """to_peft_layout's inverse."""
    if factor == "A":
        return value.reshape(experts, -1, value.shape[-1])
    return np.transpose(value.reshape(value.shape[0], -1, experts), (2, 0, 1))


def adapter_state_dict(model: Llama) -> dict[str, np.ndarray]:
    """What a PEFT adapter file holds, under PEFT's names (without the `base_model.model.` prefix):
    the adapter's own tensors in float32 — `model.layers.{i}.self_attn.q_proj.lora_A.weight` [r, in],
    `...lora_B.weight` [out, r], DoRA's `...lora_magnitude_vector` [out] — and each module trained in
    full under its own name, in its param dtype (`model.norm.weight`, `lm_head.weight`, ...); a
    multimodal model's text tower as PEFT names it (`model.language_model.layers.{i}...`). A tied
    output head trained through its embedding is written under both names: PEFT keeps one copy per
    name in `modules_to_save`, and both must hold the trained matrix."""
    out = {}
    for var, names, stacked, factor, layout in _adapter_variables(model):
        value = np.asarray(var[...], np.float32) if factor else np.asarray(var[...])
        for i, n in enumerate(names):
            v = value[i] if stacked else value
            out[n] = np.ascontiguousarray(v if layout is None else to_peft_layout(v, layout))
    return out


def adapter_shapes(model: Llama) -> dict[str, tuple[int, ...]]:
    """adapter_state_dict's names → shapes, read from the model's variables alone (an abstract
    model, `nnx.eval_shape`, will do): what a PEFT adapter of this model must hold."""
    out = {}
    for var, names, stacked, _, layout in _adapter_variables(model):
        shape = tuple(var.shape[1:] if stacked else var.shape)
        if layout is not None:
            shape = to_peft_layout(np.empty(shape, np.int8), layout).shape
        out.update({n: shape for n in names})
    return out


def adapter_variables(model: Llama):
    """(state path, variable, its PEFT names, stacked over layers, LoRA factor, expert layout: None
    or "A" / "B" — to_peft_layout's) of each trained variable."""
    _, full_state, factor_state, _ = nnx.split(model, FullParam, LoRAParam, ...)
    for path, var in nnx.to_flat_state(factor_state):
        path = tuple(map(str, path))
        expert = _expert_factor(path, model.lora)
        if expert is not None:
            suffix, layout = expert
            names = [f"model.layers.{i}.mlp.experts.{suffix}" for i in range(model.cfg.num_layers)]
            yield path, var, names, True, True, layout
            continue
        suffix = "" if path[-1] == "lora_magnitude_vector" else ".weight"
        yield path, var, [n + suffix for n in checkpoint_names(path, model.cfg)], True, True, \
            None
    for path, var in nnx.to_flat_state(full_state):
        path = tuple(map(str, path))
        names = checkpoint_names(path, model.cfg)
        if path == ("embed_tokens", "weight") and model.cfg.tie_word_embeddings:
            names = names + [model.cfg.hf_name("lm_head.weight")]
        yield path, var, names, path[0] == "layers", False, None


def _adapter_variables(model: Llama):
    for _, *rest in adapter_variables(model):
        yield tuple(rest)


def vision_tensors(model_dir) -> tuple[bool, dict[str, np.ndarray]]:
    """(whether it names its tensors the older way, its vision tensors as stored) of a multimodal
    checkpoint directory: what a merged checkpoint copies through beside the text model."""
    ckpt = _Checkpoint(Path(model_dir))
    return legacy_names(ckpt.where), {n: ckpt.get(n) for n in sorted(ckpt.names())
                                      if is_vision_tensor(n)}
