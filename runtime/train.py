"""The train step: one jitted function of (LoRA state, optimizer state, frozen weights, batch, rng, step).

The model is split once into its graph definition, its LoRA parameters (the only thing differentiated,
and the only thing the optimizer sees) and everything else (frozen, passed in but never donated). Inside
the step the micro-batches of the [accum, B, T] batch are scanned, summing the token losses, the
supervised-token counts and the gradients of the summed loss; the sum is divided once by the number of
supervised tokens in the whole global batch, so the loss is Σ token CE / Σ tokens whatever the
accumulation — not a mean of micro-batch means. A batch with a `loss_weight` (data.balance=weighted)
weighs each token's CE by its class weight and divides by the weights' sum: Σ w·CE / Σ w.
With a classification head (adapter.head=classifier, runtime/head.py; `head=True`) the loss is the
head's cross-entropy at each example's last prompt token instead (runtime/loss.head_cross_entropy),
summed and divided the same way: by the examples (or their weights) of the whole global batch.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from runtime.loss import head_cross_entropy, supervised_cross_entropy
from runtime.model import LoRAParam

def split_model(model):
    """(graphdef, lora, frozen): LoRA parameters and all the rest, as pure array trees."""
    graphdef, lora, frozen = nnx.split(model, LoRAParam, ...)
    return graphdef, nnx.as_pure(lora), nnx.as_pure(frozen)


def lr_schedule(lr: float, warmup_steps: int, total_steps: int, kind: str) -> Callable:
    """Learning rate of step s (0-based): linear warmup lr·(s+1)/warmup, then decay towards 0 at
    total_steps (cosine or linear), or constant. The first step already learns (lr/warmup), and the last
    one still does."""
    if kind not in ("cosine", "linear", "constant"):
        raise ValueError(f"unknown lr schedule {kind!r}; expected cosine, linear or constant")
    warmup, total = int(warmup_steps), max(int(total_steps), 1)

    def at(step):
        step = jnp.asarray(step, jnp.float32)
        warm = jnp.minimum(1.0, (step + 1.0) / warmup) if warmup > 0 else 1.0
        p = jnp.clip((step - warmup) / max(total - warmup, 1), 0.0, 1.0)
        if kind == "cosine":
            decay = 0.5 * (1.0 + jnp.cos(jnp.pi * p))
        elif kind == "linear":
            decay = 1.0 - p
        else:
            decay = 1.0
        return lr * jnp.where(step < warmup, warm, decay)

    return at


def decay_mask(params):
    """Weight decay applies to every trained tensor except norm weights and biases (modules trained
    in full): decaying an RMSNorm's gain towards 0 is never wanted."""
    def decays(path, _):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        return not names or not (names[-1] == "bias" or any(n.endswith("norm") for n in names[:-1]))
    return jax.tree_util.tree_map_with_path(decays, params)


def _micro_loss(graphdef, lora, frozen, mb, key, *, ce_chunk: int, loss_tokens: int | None,
                dropout: bool, packed: bool, head: bool = False, router: bool = False,
                probe: bool = False):
    """(Σ CE, Σ weight) of a micro-batch; router=True (a mixture of experts): (Σ CE, Σ weight,
    the routers' load-balancing loss over its real tokens). probe: the head's loss on the hidden
    states as constants (adapter.head_probe's steps train the head alone: no gradient flows into
    the model, so no backward pass through it is computed)."""
    model = nnx.merge(graphdef, frozen, lora)
    # Unpacked rows hold one example each (padding after it): plain causal attention is exact for
    # every real token and needs no [T, T] mask, which lets a fused attention kernel run.
    hidden = model(mb["tokens"], positions=mb["positions"],
                   segment_ids=mb["segment_ids"] if packed else None,
                   deterministic=not dropout, rngs=nnx.Rngs(dropout=key) if dropout else None,
                   router_loss=router, token_mask=mb["segment_ids"] > 0)
    if router:
        hidden, aux = hidden
    if probe:
        hidden = jax.lax.stop_gradient(hidden)
    B, T = mb["tokens"].shape
    if head:        # the head's cross-entropy replaces the answer tokens' (their loss is not used)
        out = head_cross_entropy(hidden, model.head_weight(), mb["head_label"],
                                 capacity=B * T if loss_tokens is None else loss_tokens,
                                 weight=mb.get("loss_weight"))
    else:
        # data.balance=weighted: each target's class weight (Σ w·CE, Σ w); else the 0/1 mask
        mask = mb["loss_weight"] if "loss_weight" in mb else mb["loss_mask"]
        out = supervised_cross_entropy(hidden, model.lm_head(), mb["targets"], mask,
                                       capacity=B * T if loss_tokens is None else loss_tokens,
                                       chunk=ce_chunk, softcap=model.cfg.final_softcap)
    return (*out, aux) if router else out


