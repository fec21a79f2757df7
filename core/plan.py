"""The Plan: every value the runtime needs, resolved once by the compiler, typed, and content-hashed.

A Plan is a tree of frozen dataclasses, one section per concern (model, data, template, adapter,
schedule, runtime, eval) plus the compiler's estimates. The runtime reads these fields and nothing
else: it keeps no defaults of its own and never looks at `config`, the validated config the plan was
compiled from (kept for provenance, for `tune eval run=DIR` and for rebuilding a token cache).

plan.json is the Plan as JSON with sorted keys, so the same plan is the same bytes; reading it back
gives an equal Plan. A plan.json of another format version is refused with a message, never misread.

The hash covers what determines the training result: every section except the compiler's estimates,
its warnings and what depends only on where things are (file and directory paths, the token cache's
location, $TUNE_HOME, the recipe's path, the run directory, the prompt). Data files enter through
their sha256 and the model through the hashes of its config and tokenizer; recompiling an unchanged
recipe gives the same hash, and editing any resolved value changes it.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.architecture import ModelConfig
from core.errors import PlanError
from core.files import write_atomic

PLAN_VERSION = 4


# ------------------------------------------------------------------------------ sections

@dataclass(frozen=True)
class ModelSection:
    name: str
    source: str                     # embedded | local | hub
    dir: str                        # absolute path of the Hugging Face-layout directory
    architecture: str               # e.g. LlamaForCausalLM
    config: ModelConfig             # config.json, read once (core/architecture.py)
    params: int
    chat_template: str | None
    bos_token_id: int | None
    eos_token_id: int               # the end-of-response token the tokenizer declares
    eos_token_ids: tuple[int, ...]  # every id that ends generation (tokenizer, config, generation config)
    pad_token_id: int
    bos_token: str                  # tokenizer_config.json's bos/eos tokens as text ('' when none), for
    eos_token: str                  # chat templates that print them and plain prompts that end with eos
    config_hash: str                # sha256 of the canonical config.json
    tokenizer_hash: str             # sha256 of tokenizer.json + chat template

    @property
    def family(self) -> str:
        return self.config.family

    @property
    def module_names(self) -> tuple[str, ...]:
        return self.config.linear_names()

    @property
    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        return self.config.linear_shapes()


@dataclass(frozen=True)
class HubSource:
    """A split of a Hugging Face Hub dataset as read (`data.path=hf://datasets/ORG/NAME`)."""
    repo: str                       # ORG/NAME
    split: str | None               # None: the URL names one file of the repo
    subset: str | None              # the config (subset) the split belongs to, if the repo has any
    revision: str | None            # as asked (None = main)
    commit: str | None              # what it resolved to (not hashed: the files' content is)
    files: tuple[str, ...]          # the split's files in the repo, in reading order


@dataclass(frozen=True)
class TableStats:
    """One data file as read: where, its hash, its fields and what happened to its rows. A Hub
    dataset's split counts as one file: `file` is its hf:// URL, `sha256` covers all its files."""
    file: str
    sha256: str
    fields: tuple[str, ...]
    read: int
    kept: int
    dropped: dict[str, int]         # reason → rows
    sampled: int | None = None      # training file: rows after data.max_rows
    train: int | None = None        # ... of which trained on
    val: int | None = None          # ... and held out for validation
    cleaning: dict[str, int] = field(default_factory=dict)   # texts changed: normalized,
                                    # whitespace, control_tokens (escaped)
    hub: HubSource | None = None    # where a Hub dataset's split came from (None: a local file)


@dataclass(frozen=True)
class Label:
    """One answer of a classification task's closed label set."""
    text: str                       # as the training data writes it most often
    ids: tuple[int, ...]            # its supervised tokens as training saw them, end token included:
                                    # what constrained decoding follows
    count: int                      # training rows with this answer


