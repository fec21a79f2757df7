"""Gemma 3's multimodal checkpoints (Gemma3ForConditionalGeneration): tune trains the text model and
leaves the vision tower as it is. Against transformers and PEFT, on a tiny random checkpoint
(conftest.tiny_gemma3_multimodal) under both namings of its tensors: config.json's text_config read
with transformers' defaults, the logits on text, the PEFT adapter both ways, the merged export with
the vision tensors copied through, the plan, and a short run exported."""
from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from conftest import load_in_peft
from core.architecture import ModelConfig, is_vision_tensor
from core.errors import PlanError
from runtime.model import LoraConfig
from runtime.weights import load_pretrained
from test_export import merged_computes_the_model, torch_logits, trained_like, tune_logits

STYLES = ["legacy", "current"]
# LoRA on attention and MLP layers, beside a v_proj (a name the vision tower has too), the final
# norm and the layers' input norms trained in full
LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=("q_proj", "o_proj", "up_proj", "down_proj"),
                  train_modules=("v_proj", "norm", "input_layernorm"))


@pytest.fixture(autouse=True)
def exact_matmuls():
    with jax.default_matmul_precision("highest"):
        yield


def ids(B=2, T=17, seed=0):
    """Text tokens (the conditional-generation model is given input_ids alone)."""
    return np.random.default_rng(seed).integers(0, 96, (B, T)).astype(np.int32)


