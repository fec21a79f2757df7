"""Mixtures of experts (Mixtral, Qwen3-MoE) beyond the logits every family is checked for in
test_model_logits.py: the routers' load-balancing loss, both checkpoint layouts, LoRA on the experts
as PEFT's target_parameters (the adapter loads in PEFT, reproduces tune's logits, and the training
loss with its load-balancing term and the gradients equal PEFT's), the merged export, and the plan
(meshes of 8 devices against one: test_families.py)."""
from __future__ import annotations

import dataclasses
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from conftest import tiny_plan
from test_export import ids, torch_logits, trained_like, tune_logits
from core.architecture import ModelConfig, fold_expert_names, unfold_expert_tensors
from core.errors import PlanError
from runtime.model import LoraConfig
from runtime.weights import adapter_variables, load_pretrained, to_hf_state_dict, to_peft_layout

KINDS = ["mixtral", "qwen3-moe"]
LORA = LoraConfig(rank=2, alpha=4.0, dropout=0.0,
                  targets=("q_proj", "v_proj", "gate_up_proj", "down_proj"))


@pytest.fixture(autouse=True)
def exact_matmuls():
    with jax.default_matmul_precision("highest"):
        yield


@pytest.mark.parametrize("kind", KINDS)
def test_load_balancing_loss_equals_transformers(hf_tiny, kind):
    """The routers' load-balancing loss over every layer, padding excluded, is transformers'
    aux_loss (load_balancing_loss_func with the attention mask)."""
    from transformers import AutoModelForCausalLM

    _, path = hf_tiny(kind)
    ref = AutoModelForCausalLM.from_pretrained(path, output_router_logits=True).eval()
    model = load_pretrained(path)
    x = ids()
    real = np.ones_like(x, bool)
    real[1, 9:] = False                                 # the second row is padded at its end
    with torch.no_grad():
        want = ref(torch.as_tensor(x, dtype=torch.long),
                   attention_mask=torch.as_tensor(real, dtype=torch.long)).aux_loss.item()
    _, aux = model(jnp.asarray(x), router_loss=True, token_mask=jnp.asarray(real))
    assert float(aux) == pytest.approx(want, rel=1e-5)
    with torch.no_grad():
        whole = ref(torch.as_tensor(x, dtype=torch.long)).aux_loss.item()
    _, aux_all = model(jnp.asarray(x), router_loss=True)
    assert float(aux_all) == pytest.approx(whole, rel=1e-5)
    assert abs(whole - want) > 1e-4                     # the mask matters
    # a dense model has no router: the loss is 0
    _, dense = hf_tiny("llama")
    assert float(load_pretrained(dense)(jnp.asarray(x), router_loss=True)[1]) == 0.0


