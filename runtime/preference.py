"""Preference objectives: DPO, IPO, ORPO, SimPO and KTO, as one jitted train step.

The token data of a preference plan is made of *units* of two examples each, always side by side in
one row (runtime/batching.py): segment 2u+1 is unit u's chosen reply (KTO: its completion) and
segment 2u+2 its rejected reply (KTO: the same prompt with another row's completion, whose
log-probabilities estimate the KL term). Per-token log-probabilities are computed on the supervised
positions only (the replies, never the prompts), in chunks as the cross-entropy is
(runtime/loss.py), and summed per segment.

Reference model: where the objective has one (dpo, ipo, kto) it is the *initial trained state*
passed to the step beside the frozen weights: fresh LoRA factors (B = 0), which compute the base
model exactly — the adapter switched off, no second copy of the weights — or the adapter of
init.run, the model a preference run starts from. Its forward pass runs under stop_gradient in the
same step. ORPO and SimPO have no reference.

Losses (TRL's definitions, checked against TRL in tests/test_preference.py): with policy and
reference log-probability sums πc, πr, ρc, ρr over the chosen and rejected tokens (nc, nr tokens),
- dpo:   −logσ(β·Δ),  Δ = (πc−ρc) − (πr−ρr); with label smoothing ε, robust DPO (TRL's "robust"):
         (−(1−ε)·logσ(β·Δ) + ε·logσ(−β·Δ)) / (1−2ε)
- ipo:   (Δ̄ − 1/(2β))²,  Δ̄ = (πc−ρc)/nc − (πr−ρr)/nr
- simpo: −(1−ε)·logσ(β·(πc/nc − πr/nr) − γ) − ε·logσ(−(…))
- orpo:  CE on the chosen reply's tokens (mean over them) − λ·logσ(log odds(πc/nc) − log odds(πr/nr));
         as the ORPO paper's SFT term, on the reply only (TRL's ORPOTrainer also counts the prompt's
         tokens in it: the tests compare the two where they agree)
- kto:   w⁺·(1 − σ(β·((π−ρ) − z))) for a desirable completion, w⁻·(1 − σ(β·(z − (π−ρ)))) for an
         undesirable one; z = max(0, mean over the micro-batch of the mismatched pairs' π−ρ),
         without gradient (TRL estimates it per batch; here per micro-batch).
Each is averaged over the global batch's units (ORPO's CE over its chosen tokens), so the gradient is
that of the mean whatever the accumulation. Dropout is off in every preference forward pass, as
TRL's trainers switch it off: the chosen and rejected scores must come from the same function.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from core.plan import WITH_REFERENCE
from runtime.attention import soft_cap


@dataclass(frozen=True)
class Objective:
    """The loss's settings (plan.objective)."""
    kind: str
    beta: float = 0.1
    label_smoothing: float = 0.0
    gamma: float = 0.5
    orpo_lambda: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    @property
    def reference(self) -> bool:
        return self.kind in WITH_REFERENCE

    @classmethod
    def of(cls, section) -> "Objective":
        return cls(kind=section.kind, beta=float(section.beta),
                   label_smoothing=float(section.label_smoothing), gamma=float(section.gamma),
                   orpo_lambda=float(section.orpo_lambda),
                   desirable_weight=float(section.desirable_weight),
                   undesirable_weight=float(section.undesirable_weight))


# ------------------------------------------------------------------------------ log-probabilities

