"""The families beyond Llama — Gemma 2/3, Phi-3 and Mixtral — through the whole of tune, on tiny random
checkpoints saved by transformers: the plan, the training loss (soft-capped logits included) against
transformers' own, training, and meshes of 8 devices against one. The decoder's logits and the
exports are checked with every other family in test_model_logits.py and test_export.py."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import tiny_plan
from runtime.loss import supervised_cross_entropy
from runtime.weights import load_pretrained


@pytest.fixture(autouse=True)
def exact_matmuls():
    with jax.default_matmul_precision("highest"):
        yield


@pytest.mark.parametrize("kind", ["gemma2", "gemma3", "phi3"])
def test_training_loss_equals_transformers(hf_tiny, kind):
    """The loss tune trains on — the supervised positions gathered, the output head in chunks, the
    final logits soft-capped (Gemma 2) — is transformers' causal-LM loss."""
    ref_model, path = hf_tiny(kind)
    model = load_pretrained(path)
    ids = np.random.default_rng(0).integers(0, 128, (2, 17)).astype(np.int32)
    mask = np.ones((2, 17), bool)
    mask[:, :6] = False                           # a prompt of 6 tokens, not supervised
    mask[:, -1] = False                           # the last token predicts nothing
    targets = np.roll(ids, -1, axis=1)
    total, n = supervised_cross_entropy(model(jnp.asarray(ids)), model.lm_head(),
                                        jnp.asarray(targets), jnp.asarray(mask), capacity=24,
                                        chunk=5, softcap=model.cfg.final_softcap)
    labels = np.where(np.roll(mask, 1, axis=1), ids, -100)     # transformers shifts the labels
    with torch.no_grad():
        ref = ref_model(torch.as_tensor(ids, dtype=torch.long),
                        labels=torch.as_tensor(labels, dtype=torch.long)).loss.item()
    assert float(n) == 2 * 10
    np.testing.assert_allclose(float(total / n), ref, rtol=1e-5)


def test_plan_and_training(tiny_gemma_chat_dir, tmp_path):
    """A Gemma 3 plan compiles (its architecture, sizes, and Gemma's own modules as train_modules
    options), trains — the loss falls — and writes an adapter PEFT can name."""
    from runtime.run import train

    plan = tiny_plan(tiny_gemma_chat_dir, tmp_path, epochs=4, lr=2e-2, pack=False,
                     targets=("q_proj", "v_proj", "o_proj", "up_proj", "down_proj"))
    assert plan.model.architecture == "Gemma3ForCausalLM"
    cfg = plan.model.config
    assert (cfg.family, cfg.sliding_windows, cfg.local_rope_theta) == ("gemma3", (8, 0), 1e4)
    assert plan.model.params == cfg.param_count()
    train(plan, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == plan.schedule.total_steps
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.08, losses     # as the tiny Llama
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_gemma_chat_dir)


def test_phi3_plan_adapts_the_fused_layers(tiny_phi3_chat_dir, tmp_path):
    """Targets written for separate layers (the default q/k/v/o, gate and up) adapt Phi-3's fused
    ones, each once; a module it does not have is refused naming the ones it has."""
    from compiler import schema
    from compiler.compile import compile_plan
    from core.errors import PlanError

    plan = tiny_plan(tiny_phi3_chat_dir, tmp_path,
                     targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"))
    assert plan.adapter.targets == ("qkv_proj", "o_proj", "gate_up_proj")
    assert (plan.model.config.fused, plan.model.config.rotary_dim) == (True, 4)
    cfg = schema.defaults()
    cfg["model"]["path"] = str(tiny_phi3_chat_dir)
    cfg["data"]["path"] = str(tmp_path / "data.jsonl")
    cfg["template"].update(prompt="{text}", response="{label}", chat=False)
    cfg["adapter"]["targets"] = ["q_norm"]
    with pytest.raises(PlanError, match="qkv_proj, o_proj, gate_up_proj, down_proj"):
        compile_plan(cfg, recipe_info=None, command="plan")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gemma", "phi3", "mixtral"])
def test_meshes_train_as_one_device(family, tiny_gemma_chat_dir, tiny_phi3_chat_dir,
                                    tiny_mixtral_chat_dir, tmp_path):
    """data 2 × fsdp 2 × tensor 2 and fsdp 8 over 8 simulated devices: the one-device losses and
    adapter — Gemma's sandwich and q/k norms, two RoPE tables and window, Phi-3's fused layers,
    Mixtral's experts (split by expert over the tensor axis) and their LoRA, sharded with the
    rest."""
    from test_scaling import _same_adapter, _train

    model_dir = {"gemma": tiny_gemma_chat_dir, "phi3": tiny_phi3_chat_dir,
                 "mixtral": tiny_mixtral_chat_dir}[family]
    one = _train(model_dir, tmp_path / "one", 4, "1,1,1", devices=1)["1,1,1"]
    many = _train(model_dir, tmp_path / "many", 4, "2,2,2", "1,8,1")
    for mesh in ("2,2,2", "1,8,1"):
        assert many[mesh]["devices"] == 8
        np.testing.assert_allclose(many[mesh]["losses"], one["losses"], rtol=1e-5, atol=0)
        _same_adapter(tmp_path / "one" / "1-1-1", tmp_path / "many" / mesh.replace(",", "-"))
