"""Shared fixtures."""
from __future__ import annotations

import pytest


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


def synthetic_examples(n, *, seed=0, vocab=96, max_len=24):
    """(ids, prompt_lens): a learnable toy task — the response repeats the prompt's first tokens."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids, prompt_lens = [], []
    for _ in range(n):
        p = int(rng.integers(3, max_len // 2))
        r = int(rng.integers(2, max(3, min(p, max_len - p))))
        prompt = rng.integers(3, vocab, size=p)
        x = np.concatenate([prompt, prompt[:r - 1], [2]]).astype(np.int32)   # ends with eos = 2
        ids.append(x)
        prompt_lens.append(p)
    return ids, prompt_lens


class TinyExamples:
    def __init__(self, splits):
        self._splits = splits

    def split(self, name):
        return self._splits.get(name, ([], []))

    def masks(self, name):  # single-turn rows: every token after the prompt is supervised
        return None


def make_plan(model_dir, *, examples=None, sizes=None, labels=(), plan_hash="tiny-plan-0", eos=2, pad=0,
              template=None, schedule=None, runtime=None, adapter=None, evaluation=None,
              chat_template=None):
    """A typed Plan for a tiny model directory, with the given settings, built the way the compiler
    builds one: steps and the loss buffer sized by the compiler's own rules from `examples` (a
    TinyExamples; none: no training steps). Its `config` is empty: the runtime must not need it."""
    from core.architecture import architecture, read_config
    from compiler.estimates import schedule_steps
    from core.plan import (PLAN_VERSION, AdapterSection, DataSection, Devices, EvalSection, Estimates,
                               MeshAxes, ModelSection, Plan, RuntimeSection, ScheduleSection,
                               TemplateSection)
    import json

    cfg = read_config(model_dir)
    hf = json.loads((model_dir / "config.json").read_text())
    model = ModelSection(name="tiny", source="local", dir=str(model_dir), architecture=architecture(hf),
                         config=cfg, params=cfg.param_count(), chat_template=chat_template,
                         bos_token_id=1, eos_token_id=eos, eos_token_ids=(eos,), pad_token_id=pad,
                         bos_token="", eos_token="", config_hash="tiny", tokenizer_hash="tiny")
    s = dict(lr=3e-3, epochs=2, max_steps=None, batch_size=4, grad_accum=2, warmup=2, seed=0,
             lr_schedule="cosine", weight_decay=0.0, max_grad_norm=1.0, beta1=0.9, beta2=0.999,
             eps=1e-8, seq_len=64)
    s.update(schedule or {})
    rt = dict(dtype="float32", param_dtype="float32", matmul_dtype="float32",
              mesh=MeshAxes(1, 1, 1),
              devices=Devices("cpu", "cpu", 1, None, None), remat="none", attention="xla",
              attention_block=128, pack=True, ce_chunk=32,
              log_every=1, checkpoint_every=0)
    rt.update(runtime or {})
    train_ids, _ = examples.split("train") if examples else ([], [])
    if "loss_tokens" not in rt:
        from core.packing import supervised_capacity

        ids = [x for split in ("train", "val") for x in examples.split(split)[0]] if examples else []
        plens = [p for split in ("train", "val") for p in examples.split(split)[1]] if examples else []
        sup = [len(x) - max(int(p), 1) for x, p in zip(ids, plens)]
        rt["loss_tokens"] = supervised_capacity([len(x) for x in ids], sup, s["seq_len"],
                                                s["batch_size"], pack=rt["pack"])
    steps = {"rows_per_epoch": 0, "steps_per_epoch": 0, "total_steps": 0, "warmup_steps": 0}
    if len(train_ids):
        steps = schedule_steps([len(x) for x in train_ids], batch_size=s["batch_size"],
                               grad_accum=s["grad_accum"], epochs=s["epochs"], max_steps=s["max_steps"],
                               warmup=s["warmup"], pack=rt["pack"], seq_len=s["seq_len"])
    gb = s["batch_size"] * s["grad_accum"]
    a = dict(rank=4, alpha=8.0, dropout=0.0, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    a.update(adapter or {})
    a["targets"] = tuple(a["targets"])
    a.setdefault("rslora", False)
    t = dict(prompt="{text}", response="{label}", system=None, chat=False, fields=("text", "label"),
             chat_template=None, examples=())
    t.update(template or {})
    ev = dict(metric="accuracy", mode="generate", max_new_tokens=8, limit=None, every=0, batch_size=8)
    ev.update(evaluation or {})
    sizes = dict(sizes or {"train": len(train_ids), "val": 0, "test": 0})
    return Plan(
        version=PLAN_VERSION, hash=plan_hash, model=model,
        data=DataSection(format="auto", max_rows=None, val_fraction=0.0, max_length=s["seq_len"],
                         overlength="truncate", dedupe=True, train=None, test=None, cache="tiny",
                         key="tiny", sizes=sizes, tokens={}, truncate_fields=(), truncated=0,
                         truncated_fields={}, dropped_too_long=0, no_supervised=0, supervised={},
                         per_split={}, n_labels=len(labels), task="classification" if labels else
                         "generation", labels=tuple(labels), majority_baseline=None,
                         unseen_test_labels=()),
        template=TemplateSection(**t),
        adapter=AdapterSection(**a, scale=a["alpha"] / (a["rank"] ** 0.5 if a["rslora"] else a["rank"]),
                               trainable_params=0, per_target={},
                               share=0.0),
        schedule=ScheduleSection(**s, global_batch=gb, **steps, tokens_per_step=gb * s["seq_len"]),
        runtime=RuntimeSection(**rt), eval=EvalSection(**ev),
        estimates=Estimates(memory={}, memory_share=None, step_time_s=None, total_time_s=None,
                            eval_memory=None),
        recipe=None, config={}, warnings=())


def schedule(total_steps, **kw):
    """A ScheduleSection for optimizer tests: `total_steps` steps, AdamW's usual settings."""
    from core.plan import ScheduleSection

    s = dict(lr=1e-3, epochs=1, max_steps=None, batch_size=4, grad_accum=1, warmup=0, seed=0,
             lr_schedule="cosine", weight_decay=0.0, max_grad_norm=1.0, beta1=0.9, beta2=0.999,
             eps=1e-8, seq_len=32, global_batch=4, rows_per_epoch=4 * total_steps,
             steps_per_epoch=total_steps, total_steps=total_steps, warmup_steps=0, tokens_per_step=128)
    s.update(kw)
    return ScheduleSection(**s)