@dataclass(frozen=True)
class DataSection:
    format: str
    max_rows: int | None
    val_fraction: float
    max_length: int                 # tokens per example; the packed row length
    overlength: str
    dedupe: bool
    train: TableStats | None
    test: TableStats | None
    cache: str | None               # the token data (.npz; compiler/examples.py); None = no examples
    key: str | None                 # its content key
    sizes: dict[str, int]           # examples per split (train, val, test) after tokenising
    tokens: dict[str, int]          # p50, p95, max tokens per training example
    truncate_fields: tuple[str, ...]    # data.truncate_fields as given (() = every prompt field)
    truncated: int                      # examples shortened to max_length (by any means)
    truncated_fields: dict[str, int]    # rows cut inside each field
    dropped_too_long: int
    no_supervised: int
    supervised: dict[str, float]    # min, mean supervised tokens per training example
    per_split: dict[str, dict[str, int]]
    n_labels: int                   # distinct training answers
    task: str                       # classification (a closed label set) | generation
    labels: tuple[Label, ...]       # classification: the label set, most frequent first; else ()
    majority_baseline: float | None   # accuracy on the test rows of always answering the most
                                      # frequent training label (classification with test rows)
    unseen_test_labels: tuple[str, ...]   # test answers no training row has (always scored wrong)
    turns_dropped: int = 0          # conversations: answers dropped from over-length conversations
    normalize: str = "NFC"          # how the text was cleaned (compiler/data.TextPolicy): a prompt
    whitespace: str = "strip"       # at generation time is cleaned the same way
    control_tokens: str = "escape"
    unit: int = 1                   # examples that share a row as one: 2 for preference data
                                    # (chosen, rejected; KTO: completion, KL completion); sizes
                                    # then count units (pairs, KTO rows)
    pairs: dict = field(default_factory=dict)   # preference data: units per split, tokens per
                                    # pair (mean, p95, max), KTO's desirable/undesirable rows
    answers_cut: int = 0            # data.overlength=truncate_answer: examples whose answer (a
                                    # reply) was cut at its end to fit max_length
    val_rows: int | None = None     # data.val_rows: the cap on the rows val_fraction holds out
                                    # (None: no cap, as in a plan written before the key)
    length_choice: dict | None = None   # data.max_length=auto: how max_length was chosen (the
                                    # percentile's tokens, rows over it, what capped it, `text`)
    balance: str = "none"           # data.balance: none | oversample | weighted (core/balance.py)
    balance_max_factor: float = 10.0    # oversample: a class grows to at most this × its count
    balanced_counts: tuple[int, ...] | None = None  # oversample: training examples per label in
                                    # an epoch, aligned with `labels` (whose counts are before)
    class_weights: tuple[float, ...] | None = None  # weighted: each label's loss weight, aligned
                                    # with `labels` (N / (K · count), mean 1 per training example)


@dataclass(frozen=True)
class RetrievalSection:
    """retrieval.*: BM25 over a corpus of passages fills {retrieved} (compiler/retrieval.py)."""
    corpus: str                     # the passages file (absolute)
    sha256: str
    id_field: str
    text_field: str
    query: str                      # format string over a row's fields
    k: int
    passage_tokens: int             # each passage cut to this many tokens
    passages: int                   # usable passages in the corpus
    cut: int                        # ... of which were cut to passage_tokens
    empty: int                      # rows of the corpus without an id or a text (skipped)
    gold: str | None                # the data's field naming each row's gold passage id
    per_split: dict[str, dict[str, float]]   # split → rows, no_match, (gold_rows, recall@k)
    index: str                      # the cached BM25 index (a directory)


@dataclass(frozen=True)
class TemplateSection:
    prompt: str | None              # None with `messages`
    response: str | None
    system: str | None
    chat: bool
    fields: tuple[str, ...]         # the data fields the template reads
    chat_template: str | None       # the model's chat template when `chat`, else None
    examples: tuple[str, ...]       # two rendered training examples, supervised part between ⟦ ⟧
    messages: str | None = None     # the field of multi-turn conversations (compiler/conversations)


@dataclass(frozen=True)
class AdapterSection:
    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]
    rslora: bool                    # rank-stabilised: scale = alpha / sqrt(rank)
    scale: float                    # alpha / rank, or alpha / sqrt(rank) with rslora
    trainable_params: int           # LoRA factors + DoRA magnitudes + modules trained in full
    per_target: dict[str, int]      # adapter parameters per target module (all layers)
    share: float                    # trainable / all parameters
    kind: str = "lora"              # lora | dora
    quantize: str = "none"          # none | int8 | nf4: how the frozen linear weights are stored
    train_modules: tuple[str, ...] = ()     # existing modules trained in full
    full_params: dict[str, int] = field(default_factory=dict)  # their parameters (a tied pair once)
    quantized_params: int = 0       # base weights stored quantised
    head: str = "none"              # none | classifier: a linear layer over the last prompt token's
                                    # final hidden state, one logit per data.labels entry (in order)
    head_labels: int = 0            # classifier: its rows (labels): it is [head_labels, hidden]
    head_params: int = 0            # classifier: head_labels × hidden (no bias), in trainable_params
    head_lr: float | None = None    # classifier: its peak learning rate, resolved (adapter.head_lr,
                                    # else schedule.lr)
    head_probe_steps: int = 0       # classifier: the first steps, in which only the head trains
                                    # (adapter.head_probe resolved against the schedule's steps)


