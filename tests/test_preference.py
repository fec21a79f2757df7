"""Preference objectives against TRL's own trainers, in float32: tune's train step
(runtime/preference.make_preference_step) and TRL's loss, on the same model, LoRA adapter and
examples — the loss, the gradient of every LoRA factor of every layer, and the metrics TRL logs
under the names tune logs them by. DPO, robust DPO and IPO against trl.DPOTrainer; SimPO against
CPOTrainer (loss_type "simpo", cpo_alpha 0); ORPO against ORPOTrainer; KTO against KTOTrainer.

Each TRL trainer is built for real on the tiny Llama with a LoRA made from a peft_config — so its
reference model is the adapter switched off, as tune's reference state (every lora_B at 0) is — and
the adapter is then given the random non-zero factors tune loads. The trainer tokenizes a small text
dataset itself (adding the end token, and for KTO the mismatched KL completions), collates the whole
of it with its own data collator and computes its loss on that one batch with its own compute_loss;
backward() gives the reference gradients. tune is given the very token ids TRL prepared, laid out in
units packed several to a row and split over micro-batches.
"""
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from core.architecture import MODULE_NAMES
from runtime.batching import FIELDS, fill_row
from runtime.peft import load_peft_adapter, read_lora_config
from runtime.preference import Objective, make_preference_step
from runtime.train import split_model
from runtime.weights import load_pretrained

PEFT = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=sorted(MODULE_NAMES),
            task_type="CAUSAL_LM")
N = 6                    # examples in every batch
T = 40                   # row length: every batch below has this width, so steps are reused
RTOL = 1e-5              # loss and metrics, relative
GRAD_RTOL = 1e-5         # each LoRA factor of each layer: |tune − TRL| / |TRL| (Frobenius norms)
# micro-batches × rows × the units in each row (indices into the examples): two units to a row, the
# last row empty, 4 units in the first micro-batch and 2 in the second — the loss must still be the
# mean over all 6, not a mean of the micro-batches' means
PACKED_ACCUM2 = [[[0, 1], [2, 3]], [[4, 5], []]]


