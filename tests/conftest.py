"""Shared fixtures."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# One XLA compilation cache for the whole test run: every pytest worker (pytest-xdist's workers
# inherit this process's environment) and every `tune` subprocess a test starts. A program many
# tests compile (the same shapes of the same model) then compiles once. Set before jax is imported;
# a JAX_COMPILATION_CACHE_DIR of the caller's own is left alone. The size limit makes jax lock the
# directory around each read and write, which the concurrent workers need.
_XLA_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _XLA_CACHE = tempfile.mkdtemp(prefix="tune-tests-xla-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")


def pytest_sessionfinish(session):
    if _XLA_CACHE is not None and not hasattr(session.config, "workerinput"):
        shutil.rmtree(_XLA_CACHE, ignore_errors=True)      # the process that made it removes it


@pytest.fixture(scope="session")
def smollm2_dir():
    """The converted embedded SmolLM2-135M-Instruct, in $TUNE_HOME (default ~/.cache/tune) so the
    one-time conversion is reused across test runs."""
    from compiler.gguf import ensure_embedded_model

    return ensure_embedded_model()


@pytest.fixture(scope="session")
def smollm2_gguf():
    """(directory, file name) of the embedded GGUF, as transformers' gguf_file loading wants them."""
    from compiler.gguf import embedded_gguf_path

    path = embedded_gguf_path()
    return str(path.parent), path.name


# --- tiny random Llama + minimal plans for runtime tests ----------------------------------------