PREFERENCE = ("dpo", "ipo", "orpo", "simpo", "kto")     # objectives over (chosen, rejected) pairs
WITH_REFERENCE = ("dpo", "ipo", "kto")                 # ... whose loss reads a reference model
LENGTH_NORMALISED = ("ipo", "orpo", "simpo")           # ... that score a reply per token, not summed


@dataclass(frozen=True)
class ObjectiveSection:
    """objective.*: what the step minimises (runtime/preference.py). sft: cross-entropy on the
    supervised tokens; dpo, ipo, orpo, simpo, kto: a preference loss over (chosen, rejected) pairs or,
    for kto, labelled completions."""
    kind: str = "sft"               # sft | dpo | ipo | orpo | simpo | kto
    beta: float = 0.1               # dpo/ipo/kto: the KL strength; simpo: the reward scale
    label_smoothing: float = 0.0    # dpo: the share of pairs assumed mislabelled (cDPO)
    gamma: float = 0.5              # simpo: the target reward margin
    orpo_lambda: float = 0.1        # orpo: the weight of the odds-ratio term
    desirable_weight: float = 1.0   # kto: the weight of desirable / undesirable examples
    undesirable_weight: float = 1.0
    reference: str = "none"         # base (adapter switched off), init (init.run's model), none
    init_run: str | None = None     # init.run: the finished run whose adapter training starts from
    init_sha256: str | None = None  # its adapter weights' sha256
    router_aux_coef: float | None = None    # a mixture of experts: the load-balancing loss's
                                            # weight (resolved: objective.router_aux_coef or the
                                            # model's); None for a dense model

    @property
    def preference(self) -> bool:
        return self.kind != "sft"


@dataclass(frozen=True)
class ScheduleSection:
    lr: float
    epochs: float
    max_steps: int | None
    batch_size: int                 # rows per micro-batch over all devices
    grad_accum: int
    warmup: float                   # as configured: a fraction (< 1) or a step count
    seed: int
    lr_schedule: str
    weight_decay: float
    max_grad_norm: float | None     # None or 0: no clipping
    beta1: float
    beta2: float
    eps: float
    seq_len: int                    # tokens per row (runtime.row_length, else data.max_length)
    global_batch: int               # rows per optimizer step
    rows_per_epoch: int             # rows after packing
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    tokens_per_step: int
    row_fill: float = 0.0           # real slots / row slots in an epoch (packing's efficiency)
    examples_per_step: float = 0.0  # training examples an optimizer step holds, on average
    unpacked_total_steps: int = 0   # the steps the same epochs take with one example per row
    batch_unit: str = "rows"        # what schedule.batch_size counted: rows | examples
    batch_examples: int = 0         # batch_unit=examples with packing: the examples asked for per
                                    # micro-batch (batch_size is then the rows that hold them)


@dataclass(frozen=True)
class Devices:
    platform: str                   # cpu | gpu | tpu
    kind: str
    count: int                      # over all processes of the job
    memory: int | None              # bytes per device
    peak_flops: float | None        # dense bf16 FLOP/s per device
    cores: int | None = None
    processes: int = 1              # processes of a multi-process job (hosts, or processes on one)


@dataclass(frozen=True)
class MeshAxes:
    data: int
    fsdp: int
    tensor: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.data, self.fsdp, self.tensor


@dataclass(frozen=True)
class RuntimeSection:
    dtype: str                      # compute dtype, resolved: float32 | bfloat16
    param_dtype: str                # frozen weights' dtype, resolved
    matmul_dtype: str               # operands of the frozen weights' matmuls, resolved (bfloat16 under
                                    # float32 compute: bfloat16 × bfloat16 → float32 products)
    mesh: MeshAxes                  # resolved against the devices: no -1 left
    devices: Devices
    remat: str
    attention: str                  # xla | cudnn | pallas (auto resolved: cudnn for unpacked bf16 rows on NVIDIA GPUs)
    attention_block: int            # xla attention: query rows per causal block (0 = whole rows)
    pack: bool
    ce_chunk: int
    loss_tokens: int                # supervised positions one micro-batch can hold at most (from the
                                    # data): the output head runs on these only
    log_every: int
    checkpoint_every: int
    progress_every: float = 30.0    # seconds between plain progress lines off a terminal (a plan of
                                    # format 4 written before the key existed reads the default)


