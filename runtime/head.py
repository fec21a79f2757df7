"""The classification head (adapter.head=classifier): a linear layer without bias, [labels,
hidden], over the final (normed) hidden state of each example's last prompt token — the token right
before its answer's first token — one logit per label of the plan's label set, in
`plan.data.labels` order.

- Training (runtime/train.py, runtime/loss.head_cross_entropy): the batch's `head_label` marks each
  example's last prompt token with its label (the token cache's classes, compiler/examples.py);
  the head's cross-entropy there replaces the answer tokens' loss. The model's `score` variable holds the
  layer (runtime/model.py); it is trained, checkpointed and saved with the adapter.
- Scoring (`predict`): one forward pass per prompt, no decoding; the answer is the argmax. When
  every prompt starts with the same tokens (the system prompt, the template's opening), they are
  computed once and the rest of each prompt is packed with others in rows.
- Export: PEFT's modules_to_save `score` with task_type SEQ_CLS (runtime/peft.py), and
  labels.json beside the adapter: the label names (id2label, label2id) and the padding token, the
  keyword arguments `AutoModelForSequenceClassification.from_pretrained(base, **labels)` takes.
  LlamaForSequenceClassification reads the last token that is not padding: give it the prompt as
  training saw it (template and chat template applied), unpadded or padded with pad_token_id.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from core.errors import PlanError
from core.files import write_atomic
from core.packing import PALLAS_BLOCK, pack_rows
from core.prompting import packs_after, shared_prefix

LABELS_FILE = "labels.json"


# ------------------------------------------------------------------------------ scoring

@partial(jax.jit, static_argnames=("graphdef",))
def _head_batch(graphdef, state, tokens):
    """The head's logits [B, T, n] at every position of right-padded rows tokens [B, T] (plain
    causal attention is exact for every real token: padding comes after)."""
    model = nnx.merge(graphdef, state)
    return model.head_logits(model(tokens))


@partial(jax.jit, static_argnames=("graphdef",))
def _prefix_cache(graphdef, state, prefix):
    """The KV cache [L, 1, P, ...] of one row of prompt tokens prefix [1, P]."""
    model = nnx.merge(graphdef, state)
    P = prefix.shape[1]
    _, cache = model.decode(prefix, jnp.arange(P, dtype=jnp.int32)[None], model.init_cache(1, P),
                            last=jnp.zeros((1,), jnp.int32), head=True)
    return cache


@partial(jax.jit, static_argnames=("graphdef",))
def _head_rows(graphdef, state, prefix, tokens, positions, segment_ids):
    """The head's logits [B, T, n] at every position of rows packed with prompts (segment_ids
    [B, T]: 1, 2, ... per prompt, 0 for padding; positions: each token's, counting the shared
    prefix) that all continue the prefix in `prefix` (its cache, _prefix_cache): a token attends
    to the prefix and to its own prompt's earlier tokens."""
    from runtime.model import Cache

    model = nnx.merge(graphdef, state)
    B, T = tokens.shape
    L, _, P, K, H = prefix.k.shape

    def grow(x):        # [L, 1, P, K, H] → [L, B, P + T, K, H]: the prefix in each row, then room
        return jnp.concatenate([jnp.broadcast_to(x, (L, B, P, K, H)),
                                jnp.zeros((L, B, T, K, H), x.dtype)], axis=2)

    def wide(x, fill):  # [1, P] → [B, P + T]
        return jnp.concatenate([jnp.broadcast_to(x, (B, P)), jnp.full((B, T), fill, x.dtype)], 1)

    cache = Cache(k=grow(prefix.k), v=grow(prefix.v), positions=wide(prefix.positions, 0),
                  valid=wide(prefix.valid, False), index=jnp.int32(P))
    logits, _ = model.decode(tokens, positions, cache, valid=segment_ids > 0, head=True,
                             segment_ids=segment_ids)
    return logits


def predict(model, prompts: Sequence[Sequence[int]], *, batch_size: int, pad_id: int,
            progress=None) -> np.ndarray:
    """The head's float32 logits [N, labels] of token-id prompts, with no decoding, at most
    `batch_size` rows at a time. When every prompt starts with the same tokens (shared_prefix, at
    least SHARED_MIN: a recipe's system prompt and its template's opening), they are computed
    once and the rest of each prompt is packed with others into rows as long as the longest one's
    length bucket (best fit), each prompt attending to the shared tokens and to its own (one
    compiled program) — when that bucket is at most PACK_MAX (packs_after). Otherwise each prompt
    is a row, sorted by length and right-padded to a length bucket (a few compiled programs). A
    prompt's logits are read at its last token.
    progress(n_done) after each call, counting prompts."""
    if model.score is None:
        raise ValueError("the model has no classification head (adapter.head=classifier)")
    out = np.zeros((len(prompts), model.score.shape[0]), np.float32)
    if not len(prompts):
        return out
    if min(len(p) for p in prompts) == 0:
        raise ValueError("an empty prompt: the head reads each prompt's last token")
    from runtime.decode import bucket

    graphdef, state = nnx.split(model)
    shared = shared_prefix(prompts)
    if packs_after(prompts, shared, bucket):
        calls = _packed_after(graphdef, state, prompts, shared, batch_size, pad_id)
    else:
        calls = _padded(model, graphdef, state, prompts, batch_size, pad_id)
    done = 0
    for logits, read in calls:
        logits = np.asarray(logits)
        for i, r, col in read:
            out[i] = logits[r, col]
        done += len(read)
        if progress is not None:
            progress(done)
    return out


