"""Hugging Face safetensors ⇄ the stacked NNX model.

Reading never goes through torch or pickle: safetensors' numpy API memory-maps each file and copies
out one tensor at a time. The model is first built abstractly (`nnx.eval_shape`: shapes only, no random
weights), then every frozen variable is filled from the checkpoint — layer i of `layers/...` from
`model.layers.{i}....` — and only the LoRA factors are drawn (A) or zeroed (B).
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from compiler.architecture import ModelConfig, read_config
from runtime.model import Llama, LoraConfig, LoRAParam, lora_a_init

# Buffers some checkpoints carry that are recomputed, not loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_names(path: tuple, num_layers: int) -> list[str]:
    """HF tensor name(s) of one model variable: one per layer for the stacked `layers/...` variables."""
    path = tuple(str(p) for p in path)
    if path == ("unembed",):
        return ["lm_head.weight"]
    if path[0] == "layers":
        rest = ".".join(path[1:])
        return [f"model.layers.{i}.{rest}" for i in range(num_layers)]
    return ["model." + ".".join(path)]


class _Checkpoint:
    """name → numpy array over one or many safetensors files (model.safetensors.index.json)."""

    def __init__(self, model_dir: Path):
        index = model_dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in model_dir.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no *.safetensors in {model_dir} (weights load from safetensors only)")
            weight_map = None
        self.handles = {f: safe_open(str(model_dir / f), framework="np") for f in files}
        self.where = {}
        for f, h in self.handles.items():
            for name in h.keys():
                self.where[name] = f
        if weight_map is not None:
            missing_files = {n: f for n, f in weight_map.items() if n not in self.where}
            if missing_files:
                raise FileNotFoundError(f"index lists tensors absent from the shards: {sorted(missing_files)[:5]}")

    def names(self) -> set[str]:
        return {n for n in self.where if not n.endswith(_IGNORED_SUFFIXES)}

    def get(self, name: str) -> np.ndarray:
        return self.handles[self.where[name]].get_tensor(name)


def load_pretrained(model_dir, *, config: ModelConfig | None = None, lora: LoraConfig | None = None,
                    dtype=jnp.float32, param_dtype=jnp.float32, remat: str = "none",
                    attention: str = "xla", rngs: nnx.Rngs | None = None) -> Llama:
    """The model of an HF checkpoint directory (*.safetensors; config.json unless `config`, the
    plan's, is given), base weights cast to param_dtype, LoRA factors (if lora) freshly initialised
    from rngs (A random, B zero, float32). Missing or unexpected tensors raise ValueError naming
    them."""
    model_dir = Path(model_dir)
    cfg = config if config is not None else read_config(model_dir)
    rngs = rngs if rngs is not None else nnx.Rngs(0)

    abstract = nnx.eval_shape(lambda: Llama(cfg, lora=lora, dtype=dtype, param_dtype=param_dtype,
                                            remat=remat, attention=attention, rngs=nnx.Rngs(0)))
    graphdef, lora_abstract, frozen_abstract = nnx.split(abstract, LoRAParam, ...)

    ckpt = _Checkpoint(model_dir)
    expected = set()
    frozen = []
    for path, var in nnx.to_flat_state(frozen_abstract):
        names = hf_names(path, cfg.num_layers)
        expected.update(names)
        missing = [n for n in names if n not in ckpt.where]
        if missing:
            raise ValueError(f"{model_dir}: checkpoint lacks {len(missing)} tensor(s) the model needs, "
                             f"e.g. {missing[:3]}")
        arrays = [ckpt.get(n) for n in names]
        value = np.stack(arrays) if path[0] == "layers" else arrays[0]
        if value.shape != var.shape:
            raise ValueError(f"{model_dir}: {names[0]} has shape {value.shape[1:] if path[0] == 'layers' else value.shape}, "
                             f"the config implies {var.shape[1:] if path[0] == 'layers' else var.shape}")
        frozen.append((path, var.copy(jnp.asarray(value, dtype=var.dtype))))
    unexpected = ckpt.names() - expected
    if cfg.tie_word_embeddings:
        unexpected.discard("lm_head.weight")      # tied checkpoints sometimes store the copy anyway
    if unexpected:
        raise ValueError(f"{model_dir}: checkpoint has {len(unexpected)} tensor(s) this model does not use, "
                         f"e.g. {sorted(unexpected)[:3]} — is it really a {cfg.family} model?")

    # LoRA factors: A drawn as PEFT does (one key per stacked variable), B zero.
    lora_vars = []
    for k, (path, var) in enumerate(nnx.to_flat_state(lora_abstract)):
        if path[-1] == "lora_A":
            value = lora_a_init(jax.random.fold_in(rngs.params(), k), var.shape)
        else:
            value = jnp.zeros(var.shape, jnp.float32)
        lora_vars.append((path, var.copy(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(frozen), nnx.from_flat_state(lora_vars))


def to_hf_state_dict(model: Llama, merged: bool = False) -> dict[str, np.ndarray]:
    """The base weights under their HF names (numpy, param dtype). merged=True folds each LoRA delta
    (alpha/r)·B@A into its weight (computed in float32) — the state dict of PEFT's merge_and_unload()."""
    cfg = model.cfg
    _, lora_state, frozen_state = nnx.split(model, LoRAParam, ...)
    lora_flat = {tuple(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(lora_state)}
    out = {}
    for path, var in nnx.to_flat_state(frozen_state):
        path = tuple(map(str, path))
        value = np.asarray(var[...])
        if merged and path[-1] == "weight" and path[:-1] + ("lora_A",) in lora_flat:
            a = lora_flat[path[:-1] + ("lora_A",)]          # [L, r, in]
            b = lora_flat[path[:-1] + ("lora_B",)]          # [L, out, r]
            delta = model.lora.scale * np.einsum("lor,lri->loi", b.astype(np.float32), a.astype(np.float32))
            value = (value.astype(np.float32) + delta).astype(value.dtype)
        names = hf_names(path, cfg.num_layers)
        if path[0] == "layers":
            for i, n in enumerate(names):
                out[n] = np.ascontiguousarray(value[i])
        else:
            out[names[0]] = value
    return out


def lora_state_dict(model: Llama) -> dict[str, np.ndarray]:
    """The LoRA factors under PEFT's names (without the `base_model.model.` prefix), float32:
    `model.layers.{i}.self_attn.q_proj.lora_A.weight` [r, in] and `...lora_B.weight` [out, r]."""
    _, lora_state, _ = nnx.split(model, LoRAParam, ...)
    out = {}
    for path, var in nnx.to_flat_state(lora_state):
        path = tuple(map(str, path))
        value = np.asarray(var[...], np.float32)
        for i, n in enumerate(hf_names(path, model.cfg.num_layers)):
            out[n + ".weight"] = np.ascontiguousarray(value[i])
    return out