@dataclass(frozen=True)
class EvalSection:
    metric: str
    mode: str
    max_new_tokens: int
    limit: int | None
    every: int
    batch_size: int
    max_new_tokens_choice: str | None = None    # eval.max_new_tokens=auto: what it chose and why


@dataclass(frozen=True)
class TrackingSection:
    """Where a run reports its metrics besides metrics.jsonl (not hashed: it changes no result)."""
    backends: tuple[str, ...]       # tensorboard | mlflow | wandb
    experiment: str                 # MLflow experiment; W&B project unless wandb_project
    run_name: str | None            # None: the run directory's name
    group: str | None               # runs shown together (a sweep's jobs)
    mlflow_uri: str | None          # None: $MLFLOW_TRACKING_URI, else sqlite in the run directory
    wandb_project: str | None
    wandb_entity: str | None


@dataclass(frozen=True)
class Estimates:
    memory: dict[str, int]          # bytes per device: weights, adapter_optimizer, activations, logits, total
    memory_share: float | None      # of one device's memory
    eval_memory: int | None         # bytes one evaluation batch needs (weights + KV cache + prefill)
    step_time_s: float | None
    total_time_s: float | None      # training + validation + evaluation (before these parts were
                                    # estimated: training alone)
    train_time_s: float | None = None       # step_time_s × the schedule's steps
    validation_time_s: float | None = None  # validation_passes forward passes over the val split
    validation_passes: int = 0      # every eval.every steps before the last, and once at the end
    validation_batches: int = 0     # batches of a training step's shape in one pass
    eval_time_s: float | None = None        # the test rows scored after training (base and tuned)
    eval_rows: int = 0              # test rows each model scores (eval.limit of them)
    eval_models: int = 0            # models (and with/without retrieval) that score them


@dataclass(frozen=True)
class RecipeRef:
    name: str
    path: str
    sha256: str                     # of the file as composed: what recipe_sha256 pins


@dataclass(frozen=True)
class Recipe:
    name: str
    path: str
    description: str
    chain: tuple[RecipeRef, ...]                # each recipe composed, base first
    data_sources: dict[str, tuple[tuple[str, str], ...]]   # data key → (value, recipe dir) in merge order


@dataclass(frozen=True)
class Plan:
    version: int
    hash: str
    model: ModelSection
    data: DataSection
    template: TemplateSection
    adapter: AdapterSection
    schedule: ScheduleSection
    runtime: RuntimeSection
    eval: EvalSection
    estimates: Estimates
    recipe: Recipe | None
    config: dict                    # the validated config it was compiled from; the runtime never reads it
    warnings: tuple[str, ...] = field(default_factory=tuple)
    retrieval: RetrievalSection | None = None   # None: no retrieval
    tracking: TrackingSection | None = None     # None: metrics.jsonl only (a plan written before)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)

    # -- JSON -----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return to_jsonable(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_dict(cls, d: dict, *, file: str | None = None) -> "Plan":
        """The Plan of a plan.json document; PlanError for another format version or a malformed
        document (naming the field)."""
        if not isinstance(d, dict):
            raise PlanError("plan", f"must be a JSON object, got {type(d).__name__}.", file=file)
        version = d.get("version")
        if version != PLAN_VERSION:
            if isinstance(version, int) and version > PLAN_VERSION:
                why = (f"it was written by a newer tune (plan format {version}; this tune reads "
                       f"format {PLAN_VERSION})")
                hint = "upgrade tune, or recompile the plan with this one (`tune plan ...`)."
            else:
                why = (f"it was written by an older tune (plan format {version!r}; this tune reads "
                       f"format {PLAN_VERSION})")
                hint = "recompile it from its recipe with `tune plan ...` (the run's overrides are in " \
                       "its `config` section)."
            raise PlanError("plan", f"cannot use this plan: {why}.", file=file, hint=hint)
        try:
            return from_jsonable(cls, d, "plan")
        except (TypeError, ValueError) as e:
            raise PlanError("plan", f"is malformed: {e}.", file=file,
                            hint="recompile it with `tune plan ...`.") from None

    @classmethod
    def from_json(cls, text: str, *, file: str | None = None) -> "Plan":
        try:
            doc = json.loads(text)
        except ValueError as e:
            raise PlanError("plan", f"is not valid JSON ({e}).", file=file,
                            hint="recompile it with `tune plan ...`.") from None
        except RecursionError:
            raise PlanError("plan", "is not valid JSON (nested too deeply).", file=file,
                            hint="recompile it with `tune plan ...`.") from None
        return cls.from_dict(doc, file=file)

    @classmethod
    def load(cls, path) -> "Plan":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise PlanError("plan", f"cannot be read ({e}).", file=str(path)) from None
        return cls.from_json(text, file=str(path))

    def write(self, path) -> Path:
        """Write plan.json atomically."""
        return write_atomic(Path(path), self.to_json())

    # -- hash -----------------------------------------------------------------------------------
    def expected_hash(self) -> str:
        return content_hash(self)

    def is_consistent(self) -> bool:
        return self.expected_hash() == self.hash


