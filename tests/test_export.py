"""Exports read by the ecosystem: the PEFT adapter directory (PeftModel.from_pretrained loads it with no
missing or unexpected keys and reproduces tune's logits) and the merged checkpoint (equal to PEFT's
merge_and_unload, loadable by transformers)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from conftest import load_in_peft
from runtime.export import save_merged
from runtime.peft import load_peft_adapter, read_lora_config, save_peft_adapter
from runtime.model import LoraConfig, LoRAParam
from runtime.weights import load_pretrained

LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.05, targets=("q_proj", "v_proj", "o_proj", "gate_proj",
                                                             "down_proj"))
# Phi-3's fused layers, as PEFT names them
FUSED_LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.05, targets=("qkv_proj", "o_proj", "gate_up_proj",
                                                                   "down_proj"))


def lora_for(kind: str) -> LoraConfig:
    return FUSED_LORA if kind.startswith("phi3") else LORA


@pytest.fixture(autouse=True)
def exact_matmuls():
    with jax.default_matmul_precision("highest"):
        yield


def trained_like(path, lora=LORA, seed=0):
    """A tune model whose LoRA factors are random and non-zero, as after training."""
    model = load_pretrained(path, lora=lora)
    state = nnx.state(model, LoRAParam)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, x.shape)
                                                   for k, x in zip(keys, leaves)]))
    return model


def ids(B=2, T=13, seed=0):
    return np.random.default_rng(seed).integers(0, 128, (B, T)).astype(np.int32)


def tune_logits(model, x):
    return np.asarray(model.logits(model(jnp.asarray(x))))


def torch_logits(model, x):
    with torch.no_grad():
        return model(torch.as_tensor(x, dtype=torch.long)).logits.float().numpy()


@pytest.mark.parametrize("kind", ["llama", "smollm-tied", "gemma2", "gemma3", "phi3"])
def test_peft_loads_adapter_and_reproduces_logits(hf_tiny, tmp_path, kind):
    from transformers import AutoModelForCausalLM

    _, path = hf_tiny(kind)
    lora = lora_for(kind)
    model = trained_like(path, lora=lora)
    out = save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(path))
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"], config["bias"]) == \
        ("LORA", "CAUSAL_LM", 4, 8.0, "none")
    assert config["target_modules"] == sorted(lora.targets)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    attn = lora.targets[0]          # q_proj, or Phi-3's qkv_proj
    assert tensors[f"base_model.model.model.layers.1.self_attn.{attn}.lora_A.weight"].shape == (4, 64)
    assert tensors["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].shape == (64, 4)
    assert len(tensors) == 2 * len(lora.targets) * 2

    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    peft = load_in_peft(base, out, tensors)
    loaded = {n.replace(".default", ""): p.detach().numpy() for n, p in peft.named_parameters() if "lora_" in n}
    assert set(loaded) == set(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(loaded[name], value)
    assert peft.peft_config["default"].lora_dropout == pytest.approx(0.05)

    x = ids()
    ours, theirs = tune_logits(model, x), torch_logits(peft, x)
    # float32 against float32, each within its own rounding of the exact (float64) logits: where
    # PEFT's own float32 error is large (an ill-conditioned position: on phi3's LongRoPE one
    # position of 26 drifts 7e-5 in PEFT and 2e-4 in tune), the bound widens with it
    exact = torch_logits(peft.double(), x)
    bound = 1e-4 + 4 * np.abs(theirs - exact).max(axis=-1, keepdims=True)
    assert (np.abs(ours - exact) <= bound).all(), np.abs(ours - exact).max()
    assert np.abs(ours - theirs).max() < 5e-4


@pytest.mark.parametrize("kind", ["llama", "smollm-tied", "gemma2", "gemma3-tied", "phi3"])
def test_merged_equals_peft_merge_and_unload(hf_tiny, tmp_path, kind):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, path = hf_tiny(kind)
    model = trained_like(path, lora=lora_for(kind), seed=1)
    adapter = save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(path))
    merged_dir = save_merged(model, tmp_path / "merged", path)
    assert (merged_dir / "config.json").read_text() == (path / "config.json").read_text()
    assert (merged_dir / "generation_config.json").exists()

    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    ref_state = {k: v.numpy() for k, v in reference.state_dict().items()}
    ours = load_file(str(merged_dir / "model.safetensors"))
    expected_keys = set(ref_state) - ({"lm_head.weight"} if model.cfg.tie_word_embeddings else set())
    assert set(ours) == expected_keys
    for k, v in ours.items():
        np.testing.assert_allclose(v, ref_state[k], atol=1e-5, rtol=0)

    merged_computes_the_model(merged_dir, model, ids(seed=2))


def merged_computes_the_model(merged_dir, model, x, auto_class=None):
    """transformers (auto_class, by default AutoModelForCausalLM) loads the merged checkpoint with no
    key missing or unexpected, and it and tune's own load of it compute `model`'s logits on x."""
    from transformers import AutoModelForCausalLM

    loaded, info = (auto_class or AutoModelForCausalLM).from_pretrained(
        merged_dir, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    # merged weights round differently from the adapter added at run time: float32's relative error
    np.testing.assert_allclose(torch_logits(loaded.eval(), x), tune_logits(model, x), atol=1e-4,
                               rtol=1e-4)
    # and tune reads its own merged checkpoint back as a plain model
    np.testing.assert_allclose(tune_logits(load_pretrained(merged_dir), x), tune_logits(model, x),
                               atol=1e-4, rtol=0)


def test_gemma_norms_trained_in_full_load_in_peft(hf_tiny, tmp_path):
    """Gemma's own modules (the MLP's sandwich norms, the q/k norms, stored around 0 and scaled by
    1 + w) trained in full beside LoRA: PEFT's modules_to_save takes them, reproduces tune's logits,
    and tune reads the adapter back."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, path = hf_tiny("gemma3")
    lora = LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=("q_proj", "up_proj"),
                      train_modules=("pre_feedforward_layernorm", "post_feedforward_layernorm",
                                     "q_norm"))
    model = trained_like(path, lora=lora, seed=4)
    out = save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(path))
    config = json.loads((out / "adapter_config.json").read_text())
    assert set(config["modules_to_save"]) == set(lora.train_modules)
    assert read_lora_config(out).train_modules == lora.train_modules
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, out).eval()
    x = ids(seed=5)
    np.testing.assert_allclose(torch_logits(peft, x), tune_logits(model, x), atol=1e-4, rtol=0)
    fresh = load_peft_adapter(load_pretrained(path, lora=read_lora_config(out)), out)
    np.testing.assert_allclose(tune_logits(fresh, x), tune_logits(model, x), atol=1e-5, rtol=0)