@pytest.mark.parametrize("kind", KINDS)
def test_both_checkpoint_layouts_load(hf_tiny, tmp_path, kind):
    """The published layout (one tensor per expert, what save_pretrained writes) and transformers
    5's 3-D tensors read into the same model; unfolding the 3-D tensors gives back the published
    file exactly."""
    ref, path = hf_tiny(kind)
    published = load_file(str(path / "model.safetensors"))
    cfg = ModelConfig.from_hf(json.loads((path / "config.json").read_text()))
    assert any(".experts.0." in n for n in published)               # the per-expert layout
    fused = to_hf_state_dict(load_pretrained(path))
    assert set(fused) == set(cfg.tensor_shapes())
    assert {n: v.shape for n, v in fused.items()} == fold_expert_names(
        {n: v.shape for n, v in published.items()}, cfg)
    unfolded = unfold_expert_tensors(fused, cfg)
    assert set(unfolded) == set(published)
    for n in published:
        np.testing.assert_array_equal(unfolded[n], published[n])
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    save_file(fused, str(tmp_path / "model.safetensors"))
    x = ids()
    np.testing.assert_allclose(tune_logits(load_pretrained(tmp_path), x), torch_logits(ref, x),
                               atol=1e-4, rtol=0)
    # an expert missing from the per-expert layout is named
    partial = {n: v for n, v in published.items() if ".experts.3." not in n or ".0." in n[:16]}
    save_file(partial, str(tmp_path / "model.safetensors"))
    with pytest.raises(PlanError, match="lacks"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("kind", KINDS)
def test_peft_loads_expert_adapter_loss_and_gradients_equal(hf_tiny, tmp_path, kind):
    """LoRA on the attention and on the experts: PEFT loads tune's adapter (target_parameters,
    no missing or unexpected keys) and computes tune's logits; tune reads it back; and the
    training loss — cross-entropy plus router_aux_loss_coef × the load-balancing loss — and its
    gradients for every LoRA factor equal PEFT's on a padded batch."""
    from peft import PeftModel, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from runtime.peft import load_peft_adapter, read_lora_config, save_peft_adapter
    from runtime.train import accumulate, split_model

    _, path = hf_tiny(kind)
    model = trained_like(path, lora=LORA)
    out = save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(path))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert config["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    tensors = load_file(str(out / "adapter_model.safetensors"))
    E = model.cfg.num_experts
    assert tensors["base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"].shape \
        == (E * 2, 64)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                output_router_logits=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft = PeftModel.from_pretrained(base, out, is_trainable=True)
    assert not [w for w in caught if "missing" in str(w.message).lower()
                or "unexpected" in str(w.message).lower()]
    result = set_peft_model_state_dict(peft, {k: torch.from_numpy(v) for k, v in tensors.items()})
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora_" in k]
    x = ids()
    peft.eval()
    np.testing.assert_allclose(torch_logits(peft, x), tune_logits(model, x), atol=1e-4, rtol=0)
    back = load_peft_adapter(load_pretrained(path, lora=read_lora_config(out)), out)
    np.testing.assert_allclose(tune_logits(back, x), tune_logits(model, x), atol=1e-6, rtol=0)

    # the training loss and its gradients, a padded row and a 4-token prompt unsupervised
    real = np.ones_like(x, bool)
    real[1, 9:] = False
    mask = real.copy()
    mask[:, :4] = False
    mask[np.arange(2), real.sum(1) - 1] = False                 # the last token predicts nothing
    batch = {"tokens": x, "positions": np.tile(np.arange(13, dtype=np.int32), (2, 1)),
             "segment_ids": real.astype(np.int32), "targets": np.roll(x, -1, axis=1),
             "loss_mask": mask.astype(np.int32)}
    batch = {k: jnp.asarray(v)[None] for k, v in batch.items()}
    coef = model.cfg.router_aux_coef
    graphdef, lora, frozen = split_model(model)
    loss_sum, n, grads, aux_sum = accumulate(graphdef, lora, frozen, batch, None, ce_chunk=8,
                                             dropout=False, loss_tokens=None, packed=False,
                                             router_aux=coef)
    labels = np.where(np.roll(mask, 1, axis=1), x, -100)
    peft.train()
    want = peft(torch.as_tensor(x, dtype=torch.long), attention_mask=torch.as_tensor(real.astype(int)),
                labels=torch.as_tensor(labels, dtype=torch.long))
    assert float(loss_sum / n) + coef * float(aux_sum / n) == pytest.approx(want.loss.item(),
                                                                             rel=1e-5)
    want.loss.backward()
    theirs = {n.removeprefix("base_model.model.").replace(".default", ""): p.grad.numpy()
              for n, p in peft.named_parameters() if "lora_" in n}
    nnx.update(model, jax.tree.map(lambda g: g / n, grads))      # the gradients, in the model's place
    checked = 0
    for _, var, names, _, _, layout in adapter_variables(model):
        for i, name in enumerate(names):
            g = np.asarray(var[...][i])
            g = g if layout is None else to_peft_layout(g, layout)
            np.testing.assert_allclose(g, theirs[name], atol=2e-5, rtol=1e-4, err_msg=name)
            checked += 1
    assert checked == len(theirs) == 2 * 2 * 4


@pytest.mark.parametrize("kind", KINDS)
def test_merged_export_loads_in_transformers(hf_tiny, tmp_path, kind):
    """format=merged folds every expert's LoRA into its weights and writes the published layout,
    which AutoModelForCausalLM loads with tune's logits; PEFT's merge_and_unload agrees."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from runtime.export import save_merged
    from runtime.peft import save_peft_adapter

    _, path = hf_tiny(kind)
    model = trained_like(path, lora=LORA, seed=1)
    save_merged(model, tmp_path / "merged", path)
    written = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert set(written) == set(load_file(str(path / "model.safetensors")))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    x = ids(seed=2)
    np.testing.assert_allclose(torch_logits(merged, x), tune_logits(model, x), atol=1e-4, rtol=1e-4)
    adapter = save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(path))
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    theirs = PeftModel.from_pretrained(base, adapter).merge_and_unload().eval()
    np.testing.assert_allclose(torch_logits(theirs, x), torch_logits(merged, x), atol=1e-4,
                               rtol=1e-4)


def test_config_reading_and_refusals():
    """transformers' defaults for keys left out; layers that are not mixtures, router jitter and
    more experts per token than experts are refused naming the key."""
    base = dict(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                num_attention_heads=2)
    mixtral = ModelConfig.from_hf({"architectures": ["MixtralForCausalLM"], **base})
    assert (mixtral.num_experts, mixtral.experts_per_token, mixtral.expert_intermediate_size,
            mixtral.norm_topk_prob, mixtral.router_aux_coef) == (8, 2, 24, True, 0.001)
    qwen = ModelConfig.from_hf({"model_type": "qwen3_moe", **base, "num_experts": 4,
                                "num_experts_per_tok": 2, "moe_intermediate_size": 8})
    assert (qwen.family, qwen.num_experts, qwen.expert_intermediate_size, qwen.norm_topk_prob,
            qwen.qk_norm) == ("qwen3_moe", 4, 8, False, True)
    assert qwen.active_param_count() == qwen.param_count() - 2 * 2 * (16 * 16 + 8 * 16)
    for bad, match in [({"mlp_only_layers": [1]}, "mlp_only_layers"),
                       ({"decoder_sparse_step": 2}, "decoder_sparse_step"),
                       ({"num_experts_per_tok": 5}, "num_experts_per_tok=5")]:
        with pytest.raises(PlanError, match=match):
            ModelConfig.from_hf({"model_type": "qwen3_moe", **base, "num_experts": 4,
                                 "num_experts_per_tok": 2, **bad})
    with pytest.raises(PlanError, match="router_jitter_noise"):
        ModelConfig.from_hf({"architectures": ["MixtralForCausalLM"], **base,
                             "router_jitter_noise": 0.1})


def test_plan_refusals_and_training(tiny_mixtral_chat_dir, tmp_path):
    """A Mixtral plan shows its experts (total and active parameters, routing, expert memory) and
    trains: the loss falls, metrics.jsonl logs the load-balancing loss, the adapter holds the
    experts' LoRA under PEFT's names. What PEFT cannot hold for expert parameters — dropout, DoRA
    — and QLoRA and full fine-tuning are refused at compile time."""
    import io

    from rich.console import Console

    from compiler.compile import _computed_params
    from compiler.summary import print_plan
    from runtime.run import train

    targets = ("q_proj", "v_proj", "gate_proj", "down_proj")
    plan = tiny_plan(tiny_mixtral_chat_dir, tmp_path, epochs=4, lr=2e-2, pack=False,
                     targets=targets)
    cfg = plan.model.config
    assert plan.adapter.targets == ("q_proj", "v_proj", "gate_up_proj", "down_proj")
    assert plan.model.params == cfg.param_count()
    assert plan.objective.router_aux_coef == 0.02
    per_expert = plan.adapter.per_target["gate_up_proj"]
    assert per_expert == 2 * 4 * 4 * (32 + 128)             # layers × experts × r × (in + out)
    # the step-time estimate's weights a token computes with: on a GPU the 2 experts it is routed
    # to (the active parameters); on a CPU, whose grouped product runs every expert, all 4 twice
    experts = cfg.expert_params()
    gpu = dataclasses.replace(plan.runtime, devices=dataclasses.replace(plan.runtime.devices,
                                                                        platform="gpu"))
    assert _computed_params(plan.model, gpu) == cfg.active_param_count()
    assert _computed_params(plan.model, plan.runtime) == plan.model.params + experts
    buf = io.StringIO()
    print_plan(plan, console=Console(file=buf, width=200, color_system=None))
    text = buf.getvalue()
    assert "active per token" in text and "4 per layer" in text and "top 2 per token" in text
    for change, key in [(dict(dropout=0.1), "adapter.dropout"), (dict(kind="dora"), "adapter.kind"),
                        (dict(kind="full"), "adapter.kind")]:
        with pytest.raises(PlanError) as e:
            tiny_plan(tiny_mixtral_chat_dir, tmp_path, targets=targets, **change)
        assert e.value.key == key
    train(plan, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == plan.schedule.total_steps
    assert all(r["router_aux"] > 0.9 for r in steps)      # E·Σ f·P is 1 when balanced, above if not
    losses = [r["loss"] for r in steps]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.08, losses
    adapter = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.1.mlp.experts.lora_B.weight" in adapter