# ------------------------------------------------------------------------------ hash

# Paths into the plan's JSON that depend only on where things are, or are the compiler's opinions.
_UNHASHED = (("hash",), ("estimates",), ("warnings",), ("recipe",), ("config", "run"),
             ("config", "prompt"), ("config", "max_new_tokens"), ("config", "sweep"),
             ("config", "recipe_sha256"), ("config", "lr_find"), ("config", "format"),
             ("config", "out"), ("config", "gguf_type"), ("config", "temperature"),
             ("config", "top_p"), ("config", "seed"), ("config", "runs"), ("config", "host"),
             ("config", "port"), ("config", "serve"), ("config", "tracking"), ("tracking",), ("config", "data", "path"), ("config", "data", "test_path"),
             ("config", "model", "path"), ("config", "model", "name"), ("model", "dir"),
             ("model", "name"), ("model", "source"), ("data", "cache"), ("data", "train", "file"),
             ("data", "test", "file"), ("data", "train", "hub", "commit"),
             ("data", "test", "hub", "commit"), ("runtime", "devices", "kind"),
             ("retrieval", "corpus"), ("retrieval", "index"), ("config", "retrieval", "corpus"),
             ("runtime", "devices", "memory"), ("runtime", "devices", "peak_flops"),
             ("runtime", "devices", "cores"), ("objective", "init_run"),
             ("config", "init", "run"))


# data.* keys that pick a Hub dataset's split (compiler/hub.py), and their defaults: left out of the
# hash where they hold these, so plans of local files hash as they did before the keys existed.
HUB_KEY_DEFAULTS = {"split": "train", "subset": None, "revision": None,
                    "test_split": "test", "test_subset": None, "test_revision": None}