def _padded(model, graphdef, state, prompts, batch_size: int, pad_id: int):
    """(logits [B, T, n], [(prompt, row, last column)]) per batch of prompts, a prompt a row."""
    from runtime.decode import bucket

    # the pallas kernel takes rows of whole blocks
    multiple = PALLAS_BLOCK if model.compute.attention == "pallas" else 1
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        length = -(-bucket(max(len(prompts[i]) for i in idx)) // multiple) * multiple
        tokens = np.full((batch_size, length), pad_id, np.int32)
        for k, i in enumerate(idx):
            tokens[k, :len(prompts[i])] = prompts[i]
        yield _head_batch(graphdef, state, tokens), [(i, k, len(prompts[i]) - 1)
                                                     for k, i in enumerate(idx)]


def _packed_after(graphdef, state, prompts, shared: int, batch_size: int, pad_id: int):
    """(logits [B, T, n], [(prompt, row, last column)]) per call of rows packed with the prompts'
    own tokens, after their shared `shared` first tokens computed once."""
    from runtime.decode import bucket

    prefix = _prefix_cache(graphdef, state, jnp.asarray([list(prompts[0][:shared])], jnp.int32))
    own = [list(p[shared:]) for p in prompts]
    T = bucket(max(len(x) for x in own))
    rows = sorted(pack_rows([len(x) for x in own], T, np.random.default_rng(0)), key=min)
    # as few calls as batch_size allows, the rows spread evenly over them: idle rows only to
    # even out the last call
    calls = -(-len(rows) // batch_size)
    per = -(-len(rows) // calls)
    for start in range(0, len(rows), per):
        tokens = np.full((per, T), pad_id, np.int32)
        positions = np.zeros((per, T), np.int32)
        segments = np.zeros((per, T), np.int32)
        read = []
        for r, members in enumerate(rows[start:start + per]):
            at = 0
            for seg, i in enumerate(members, start=1):
                n = len(own[i])
                tokens[r, at:at + n] = own[i]
                positions[r, at:at + n] = shared + np.arange(n)
                segments[r, at:at + n] = seg
                read.append((i, r, at + n - 1))
                at += n
        yield _head_rows(graphdef, state, prefix, tokens, positions, segments), read


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Softmax over the labels (float64, each row sums to 1)."""
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


# ------------------------------------------------------------------------------ labels.json

def labels_config(labels: Sequence[str], pad_token_id: int | None) -> dict:
    """labels.json: what a sequence-classification model of transformers needs to name its
    outputs (id2label, label2id) and to find each row's last token (pad_token_id)."""
    return {"id2label": {str(i): t for i, t in enumerate(labels)},
            "label2id": {t: i for i, t in enumerate(labels)}, "pad_token_id": pad_token_id}


def write_labels(out_dir, labels: Sequence[str], pad_token_id: int | None) -> Path:
    return write_atomic(Path(out_dir) / LABELS_FILE,
                        json.dumps(labels_config(labels, pad_token_id), indent=2,
                                   ensure_ascii=False) + "\n")


def read_labels(adapter_dir, *, key: str = "run") -> list[str] | None:
    """The label names of an adapter's head, in row order (labels.json), or None when there is no
    labels.json. PlanError(key) naming the file when it is unreadable."""
    path = Path(adapter_dir) / LABELS_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        names = doc["id2label"]
        labels = [names[str(i)] for i in range(len(names))]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise PlanError(key, f"{LABELS_FILE} is not a label list tune wrote ({type(e).__name__}: "
                        f"{e}).", file=str(path),
                        hint="the adapter is damaged: train the run again, or copy its adapter/ "
                             "folder again from where it was trained.") from None
    if not all(isinstance(t, str) for t in labels):
        raise PlanError(key, f"{LABELS_FILE}'s id2label must map each index to a label's text.",
                        file=str(path), hint="train the run again.")
    return labels


def check_labels(adapter_dir, labels: Sequence[str], *, key: str = "run") -> None:
    """Refuse a head whose labels (its labels.json) are not the plan's label set, in order: its
    rows would be read as other labels."""
    have = read_labels(adapter_dir, key=key)
    if have is not None and list(have) != list(labels):
        raise PlanError(key, f"the adapter's head scores the labels {have[:5]}"
                        f"{' …' if len(have) > 5 else ''} ({len(have)}), but this plan's label "
                        f"set is {list(labels)[:5]}{' …' if len(labels) > 5 else ''} "
                        f"({len(labels)}).", file=str(Path(adapter_dir) / LABELS_FILE),
                        hint="score the run with the training data it was trained on (its own "
                             "config: leave data.path as the run had it).")