TINY_LLAMA = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A random 2-layer Llama saved by transformers (config.json + model.safetensors)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(**TINY_LLAMA, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    return out


def synthetic_examples(n, *, seed=0, vocab=96, max_len=24, low=3):
    """(ids, prompt_lens): a learnable toy task — the response repeats the prompt's first tokens
    (ids from `low` up, then the end token 2)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids, prompt_lens = [], []
    for _ in range(n):
        p = int(rng.integers(3, max_len // 2))
        r = int(rng.integers(2, max(3, min(p, max_len - p))))
        prompt = rng.integers(low, vocab, size=p)
        x = np.concatenate([prompt, prompt[:r - 1], [2]]).astype(np.int32)   # ends with eos = 2
        ids.append(x)
        prompt_lens.append(p)
    return ids, prompt_lens


def tiny_plan(model_dir, workdir, *, n_train=48, n_val=8, seed=0, batch_size=4, grad_accum=2,
              seq_len=64, epochs=2, max_steps=None, lr=3e-3, warmup_steps=2, dropout=0.0, rank=4,
              pack=True, checkpoint_every=0, eval_every=0, log_every=1, ce_chunk=32,
              targets=("q_proj", "k_proj", "v_proj", "o_proj"), mesh=None, kind="lora"):
    """A Plan compiled by the compiler, as `tune plan` would, for the tiny word-level model
    (tiny_chat_dir) and a learnable toy task written to workdir/data.jsonl: each answer repeats
    the first words of its prompt (synthetic_examples, in words). n_val rows are held out for
    validation by data.val_fraction."""
    from compiler import schema
    from compiler.compile import compile_plan

    ids, prompt_lens = synthetic_examples(n_train + n_val, seed=seed, low=11)
    rows = [{"text": " ".join(f"w{t}" for t in x[:p]), "label": " ".join(f"w{t}" for t in x[p:-1])}
            for x, p in zip(ids, prompt_lens)]
    import json

    from core.files import write_atomic

    # atomically: the processes of a multi-process test each compile the plan from this file
    data = write_atomic(Path(workdir) / "data.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    cfg = schema.defaults()
    cfg["model"]["path"] = str(model_dir)
    cfg["data"].update(path=str(data), val_fraction=n_val / (n_train + n_val), max_length=seq_len,
                       dedupe=False, task="generation")
    cfg["template"].update(prompt="{text}", response="{label}", chat=False)
    cfg["adapter"].update(rank=rank, alpha=2.0 * rank, dropout=dropout, targets=list(targets),
                          kind=kind)
    cfg["schedule"].update(lr=lr, batch_size=batch_size, grad_accum=grad_accum, epochs=epochs,
                           max_steps=max_steps, warmup=warmup_steps, seed=seed)
    cfg["runtime"].update(pack=pack, ce_chunk=ce_chunk, log_every=log_every,
                          checkpoint_every=checkpoint_every, dtype="float32",
                          matmul_dtype="float32")
    if mesh is not None:
        cfg["runtime"]["mesh"] = {"data": mesh.data, "fsdp": mesh.fsdp, "tensor": mesh.tensor}
    cfg["eval"]["every"] = eval_every
    return compile_plan(cfg, recipe_info=None, command="train")


def make_plan(model_dir, *, sizes=None, labels=(), template=None, adapter=None, evaluation=None,
              seed=0):
    """A Plan compiled by the compiler (tiny_plan, for the tiny word-level model), with the parts
    a test decides replaced: the split sizes and label set of the examples it scores, its
    evaluation settings and its template."""
    import dataclasses
    import tempfile

    a = dict(rank=4, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    a.update(adapter or {})
    plan = tiny_plan(model_dir, tempfile.mkdtemp(prefix="tune-plan-"), rank=a["rank"],
                     targets=tuple(a["targets"]), seed=seed)
    data = dataclasses.replace(plan.data, sizes=dict(sizes or plan.data.sizes), labels=tuple(labels),
                               n_labels=len(labels),
                               task="classification" if labels else "generation")
    return dataclasses.replace(plan, data=data,
                               eval=dataclasses.replace(plan.eval, **(evaluation or {})),
                               template=dataclasses.replace(plan.template, **(template or {})))


def schedule(total_steps, **kw):
    """A ScheduleSection for optimizer tests: `total_steps` steps, AdamW's usual settings."""
    from core.plan import ScheduleSection

    s = dict(lr=1e-3, epochs=1, max_steps=None, batch_size=4, grad_accum=1, warmup=0, seed=0,
             lr_schedule="cosine", weight_decay=0.0, max_grad_norm=1.0, beta1=0.9, beta2=0.999,
             eps=1e-8, seq_len=32, global_batch=4, rows_per_epoch=4 * total_steps,
             steps_per_epoch=total_steps, total_steps=total_steps, warmup_steps=0, tokens_per_step=128)
    s.update(kw)
    return ScheduleSection(**s)


# --- tiny random models of every supported family, saved by transformers -------------------------

HF_TINY_BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                    rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                    pad_token_id=0)
# kind -> (transformers config class name, overrides of HF_TINY_BASE)
HF_TINY_KINDS = {
    "llama": ("LlamaConfig", {}),
    "llama-bias": ("LlamaConfig", dict(attention_bias=True)),
    "llama3-rope": ("LlamaConfig", dict(rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16), rope_theta=500000.0)),
    "linear-rope": ("LlamaConfig", dict(rope_scaling=dict(rope_type="linear", factor=4.0))),
    "mqa": ("LlamaConfig", dict(num_key_value_heads=1)),
    "mha": ("LlamaConfig", dict(num_key_value_heads=4)),
    "smollm-tied": ("LlamaConfig", dict(tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(sliding_window=None)),
    "mistral-window": ("MistralConfig", dict(sliding_window=5)),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", dict(head_dim=24)),     # head_dim != hidden/heads, as in real Qwen3
    # Gemma: caps low enough to bend these scores and logits, a query scale not head_dim's, the
    # window short enough to matter in 17 tokens, a local and a global layer (Gemma 3: at two RoPE
    # bases, the global one scaled)
    "gemma2": ("Gemma2Config", dict(head_dim=24, query_pre_attn_scalar=20, sliding_window=5,
                                    attn_logit_softcapping=4.0, final_logit_softcapping=3.0)),
    "gemma3": ("Gemma3TextConfig", dict(
        head_dim=24, query_pre_attn_scalar=20, sliding_window=5,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                            "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
    "gemma3-tied": ("Gemma3TextConfig", dict(head_dim=16, tie_word_embeddings=True)),
    # Gemma 3 as published, as far as llama.cpp fixes it (GGUF export): a global layer in every six,
    # queries scaled by 1/√head_dim (transformers' default query_pre_attn_scalar, 256), the local
    # base 10000; Gemma's special-token ids, a vocabulary with room for 256 byte pieces
    "gemma3-gguf": ("Gemma3TextConfig", dict(
        vocab_size=384, num_hidden_layers=6, num_attention_heads=2, num_key_value_heads=1,
        head_dim=256, query_pre_attn_scalar=256, sliding_window=4, bos_token_id=2, eos_token_id=1,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
    # Phi-3: fused qkv_proj and gate_up_proj, half of each head turned, LongRoPE whose pretraining
    # length (8) the tests' 17 tokens pass, so the long factors apply (decoding crosses over)
    "phi3": ("Phi3Config", dict(rope_parameters=dict(
        rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.5,
        short_factor=[1.0, 1.5, 2.0, 3.0], long_factor=[2.0, 4.0, 8.0, 16.0],
        original_max_position_embeddings=8), original_max_position_embeddings=8)),
    "phi3-window": ("Phi3Config", dict(sliding_window=5)),
    # mixtures of experts: 4 experts, 2 per token; Mixtral with a sliding window and its
    # renormalised top-2 weights, Qwen3-MoE with q/k norms, narrower experts and raw top-k weights
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=5,
                                      router_aux_loss_coef=0.02)),
    "qwen3-moe": ("Qwen3MoeConfig", dict(head_dim=24, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=40, norm_topk_prob=False)),
    # GGUF export (test_export_gguf.py): each family as llama.cpp runs it, with room for a
    # vocabulary of 256 byte tokens and more; Phi-3 with LongRoPE over half of each head, Gemma 2
    # with its published query scale (1/√head_dim), Mixtral without a window, Qwen3-MoE's chosen
    # experts' weights renormalised
    "qwen2-gguf": ("Qwen2Config", dict(vocab_size=384)),
    "qwen3-gguf": ("Qwen3Config", dict(vocab_size=384, head_dim=24)),
    "phi3-gguf": ("Phi3Config", dict(vocab_size=384, rope_parameters=dict(
        rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.5,
        short_factor=[1.0, 1.5, 2.0, 3.0], long_factor=[2.0, 4.0, 8.0, 16.0],
        original_max_position_embeddings=8), original_max_position_embeddings=8)),
    "gemma2-gguf": ("Gemma2Config", dict(vocab_size=384, head_dim=24, query_pre_attn_scalar=24,
                                         sliding_window=5, attn_logit_softcapping=4.0,
                                         final_logit_softcapping=3.0, tie_word_embeddings=True)),
    "mixtral-gguf": ("MixtralConfig", dict(vocab_size=384, num_local_experts=4,
                                           num_experts_per_tok=2)),
    "qwen3-moe-gguf": ("Qwen3MoeConfig", dict(vocab_size=384, head_dim=24, num_experts=4,
                                              num_experts_per_tok=2, moe_intermediate_size=40,
                                              norm_topk_prob=True)),
}


def redraw(model):
    """`model` (torch) with its weights drawn larger than transformers' 0.02 init (and norms and
    biases non-trivial), so that logits differ clearly between tokens and a wrong detail shows."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model


def load_in_peft(base, adapter_dir, tensors):
    """PeftModel.from_pretrained(base, adapter_dir), in eval mode, checked: PEFT warns of no key
    missing or unexpected, and loading the adapter's `tensors` again (which reports what matched)
    finds none unexpected and none of the adapter's own missing (LoRA factors, modules trained in
    full; their `original_module` is the base's, as for any PEFT save)."""
    import warnings

    import torch
    from peft import PeftModel, set_peft_model_state_dict

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft = PeftModel.from_pretrained(base, adapter_dir).eval()
    assert not [w for w in caught if "missing" in str(w.message).lower()
                or "unexpected" in str(w.message).lower()]
    result = set_peft_model_state_dict(peft, {k: torch.from_numpy(v) for k, v in tensors.items()})
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k]
    return peft


@pytest.fixture(scope="session")
def hf_tiny(tmp_path_factory):
    """hf_tiny(kind) -> (transformers model in eval mode, float32; directory it was saved to).
    Weights are re-drawn (redraw). Cached per kind for the session."""
    import torch
    import transformers

    made = {}

    def make(kind: str = "llama"):
        if kind in made:
            return made[kind]
        cls_name, overrides = HF_TINY_KINDS[kind]
        config = getattr(transformers, cls_name)(**{**HF_TINY_BASE, **overrides})
        torch.manual_seed(0)
        model = redraw(transformers.AutoModelForCausalLM.from_config(config).float().eval())
        out = tmp_path_factory.mktemp(f"hf-{kind}")
        model.save_pretrained(out, safe_serialization=True)
        made[kind] = (model, out)
        return made[kind]

    return make


@pytest.fixture(scope="session")
def bos_tokenizer_dir(tmp_path_factory):
    """A word-level tokenizer.json whose post-processor puts <s> first (as Llama's does) and which
    ships with truncation on (max 2 tokens), vocab <s>=0 </s>=1 a=2 b=3 c=4."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "a": 2, "b": 3, "c": 4}, unk_token="</s>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.enable_truncation(max_length=2)
    out = tmp_path_factory.mktemp("bos-tokenizer")
    tok.save(str(out / "tokenizer.json"))
    return out


def _tiny_chat_model(tiny_chat_dir, out, config):
    """tiny_chat_dir's tokenizer and chat template over a random model of `config` (saved by
    transformers into `out`)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_chat_dir / name, out / name)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def tiny_gemma_chat_dir(tiny_chat_dir, tmp_path_factory):
    """A random 2-layer Gemma 3 of tiny_chat_dir's sizes and tokenizer (a local layer with an 8-token
    window, then a global one; tied embeddings)."""
    from transformers import Gemma3TextConfig

    sizes = {k: v for k, v in TINY_LLAMA.items() if k != "rope_theta"}     # Gemma's two bases
    cfg = Gemma3TextConfig(**{**sizes, "tie_word_embeddings": True}, head_dim=8,
                           query_pre_attn_scalar=8, sliding_window=8,
                           layer_types=["sliding_attention", "full_attention"],
                           bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return _tiny_chat_model(tiny_chat_dir, tmp_path_factory.mktemp("tiny-gemma-chat"), cfg)


# Gemma3ForConditionalGeneration's tensors: transformers' save_pretrained writes the older names
# (left), transformers 5 holds them under its own (right)
GEMMA3_MM_RENAMES = {"language_model.model.": "model.language_model.",
                     "language_model.lm_head.": "lm_head.", "vision_tower.": "model.vision_tower.",
                     "multi_modal_projector.": "model.multi_modal_projector."}


@pytest.fixture(scope="session")
def tiny_gemma3_multimodal(tiny_chat_dir, tmp_path_factory):
    """(Gemma3ForConditionalGeneration in eval mode, float32; {"legacy": dir, "current": dir}): a
    random multimodal Gemma 3 — a 2-layer text model of tiny_chat_dir's sizes and tokenizer (a local
    layer with a 5-token window, then a global one with linear RoPE scaling; head_dim and query
    scale not hidden/heads'; tied embeddings) beside a 1-layer SigLIP vision tower on 16-pixel
    images — saved by transformers, its tensors under the older names (GEMMA3_MM_RENAMES' keys) in
    one directory and transformers 5's in the other. Weights re-drawn (redraw)."""
    import shutil

    import torch
    from safetensors.numpy import load_file, save_file
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    sizes = {k: v for k, v in TINY_LLAMA.items() if k not in ("rope_theta", "tie_word_embeddings")}
    text = dict(sizes, head_dim=12, query_pre_attn_scalar=10, sliding_window=5,
                layer_types=["sliding_attention", "full_attention"],
                rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                                    "rope_theta": 1e6},
                                 "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vision = dict(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32,
                  num_hidden_layers=1, num_attention_heads=2)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                          boi_token_index=93, eoi_token_index=94, image_token_index=95)
    torch.manual_seed(0)
    model = redraw(Gemma3ForConditionalGeneration(config).float().eval())
    saved = tmp_path_factory.mktemp("gemma3-mm-saved")
    model.save_pretrained(saved, safe_serialization=True)
    tensors = load_file(str(saved / "model.safetensors"))
    named = {"legacy": {}, "current": {}}
    for name, value in tensors.items():     # whichever names save_pretrained wrote: both
        for old, new in GEMMA3_MM_RENAMES.items():
            if name.startswith(old) or name.startswith(new):
                rest = name.removeprefix(old) if name.startswith(old) else name.removeprefix(new)
                named["legacy"][old + rest], named["current"][new + rest] = value, value
                break
    assert len(named["legacy"]) == len(named["current"]) == len(tensors)
    dirs = {}
    for style, state in named.items():
        dirs[style] = tmp_path_factory.mktemp(f"gemma3-mm-{style}")
        save_file(state, str(dirs[style] / "model.safetensors"), metadata={"format": "pt"})
        for name in ("config.json", "generation_config.json"):
            shutil.copy(saved / name, dirs[style] / name)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tiny_chat_dir / name, dirs[style] / name)
    return model, dirs


