"""Batched greedy decoding and label scoring with the model's KV cache.

Prompts of different lengths share a batch by LEFT-padding: every row's last prompt token sits in the
same slot, so one prefill gives every row's first-token logits, and from then on all rows write the
same cache slot per step. Padding slots are marked invalid in the cache and never attended to; RoPE
positions count real tokens only (runtime.model.Llama.decode). Each batch is one jitted program —
prefill, then a `lax.while_loop` of single-token steps that stops as soon as every row has produced
an end token (or after max_new_tokens). Prompt lengths are rounded up to a few static buckets and
the batch is padded to a fixed size, so an evaluation compiles a handful of programs, not one per
batch.

`classify` decodes within a closed label set (eval.mode=constrained): a prefix trie over the labels'
token ids, followed greedily, so every answer is a label; from the same prefill it can also decode
freely, to measure how often free generation lands on a valid label. `choice_logprobs` scores
every label in full instead (eval.mode=choices): each prompt is prefilled once and every choice
continues from that shared cache.
"""
from __future__ import annotations

from dataclasses import dataclass
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


def _batches(prompts: Sequence[Sequence[int]], batch_size: int, pad_id: int, progress=None):
    """Prompts sorted by length into batches of `batch_size` (less padding): (indices, tokens,
    valid, active) per batch, left-padded to a length bucket and with idle rows to a full batch
    (so a few programs are compiled, not one per batch). progress(n_done) after each batch."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        rows = [list(prompts[i]) for i in idx]
        tokens, valid = _left_pad(rows, bucket(max(len(r) for r in rows)), batch_size, pad_id)
        active = np.zeros((batch_size,), bool)
        active[:len(rows)] = True
        yield idx, tokens, valid, active
        if progress is not None:
            progress(start + len(idx))


def _until_end(tokens: Sequence[int], end: set) -> list[int]:
    """The tokens before the first end token."""
    tokens = list(tokens)
    return tokens[:next((j for j, t in enumerate(tokens) if t in end), len(tokens))]


def _prefill(model, prompt, valid, cache_len):
    """Prefill a left-padded batch: (last-token logits [B, V], cache, lengths [B])."""
    B, P = prompt.shape
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)
    lengths = jnp.sum(valid, axis=1).astype(jnp.int32)
    cache = model.init_cache(B, cache_len)
    logits, cache = model.decode(prompt, positions, cache, valid=valid,
                                 last=jnp.full((B,), P - 1, jnp.int32))
    return logits, cache, lengths


def _free_loop(model, logits, cache, lengths, active, eos_ids, pad_id, max_new_tokens: int):
    """Greedy tokens [B, max_new_tokens] after a prefill (pad after each row's end token)."""
    B = logits.shape[0]
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


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def _greedy_batch(graphdef, state, prompt, valid, active, eos_ids, pad_id, max_new_tokens: int):
    model = nnx.merge(graphdef, state)
    logits, cache, lengths = _prefill(model, prompt, valid, prompt.shape[1] + max_new_tokens)
    return _free_loop(model, logits, cache, lengths, active, eos_ids, pad_id, max_new_tokens)


def greedy_generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                    eos_ids: Sequence[int], pad_id: int, batch_size: int,
                    progress=None) -> list[list[int]]:
    """Greedy continuations of token-id prompts, in input order.

    Each result holds the generated ids up to (not including) the first end token, at most
    max_new_tokens. Prompts are sorted by length into batches of `batch_size` (less padding), each
    batch left-padded to a length bucket. `progress(n_done)` is called after each batch."""
    if max_new_tokens <= 0 or not prompts:
        return [[] for _ in prompts]
    graphdef, state = nnx.split(model)
    eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
    end = set(int(e) for e in eos_ids)
    results: list[list[int]] = [[] for _ in prompts]
    for idx, tokens, valid, active in _batches(prompts, batch_size, pad_id, progress):
        out = np.asarray(_greedy_batch(graphdef, state, tokens, valid, active, eos, jnp.int32(pad_id),
                                       max_new_tokens))
        for k, i in enumerate(idx):
            results[i] = _until_end(out[k].tolist(), end)
    return results


# --- decoding within a label set (classification) ---------------------------------------------