def _drop_unused(doc: dict) -> None:
    """Supervised plans hash as they did before preference objectives existed: the sections and
    keys those added are left out where they hold their supervised defaults (and data.answers_cut
    where it is 0, model.config.multimodal where it is false)."""
    def obj(x) -> dict:                     # a malformed plan.json may hold anything there
        return x if isinstance(x, dict) else {}

    default = to_jsonable(ObjectiveSection())
    default.pop("router_aux_coef")
    if obj(doc.get("objective")).get("router_aux_coef", 0) is None:
        doc["objective"].pop("router_aux_coef")
    if doc.get("objective") == default:
        doc.pop("objective")
    data, config = obj(doc.get("data")), obj(doc.get("config"))
    if data.get("unit", 1) == 1 and not data.get("pairs"):
        data.pop("unit", None)
        data.pop("pairs", None)
    if not data.get("answers_cut"):         # added later; 0 unless data.overlength=truncate_answer
        data.pop("answers_cut", None)
    if data.get("val_rows") is None:        # added later: a plan written before hashes as it did
        data.pop("val_rows", None)
    if data.get("length_choice") is None:   # added later: set only by data.max_length=auto
        data.pop("length_choice", None)
    if obj(doc.get("eval")).get("max_new_tokens_choice", 0) is None:    # eval.max_new_tokens=auto
        doc["eval"].pop("max_new_tokens_choice")
    if data.get("balance", "none") == "none":   # added later; the factor only counts with a balance
        for key in ("balance", "balance_max_factor", "balanced_counts", "class_weights"):
            data.pop(key, None)
    if obj(config.get("data")).get("balance", "none") == "none":
        for key in ("balance", "balance_max_factor"):
            obj(config.get("data")).pop(key, None)
    adapter = obj(doc.get("adapter"))
    if adapter.get("head", "none") == "none":   # added later: plans without a head hash as before
        for key in ("head", "head_labels", "head_params", "head_lr"):
            adapter.pop(key, None)
    if not adapter.get("head_probe_steps", 0):     # added later still
        adapter.pop("head_probe_steps", None)
    if obj(config.get("adapter")).get("head", "none") == "none":
        for key in ("head", "head_lr", "head_probe"):
            obj(config.get("adapter")).pop(key, None)
    for split in ("train", "test"):         # added later: None for a local file
        if obj(data.get(split)).get("hub", 0) is None:
            data[split].pop("hub")
    hub_keys = obj(config.get("data"))       # the Hub keys, added later, at their defaults
    for key, default in HUB_KEY_DEFAULTS.items():
        if key in hub_keys and hub_keys[key] == default:
            hub_keys.pop(key)
    # added with mixtures of experts: dense models' plans hash as they did before
    model_config = obj(obj(doc.get("model")).get("config"))
    if not model_config.get("num_experts"):
        for key in ("num_experts", "experts_per_token", "expert_intermediate_size",
                    "norm_topk_prob", "router_aux_coef"):
            model_config.pop(key, None)
    if obj(config.get("objective")).get("router_aux_coef", 0) is None:
        config["objective"].pop("router_aux_coef")
    if obj(config.get("objective")).get("kind", "sft") == "sft":
        config.pop("objective", None)
        obj(config.get("data")).pop("fields", None)
    if obj(config.get("init")).get("run") is None:
        config.pop("init", None)
    if obj(obj(doc.get("model")).get("config")).get("multimodal") is False:    # added later
        doc["model"]["config"].pop("multimodal")


def content_hash(plan: Plan) -> str:
    doc = plan.to_dict()
    doc["version"] = PLAN_VERSION
    _drop_unused(doc)
    for path in _UNHASHED:
        node = doc
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(path[-1], None)
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()


def with_hash(plan: Plan) -> Plan:
    return dataclasses.replace(plan, hash=content_hash(plan))


# ------------------------------------------------------------------------------ JSON codec

def to_jsonable(x):
    """Plain JSON types: dataclasses → objects, tuples → lists, Paths → str, numpy scalars → Python,
    dict keys → str, NaN → null."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: to_jsonable(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item") and callable(x.item) and type(x).__module__ == "numpy":
        return x.item()
    if isinstance(x, float) and x != x:
        return None
    return x


def from_jsonable(tp, value, where: str):
    """`value` (parsed JSON) as type `tp` (a dataclass, tuple[...], dict[...], X | None, a scalar
    type or Any). Lists become tuples where the type says tuple, so a round trip gives equal
    objects. TypeError/ValueError naming `where` for a value of the wrong shape."""
    if tp is Any:
        return copy.deepcopy(value)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        return from_jsonable(rest[0] if len(rest) == 1 else Any, value, where)
    if dataclasses.is_dataclass(tp):
        return _dataclass_from(tp, value, where)
    if origin is tuple or tp is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{where}: expected a list, got {_kind(value)}")
        if not args:
            return tuple(_freeze(v) for v in value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(from_jsonable(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ValueError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(from_jsonable(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise TypeError(f"{where}: expected an object, got {_kind(value)}")
        vt = args[1] if len(args) == 2 else Any
        return {k: from_jsonable(vt, v, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{where}: expected a number, got {_kind(value)}")
        return value
    if tp in (int, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise TypeError(f"{where}: expected {tp.__name__}, got {_kind(value)}")
        return value
    raise TypeError(f"{where}: cannot read a value of type {tp}")


def _dataclass_from(cls, value, where: str):
    if not isinstance(value, dict):
        raise TypeError(f"{where}: expected an object, got {_kind(value)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(value) - set(names))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}")
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in value]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
    return cls(**{n: from_jsonable(hints[n], value[n], f"{where}.{n}") for n in names if n in value})


def _freeze(v):
    """Untyped tuple items (ModelConfig.rope_scaling's pairs): nested lists → tuples."""
    return tuple(_freeze(x) for x in v) if isinstance(v, list) else v


def _kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null", int: "a number", float: "a number"}.get(type(value), type(value).__name__)