def test_config_is_the_text_config_with_transformers_defaults(tiny_gemma3_multimodal):
    """text_config reads as the same Gemma 3 text model's config.json would, keys left out taking
    Gemma3TextConfig's defaults (a published config leaves most out); bad keys are named
    `text_config.<key>`; GGUF export checks the text model as a Gemma 3's."""
    from transformers import Gemma3TextConfig

    from runtime.gguf import check_gguf_export

    ref, dirs = tiny_gemma3_multimodal
    hf = json.loads((dirs["legacy"] / "config.json").read_text())
    cfg = ModelConfig.from_hf(hf)
    text = ModelConfig.from_hf(ref.config.text_config.to_dict())
    assert cfg.multimodal and not text.multimodal
    assert dataclasses.replace(cfg, multimodal=False) == text
    assert (cfg.sliding_windows, cfg.tie_word_embeddings) == ((5, 0), True)
    assert cfg.query_scale == pytest.approx(10 ** -0.5)
    assert cfg.param_count() == ref.model.language_model.num_parameters()
    # google/gemma-3-4b-it's text_config, and none at all
    published = {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                 "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                 "sliding_window": 1024}
    for given in (published, {}):
        cfg = ModelConfig.from_hf({"architectures": ["Gemma3ForConditionalGeneration"],
                                   "text_config": given})
        assert dataclasses.replace(cfg, multimodal=False) == \
            ModelConfig.from_hf(Gemma3TextConfig(**given).to_dict())
    assert cfg.vocab_size == 262_208 and ModelConfig.from_hf({"model_type": "gemma3"}).multimodal
    assert not ModelConfig.from_hf({"model_type": "gemma3", "tie_word_embeddings": False}
                                   ).tie_word_embeddings          # the top level's decides
    for bad, match in ((dict(num_hidden_layers=0), "text_config.num_hidden_layers=0"),
                       (dict(layer_types=["full_attention"]), "text_config.layer_types"),
                       (dict(hidden_activation="relu"), "text_config.hidden_activation"),
                       (dict(final_logit_softcapping=30.0), "text_config.final_logit_softcapping"),
                       (dict(model_type="llama"), "text_config.model_type")):
        with pytest.raises(PlanError, match=match) as e:
            ModelConfig.from_hf({**hf, "text_config": {**hf["text_config"], **bad}})
        assert e.value.key == "model.path"
    with pytest.raises(PlanError, match="multimodal Gemma 3's text model .*one global layer in "
                       "every 6") as e:     # its text model checked as Gemma 3's: 2 layers here
        check_gguf_export(ModelConfig.from_hf(hf))
    assert e.value.key == "format"
    check_gguf_export(ModelConfig.from_hf({**hf, "text_config": {
        **hf["text_config"], "num_hidden_layers": 6, "head_dim": 256, "query_pre_attn_scalar": 256,
        "layer_types": None, "sliding_window_pattern": 6, "rope_parameters": None}}))


@pytest.mark.parametrize("style", STYLES)
def test_logits_match_transformers(tiny_gemma3_multimodal, style):
    """Either naming of the tensors loads (the vision tensors left aside); the text model's logits
    are Gemma3ForConditionalGeneration's on input_ids alone."""
    ref, dirs = tiny_gemma3_multimodal
    model = load_pretrained(dirs[style])
    assert model.cfg.multimodal
    x = ids()
    np.testing.assert_allclose(tune_logits(model, x), torch_logits(ref, x), atol=1e-4, rtol=0)


def test_missing_and_unexpected_tensors_are_named(tiny_gemma3_multimodal, hf_tiny, tmp_path):
    """A text tensor missing or one the model lacks is named as stored; vision tensors pass only in
    the multimodal architecture."""
    _, dirs = tiny_gemma3_multimodal
    tensors = load_file(str(dirs["current"] / "model.safetensors"))
    (tmp_path / "config.json").write_text((dirs["current"] / "config.json").read_text())
    partial = dict(tensors)
    del partial["model.language_model.layers.1.mlp.up_proj.weight"]
    save_file(partial, str(tmp_path / "model.safetensors"))
    with pytest.raises(PlanError, match=r"model\.language_model\.layers\.1\.mlp\.up_proj"):
        load_pretrained(tmp_path)
    mixed = {**tensors, "language_model.model.norm.weight": tensors["model.language_model.norm.weight"]}
    save_file(mixed, str(tmp_path / "model.safetensors"))      # both namings: the older one read
    with pytest.raises(PlanError, match="lacks"):
        load_pretrained(tmp_path)

    _, text_dir = hf_tiny("gemma3")
    (tmp_path / "config.json").write_text((text_dir / "config.json").read_text())
    text = load_file(str(text_dir / "model.safetensors"))
    save_file({**text, "vision_tower.post_layernorm.weight": np.ones(16, np.float32)},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(PlanError, match=r"vision_tower\.post_layernorm\.weight"):
        load_pretrained(tmp_path)


def test_peft_adapter_both_ways(tiny_gemma3_multimodal, tmp_path):
    """tune's adapter, under the names PEFT gives the multimodal model, loads in PEFT with no key
    missing or unexpected, adapts the text model alone and computes tune's logits; tune reads it
    back, and reads PEFT's own save of it."""
    from transformers import Gemma3ForConditionalGeneration

    from runtime.peft import load_peft_adapter, read_lora_config, save_peft_adapter

    _, dirs = tiny_gemma3_multimodal
    path = dirs["legacy"]
    model = trained_like(path, lora=LORA)
    out = save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(path))
    tensors = load_file(str(out / "adapter_model.safetensors"))
    prefix = "base_model.model.model.language_model."
    assert tensors[prefix + "layers.1.self_attn.q_proj.lora_A.weight"].shape == (4, 32)
    assert tensors[prefix + "layers.0.self_attn.v_proj.weight"].shape == (24, 32)   # 2 heads of 12
    assert prefix + "norm.weight" in tensors and all(n.startswith(prefix) for n in tensors)

    base = Gemma3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    peft = load_in_peft(base, out, tensors)
    adapted = [n for n, _ in peft.named_parameters() if "lora_" in n or "modules_to_save" in n]
    assert adapted and not [n for n in adapted if "language_model" not in n]
    x = ids(seed=1)
    np.testing.assert_allclose(torch_logits(peft, x), tune_logits(model, x), atol=1e-4, rtol=0)

    lora = read_lora_config(out)
    assert (set(lora.targets), set(lora.train_modules)) == (set(LORA.targets), set(LORA.train_modules))
    for adapter in (out, tmp_path / "peft"):
        if adapter != out:
            peft.save_pretrained(adapter)
        fresh = load_peft_adapter(load_pretrained(dirs["current"], lora=read_lora_config(adapter)),
                                  adapter)
        np.testing.assert_allclose(tune_logits(fresh, x), tune_logits(model, x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("style", STYLES)
def test_merged_export_loads_in_transformers(tiny_gemma3_multimodal, tmp_path, style):
    """format=merged writes the whole multimodal checkpoint, named as its base is: the merged text
    model beside the base's vision tensors, byte for byte; transformers loads it with no key missing
    or unexpected and computes the merged model, and tune reads it back."""
    from transformers import Gemma3ForConditionalGeneration

    from runtime.export import save_merged

    _, dirs = tiny_gemma3_multimodal
    model = trained_like(dirs[style], lora=LORA, seed=2)
    merged_dir = save_merged(model, tmp_path / "merged", dirs[style])
    source = load_file(str(dirs[style] / "model.safetensors"))
    merged = load_file(str(merged_dir / "model.safetensors"))
    assert set(merged) == set(source)
    vision = [n for n in source if is_vision_tensor(n)]
    assert len(vision) > 20
    for n in vision:
        assert merged[n].dtype == source[n].dtype and merged[n].tobytes() == source[n].tobytes()

    merged_computes_the_model(merged_dir, model, ids(seed=3), Gemma3ForConditionalGeneration)


@pytest.mark.parametrize("style", STYLES)
def test_plan_compiles(tiny_gemma3_multimodal, tmp_path, style):
    """The compiler takes the checkpoint (its vision tensors aside) and sizes the text model; the
    plan keeps the multimodal switch through its JSON."""
    from conftest import tiny_plan
    from core.plan import Plan

    _, dirs = tiny_gemma3_multimodal
    plan = tiny_plan(dirs[style], tmp_path, targets=("q_proj", "v_proj"))
    assert plan.model.architecture == "Gemma3ForConditionalGeneration"
    assert plan.model.config.multimodal and plan.model.params == plan.model.config.param_count()
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again.model.config == plan.model.config and again.is_consistent()


def test_trains_and_exports(tiny_gemma3_multimodal, tmp_path):
    """Two training steps through the runtime: the run's adapter targets the text model alone, and
    `tune export`'s merged checkpoint loads in transformers whole; GGUF of this text model (a layer
    pattern llama.cpp fixes otherwise) is refused."""
    from transformers import Gemma3ForConditionalGeneration

    from conftest import tiny_plan
    from runtime.export import export_run
    from runtime.run import train

    _, dirs = tiny_gemma3_multimodal
    plan = tiny_plan(dirs["legacy"], tmp_path, max_steps=2, targets=("q_proj", "v_proj"))
    train(plan, tmp_path / "run")
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == r".*language_model\..*\.(q_proj|v_proj)"
    out = export_run(plan, tmp_path / "run", tmp_path / "merged", fmt="merged", gguf_type="f32")
    _, info = Gemma3ForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with pytest.raises(PlanError, match="multimodal Gemma 3's text model"):
        export_run(plan, tmp_path / "run", tmp_path / "model.gguf", fmt="gguf", gguf_type="f32")