def accumulate(graphdef, lora, frozen, batch, key, *, ce_chunk: int, dropout: bool,
               loss_tokens: int | None, packed: bool, head: bool = False,
               router_aux: float | None = None, probe: bool = False):
    """Scan the micro-batches of an [accum, B, T] batch: (Σ token CE, Σ supervised tokens, gradients of
    Σ CE w.r.t. the LoRA parameters, accumulated in float32). Micro-batch i draws dropout from
    fold_in(key, i). head: the classification head's loss instead (Σ w·CE, Σ w over the
    examples). router_aux (a mixture of experts; None for a dense model): the load-balancing
    loss's weight — each micro-batch adds router_aux · aux · its Σ weight to what is
    differentiated, so that divided by Σ weight the objective is the mean CE + router_aux · aux,
    as transformers adds it — and a fourth result, Σ aux · weight (the reported Σ CE stays CE)."""
    accum = batch["tokens"].shape[0]
    router = router_aux is not None

    def objective(p, mb, sub):
        out = _micro_loss(graphdef, p, frozen, mb, sub, ce_chunk=ce_chunk,
                          loss_tokens=loss_tokens, dropout=dropout, packed=packed, head=head,
                          router=router, probe=probe)
        if not router:
            return out[0], (out[0], out[1], jnp.float32(0))
        l, c, aux = out
        weight = jax.lax.stop_gradient(c.astype(jnp.float32))
        return l + router_aux * aux * weight, (l, c, aux * weight)

    def micro(carry, xs):
        grads, loss_sum, n, aux_sum = carry
        mb, i = xs
        sub = jax.random.fold_in(key, i) if dropout else None
        (_, (l, c, a)), g = jax.value_and_grad(objective, has_aux=True)(lora, mb, sub)
        grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
        return (grads, loss_sum + l.astype(jnp.float32), n + c.astype(jnp.float32),
                aux_sum + a), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), lora)
    (grads, loss_sum, n, aux_sum), _ = jax.lax.scan(
        micro, (zeros, jnp.float32(0), jnp.float32(0), jnp.float32(0)),
        (batch, jnp.arange(accum)))
    return (loss_sum, n, grads, aux_sum) if router else (loss_sum, n, grads)


def make_train_step(graphdef, optimizer: optax.GradientTransformation, lr_fn: Callable, *,
                    ce_chunk: int, dropout: bool, loss_tokens: int | None, packed: bool,
                    donate: bool = True, state_sharding=None, head: bool = False,
                    router_aux: float | None = None, probe: bool = False):
    """step(lora, opt_state, frozen, batch, rng, step) -> (lora, opt_state, metrics), jitted, with the
    LoRA and optimizer states donated. batch: dict of int32 [accum, B, T]; rng: a PRNG key; step: the
    0-based global step, folded into rng for dropout (so a resumed run draws the same masks).
    state_sharding: where the outputs (LoRA, optimizer state, metrics) live, so that they are valid
    inputs of the next call as they are: one sharding for all three, or a tuple of three (trees). loss_tokens: supervised positions
    per micro-batch at most (the plan's runtime.loss_tokens): the output head runs on those only;
    None runs it on every position. head: the loss is the classification head's cross-entropy
    (the batch's `head_label`) instead of the answer tokens'. router_aux: a mixture of experts'
    load-balancing weight (accumulate); its loss is reported as `router_aux`. probe: a step of
    adapter.head_probe's (the head alone: the model's gradients are zeros, not computed)."""

    def step_fn(lora, opt_state, frozen, batch, rng, step):
        key = jax.random.fold_in(rng, step)
        out = accumulate(graphdef, lora, frozen, batch, key, ce_chunk=ce_chunk,
                         loss_tokens=loss_tokens, dropout=dropout, packed=packed, head=head,
                         router_aux=router_aux, probe=probe)
        loss_sum, n, grads = out[:3]
        denom = jnp.maximum(n, 1.0)
        grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, lora)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, opt_state, lora)
        lora = optax.apply_updates(lora, updates)
        if "loss_weight" in batch:      # n_tokens counts (head: examples); n was Σ w, the divisor
            n = jnp.sum((batch["head_label"] if head else batch["loss_mask"]) > 0).astype(
                jnp.float32)
        metrics = {"loss": loss_sum / denom, "n_tokens": n, "grad_norm": grad_norm,
                   "lr": lr_fn(step), "n_inputs": jnp.sum(batch["segment_ids"] > 0)}
        if router_aux is not None:
            metrics["router_aux"] = out[3] / denom
        return lora, opt_state, metrics

    if state_sharding is not None and not isinstance(state_sharding, tuple):
        state_sharding = (state_sharding,) * 3
    kw = {} if state_sharding is None else {"out_shardings": state_sharding}
    return jax.jit(step_fn, donate_argnums=(0, 1) if donate else (), **kw)


def make_eval_loss(graphdef, *, ce_chunk: int, loss_tokens: int | None, packed: bool,
                   state_sharding=None, head: bool = False):
    """eval_loss(lora, frozen, batch) -> (loss_sum, n_tokens) over all micro-batches, jitted; head:
    the classification head's (Σ CE, examples)."""

    def eval_fn(lora, frozen, batch):
        def micro(carry, mb):
            l, c = _micro_loss(graphdef, lora, frozen, mb, None, ce_chunk=ce_chunk,
                               loss_tokens=loss_tokens, dropout=False, packed=packed, head=head)
            return (carry[0] + l.astype(jnp.float32), carry[1] + c.astype(jnp.float32)), None

        (loss_sum, n), _ = jax.lax.scan(micro, (jnp.float32(0), jnp.float32(0)), batch)
        return loss_sum, n

    return jax.jit(eval_fn, **({} if state_sharding is None else {"out_shardings": state_sharding}))