@dataclass(frozen=True)
class LabelTrie:
    """The labels' token ids as a prefix trie, in arrays a jitted decoder can index: node n's k-th
    child is reached by token tokens[n, k] (-1: no k-th child) and is node nodes[n, k]; label[n] is
    the label whose last token leads to node n (-1: none). Node 0 is the root. Labels that share a
    prefix share its nodes; labels end with the end token as training saw them, so none is a
    prefix of another (if one were, decoding stops at the shorter)."""
    tokens: np.ndarray      # [N, K] int32
    nodes: np.ndarray       # [N, K] int32
    label: np.ndarray       # [N] int32
    depth: int              # tokens of the longest label

    @classmethod
    def build(cls, label_ids: Sequence[Sequence[int]]) -> "LabelTrie":
        children: list[dict[int, int]] = [{}]
        label = [-1]
        for j, ids in enumerate(label_ids):
            if not len(ids):
                raise ValueError(f"label {j} has no tokens")
            n = 0
            for t in ids:
                if int(t) not in children[n]:
                    children[n][int(t)] = len(children)
                    children.append({})
                    label.append(-1)
                n = children[n][int(t)]
            if label[n] < 0:                 # the same tokens twice: the first label keeps them
                label[n] = j
        width = max(len(c) for c in children)
        tokens = np.full((len(children), width), -1, np.int32)
        nodes = np.zeros((len(children), width), np.int32)
        for n, c in enumerate(children):
            tokens[n, :len(c)] = list(c)
            nodes[n, :len(c)] = list(c.values())
        return cls(tokens, nodes, np.asarray(label, np.int32), max(len(x) for x in label_ids))


def _trie_loop(model, logits, cache, lengths, trie_tokens, trie_nodes, trie_label, pad_id, depth: int):
    """Greedy decoding within the trie after a prefill: at each step the likeliest token among the
    current node's children. Returns the label index of each row."""
    B = logits.shape[0]
    rows = jnp.arange(B)

    def body(i, carry):
        node, logits, cache = carry
        done = trie_label[node] >= 0
        child = trie_tokens[node]                                         # [B, K]
        score = jnp.where(child >= 0, jnp.take_along_axis(logits, jnp.maximum(child, 0), axis=-1),
                          -jnp.inf)
        k = jnp.argmax(score, axis=-1)
        token = jnp.where(done, pad_id, child[rows, k])
        node = jnp.where(done, node, trie_nodes[node, k])
        logits, cache = model.decode(token[:, None], (lengths + i)[:, None], cache)
        return node, logits[:, 0], cache

    node, _, _ = jax.lax.fori_loop(0, depth, body, (jnp.zeros((B,), jnp.int32), logits, cache))
    return trie_label[node]


@partial(jax.jit, static_argnames=("graphdef", "depth", "free_tokens"))
def _classify_batch(graphdef, state, prompt, valid, active, trie_tokens, trie_nodes, trie_label,
                    eos_ids, pad_id, depth: int, free_tokens: int):
    """One prefill; from it the constrained label and (free_tokens > 0) the free greedy answer."""
    model = nnx.merge(graphdef, state)
    logits, cache, lengths = _prefill(model, prompt, valid,
                                      prompt.shape[1] + max(depth, free_tokens))
    labels = _trie_loop(model, logits, cache, lengths, trie_tokens, trie_nodes, trie_label, pad_id,
                        depth)
    if not free_tokens:
        return labels, jnp.zeros((prompt.shape[0], 0), jnp.int32)
    return labels, _free_loop(model, logits, cache, lengths, active, eos_ids, pad_id, free_tokens)


def classify(model, prompts: Sequence[Sequence[int]], trie: LabelTrie, *, batch_size: int,
             pad_id: int, eos_ids: Sequence[int], free_tokens: int = 0, progress=None
             ) -> tuple[list[int], list[list[int]] | None]:
    """Decode each prompt's answer within the label set: (label index per prompt, and with
    free_tokens > 0 the free greedy answer's tokens up to its end token, from the same prefill —
    so nothing is hidden: how often free generation lands on a label is measured beside it)."""
    if not prompts:
        return [], ([] if free_tokens else None)
    graphdef, state = nnx.split(model)
    eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
    end = set(int(e) for e in eos_ids)
    labels: list[int] = [0] * len(prompts)
    free: list[list[int]] = [[] for _ in prompts]
    for idx, tokens, valid, active in _batches(prompts, batch_size, pad_id, progress):
        lab, out = _classify_batch(graphdef, state, tokens, valid, active, trie.tokens, trie.nodes,
                                   trie.label, eos, jnp.int32(pad_id), trie.depth, free_tokens)
        lab, out = np.asarray(lab), np.asarray(out)
        for k, i in enumerate(idx):
            labels[i] = int(lab[k])
            free[i] = _until_end(out[k].tolist(), end)
    return labels, (free if free_tokens else None)


