"""One construction site for everything the runtime makes from a Plan, used by training, evaluation,
generation, lr-find, export and the benchmarks alike:

- compute_spec / lora_config: the model's compute spec and adapter, from plan.runtime and plan.adapter;
- training_model: the model on the plan's mesh, split into trained and frozen state;
- scoring_model: the model for evaluation and generation, with a trained adapter or without;
- optimizer / place_optimizer: AdamW with the plan's schedule (or a given learning-rate curve), its
  state laid out like the parameters;
- batches: the training and validation batchers over the plan's token data;
- train_step / eval_loss: the jitted step and validation loss with the plan's runtime settings;
- decoding: what every decoder call takes from the plan (batch, end and padding tokens).

Nothing here has a default that stands for a plan field: every value is read from the plan.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from core import records
from core.plan import Plan, ScheduleSection
from core.token_cache import load_examples

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# ------------------------------------------------------------------------------ the model

def compute_spec(plan: Plan, *, training: bool):
    """The plan's ComputeSpec. Scoring and decoding run no backward pass, so they take no remat."""
    from runtime.model import ComputeSpec

    rt = plan.runtime
    return ComputeSpec(dtype=DTYPES[rt.dtype], param_dtype=DTYPES[rt.param_dtype],
                       matmul_dtype=DTYPES[rt.matmul_dtype], remat=rt.remat if training else "none",
                       attention=rt.attention, attention_block=rt.attention_block)


def lora_config(plan: Plan):
    from runtime.model import LoraConfig

    a = plan.adapter
    return LoraConfig(rank=a.rank, alpha=float(a.alpha), dropout=float(a.dropout), targets=a.targets,
                      rslora=a.rslora, kind=a.kind, train_modules=a.train_modules,
                      quantize=a.quantize, head=a.head_labels)


def training_model(plan: Plan, mesh):
    """(graphdef, trained state, frozen state) on the mesh (runtime/mesh.py: frozen weights split
    over fsdp and tensor, trained ones over tensor). Each base weight goes from the checkpoint
    straight to its shards."""
    from runtime.mesh import param_spec, put_global, state_shardings, to_host
    from runtime.train import split_model
    from runtime.weights import load_pretrained

    fsdp, tensor = mesh.shape["fsdp"], mesh.shape["tensor"]

    def place(names, value, trained, dense):
        spec = param_spec(names, value.shape, fsdp=1 if trained else fsdp, tensor=tensor,
                          dense=dense)
        return put_global(value, jax.sharding.NamedSharding(mesh, spec))

    full_start = plan.adapter.kind == "full" and plan.objective.init_run is not None
    model = load_pretrained(_start_from(plan) if full_start else plan.model.dir,
                            config=plan.model.config, lora=lora_config(plan),
                            compute=compute_spec(plan, training=True),
                            rngs=nnx.Rngs(plan.schedule.seed), place=place)
    if plan.objective.init_run is not None and not full_start:
        from runtime.peft import load_peft_adapter

        load_peft_adapter(model, _start_from(plan), key="init.run")
    graphdef, trained, frozen = split_model(model)
    trained = put_global(to_host(trained), state_shardings(mesh, trained, trained=True))
    return graphdef, trained, frozen


def trained_dir(plan: Plan, run_dir) -> Path:
    """Where a run keeps what it trained: adapter/ (PEFT), or for adapter.kind=full model/ (a
    transformers checkpoint)."""
    return records.trained_dir(run_dir, plan.adapter.kind)


def trained_weights(plan: Plan, run_dir) -> Path | None:
    """trained_dir, once training has written its weights there; else None."""
    return trained_dir(plan, run_dir) if records.trained_file(run_dir, plan.adapter.kind).is_file() \
        else None


def _start_from(plan: Plan) -> Path:
    """init.run's trained weights (its adapter, or its whole model), where training starts, if they
    are still those the plan was compiled against."""
    from core.files import sha256_file

    d = trained_dir(plan, plan.objective.init_run)
    weights = records.trained_file(plan.objective.init_run, plan.adapter.kind)
    if not weights.is_file() or sha256_file(weights) != plan.objective.init_sha256:
        raise RuntimeError(f"init.run's trained weights ({weights}) are gone or changed since the "
                           "plan was compiled: recompile the plan with `tune plan`")
    return d


