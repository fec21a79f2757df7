"""The classification head (adapter.head=classifier): a linear layer without bias, [labels,
hidden], over the final (normed) hidden state of each example's last prompt token — the token right
before its answer's first token — one logit per label of the plan's label set, in
`plan.data.labels` order.

- Training (runtime/train.py, runtime/loss.head_cross_entropy): the batch's `head_label` marks each
  example's last prompt token with its label (the token cache's classes, compiler/examples.py);
  the head's cross-entropy there replaces the answer tokens' loss. The model's `score` variable holds the
  layer (runtime/model.py); it is trained, checkpointed and saved with the adapter.
- Scoring (`predict`): one forward pass per prompt, no decoding; the answer is the argmax.
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
from core.packing import PALLAS_BLOCK

LABELS_FILE = "labels.json"


# ------------------------------------------------------------------------------ scoring

@partial(jax.jit, static_argnames=("graphdef",))
def _head_batch(graphdef, state, tokens, last):
    """tokens [B, T] right-padded, last [B] (each row's last prompt token) → logits [B, n]."""
    model = nnx.merge(graphdef, state)
    # right padding: plain causal attention is exact for every real token, padding comes after
    hidden = model(tokens)
    return model.head_logits(jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0])


def predict(model, prompts: Sequence[Sequence[int]], *, batch_size: int, pad_id: int,
            progress=None) -> np.ndarray:
    """The head's float32 logits [N, labels] of token-id prompts: one forward pass per prompt,
    `batch_size` prompts at a time (sorted by length, right-padded to a length bucket, the last
    batch filled with idle rows: a few compiled programs, not one per batch). progress(n_done)
    after each batch."""
    from runtime.decode import bucket

    if model.score is None:
        raise ValueError("the model has no classification head (adapter.head=classifier)")
    graphdef, state = nnx.split(model)
    out = np.zeros((len(prompts), model.score.shape[0]), np.float32)
    # the pallas kernel takes rows of whole blocks
    multiple = PALLAS_BLOCK if model.compute.attention == "pallas" else 1
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        length = -(-bucket(max(len(prompts[i]) for i in idx)) // multiple) * multiple
        tokens = np.full((batch_size, length), pad_id, np.int32)
        last = np.zeros((batch_size,), np.int32)
        for k, i in enumerate(idx):
            tokens[k, :len(prompts[i])] = prompts[i]
            last[k] = max(len(prompts[i]) - 1, 0)
        out[idx] = np.asarray(_head_batch(graphdef, state, tokens, last))[:len(idx)]
        if progress is not None:
            progress(start + len(idx))
    return out


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