@pytest.fixture(scope="session")
def tiny_phi3_chat_dir(tiny_chat_dir, tmp_path_factory):
    """A random 2-layer Phi-3 of tiny_chat_dir's sizes and tokenizer (fused qkv_proj and
    gate_up_proj, RoPE over half of each head)."""
    from transformers import Phi3Config

    cfg = Phi3Config(**TINY_LLAMA, partial_rotary_factor=0.5, bos_token_id=1, eos_token_id=2,
                     pad_token_id=0)
    return _tiny_chat_model(tiny_chat_dir, tmp_path_factory.mktemp("tiny-phi3-chat"), cfg)


@pytest.fixture(scope="session")
def tiny_mixtral_chat_dir(tiny_chat_dir, tmp_path_factory):
    """A random 2-layer Mixtral of tiny_chat_dir's sizes and tokenizer: 4 experts, 2 per token,
    the load-balancing loss weighed 0.02 (as the published Mixtral)."""
    from transformers import MixtralConfig

    cfg = MixtralConfig(**TINY_LLAMA, num_local_experts=4, num_experts_per_tok=2,
                        router_aux_loss_coef=0.02, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return _tiny_chat_model(tiny_chat_dir, tmp_path_factory.mktemp("tiny-mixtral-chat"), cfg)


# --- a tiny random Llama with a word-level tokenizer, for evaluation and generation tests -------

TINY_SPECIAL = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
TINY_WORDS = ["Q", "A", ":", "user", "assistant", "system"]
TINY_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>"
                      "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant{% endif %}")


