"""Batched greedy decoding and label scoring with the model's KV cache.

Prompts of different lengths share a batch by LEFT-padding: every row's last prompt token sits in the
same slot, so one prefill gives every row's first-token logits, and from then on all rows write the
same cache slot per step. Padding slots are marked invalid in the cache and never attended to; RoPE
positions count real tokens only (runtime.model.Llama.decode). Each batch is one jitted program —
prefill, then a `lax.while_loop` of single-token steps that stops as soon as every row has produced
an end token (or after max_new_tokens). Prompt lengths are rounded up to a few static buckets and
the batch is padded to a fixed size, so an evaluation compiles a handful of programs, not one per
batch.

`choice_logprobs` scores a fixed set of answers instead of generating (eval.mode=choices): each
prompt is prefilled once and every choice continues from that shared cache.
"""
from __future__ import annotations

from functools import partial
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# End-of-turn markers of common chat templates. A tokenizer that has one of these as a single token
# ends generation on it: a chat-tuned model closes its answer with it, not with eos.
CHAT_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                   "<|end_of_text|>", "</s>")


def bucket(n: int, minimum: int = 16) -> int:
    """The static size a length is padded to: 16, 24, 32, 48, 64, 96, ... (2^k and 1.5·2^k), so at
    most a third of a prefill is padding and a run meets only a few distinct shapes."""
    size = minimum
    while size < n:
        size = size + size // 2 if size & (size - 1) == 0 else size + size // 3
    return size


def end_token_ids(eos_token_ids, tokenizer=None) -> tuple[int, ...]:
    """Every id that ends an answer: the model's eos ids (plan.model.eos_token_ids) plus the chat end
    tokens the tokenizer has."""
    ids = [int(x) for x in eos_token_ids]
    if tokenizer is not None:
        for tok in CHAT_END_TOKENS:
            i = tokenizer.token_to_id(tok)
            if i is not None:
                ids.append(int(i))
    return tuple(dict.fromkeys(ids))


def _left_pad(rows: Sequence[Sequence[int]], length: int, batch: int, pad_id: int):
    """tokens [batch, length] int32 and valid [batch, length] bool; rows beyond len(rows) are all
    padding (they fill the static batch and are ignored)."""
    tokens = np.full((batch, length), pad_id, np.int32)
    valid = np.zeros((batch, length), bool)
    for i, r in enumerate(rows):
        if len(r):
            tokens[i, length - len(r):] = r
            valid[i, length - len(r):] = True
    return tokens, valid


def _prefill(model, prompt, valid, cache_len):
    """Prefill a left-padded batch: (last-token logits [B, V], cache, lengths [B])."""
    B, P = prompt.shape
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)
    lengths = jnp.sum(valid, axis=1).astype(jnp.int32)
    cache = model.init_cache(B, cache_len)
    logits, cache = model.decode(prompt, positions, cache, valid=valid,
                                 last=jnp.full((B,), P - 1, jnp.int32))
    return logits, cache, lengths


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def _greedy_batch(graphdef, state, prompt, valid, active, eos_ids, pad_id, max_new_tokens: int):
    model = nnx.merge(graphdef, state)
    B, P = prompt.shape
    logits, cache, lengths = _prefill(model, prompt, valid, P + max_new_tokens)
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    out = jnp.full((B, max_new_tokens), pad_id, jnp.int32)

    def cond(carry):
        i, _, done, _, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, token, done, cache, out = carry
        out = out.at[:, i].set(jnp.where(done, pad_id, token))
        done = done | jnp.isin(token, eos_ids)
        # The step after the last one is wasted work, but keeps the loop body a single shape.
        logits, cache = model.decode(token[:, None], (lengths + i)[:, None], cache)
        token = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
        return i + 1, token, done, cache, out

    _, _, _, _, out = jax.lax.while_loop(cond, body, (jnp.int32(0), token, ~active, cache, out))
    return out


def greedy_generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                    eos_ids: Sequence[int] = (), pad_id: int = 0, batch_size: int = 8,
                    progress=None) -> list[list[int]]:
    """Greedy continuations of token-id prompts, in input order.

    Each result holds the generated ids up to (not including) the first end token, at most
    max_new_tokens. Prompts are sorted by length into batches of `batch_size` (less padding), each
    batch left-padded to a length bucket. `progress(n_done)` is called after each batch."""
    if max_new_tokens <= 0 or not prompts:
        return [[] for _ in prompts]
    graphdef, state = nnx.split(model)
    eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[int] | None] = [None] * len(prompts)
    end = set(int(e) for e in eos_ids)
    done = 0
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        rows = [list(prompts[i]) for i in idx]
        tokens, valid = _left_pad(rows, bucket(max(len(r) for r in rows)), batch_size, pad_id)
        active = np.zeros((batch_size,), bool)
        active[:len(rows)] = True
        out = np.asarray(_greedy_batch(graphdef, state, tokens, valid, active, eos, jnp.int32(pad_id),
                                       max_new_tokens))
        for k, i in enumerate(idx):
            row = []
            for t in out[k].tolist():
                if t in end:
                    break
                row.append(t)
            results[i] = row
        done += len(idx)
        if progress is not None:
            progress(done)
    return results