def token_logps(hidden, lm_head_w, targets, mask, *, capacity: int, chunk: int, softcap=None):
    """(log p(target) per gathered position [N], flat position index [N], valid [N]): the supervised
    positions of hidden [B,T,D] gathered into `capacity` slots (all B·T when capacity ≥ B·T), the
    output head run on them in chunks (logits in float32, soft-capped by `softcap` — the model's
    final_softcap — recomputed in the backward pass)."""
    B, T, D = hidden.shape
    n = B * T
    flat = mask.reshape(-1) > 0
    if capacity >= n:
        idx, valid, h = jnp.arange(n), flat, hidden.reshape(n, D)
    else:
        idx = jnp.nonzero(flat, size=capacity, fill_value=0)[0]
        valid = jnp.arange(capacity) < jnp.sum(flat)
        h = hidden.reshape(n, D)[idx]
    t = jnp.where(valid, targets.reshape(-1)[idx], 0).astype(jnp.int32)
    N = h.shape[0]
    chunk = max(1, min(int(chunk), N))
    n_chunks = -(-N // chunk)
    pad = n_chunks * chunk - N
    if pad:
        h = jnp.pad(h, ((0, pad), (0, 0)))
        t = jnp.pad(t, (0, pad))
    w = lm_head_w.astype(hidden.dtype)

    @jax.checkpoint
    def chunk_logp(w, h, t):
        logits = soft_cap(jnp.einsum("cd,vd->cv", h, w, preferred_element_type=jnp.float32),
                          softcap)
        target = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
        return target - jax.nn.logsumexp(logits, axis=-1)

    _, lp = jax.lax.scan(lambda c, xs: (c, chunk_logp(w, *xs)), None,
                         (h.reshape(n_chunks, chunk, D), t.reshape(n_chunks, chunk)))
    lp = lp.reshape(-1)[:N]
    return jnp.where(valid, lp, 0.0), idx, valid


def unit_sums(lp, idx, valid, segment_ids):
    """Per unit slot [B·U] (U = T//2 + 1 units a row can hold): (Σ log p chosen, Σ log p rejected,
    chosen tokens, rejected tokens)."""
    B, T = segment_ids.shape
    U = T // 2 + 1
    seg = segment_ids.reshape(-1)[idx]
    ok = valid & (seg > 0)
    unit = (idx // T) * U + (seg - 1) // 2
    key = jnp.where(ok, unit, B * U)
    chosen = ok & ((seg - 1) % 2 == 0)
    rejected = ok & ((seg - 1) % 2 == 1)

    def total(x):
        return jax.ops.segment_sum(x, key, num_segments=B * U + 1)[:-1]

    return (total(jnp.where(chosen, lp, 0.0)), total(jnp.where(rejected, lp, 0.0)),
            total(chosen.astype(jnp.float32)), total(rejected.astype(jnp.float32)))


def unit_labels(batch_mb):
    """Per unit slot [B·U]: (present, KTO label) from the unit's first token."""
    seg, pos = batch_mb["segment_ids"], batch_mb["positions"]
    B, T = seg.shape
    U = T // 2 + 1
    first = (seg > 0) & ((seg - 1) % 2 == 0) & (pos == 0)
    key = jnp.where(first, jnp.arange(B)[:, None] * U + (seg - 1) // 2, B * U).reshape(-1)
    present = jax.ops.segment_sum(first.reshape(-1).astype(jnp.float32), key,
                                  num_segments=B * U + 1)[:-1]
    label = batch_mb.get("unit_label")
    lab = (jax.ops.segment_sum(jnp.where(first, label, 0).reshape(-1).astype(jnp.float32), key,
                               num_segments=B * U + 1)[:-1] if label is not None else present)
    return present, lab


# ------------------------------------------------------------------------------ losses

def _logsig(x):
    return jax.nn.log_sigmoid(x)


def log1mexp(x):
    """log(1 − eˣ) for x < 0, stable at both ends (x near 0 and very negative)."""
    x = jnp.minimum(x, -1e-30)
    return jnp.where(x > -0.6931472, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def unit_losses(obj: Objective, pc, pr, nc, nr, rc=None, rr=None, label=None):
    """Per unit: (loss, chosen reward, rejected reward), float32 — the arithmetic of each objective
    on the log-probability sums of the chosen and rejected replies (policy pc/pr, reference rc/rr,
    token counts nc/nr). KTO: pc is the completion, pr the mismatched KL completion, label 1 for a
    desirable completion. ORPO's cross-entropy term is added by the caller."""
    beta, eps = obj.beta, obj.label_smoothing
    nc, nr = jnp.maximum(nc, 1.0), jnp.maximum(nr, 1.0)
    if obj.kind == "dpo":
        c, r = pc - rc, pr - rr
        d = beta * (c - r)
        loss = -_logsig(d) if not eps else \
            (-(1 - eps) * _logsig(d) + eps * _logsig(-d)) / (1 - 2 * eps)
        return loss, beta * c, beta * r
    if obj.kind == "ipo":
        c, r = (pc - rc) / nc, (pr - rr) / nr
        return (c - r - 1.0 / (2.0 * beta)) ** 2, beta * (pc - rc), beta * (pr - rr)
    if obj.kind == "simpo":
        c, r = pc / nc, pr / nr
        d = beta * (c - r) - obj.gamma
        return -(1 - eps) * _logsig(d) - eps * _logsig(-d), beta * c, beta * r
    if obj.kind == "orpo":
        c, r = pc / nc, pr / nr
        log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
        return -obj.orpo_lambda * _logsig(log_odds), obj.orpo_lambda * c, obj.orpo_lambda * r
    raise ValueError(f"unknown objective {obj.kind!r}")


def kto_losses(obj: Objective, logratio, kl, label):
    """Per unit: KTO's loss of a completion with policy − reference log-ratio `logratio`, the
    batch's KL estimate `kl` (no gradient) and its label (1 desirable, 0 undesirable)."""
    good = obj.desirable_weight * (1.0 - jax.nn.sigmoid(obj.beta * (logratio - kl)))
    bad = obj.undesirable_weight * (1.0 - jax.nn.sigmoid(obj.beta * (kl - logratio)))
    return jnp.where(label > 0, good, bad)


# ------------------------------------------------------------------------------ the step

def global_counts(batch) -> dict:
    """Over the whole [accum, B, T] batch: units, desirable units (KTO), chosen tokens (ORPO)."""
    seg, pos, mask = batch["segment_ids"], batch["positions"], batch["loss_mask"] > 0
    first = (seg > 0) & ((seg - 1) % 2 == 0) & (pos == 0)
    units = jnp.sum(first).astype(jnp.float32)
    out = {"units": units,
           "chosen_tokens": jnp.sum(mask & (seg > 0) & ((seg - 1) % 2 == 0)).astype(jnp.float32)}
    if "unit_label" in batch:
        out["desirable"] = jnp.sum(first & (batch["unit_label"] > 0)).astype(jnp.float32)
        out["undesirable"] = units - out["desirable"]
    return out


def _sums(graphdef, trained, frozen, mb, *, ce_chunk, loss_tokens):
    """Per unit slot: the log-probability sums and token counts of its chosen and rejected replies.
    Attention always keeps the segments apart: a row holds a pair even unpacked."""
    model = nnx.merge(graphdef, frozen, trained)
    hidden = model(mb["tokens"], positions=mb["positions"], segment_ids=mb["segment_ids"],
                   deterministic=True)
    B, T = mb["tokens"].shape
    lp, idx, valid = token_logps(hidden, model.lm_head(), mb["targets"], mb["loss_mask"],
                                 capacity=B * T if loss_tokens is None else loss_tokens,
                                 chunk=ce_chunk, softcap=model.cfg.final_softcap)
    return unit_sums(lp, idx, valid, mb["segment_ids"])


def micro_loss(obj: Objective, graphdef, trained, frozen, ref, mb, counts, *, ce_chunk: int,
               loss_tokens: int | None):
    """(this micro-batch's share of the global batch's mean loss, its metric sums)."""
    kw = dict(ce_chunk=ce_chunk, loss_tokens=loss_tokens)
    pc, pr, nc, nr = _sums(graphdef, trained, frozen, mb, **kw)
    present, label = unit_labels(mb)
    on = present > 0
    rc = rr = None
    if obj.reference:
        rc, rr, _, _ = jax.tree.map(jax.lax.stop_gradient,
                                    _sums(graphdef, ref, frozen, mb, **kw))
    units = jnp.maximum(counts["units"], 1.0)
    if obj.kind == "kto":
        logratio, kl_ratio = pc - rc, pr - rr
        kl = jnp.sum(jnp.where(on, kl_ratio, 0.0)) / jnp.maximum(jnp.sum(on), 1.0)
        kl = jax.lax.stop_gradient(jnp.maximum(kl, 0.0))
        losses = kto_losses(obj, logratio, kl, label)
        loss = jnp.sum(jnp.where(on, losses, 0.0)) / units
        good, bad = on & (label > 0), on & (label <= 0)
        rewards = obj.beta * logratio
        sums = {"rewards/chosen": jnp.sum(jnp.where(good, rewards, 0.0)),
                "rewards/rejected": jnp.sum(jnp.where(bad, rewards, 0.0)),
                "logps/chosen": jnp.sum(jnp.where(good, pc, 0.0)),
                "logps/rejected": jnp.sum(jnp.where(bad, pc, 0.0)),
                "kl": kl * jnp.sum(on)}
        return loss, sums
    losses, rew_c, rew_r = unit_losses(obj, pc, pr, nc, nr, rc, rr)
    loss = jnp.sum(jnp.where(on, losses, 0.0)) / units
    # logps/*: what TRL logs, the log-probabilities the loss is made of — per-token means for simpo
    # and orpo (CPOTrainer, ORPOTrainer), sums otherwise (DPOTrainer, ipo included)
    lc, lr = ((pc / jnp.maximum(nc, 1.0), pr / jnp.maximum(nr, 1.0))
              if obj.kind in ("simpo", "orpo") else (pc, pr))
    sums = {"rewards/chosen": jnp.sum(jnp.where(on, rew_c, 0.0)),
            "rewards/rejected": jnp.sum(jnp.where(on, rew_r, 0.0)),
            "rewards/accuracies": jnp.sum(jnp.where(on, (rew_c > rew_r).astype(jnp.float32), 0.0)),
            "logps/chosen": jnp.sum(jnp.where(on, lc, 0.0)),
            "logps/rejected": jnp.sum(jnp.where(on, lr, 0.0))}
    if obj.kind == "orpo":
        nll = -jnp.sum(jnp.where(on, pc, 0.0)) / jnp.maximum(counts["chosen_tokens"], 1.0)
        sums["nll_loss"] = nll * units
        loss = loss + nll
    return loss, sums


def _finish_metrics(obj: Objective, sums: dict, counts: dict) -> dict:
    units = jnp.maximum(counts["units"], 1.0)
    if obj.kind == "kto":
        good, bad = jnp.maximum(counts["desirable"], 1.0), jnp.maximum(counts["undesirable"], 1.0)
        out = {"rewards/chosen": sums["rewards/chosen"] / good,
               "rewards/rejected": sums["rewards/rejected"] / bad,
               "logps/chosen": sums["logps/chosen"] / good,
               "logps/rejected": sums["logps/rejected"] / bad,
               "kl": sums["kl"] / units}
    else:
        out = {k: v / units for k, v in sums.items()}
    out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


def make_preference_step(obj: Objective, graphdef, optimizer: optax.GradientTransformation,
                         lr_fn: Callable, *, ce_chunk: int, loss_tokens: int | None,
                         donate: bool = True, state_sharding=None):
    """step(trained, opt_state, (frozen, reference), batch, rng, step) → (trained, opt_state,
    metrics): the train step of runtime/train.py with a preference loss. `reference` is the trained
    state the reference model is made of (unused without one). metrics: loss, n_tokens (supervised
    tokens), grad_norm, lr, n_inputs, n_units and TRL's reward metrics."""

    def step_fn(trained, opt_state, fixed, batch, rng, step):
        frozen, ref = fixed
        counts = global_counts(batch)

        def micro(carry, mb):
            grads, loss_sum, sums = carry
            (l, s), g = jax.value_and_grad(
                lambda p: micro_loss(obj, graphdef, p, frozen, ref, mb, counts, ce_chunk=ce_chunk,
                                     loss_tokens=loss_tokens), has_aux=True)(trained)
            grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
            sums = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), sums, s)
            return (grads, loss_sum + l.astype(jnp.float32), sums), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trained)
        shapes = jax.eval_shape(lambda mb: micro_loss(obj, graphdef, trained, frozen, ref, mb,
                                                      counts, ce_chunk=ce_chunk,
                                                      loss_tokens=loss_tokens)[1],
                                jax.tree.map(lambda x: x[0], batch))
        sums0 = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)
        (grads, loss, sums), _ = jax.lax.scan(micro, (zeros, jnp.float32(0), sums0), batch)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, trained)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, opt_state, trained)
        trained = optax.apply_updates(trained, updates)
        metrics = {"loss": loss, "n_tokens": jnp.sum(batch["loss_mask"]).astype(jnp.float32),
                   "grad_norm": grad_norm, "lr": lr_fn(step),
                   "n_inputs": jnp.sum(batch["segment_ids"] > 0), "n_units": counts["units"],
                   **_finish_metrics(obj, sums, counts)}
        return trained, opt_state, metrics

    if state_sharding is not None and not isinstance(state_sharding, tuple):
        state_sharding = (state_sharding,) * 3
    kw = {} if state_sharding is None else {"out_shardings": state_sharding}
    return jax.jit(step_fn, donate_argnums=(0, 1) if donate else (), **kw)


def make_preference_eval(obj: Objective, graphdef, *, ce_chunk: int, loss_tokens: int | None,
                         state_sharding=None):
    """eval_loss(trained, (frozen, reference), batch) → (Σ unit losses, units): the validation
    loss's parts, as runtime/train.make_eval_loss gives them for cross-entropy."""

    def eval_fn(trained, fixed, batch):
        frozen, ref = fixed

        def micro(carry, mb):
            counts = global_counts(jax.tree.map(lambda x: x[None], mb))
            l, _ = micro_loss(obj, graphdef, trained, frozen, ref, mb, counts, ce_chunk=ce_chunk,
                              loss_tokens=loss_tokens)
            # l is this micro-batch's mean over its units: weighted back to a sum
            return (carry[0] + l.astype(jnp.float32) * counts["units"],
                    carry[1] + counts["units"]), None

        (loss_sum, n), _ = jax.lax.scan(micro, (jnp.float32(0), jnp.float32(0)), batch)
        return loss_sum, n

    return jax.jit(eval_fn, **({} if state_sharding is None else {"out_shardings": state_sharding}))