@pytest.fixture(scope="session")
def tiny_chat_dir(tiny_llama_dir, tmp_path_factory):
    """tiny_llama_dir plus a word-level tokenizer over its 96 ids (specials, a few words, then
    w11..w95) and a chat template; eos `</s>` = 2, chat end `<|im_end|>` = 4."""
    import shutil

    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    out = tmp_path_factory.mktemp("tiny-chat")
    for f in tiny_llama_dir.iterdir():
        shutil.copy(f, out / f.name)
    words = TINY_SPECIAL + TINY_WORDS
    vocab = {w: i for i, w in enumerate(words)}
    vocab.update({f"w{i}": i for i in range(len(words), TINY_LLAMA["vocab_size"])})
    tok = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TINY_SPECIAL])
    tok.save(str(out / "tokenizer.json"))
    import json

    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
         "chat_template": TINY_CHAT_TEMPLATE}))
    return out


# --- the `tune` command line, in-process, and small classification tables -----------------------

LABELS = ("Alpha", "Beta", "Gamma")


def clf_rows(n, *, seed=0, fields=("text", "label")):
    """n distinct rows of a toy 3-class task: {"text": ..., "label": ...}."""
    text_field, label_field = fields
    return [{text_field: f"Row {seed}-{i}: the clause concerns matter number {i * 7 + seed} of "
                         f"the agreement.", label_field: LABELS[i % 3]} for i in range(n)]