def fixed_inputs(plan: Plan, frozen, trained):
    """What the train step and the validation loss take besides the trained state: the frozen
    weights, or for a preference objective (frozen weights, reference state) — the reference a
    copy of the trained state as training starts (fresh LoRA factors compute the base model
    exactly; with init.run, that run's adapter), None for objectives without one. A copy: the
    trained state is donated to every step."""
    if not plan.objective.preference:
        return frozen
    if plan.objective.reference == "none":
        return frozen, None
    return frozen, jax.tree.map(jnp.copy, trained)


def scoring_model(plan: Plan, adapter_dir=None, *, adapter_weights: bool = True):
    """The plan's base model for evaluation and generation; with adapter_dir, built with the
    adapter's LoRA shape and (unless adapter_weights=False) its weights. Without them the LoRA B
    factors are zero, as freshly initialised, so the model computes exactly the base model."""
    from runtime.peft import load_peft_adapter, read_lora_config
    from runtime.weights import load_pretrained

    if plan.adapter.kind == "full":     # a whole trained model (model/), or the base
        source = adapter_dir if adapter_dir is not None and adapter_weights else plan.model.dir
        return load_pretrained(source, config=plan.model.config,
                               compute=compute_spec(plan, training=False), rngs=nnx.Rngs(0))
    lora = None if adapter_dir is None else read_lora_config(adapter_dir, model_config=plan.model.config)
    if lora is not None and plan.adapter.quantize != "none":
        # the adapter was trained on the quantised base: score it on that base
        lora = dataclasses.replace(lora, quantize=plan.adapter.quantize)
    model = load_pretrained(plan.model.dir, config=plan.model.config, lora=lora,
                            compute=compute_spec(plan, training=False), rngs=nnx.Rngs(0))
    if adapter_dir is not None and adapter_weights:
        load_peft_adapter(model, adapter_dir)
    return model


# ------------------------------------------------------------------------------ optimisation

def optimizer(s: ScheduleSection, lr_fn: Callable | None = None, *, head_lr: float | None = None,
              head_probe: int = 0):
    """(optimizer, lr_fn): gradient clipping (unless schedule.max_grad_norm is 0 or None) + AdamW
    with the plan's betas, eps and weight decay, driven by the plan's schedule — or by `lr_fn`
    (step → learning rate) when one is given (the lr range test). head_lr: the classification
    head's peak learning rate (plan.adapter.head_lr; None for a plan without a head).
    head_probe: the first steps in which only the head trains (plan.adapter.head_probe_steps):
    the rest of the model is held until then and afterwards trains on the schedule's warmup and
    decay over the steps left (its own AdamW, starting afresh); lr_fn is then its learning rate
    (0 while held), the head's is head_lr on the whole run's warmup and decay."""
    import optax

    from runtime.train import decay_mask, lr_schedule

    def adamw(fn):
        return optax.adamw(fn, b1=s.beta1, b2=s.beta2, eps=s.eps, weight_decay=s.weight_decay,
                           mask=decay_mask)

    parts = [optax.clip_by_global_norm(s.max_grad_norm)] if s.max_grad_norm else []
    if head_probe and lr_fn is None:
        n = int(head_probe)
        whole = lr_schedule(s.lr, s.warmup_steps, s.total_steps, s.lr_schedule)
        left = lr_schedule(s.lr, min(s.warmup_steps, s.total_steps - n), s.total_steps - n,
                           s.lr_schedule)
        scale = (head_lr if head_lr is not None else s.lr) / s.lr

        def head_fn(step):
            return scale * whole(step)

        def lr_fn(step):
            step = jnp.asarray(step)
            return jnp.where(step < n, 0.0, left(jnp.maximum(step - n, 0)))

        parts.append(optax.multi_transform(
            {"head": adamw(head_fn), "model": _after(n, adamw(left))},
            lambda params: jax.tree.map(lambda h: "head" if h else "model", _head_mask(params))))
        return optax.chain(*parts), lr_fn
    if lr_fn is None:
        lr_fn = lr_schedule(s.lr, s.warmup_steps, s.total_steps, s.lr_schedule)
    parts.append(adamw(lr_fn))
    if head_lr is not None and head_lr != s.lr:
        # AdamW's step is proportional to its learning rate: the head's, scaled, is AdamW at
        # head_lr on the same warmup and decay
        parts.append(optax.masked(optax.scale(head_lr / s.lr), _head_mask))
    return optax.chain(*parts), lr_fn