# --- sampling -----------------------------------------------------------------------------------

def nucleus_logits(logits, temperature, top_p):
    """The logits a sampler draws from: [B, V] scaled by 1/temperature [B], with every token outside
    the nucleus (the fewest likeliest tokens whose probabilities reach top_p [B]) set to -inf —
    what transformers' TemperatureLogitsWarper then TopPLogitsWarper compute. The likeliest token
    is always kept. Rows with temperature 0 are left for the caller's greedy choice."""
    logits = logits.astype(jnp.float32)
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    ordered = -jnp.sort(-scaled, axis=-1)                               # descending
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs                         # mass of the likelier ones
    kept = jnp.maximum(jnp.sum(before < top_p[:, None], axis=-1), 1)
    cutoff = jnp.take_along_axis(ordered, (kept - 1)[:, None], axis=-1)
    return jnp.where(scaled >= cutoff, scaled, -jnp.inf)


def sample(logits, temperature, top_p, keys, step):
    """One token per row [B] from logits [B, V]: greedy where temperature is 0, else drawn from
    nucleus_logits with the row's own key [B, 2] folded with the step — a row's draws depend on its
    seed and step only, not on the other rows of its batch."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if temperature is None:
        return greedy
    masked = nucleus_logits(logits, temperature, top_p)
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
    drawn = jax.vmap(jax.random.categorical)(step_keys, masked).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)


@dataclass(frozen=True)
class Sampling:
    """How each answer's tokens are chosen: temperature 0 is greedy (the default everywhere)."""
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None          # None: a fresh seed per answer

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = Sampling()


def _row_keys(sampling: Sequence[Sampling]) -> np.ndarray:
    """[B, 2] uint32 PRNG keys, one per row: from its seed, or fresh entropy."""
    import secrets

    seeds = [s.seed if s.seed is not None else secrets.randbits(32) for s in sampling]
    return np.stack([np.asarray(jax.random.key_data(jax.random.key(x))) for x in seeds]).astype(np.uint32)


# --- streaming answers (tune generate, tune serve) ---------------------------------------------

@partial(jax.jit, static_argnames=("graphdef", "cache_len", "sampled"))
def _prefill_next(graphdef, state, prompt, valid, temperature, top_p, keys, cache_len: int,
                  sampled: bool):
    model = nnx.merge(graphdef, state)
    logits, cache, lengths = _prefill(model, prompt, valid, cache_len)
    token = sample(logits, temperature if sampled else None, top_p, keys, 0)
    return token, cache, lengths


@partial(jax.jit, static_argnames=("graphdef", "sampled"), donate_argnames=("cache",))
def _step_next(graphdef, state, token, position, cache, temperature, top_p, keys, step,
               sampled: bool):
    model = nnx.merge(graphdef, state)
    logits, cache = model.decode(token[:, None], position[:, None], cache)
    return sample(logits[:, 0], temperature if sampled else None, top_p, keys, step), cache


def batch_bucket(n: int) -> int:
    """The static batch a number of rows is padded to: 1, 2, 4, 8, ... (a few programs)."""
    return 1 << max(0, (n - 1).bit_length())


def stream_batch(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 sampling: Sequence[Sampling] | None = None, pad_id: int,
                 split=None) -> Iterator[np.ndarray]:
    """Decode several prompts together, one step at a time: yields each step's tokens [len(prompts)]
    (int32), max_new_tokens steps at most. The caller decides when a row is done (an end token, a
    stop string, its own token limit) and stops iterating once every row is: nothing here ends a
    row. One left-padded prefill, then one jitted single-token step per token over the shared KV
    cache; rows are padded to a batch of 1, 2, 4, 8, ... and the prompt to a length bucket, so a
    server meets a few compiled shapes. `split`: (graphdef, state) already split from the model
    (several runs' adapters over one base share the base's arrays)."""
    if max_new_tokens <= 0 or not prompts:
        return
    graphdef, state = split if split is not None else nnx.split(model)
    sampling = list(sampling) if sampling is not None else [GREEDY] * len(prompts)
    n, B = len(prompts), batch_bucket(len(prompts))
    padded = sampling + [GREEDY] * (B - n)
    sampled = not all(s.greedy for s in sampling)
    temperature = np.asarray([s.temperature for s in padded], np.float32)
    top_p = np.asarray([s.top_p for s in padded], np.float32)
    keys = _row_keys(padded) if sampled else np.zeros((B, 2), np.uint32)
    P = bucket(max(len(p) for p in prompts))
    tokens, valid = _left_pad([list(p) for p in prompts], P, B, pad_id)
    token, cache, lengths = _prefill_next(graphdef, state, tokens, valid, temperature, top_p, keys,
                                          bucket(P + max_new_tokens), sampled)
    for i in range(max_new_tokens):
        yield np.asarray(token)[:n]
        if i + 1 < max_new_tokens:
            token, cache = _step_next(graphdef, state, token, lengths + i, cache, temperature,
                                      top_p, keys, jnp.int32(i + 1), sampled)