def write_jsonl(path, rows):
    import json
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def tune_cli(tmp_path, monkeypatch, capsys, smollm2_dir):
    """tune_cli(*argv) -> (exit code, stdout, stderr): `tune` run in-process in tmp_path (the current
    directory), with TUNE_RECIPE_PATH unset. smollm2_dir makes sure the embedded model is converted."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TUNE_RECIPE_PATH", raising=False)
    monkeypatch.delenv("TUNE_DEBUG", raising=False)
    from tune.cli import main

    def run(*argv):
        capsys.readouterr()
        rc = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return rc, out, err

    return run


@pytest.fixture
def clf_data(tmp_path):
    """clf_data(n=300, name="train.jsonl") -> path of a toy classification table in tmp_path/data."""
    def make(n=300, name="train.jsonl", seed=0):
        return write_jsonl(tmp_path / "data" / name, clf_rows(n, seed=seed))

    return make


# --- preference data for the tiny word-level model ------------------------------------------------

def pref_rows(n, *, seed=0, vocab=96, low=11):
    """n preference pairs of a learnable toy task, in the tiny model's words: the chosen reply
    repeats the prompt's first words (tiny_plan's answers), the rejected reply is as many other
    words — so a reply's length tells nothing."""
    import numpy as np

    ids, prompt_lens = synthetic_examples(n, seed=seed, low=low)
    rng = np.random.default_rng(seed + 1000)
    rows = []
    for x, p in zip(ids, prompt_lens):
        chosen = x[p:-1]
        rejected = rng.integers(low, vocab, size=len(chosen))
        while np.array_equal(rejected, chosen):
            rejected = rng.integers(low, vocab, size=len(chosen))
        words = lambda xs: " ".join(f"w{t}" for t in xs)                # noqa: E731
        rows.append({"prompt": words(x[:p]), "chosen": words(chosen), "rejected": words(rejected)})
    return rows