# --- streaming one answer (tune generate) ------------------------------------------------------

@partial(jax.jit, static_argnames=("graphdef", "cache_len"))
def _prefill_one(graphdef, state, prompt, valid, cache_len: int):
    model = nnx.merge(graphdef, state)
    logits, cache, lengths = _prefill(model, prompt, valid, cache_len)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache, lengths


@partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _step_one(graphdef, state, token, position, cache):
    model = nnx.merge(graphdef, state)
    logits, cache = model.decode(token[:, None], position[:, None], cache)
    return jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32), cache


def stream_greedy(model, prompt: Sequence[int], *, max_new_tokens: int,
                  eos_ids: Sequence[int] = (), pad_id: int = 0) -> Iterator[int]:
    """Yield the greedy answer to one prompt token by token (a Python loop over a jitted step), until
    an end token (not yielded) or max_new_tokens. Same tokens as greedy_generate."""
    if max_new_tokens <= 0:
        return
    graphdef, state = nnx.split(model)
    P = bucket(len(prompt))
    tokens, valid = _left_pad([list(prompt)], P, 1, pad_id)
    token, cache, lengths = _prefill_one(graphdef, state, tokens, valid, bucket(P + max_new_tokens))
    end = set(int(e) for e in eos_ids)
    for i in range(max_new_tokens):
        t = int(token[0])
        if t in end:
            return
        yield t
        if i + 1 < max_new_tokens:
            token, cache = _step_one(graphdef, state, token, lengths + i, cache)


# --- scoring fixed answers (eval.mode=choices) --------------------------------------------------

@partial(jax.jit, static_argnames=("graphdef",))
def _choice_batch(graphdef, state, prompt, valid, choices, choice_valid):
    """prompt/valid [B, P] left-padded; choices/choice_valid [K, C] right-padded → [B, K] total
    log-likelihood of each choice's tokens after each prompt."""
    model = nnx.merge(graphdef, state)
    B, P = prompt.shape
    C = choices.shape[1]
    logits0, cache, lengths = _prefill(model, prompt, valid, P + C)
    lp0 = jax.nn.log_softmax(logits0, axis=-1)                     # predicts each choice's 1st token

    def one(xs):
        toks, cv = xs
        # Every choice continues from the same prefilled cache (decode returns a new one).
        logits, _ = model.decode(jnp.broadcast_to(toks, (B, C)),
                                 lengths[:, None] + jnp.arange(C, dtype=jnp.int32)[None],
                                 cache, valid=jnp.broadcast_to(cv, (B, C)))
        lp = jax.nn.log_softmax(logits[:, :-1], axis=-1)           # position j predicts token j+1
        nxt = jnp.take_along_axis(lp, jnp.broadcast_to(toks[1:], (B, C - 1))[..., None], axis=-1)[..., 0]
        return lp0[:, toks[0]] + jnp.sum(jnp.where(cv[1:][None], nxt, 0.0), axis=1)

    return jax.lax.map(one, (choices, choice_valid)).T


def choice_logprobs(model, prompt_ids: Sequence[Sequence[int]], choices_ids: Sequence[Sequence[int]],
                    *, batch_size: int = 8, pad_id: int = 0, progress=None) -> np.ndarray:
    """Total log-likelihood [N, K] (float32) of each choice's tokens given each prompt.

    Each prompt is prefilled once; each of the K choices then runs over the shared cache. Choices
    should be tokenised exactly as training saw the responses (incl. their end token), so that a
    choice that is a prefix of another is not favoured."""
    if not choices_ids or any(len(c) == 0 for c in choices_ids):
        raise ValueError("every choice needs at least one token")
    graphdef, state = nnx.split(model)
    C = max(len(c) for c in choices_ids)
    K = len(choices_ids)
    choices = np.full((K, C + 1), pad_id, np.int32)      # +1: C-1 >= 1 keeps shapes non-empty
    cvalid = np.zeros((K, C + 1), bool)
    for k, c in enumerate(choices_ids):
        choices[k, :len(c)] = c
        cvalid[k, :len(c)] = True
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    scores = np.zeros((len(prompt_ids), K), np.float32)
    done = 0
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        rows = [list(prompt_ids[i]) for i in idx]
        tokens, valid = _left_pad(rows, bucket(max(len(r) for r in rows)), batch_size, pad_id)
        out = np.asarray(_choice_batch(graphdef, state, tokens, valid, choices, cvalid))
        scores[idx] = out[:len(idx)]
        done += len(idx)
        if progress is not None:
            progress(done)
    return scores