def stream_tokens(model, prompt: Sequence[int], *, max_new_tokens: int, eos_ids: Sequence[int],
                  pad_id: int, sampling: Sampling = GREEDY) -> Iterator[int]:
    """Yield the answer to one prompt token by token until an end token (not yielded) or
    max_new_tokens. Greedy by default: the same tokens as greedy_generate."""
    end = set(int(e) for e in eos_ids)
    for step in stream_batch(model, [prompt], max_new_tokens=max_new_tokens, sampling=[sampling],
                             pad_id=pad_id):
        t = int(step[0])
        if t in end:
            return
        yield t


# --- a running batch that takes new rows (tune serve) -----------------------------------------

def sample_rows(logits, temperature, top_p, keys, steps, sampled: bool = True):
    """sample() with each row at its own step [B] (rows that joined a running batch later);
    sampled=False: every row is greedy (no sort over the vocabulary)."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if not sampled:
        return greedy
    masked = nucleus_logits(logits, temperature, top_p)
    step_keys = jax.vmap(jax.random.fold_in)(keys, steps)
    drawn = jax.vmap(jax.random.categorical)(step_keys, masked).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)


@partial(jax.jit, static_argnames=("graphdef", "sampled"), donate_argnames=("cache",))
def _join(graphdef, state, cache, slot, prompt, valid, temperature, top_p, key, sampled: bool):
    """Prefill one prompt [1, P] (left-padded) into row `slot` of a running cache so that it ends
    just before the batch's next slot: the row's old keys and values are marked invalid, its prompt
    is written to the P slots before cache.index, and its first token is sampled (step 0)."""
    model = nnx.merge(graphdef, state)
    P, S = prompt.shape[1], cache.k.shape[2]
    row = model.init_cache(1, S)._replace(index=cache.index - P)
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)
    logits, row = model.decode(prompt, positions, row, valid=valid,
                               last=jnp.full((1,), P - 1, jnp.int32))
    cache = cache._replace(k=cache.k.at[:, slot].set(row.k[:, 0]),
                           v=cache.v.at[:, slot].set(row.v[:, 0]),
                           positions=cache.positions.at[slot].set(row.positions[0]),
                           valid=cache.valid.at[slot].set(row.valid[0]))
    token = sample_rows(logits, temperature[None], top_p[None], key[None],
                        jnp.zeros((1,), jnp.int32), sampled)[0]
    return token, cache, jnp.sum(valid).astype(jnp.int32)


@partial(jax.jit, static_argnames=("graphdef", "sampled"), donate_argnames=("cache",))
def _step_rows(graphdef, state, token, position, cache, temperature, top_p, keys, steps,
               sampled: bool):
    model = nnx.merge(graphdef, state)
    logits, cache = model.decode(token[:, None], position[:, None], cache)
    return sample_rows(logits[:, 0], temperature, top_p, keys, steps, sampled), cache


@partial(jax.jit, static_argnames=("rows",))
def _widen(cache, rows: int):
    """The cache with `rows` rows (the new ones empty: nothing valid)."""
    extra = rows - cache.positions.shape[0]
    pad = lambda x, axis: jnp.pad(x, [(0, extra) if a == axis else (0, 0) for a in range(x.ndim)])
    return cache._replace(k=pad(cache.k, 1), v=pad(cache.v, 1), positions=pad(cache.positions, 0),
                          valid=pad(cache.valid, 0))


class RunningBatch:
    """Rows decoded together over one KV cache, where a new row can join while others run
    (continuous batching): when a row is done its slot takes a new prompt, prefilled into that row
    alone so that it ends where the batch writes next; the batch widens (1, 2, 4, ... rows) when
    more rows wait than slots are free. All rows write the same cache slot per step, so a prompt
    can join once the batch has written at least its (bucketed) length, and only if its token
    budget fits in the slots left. Each row samples with its own key at its own step: a row's
    tokens are the same whether it started the batch or joined it later."""

    def __init__(self, split, *, cache_len: int, pad_id: int, max_rows: int):
        self.graphdef, self.state = split
        self.cache_len, self.pad_id, self.max_rows = cache_len, pad_id, max_rows
        self.cache = None
        self.rows = 0

    def start(self, prompts: Sequence[Sequence[int]], sampling: Sequence[Sampling]) -> np.ndarray:
        """Prefill the first rows together; their first tokens [len(prompts)]."""
        n = len(prompts)
        self.rows = min(batch_bucket(n), max(self.max_rows, n))
        padded = list(sampling) + [GREEDY] * (self.rows - n)
        self._set_sampling(padded)
        P = bucket(max(len(p) for p in prompts))
        tokens, valid = _left_pad([list(p) for p in prompts], P, self.rows, self.pad_id)
        token, self.cache, lengths = _prefill_next(
            self.graphdef, self.state, tokens, valid, self.temperature, self.top_p, self.keys,
            self.cache_len, self.sampled)
        self.token, self.lengths = np.array(token), np.array(lengths)
        self.steps = np.zeros((self.rows,), np.int32)
        self.index = P
        return self.token[:n].copy()

    def _set_sampling(self, sampling):
        self.temperature = np.asarray([s.temperature for s in sampling], np.float32)
        self.top_p = np.asarray([s.top_p for s in sampling], np.float32)
        self.keys = _row_keys(sampling)

    def fits(self, prompt_len: int, max_new_tokens: int) -> bool:
        """Whether a prompt can join now and still have room for its tokens."""
        return bucket(prompt_len) <= self.index and self.index + max_new_tokens <= self.cache_len

    def widen(self, rows: int) -> None:
        rows = min(batch_bucket(rows), self.max_rows)
        if rows <= self.rows:
            return
        extra = rows - self.rows
        self.cache = _widen(self.cache, rows)
        self.token = np.concatenate([self.token, np.full((extra,), self.pad_id, np.int32)])
        self.lengths = np.concatenate([self.lengths, np.zeros((extra,), np.int32)])
        self.steps = np.concatenate([self.steps, np.zeros((extra,), np.int32)])
        self.temperature = np.concatenate([self.temperature, np.zeros((extra,), np.float32)])
        self.top_p = np.concatenate([self.top_p, np.ones((extra,), np.float32)])
        self.keys = np.concatenate([self.keys, np.zeros((extra, 2), np.uint32)])
        self.rows = rows

    def join(self, slot: int, prompt: Sequence[int], sampling: Sampling) -> int:
        """Put a prompt in row `slot` (free: its old row is done); its first token."""
        P = bucket(len(prompt))
        tokens, valid = _left_pad([list(prompt)], P, 1, self.pad_id)
        self.temperature[slot], self.top_p[slot] = sampling.temperature, sampling.top_p
        self.keys[slot] = _row_keys([sampling])[0]
        token, self.cache, length = _join(self.graphdef, self.state, self.cache, jnp.int32(slot),
                                          tokens, valid, self.temperature[slot],
                                          self.top_p[slot], self.keys[slot], not sampling.greedy)
        self.token[slot], self.lengths[slot], self.steps[slot] = int(token), int(length), 0
        return int(token)

    def step(self) -> np.ndarray:
        """One token for every row [rows] (rows that are done or empty compute and are ignored)."""
        self.steps = self.steps + 1
        token, self.cache = _step_rows(self.graphdef, self.state, self.token,
                                       self.lengths + self.steps - 1, self.cache,
                                       self.temperature, self.top_p, self.keys, self.steps,
                                       self.sampled)
        self.token = np.array(token)
        self.index += 1
        return self.token.copy()

    def release(self, slot: int) -> None:
        """Row `slot` is done: it computes greedily (and costs no sampling) until a prompt joins."""
        self.temperature[slot] = 0.0

    @property
    def sampled(self) -> bool:
        """Whether any row samples (else every step is a plain argmax)."""
        return bool((self.temperature > 0).any())

    @property
    def full(self) -> bool:
        return self.index >= self.cache_len


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
                    *, batch_size: int, pad_id: int, progress=None) -> np.ndarray:
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
    scores = np.zeros((len(prompt_ids), K), np.float32)
    for idx, tokens, valid, _ in _batches(prompt_ids, batch_size, pad_id, progress):
        out = np.asarray(_choice_batch(graphdef, state, tokens, valid, choices, cvalid))
        scores[idx] = out[:len(idx)]
    return scores