def pref_plan(model_dir, workdir, *, objective="dpo", n_train=32, n_val=4, n_test=8, seed=0,
              batch_size=2, grad_accum=1, max_length=32, epochs=1, max_steps=None, lr=1e-2,
              rank=4, checkpoint_every=0, eval_every=0, init_run=None, kind="lora", rows=None,
              mesh=None, pack=True, **settings):
    """A preference Plan compiled by the compiler for the tiny word-level model (tiny_chat_dir):
    pref_rows (or `rows`) written to workdir/pairs.jsonl (n_train + n_val rows, n_val held out)
    and workdir/pairs_test.jsonl (n_test rows). `settings`: objective.* (beta, gamma, ...)."""
    import json

    from compiler import schema
    from compiler.compile import compile_plan
    from core.files import write_atomic

    rows = rows if rows is not None else pref_rows(n_train + n_val + n_test, seed=seed)
    train_rows, test_rows = rows[:len(rows) - n_test], rows[len(rows) - n_test:]
    data = write_atomic(Path(workdir) / "pairs.jsonl",
                        "".join(json.dumps(r) + "\n" for r in train_rows))
    test = write_atomic(Path(workdir) / "pairs_test.jsonl",
                        "".join(json.dumps(r) + "\n" for r in test_rows)) if test_rows else None
    cfg = schema.defaults()
    cfg["model"]["path"] = str(model_dir)
    cfg["data"].update(path=str(data), test_path=str(test) if test else None,
                       val_fraction=n_val / len(train_rows), max_length=max_length, dedupe=False)
    cfg["template"].update(chat=False)
    cfg["adapter"].update(rank=rank, alpha=2.0 * rank, dropout=0.0, kind=kind,
                          targets=["q_proj", "k_proj", "v_proj", "o_proj"])
    cfg["objective"].update(kind=objective, **settings)
    cfg["init"]["run"] = None if init_run is None else str(init_run)
    cfg["schedule"].update(lr=lr, batch_size=batch_size, grad_accum=grad_accum, epochs=epochs,
                           max_steps=max_steps, warmup=0, seed=seed)
    cfg["runtime"].update(pack=pack, ce_chunk=32, checkpoint_every=checkpoint_every,
                          dtype="float32", matmul_dtype="float32")
    if mesh is not None:
        cfg["runtime"]["mesh"] = {"data": mesh.data, "fsdp": mesh.fsdp, "tensor": mesh.tensor}
    cfg["eval"].update(every=eval_every, max_new_tokens=4)
    return compile_plan(cfg, recipe_info=None, command="train")


def diverge_at(monkeypatch, step: int) -> None:
    """Make the training loop see a non-finite loss at optimizer step `step` (the step itself runs;
    its metrics say NaN), as a diverging run would."""
    import runtime.run

    real = runtime.run._step

    def patched(s, *a):
        m = real(s, *a)
        return dict(m, loss=float("nan")) if s.step == step else m

    monkeypatch.setattr(runtime.run, "_step", patched)