def _after(n: int, inner):
    """`inner` held for its first n updates: they are zeros and its state stays as initialised
    (its step count too), so from update n on it runs as if started then."""
    import optax

    def init(params):
        return jnp.zeros((), jnp.int32), inner.init(params)

    def update(updates, state, params=None):
        count, inner_state = state
        out, new_state = inner.update(updates, inner_state, params)
        on = count >= n
        out = jax.tree.map(lambda u: jnp.where(on, u, jnp.zeros_like(u)), out)
        new_state = jax.tree.map(lambda a, b: jnp.where(on, a, b), new_state, inner_state)
        return out, (jnp.minimum(count + 1, n), new_state)

    return optax.GradientTransformation(init, update)


def _head_mask(params):
    """True for the classification head (the model's `score`), False for everything else."""
    def is_head(path, _):
        return str(getattr(path[0], "key", getattr(path[0], "name", path[0]))) == "score"
    return jax.tree_util.tree_map_with_path(is_head, params)


def place_optimizer(mesh, optimizer, trained):
    """The optimizer state of `trained` laid out like it (AdamW's moments take each parameter's
    sharding, counters are replicated), and the (trained, optimizer state) shardings the step keeps
    them in."""
    import optax

    from runtime.mesh import put_global, replicated, to_host

    trained_sh = jax.tree.map(lambda x: x.sharding, trained)
    state = jax.eval_shape(optimizer.init, trained)

    def masked(x):      # where a part of the optimizer keeps no state (optax.multi_transform)
        return isinstance(x, optax.MaskedNode)

    state_sh = optax.tree_map_params(optimizer, lambda v, sh: v if masked(v) else sh, state,
                                     trained_sh, transform_non_params=lambda _: replicated(mesh),
                                     is_leaf=masked)
    host = jax.tree.map(np.asarray, jax.device_get(optimizer.init(to_host(trained))))
    return put_global(host, state_sh), (trained_sh, state_sh)


def objective(plan: Plan):
    """The preference loss's settings (runtime/preference.Objective), or None for sft."""
    from runtime.preference import Objective

    return Objective.of(plan.objective) if plan.objective.preference else None


def train_step(plan: Plan, graphdef, optimizer, lr_fn, mesh, shardings, *, probe: bool = False):
    """step(trained, opt_state, fixed, batch, rng, step) → (trained, opt_state, metrics), jitted;
    `fixed` as fixed_inputs gives it. Cross-entropy (runtime/train.py), or the plan's preference
    loss (runtime/preference.py). probe: the step of adapter.head_probe's first steps (the head
    alone, no backward pass through the model)."""
    from runtime.mesh import replicated
    from runtime.preference import make_preference_step
    from runtime.train import make_train_step

    rt = plan.runtime
    sharding = shardings + (replicated(mesh),)
    if plan.objective.preference:
        return make_preference_step(objective(plan), graphdef, optimizer, lr_fn,
                                    ce_chunk=rt.ce_chunk, loss_tokens=rt.loss_tokens,
                                    state_sharding=sharding)
    # a probe step reads the model as it is: LoRA's B is still zero, so dropout would change
    # nothing but cost its masks
    return make_train_step(graphdef, optimizer, lr_fn, ce_chunk=rt.ce_chunk,
                           dropout=plan.adapter.dropout > 0 and not probe,
                           loss_tokens=rt.loss_tokens,
                           packed=rt.pack, state_sharding=sharding,
                           head=plan.adapter.head != "none",
                           router_aux=plan.objective.router_aux_coef, probe=probe)