def test_adapter_round_trip_and_errors(hf_tiny, tmp_path):
    _, path = hf_tiny("llama")
    model = trained_like(path, seed=3)
    out = save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path="tiny")
    lora = read_lora_config(out)
    assert lora.rank == 4 and lora.alpha == 8.0 and set(lora.targets) == set(LORA.targets)
    fresh = load_peft_adapter(load_pretrained(path, lora=lora), out)
    for (p, a), (q, b) in zip(nnx.to_flat_state(nnx.state(model, LoRAParam)),
                              nnx.to_flat_state(nnx.state(fresh, LoRAParam))):
        assert p == q
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]))

    with pytest.raises(ValueError, match="rank"):
        load_peft_adapter(load_pretrained(path, lora=LoraConfig(8, 16.0, 0.0, LORA.targets)), out)

    tensors = load_file(str(out / "adapter_model.safetensors"))
    del tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    save_file(tensors, str(out / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.v_proj\.lora_B"):
        load_peft_adapter(load_pretrained(path, lora=lora), out)


def test_peft_all_linear_adapter_names_the_models_own_layers(hf_tiny, tmp_path):
    """An adapter_config.json with PEFT's target_modules "all-linear" adapts the model's own linear
    layers — Phi-3's fused qkv_proj and gate_up_proj, not the Llama family's names — and loads with
    PEFT's logits."""
    from peft import LoraConfig as PeftLora, get_peft_model
    from transformers import AutoModelForCausalLM

    _, path = hf_tiny("phi3")
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    peft = get_peft_model(base, PeftLora(r=2, lora_alpha=4, target_modules="all-linear",
                                         init_lora_weights=False)).eval()
    peft.save_pretrained(tmp_path / "adapter")
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["target_modules"] = "all-linear"             # as written by hand, or by older PEFT
    config_file.write_text(json.dumps(config))
    model = load_pretrained(path)
    lora = read_lora_config(tmp_path / "adapter", model_config=model.cfg)
    assert sorted(lora.targets) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    adapted = load_peft_adapter(load_pretrained(path, lora=lora), tmp_path / "adapter")
    x = ids()
    ours, theirs = tune_logits(adapted, x), torch_logits(peft, x)
    assert np.abs(ours - tune_logits(model, x)).max() > 0.05            # the adapter does something
    np.testing.assert_allclose(ours, theirs, atol=5e-4, rtol=0)