def tiny_plan(model_dir, *, plan_hash="tiny-plan-0", n_train=48, n_val=8, seed=0, batch_size=4,
              grad_accum=2, seq_len=64, epochs=2, max_steps=None, lr=3e-3, warmup_steps=2,
              dropout=0.0, rank=4, pack=True, checkpoint_every=0, eval_every=0, log_every=1,
              ce_chunk=32, targets=("q_proj", "k_proj", "v_proj", "o_proj"), mesh=None):
    """A Plan for the tiny model and the token examples it trains on (synthetic, learnable).

    Returns (plan, examples); the `train_on` fixture makes train() read `examples`."""
    train = synthetic_examples(n_train, seed=seed)
    val = synthetic_examples(n_val, seed=seed + 1000)
    examples = TinyExamples({"train": train, "val": val})
    plan = make_plan(
        model_dir, plan_hash=plan_hash, examples=examples,
        sizes={"train": n_train, "val": n_val, "test": 0},
        schedule=dict(lr=lr, batch_size=batch_size, grad_accum=grad_accum, epochs=epochs,
                      max_steps=max_steps, warmup=warmup_steps, seed=seed, seq_len=seq_len),
        runtime=dict(pack=pack, ce_chunk=ce_chunk, log_every=log_every,
                     checkpoint_every=checkpoint_every,
                     **({"mesh": mesh} if mesh is not None else {})),
        adapter=dict(rank=rank, alpha=2.0 * rank, dropout=dropout, targets=targets),
        evaluation=dict(every=eval_every))
    return plan, examples


@pytest.fixture
def train_on(monkeypatch):
    """train_on(examples): make training read these examples instead of the plan's token cache."""
    import runtime.build

    def apply(examples):
        monkeypatch.setattr(runtime.build, "load_examples", lambda cache: examples)

    return apply


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
}


@pytest.fixture(scope="session")
def hf_tiny(tmp_path_factory):
    """hf_tiny(kind) -> (transformers model in eval mode, float32; directory it was saved to).
    Weights are re-drawn larger than transformers' 0.02 init (and norms/biases non-trivial) so that
    logits differ clearly between tokens and a wrong detail shows. Cached per kind for the session."""
    import torch
    import transformers

    made = {}

    def make(kind: str = "llama"):
        if kind in made:
            return made[kind]
        cls_name, overrides = HF_TINY_KINDS[kind]
        config = getattr(transformers, cls_name)(**{**HF_TINY_BASE, **overrides})
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(1.0 + 0.2 * torch.randn_like(p))
                elif name.endswith("bias"):
                    p.copy_(0.2 * torch.randn_like(p))
                else:
                    p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
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