@pytest.fixture(autouse=True)
def exact_matmuls():
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """TRL's side runs on one thread: on a small machine the hand-off between threads costs far more
    than these tiny matmuls (15 ms a linear layer on 2 threads, 0.02 ms on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer over the tiny Llama's 128 ids: <pad> 0, <s> 1, </s> 2, then t3..t127
    (the word tI is id I), so text examples tokenize to known ids."""
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(specials)} | {f"t{i}": i for i in range(3, 128)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


@pytest.fixture(scope="module")
def adapter(hf_tiny, tmp_path_factory):
    """(base model dir, PEFT adapter dir): the tiny Llama and a LoRA on its 7 modules with random
    non-zero A and B, so that the policy differs from the reference (the adapter switched off)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    _, path = hf_tiny("llama")
    out = tmp_path_factory.mktemp("preference-adapter")
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                          LoraConfig(**PEFT))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.copy_(0.15 * torch.randn_like(p))
    peft.save_pretrained(out)
    return path, out


@pytest.fixture(scope="module")
def tune_model(adapter):
    """(graphdef, trained, frozen, reference): tune's model with the adapter, and the reference
    state the runtime passes for dpo/ipo/kto — the same LoRA tree with every lora_B zero."""
    path, adapter_dir = adapter
    model = load_peft_adapter(load_pretrained(path, lora=read_lora_config(adapter_dir)),
                              adapter_dir)
    graphdef, trained, frozen = split_model(model)
    ref = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.zeros_like(x) if _names(p)[-1] == "lora_B" else x, trained)
    return graphdef, trained, frozen, ref


# ------------------------------------------------------------------------------ data

def _words(rng, n):
    return " ".join(f"t{i}" for i in rng.integers(3, 128, size=n))


def pairs(n=N, *, seed=0, prompt=True):
    """n text pairs (prompt, chosen, rejected), the two replies of each of different lengths. The
    prompt starts with <s> (TRL's ORPO/CPO would add it, DPO would not); prompt=False: <s> alone."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        nc, nr = (int(k) for k in rng.choice(np.arange(1, 5), size=2, replace=False))
        head = "<s> " + _words(rng, int(rng.integers(2, 5))) if prompt else "<s>"
        rows.append({"prompt": head, "chosen": " " + _words(rng, nc),
                     "rejected": " " + _words(rng, nr)})
    return rows


def unpaired(n=N, *, seed=1):
    """n text examples (prompt, completion, label): KTO's unpaired data, mostly desirable."""
    rng = np.random.default_rng(seed)
    return [{"prompt": "<s> " + _words(rng, int(rng.integers(2, 5))),
             "completion": " " + _words(rng, int(rng.integers(1, 5))), "label": bool(i % 3 != 1)}
            for i in range(n)]


def tune_batch(units, layout, labels=None):
    """The [accum, B, T] batch tune's step takes: units[u] = ((ids, prompt_len), (ids, prompt_len)),
    written side by side as Batcher.batch writes them (and, for KTO, the unit's label on every
    token of the unit); layout[a][b] lists the units of row b of micro-batch a."""
    accum, B = len(layout), max(len(m) for m in layout)
    fields = FIELDS + (("unit_label",) if labels is not None else ())
    out = {k: np.zeros((accum * B, T), np.int32) for k in fields}
    for a, micro in enumerate(layout):
        for b, row in enumerate(micro):
            r = a * B + b
            fill_row(out, r, [ex for u in row for ex in units[u]])
            if labels is not None:
                t = 0
                for u in row:
                    n = sum(len(ids) - 1 for ids, _ in units[u])
                    out["unit_label"][r, t:t + n] = labels[u]
                    t += n
    return {k: jnp.asarray(v.reshape(accum, B, T)) for k, v in out.items()}


def dpo_units(examples):
    """DPOTrainer's prepared examples (prompt_ids, chosen_ids, rejected_ids) as tune's units."""
    return [((e["prompt_ids"] + e["chosen_ids"], len(e["prompt_ids"])),
             (e["prompt_ids"] + e["rejected_ids"], len(e["prompt_ids"]))) for e in examples]


def cpo_units(examples):
    """CPOTrainer's / ORPOTrainer's prepared examples (whole sequences with their labels, -100 on
    the prompt) as tune's units."""
    def one(ids, labels):
        return ids, sum(1 for x in labels if x == -100)

    return [(one(e["chosen_input_ids"], e["chosen_labels"]),
             one(e["rejected_input_ids"], e["rejected_labels"])) for e in examples]


def kto_units(examples):
    """KTOTrainer's prepared examples as tune's units (prompt+completion, prompt+KL completion):
    the KL completion is the one TRL chose, another example's completion."""
    return [((e["prompt_ids"] + e["completion_ids"], len(e["prompt_ids"])),
             (e["prompt_ids"] + e["KL_completion_ids"], len(e["prompt_ids"]))) for e in examples]


# ------------------------------------------------------------------------------ the two sides

class Trl(NamedTuple):
    examples: list          # the dataset as the trainer prepared it (token ids)
    loss: float
    logs: dict              # what trainer.log logs: the loss and TRL's metrics
    grads: dict             # PEFT name (model.layers.0.self_attn.q_proj.lora_A.weight) → gradient


def run_trl(trainer_cls, args, rows, adapter, tokenizer) -> Trl:
    """TRL's loss on `rows` as one batch. The trainer wraps a fresh base model in a new LoRA
    (peft_config), so its reference is the adapter disabled; the adapter then gets the random
    factors tune loads."""
    from datasets import Dataset
    from peft import LoraConfig
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    path, adapter_dir = adapter
    trainer = trainer_cls(model=AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                          args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer, peft_config=LoraConfig(**PEFT))
    saved = load_file(adapter_dir / "adapter_model.safetensors")
    lora = {n: p for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert sorted(n.replace(".default", "") for n in lora) == sorted(saved)
    with torch.no_grad():
        for n, p in lora.items():
            p.copy_(saved[n.replace(".default", "")])
    examples = [trainer.train_dataset[i] for i in range(len(rows))]
    loss = trainer.compute_loss(trainer.model, trainer.data_collator(examples))
    loss.backward()
    trainer.log({"loss": loss.item()})
    grads = {n.removeprefix("base_model.model.").replace(".default", ""): p.grad.numpy()
             for n, p in lora.items()}
    return Trl(examples, loss.item(), trainer.state.log_history[-1], grads)


def _keep_gradient():
    """An optimizer that updates nothing and keeps the gradient it is given as its state: the step's
    gradient exactly, not a difference of parameters."""
    return optax.GradientTransformation(
        lambda p: jax.tree.map(jnp.zeros_like, p),
        lambda g, state, params=None: (jax.tree.map(jnp.zeros_like, g), g))


_compiled = {}
# compiling the steps is most of this file's time: the same programs compiled without XLA's
# backend optimisations and fusion emitters take a third of it (the results agree to ~1e-6)
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def _compile(lowered):
    try:
        return lowered.compile(compiler_options=FAST_COMPILE)
    except jax.errors.JaxRuntimeError:            # an XLA that no longer knows these options
        return lowered.compile()


def run_tune(obj, tune_model, batch, *, loss_tokens="tight"):
    """tune's train step on `batch`: (metrics, gradient tree). loss_tokens "tight": the smallest
    multiple of 8 that holds a micro-batch's supervised targets, as the plan bounds it, so the
    supervised positions are gathered before the output head; None: the head runs on every
    position."""
    graphdef, trained, frozen, ref = tune_model
    if loss_tokens == "tight":
        most = int(jnp.max(jnp.sum(batch["loss_mask"], axis=(1, 2))))
        loss_tokens = 8 * -(-most // 8)
        assert loss_tokens < batch["loss_mask"][0].size
    args = (trained, _keep_gradient().init(trained), (frozen, ref if obj.reference else None),
            batch, jax.random.key(0), 0)
    key = (obj, loss_tokens, tuple(sorted((k, v.shape) for k, v in batch.items())))
    if key not in _compiled:
        step = make_preference_step(obj, graphdef, _keep_gradient(), lambda s: jnp.float32(0.0),
                                    ce_chunk=7, loss_tokens=loss_tokens, donate=False)
        _compiled[key] = _compile(step.lower(*args))
    _, grads, metrics = _compiled[key](*args)
    return {k: float(v) for k, v in metrics.items()}, grads


def _names(path):
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def assert_gradients_equal(grads, trl_grads):
    """Every LoRA factor of every layer (tune stacks the layers on a leading axis)."""
    checked, worst = 0, 0.0
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        module = ".".join(_names(path)[1:])                      # e.g. self_attn.q_proj.lora_A
        for i, got in enumerate(np.asarray(g)):
            ref = trl_grads[f"model.layers.{i}.{module}.weight"]
            rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
            assert rel <= GRAD_RTOL, (module, i, rel)
            checked, worst = checked + 1, max(worst, rel)
    assert checked == len(trl_grads)
    return worst


def assert_metrics_equal(metrics, logs, names):
    assert set(names) <= set(logs) and set(names) <= set(metrics)
    for k in names:
        # atol: a reward is β times a difference of two sums of log-probabilities, each exact to
        # float32's rounding of its own size (one KTO reward was 3e-6 off on an AVX-512 CPU)
        np.testing.assert_allclose(metrics[k], logs[k], rtol=RTOL, atol=1e-5, err_msg=k)
    return max((abs(metrics[k] - logs[k]) / max(abs(logs[k]), 1e-6) for k in names), default=0.0)


def assert_same(tune, trl: Trl, names):
    """The loss, the metrics `names` (all logged by TRL) and the gradients."""
    metrics, grads = tune
    np.testing.assert_allclose(metrics["loss"], trl.loss, rtol=RTOL)
    worst_metric = assert_metrics_equal(metrics, trl.logs, names)
    worst_grad = assert_gradients_equal(grads, trl.grads)
    # the figures benchmarks/RESULTS.md quotes (pytest -s prints them)
    test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0].split("::")[-1]
    print(f"\n{test}: loss {metrics['loss']:.6f} vs TRL {trl.loss:.6f} (relative "
          f"{abs(metrics['loss'] - trl.loss) / abs(trl.loss):.1e}); largest relative difference of "
          f"a LoRA factor's gradient {worst_grad:.1e}, of a logged metric {worst_metric:.1e}")


PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected")


def _args(config_cls, tmp_path, **kw):
    return config_cls(output_dir=str(tmp_path), report_to="none", use_cpu=True,
                      per_device_train_batch_size=N, **kw)


# ------------------------------------------------------------------------------ DPO and IPO

@pytest.mark.parametrize("loss_type, label_smoothing, loss_tokens",
                         [("sigmoid", 0.0, None), ("robust", 0.2, "tight")])
def test_dpo_equals_trl(adapter, tokenizer, tune_model, tmp_path, loss_type, label_smoothing,
                        loss_tokens):
    """DPO (and, with label smoothing, TRL's robust DPO) against DPOTrainer on one batch of 6 pairs:
    tune's step over 2 micro-batches of packed rows gives TRL's loss (the mean over the pairs),
    LoRA gradients and reward / log-probability metrics — with the output head on every position
    (loss_tokens None) and on the gathered supervised ones."""
    from trl import DPOConfig, DPOTrainer

    beta = 0.3
    trl = run_trl(DPOTrainer, _args(DPOConfig, tmp_path, beta=beta, loss_type=loss_type,
                                    label_smoothing=label_smoothing, max_length=None),
                  pairs(), adapter, tokenizer)
    # the reference must matter: the adapter moves the rewards away from 0
    assert abs(trl.logs["rewards/margins"]) > 1e-2
    assert all(len(e["chosen_ids"]) != len(e["rejected_ids"]) for e in trl.examples)
    batch = tune_batch(dpo_units(trl.examples), PACKED_ACCUM2)
    tune = run_tune(Objective("dpo", beta=beta, label_smoothing=label_smoothing), tune_model, batch,
                    loss_tokens=loss_tokens)
    assert_same(tune, trl, PAIR_METRICS)


def test_ipo_equals_trl(adapter, tokenizer, tune_model, tmp_path):
    """IPO against DPOTrainer's loss_type "ipo" (log-ratios averaged over each reply's tokens):
    loss, gradients and metrics over 2 micro-batches of packed rows."""
    from trl import DPOConfig, DPOTrainer

    beta = 0.5
    trl = run_trl(DPOTrainer, _args(DPOConfig, tmp_path, beta=beta, loss_type="ipo",
                                    max_length=None), pairs(seed=2), adapter, tokenizer)
    batch = tune_batch(dpo_units(trl.examples), PACKED_ACCUM2)
    assert_same(run_tune(Objective("ipo", beta=beta), tune_model, batch), trl, PAIR_METRICS)


# ------------------------------------------------------------------------------ SimPO and ORPO

@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
def test_simpo_equals_trl(adapter, tokenizer, tune_model, tmp_path, label_smoothing):
    """SimPO against CPOTrainer with loss_type "simpo" and cpo_alpha 0 (pure SimPO: no NLL term),
    with and without label smoothing: loss, gradients and metrics (TRL's log-probabilities here are
    per-token means) over 2 micro-batches of packed rows."""
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    beta, gamma = 2.0, 0.4
    trl = run_trl(CPOTrainer, _args(CPOConfig, tmp_path, loss_type="simpo", cpo_alpha=0.0,
                                    beta=beta, simpo_gamma=gamma, label_smoothing=label_smoothing,
                                    max_length=512, remove_unused_columns=False),
                  pairs(seed=3), adapter, tokenizer)
    batch = tune_batch(cpo_units(trl.examples), PACKED_ACCUM2)
    obj = Objective("simpo", beta=beta, gamma=gamma, label_smoothing=label_smoothing)
    assert_same(run_tune(obj, tune_model, batch), trl, PAIR_METRICS)


ORPO_LAMBDA = 0.7


def _orpo(adapter, tokenizer, tmp_path, rows):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    return run_trl(ORPOTrainer, _args(ORPOConfig, tmp_path, beta=ORPO_LAMBDA, max_length=512,
                                      remove_unused_columns=False), rows, adapter, tokenizer)


def test_orpo_equals_trl(adapter, tokenizer, tune_model, tmp_path):
    """ORPO against ORPOTrainer (its beta is tune's orpo_lambda): the loss — the NLL of the chosen
    replies, a mean over all their tokens in the global batch, minus λ·mean log σ(log odds ratio) —
    its gradients, the metrics and the NLL, over 2 micro-batches of packed rows.

    TRL's NLL runs over the whole chosen sequence, prompt included
    (ORPOTrainer.concatenated_forward), tune's over the chosen reply: the prompts here are the start
    token alone, where the two agree; test_orpo_odds_ratio_term_equals_trl covers real prompts."""
    trl = _orpo(adapter, tokenizer, tmp_path, pairs(seed=4, prompt=False))
    assert all(e["chosen_input_ids"][0] == tokenizer.bos_token_id
               and e["chosen_labels"][1] != -100 for e in trl.examples)
    batch = tune_batch(cpo_units(trl.examples), PACKED_ACCUM2)
    tune = run_tune(Objective("orpo", orpo_lambda=ORPO_LAMBDA), tune_model, batch)
    assert_same(tune, trl, PAIR_METRICS + ("nll_loss",))


def test_orpo_odds_ratio_term_equals_trl(adapter, tokenizer, tune_model, tmp_path):
    """ORPO with real prompts: the odds-ratio term (tune's loss − NLL; TRL logs the mean
    log σ(log odds ratio) as log_odds_ratio) and the reward / log-probability metrics equal
    ORPOTrainer's. Only the NLL differs, TRL's covering the prompt tokens too."""
    trl = _orpo(adapter, tokenizer, tmp_path, pairs(seed=5))
    batch = tune_batch(cpo_units(trl.examples), PACKED_ACCUM2)
    metrics, _ = run_tune(Objective("orpo", orpo_lambda=ORPO_LAMBDA), tune_model, batch)
    np.testing.assert_allclose(metrics["loss"] - metrics["nll_loss"],
                               -ORPO_LAMBDA * trl.logs["log_odds_ratio"], rtol=RTOL)
    assert_metrics_equal(metrics, trl.logs, PAIR_METRICS)


# ------------------------------------------------------------------------------ KTO

def test_kto_equals_trl(adapter, tokenizer, tune_model, tmp_path):
    """KTO against KTOTrainer (loss_type "kto", desirable and undesirable weights ≠ 1) on a batch of
    6 completions, 4 desirable and 2 not, packed two units to a row: each unit is a completion and
    the KL completion TRL paired with its prompt (the completions cycled within the batch); loss,
    gradients, rewards, log-probabilities and the KL estimate. One micro-batch: tune estimates the
    KL term per micro-batch, TRL per batch it is given."""
    from trl import KTOConfig, KTOTrainer

    beta, good, bad = 0.4, 1.3, 0.6
    rows = unpaired()
    trl = run_trl(KTOTrainer, _args(KTOConfig, tmp_path, loss_type="kto", beta=beta,
                                    desirable_weight=good, undesirable_weight=bad, max_length=None),
                  rows, adapter, tokenizer)
    # the KL completions are other examples' completions, and the KL estimate is not clamped to 0
    assert all(e["KL_completion_ids"] != e["completion_ids"] for e in trl.examples)
    assert trl.logs["kl"] > 0
    labels = [int(e["label"]) for e in trl.examples]
    batch = tune_batch(kto_units(trl.examples), [[[0, 1], [2, 3], [4, 5]]], labels)
    obj = Objective("kto", beta=beta, desirable_weight=good, undesirable_weight=bad)
    assert_same(run_tune(obj, tune_model, batch), trl,
                ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
                 "logps/rejected", "kl"))