def eval_loss(plan: Plan, graphdef, mesh):
    """eval_loss(trained, fixed, batch) → (loss sum, count): Σ token cross-entropy and supervised
    tokens, or for a preference objective Σ unit losses and units."""
    from runtime.mesh import replicated
    from runtime.preference import make_preference_eval
    from runtime.train import make_eval_loss

    rt = plan.runtime
    if plan.objective.preference:
        return make_preference_eval(objective(plan), graphdef, ce_chunk=rt.ce_chunk,
                                    loss_tokens=rt.loss_tokens, state_sharding=replicated(mesh))
    return make_eval_loss(graphdef, ce_chunk=rt.ce_chunk, loss_tokens=rt.loss_tokens,
                          packed=rt.pack, state_sharding=replicated(mesh),
                          head=plan.adapter.head != "none")


# ------------------------------------------------------------------------------ data

def batches(plan: Plan, examples=None):
    """(training Batcher, validation Batcher or None) over the plan's token data (`examples`, as
    core.token_cache.load_examples gives it, read from plan.data.cache unless given). Refuses token
    data whose step count is not the plan's."""
    from core.packing import trim_granule
    from runtime.batching import Batcher, BatchShape

    s, pack = plan.schedule, plan.runtime.pack
    examples = examples if examples is not None else load_examples(plan.data.cache)
    shape = BatchShape(s.grad_accum, s.batch_size, s.seq_len)
    cap = plan.runtime.loss_tokens
    unit = examples.unit
    trim = 0 if pack else trim_granule(s.seq_len, plan.runtime.attention)
    batcher = Batcher(*examples.split("train"), shape, pack=pack, seed=s.seed, loss_tokens=cap,
                      masks=examples.masks("train"), unit=unit, labels=examples.unit_labels("train"),
                      trim=trim, **_balance(plan, examples), **_head_labels(plan, examples, "train"))
    if batcher.steps_per_epoch != s.steps_per_epoch or batcher.rows_per_epoch != s.rows_per_epoch:
        raise RuntimeError(f"the plan counts {s.steps_per_epoch} steps ({s.rows_per_epoch} rows) per "
                           f"epoch, its token data gives {batcher.steps_per_epoch} "
                           f"({batcher.rows_per_epoch} rows): recompile the plan with `tune plan`")
    val_ids, val_prompt_lens = examples.split("val")
    val = (Batcher(val_ids, val_prompt_lens, shape, pack=pack, seed=s.seed, loss_tokens=cap,
                   masks=examples.masks("val"), unit=unit, labels=examples.unit_labels("val"),
                   trim=trim, **_head_labels(plan, examples, "val"))
           if len(val_ids) else None)
    return batcher, val


def _head_labels(plan: Plan, examples, split: str) -> dict:
    """A Batcher's `head_labels` (adapter.head=classifier): each example's label in the plan's
    label set, as the token cache records it (compiler/examples.py), -1 for an answer outside it
    (a validation answer no training row has: left out of the head's loss)."""
    if plan.adapter.head == "none":
        return {}
    found = examples.classes(split)
    if found is None or (split == "train" and len(found) and (found < 0).all()):
        raise RuntimeError("the plan trains a classification head, but its token data records no "
                           f"{split} example's label: recompile the plan with `tune plan`")
    return {"head_labels": found}


def _balance(plan: Plan, examples) -> dict:
    """The training Batcher's data.balance arguments (core/balance.py): the examples an epoch
    holds (oversample) or each example's loss weight (weighted; validation stays unweighted)."""
    from core import balance

    d = plan.data
    if d.balance == "none":
        return {}
    classes = examples.classes("train")
    if classes is None:
        raise RuntimeError("the plan balances its labels, but its token data records no training "
                           "example's label: recompile the plan with `tune plan`")
    if d.balance == "weighted":
        return {"weights": np.asarray(d.class_weights, dtype=np.float32)[classes]}
    return {"index": balance.oversample(classes, len(d.labels), d.balance_max_factor,
                                        plan.schedule.seed)}


def decoding(plan: Plan, tokenizer) -> dict:
    """The keyword arguments every decoder call takes from the plan: the evaluation batch, the
    model's end tokens (as the tokenizer knows them) and its padding token."""
    from runtime.decode import end_token_ids

    return {"batch_size": plan.eval.batch_size, "pad_id": plan.model.pad_token_id,
            "eos_ids": end_token_ids(plan.model.eos_token_ids, tokenizer)}
