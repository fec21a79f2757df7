"""Greedy decoding with the KV cache, and label scoring, on a tiny random Llama."""
import numpy as np
import pytest

from runtime.decode import (bucket, choice_logprobs, end_token_ids, greedy_generate, stream_tokens)


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    from runtime.weights import load_pretrained

    return load_pretrained(tiny_llama_dir)


PROMPTS = [[1, 5, 9, 33, 60, 7], [1, 80], [1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 40],
           [1, 42, 42, 42], [1, 70, 71]]


WIDTH = 32
NO_END = {"eos_ids": (), "pad_id": 0}     # decode to the token limit, padding with id 0


@pytest.fixture(scope="module")
def full_logits(tiny):
    """Log-probabilities [WIDTH, V] of a full causal forward pass without any cache. The sequence is
    right-padded to a fixed width (one compile): causal attention makes the padding invisible to
    the positions before it."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(tiny)

    @jax.jit
    def fwd(state, tokens):
        model = nnx.merge(graphdef, state)
        return jax.nn.log_softmax(model.logits(model(tokens)), axis=-1)[0]

    def run(ids):
        assert len(ids) <= WIDTH
        return np.asarray(fwd(state, jnp.asarray([list(ids) + [0] * (WIDTH - len(ids))], jnp.int32)))

    return run


def _greedy_without_cache(full_logits, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(np.argmax(full_logits(ids)[len(ids) - 1])))
    return ids[len(prompt):]


def test_bucket():
    assert [bucket(n) for n in (1, 16, 17, 25, 33, 49, 65, 200)] == [16, 16, 24, 32, 48, 64, 96, 256]


def test_cached_greedy_equals_full_recomputation(tiny, full_logits):
    # batch of 3 with 5 prompts: two batches, the second padded with idle rows
    out = greedy_generate(tiny, PROMPTS, max_new_tokens=7, batch_size=3, **NO_END)
    for prompt, got in zip(PROMPTS, out):
        assert got == _greedy_without_cache(full_logits, prompt, 7)


def test_end_tokens_stop_rows(tiny):
    free = greedy_generate(tiny, PROMPTS, max_new_tokens=6, batch_size=8, **NO_END)
    # make each row's 3rd generated token an end token: that row stops before it
    eos = sorted({row[2] for row in free})
    out = greedy_generate(tiny, PROMPTS, max_new_tokens=6, eos_ids=eos, batch_size=8, pad_id=0)
    for row, got in zip(free, out):
        cut = next(i for i, t in enumerate(row) if t in eos)
        assert got == row[:cut]
    assert greedy_generate(tiny, PROMPTS[:2], max_new_tokens=0, batch_size=8, **NO_END) == [[], []]


def test_stream_equals_batch(tiny):
    out = greedy_generate(tiny, PROMPTS[:2], max_new_tokens=5, batch_size=4, **NO_END)
    for prompt, want in zip(PROMPTS[:2], out):
        assert list(stream_tokens(tiny, prompt, max_new_tokens=5, **NO_END)) == want
    first = out[0][0]
    assert list(stream_tokens(tiny, PROMPTS[0], max_new_tokens=5, eos_ids=[first], pad_id=0)) == []


def test_matches_transformers_generate(tiny, tiny_llama_dir):
    import torch
    from transformers import LlamaForCausalLM

    ref = LlamaForCausalLM.from_pretrained(tiny_llama_dir, torch_dtype=torch.float32).eval()
    ours = greedy_generate(tiny, PROMPTS, max_new_tokens=8, eos_ids=[2], batch_size=4, pad_id=0)
    for prompt, got in zip(PROMPTS, ours):
        with torch.no_grad():
            gen = ref.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                               eos_token_id=2, pad_token_id=0)
        want = gen[0, len(prompt):].tolist()
        want = want[:want.index(2)] if 2 in want else want
        assert got == want


def test_choice_logprobs_equal_full_forward(tiny, full_logits):
    choices = [[5, 2], [7, 8, 9, 2], [60]]
    scores = choice_logprobs(tiny, PROMPTS, choices, batch_size=2, pad_id=0)
    assert scores.shape == (len(PROMPTS), len(choices))
    for i, prompt in enumerate(PROMPTS):
        for k, choice in enumerate(choices):
            lp = full_logits(prompt + choice)
            want = sum(float(lp[len(prompt) - 1 + j, t]) for j, t in enumerate(choice))
            assert scores[i, k] == pytest.approx(want, abs=1e-4)
    with pytest.raises(ValueError):
        choice_logprobs(tiny, PROMPTS, [[]], batch_size=8, pad_id=0)


def test_end_token_ids():
    class Tok:
        def token_to_id(self, t):
            return {"<|im_end|>": 7, "<|endoftext|>": 0}.get(t)

    assert end_token_ids((2, 5), Tok()) == (2, 5, 7, 0)
    assert end_token_ids((2,)) == (2,)


# --- decoding within a label set ---------------------------------------------------------------

LABELS = [[20, 21, 2], [20, 22, 2], [20, 22, 23, 2], [30, 2], [31], [44, 45, 46, 47, 2]]


def test_label_trie_shares_prefixes():
    from runtime.decode import LabelTrie

    t = LabelTrie.build(LABELS)
    assert t.depth == 5
    root = {int(tok): int(node) for tok, node in zip(t.tokens[0], t.nodes[0]) if tok >= 0}
    assert set(root) == {20, 30, 31, 44}                     # 20 is shared by three labels
    after20 = {int(tok) for tok in t.tokens[root[20]] if tok >= 0}
    assert after20 == {21, 22}
    assert t.label[root[31]] == 4                            # a one-token label ends at once
    assert sorted(int(x) for x in t.label if x >= 0) == list(range(len(LABELS)))
    with pytest.raises(ValueError):
        LabelTrie.build([[5], []])


def _constrained_without_cache(full_logits, prompt, labels):
    """Brute force: at each step the full forward pass over prompt + answer so far, and the
    likeliest token among those that continue some label."""
    answer = []
    while True:
        done = [k for k, lab in enumerate(labels) if lab == answer]
        if done:
            return done[0]
        allowed = {lab[len(answer)] for lab in labels
                   if len(lab) > len(answer) and lab[:len(answer)] == answer}
        lp = full_logits(prompt + answer)[len(prompt) + len(answer) - 1]
        answer.append(max(allowed, key=lambda t: lp[t]))


def test_constrained_decoding_equals_brute_force(tiny, full_logits):
    from runtime.decode import LabelTrie, classify

    picked, free = classify(tiny, PROMPTS, LabelTrie.build(LABELS), batch_size=2, free_tokens=6,
                            eos_ids=[2], pad_id=0)
    assert picked == [_constrained_without_cache(full_logits, p, LABELS) for p in PROMPTS]
    # the free answers from the same prefill are plain greedy decoding
    assert free == greedy_generate(tiny, PROMPTS, max_new_tokens=6, eos_ids=[2], batch_size=3, pad_id=0)
    # every prompt gets a label, even where free decoding says something else entirely
    assert all(0 <= k < len(LABELS) for k in picked)
    only, none = classify(tiny, PROMPTS[:2], LabelTrie.build([[50, 2]]), batch_size=4, **NO_END)
    assert only == [0, 0] and none is None


# --- sampling -----------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature, top_p", [(1.0, 0.9), (0.7, 0.5), (1.3, 1.0), (0.5, 0.05)])
def test_nucleus_equals_transformers_warpers(temperature, top_p):
    import jax.numpy as jnp
    import torch
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    from runtime.decode import nucleus_logits

    logits = np.random.default_rng(0).normal(size=(6, 300)).astype(np.float32) * 3
    ours = np.asarray(nucleus_logits(jnp.asarray(logits), jnp.full((6,), temperature),
                                     jnp.full((6,), top_p)))
    ref = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(
        None, torch.tensor(logits))).numpy()
    assert np.array_equal(np.isfinite(ours), np.isfinite(ref))          # the same nucleus
    kept = np.isfinite(ref)
    np.testing.assert_allclose(ours[kept], ref[kept], rtol=1e-6)


def test_sampling_draws_from_the_nucleus_distribution():
    import jax
    import jax.numpy as jnp

    from runtime.decode import nucleus_logits, sample

    logits = jnp.asarray([[2.0, 1.5, 1.0, 0.0, -1.0, -3.0]])
    n = 20000
    t, p = jnp.full((n,), 0.8), jnp.full((n,), 0.9)
    keys = jax.random.key_data(jax.random.split(jax.random.key(1), n))
    drawn = np.asarray(sample(jnp.broadcast_to(logits, (n, 6)), t, p, keys, 0))
    want = np.asarray(jax.nn.softmax(nucleus_logits(logits, t[:1], p[:1]), axis=-1))[0]
    freq = np.bincount(drawn, minlength=6) / n
    assert want[-1] == 0 and freq[-1] == 0                              # outside the nucleus
    np.testing.assert_allclose(freq, want, atol=0.015)
    greedy = np.asarray(sample(jnp.broadcast_to(logits, (n, 6)), jnp.zeros((n,)), p, keys, 0))
    assert (greedy == 0).all()


def test_stream_batch_greedy_equals_greedy_generate(tiny):
    from runtime.decode import stream_batch

    want = greedy_generate(tiny, PROMPTS[:3], max_new_tokens=6, batch_size=4, **NO_END)
    steps = list(stream_batch(tiny, PROMPTS[:3], max_new_tokens=6, pad_id=0))
    assert [list(map(int, col)) for col in np.stack(steps, axis=1)] == want


def test_seeded_sampling_is_reproducible_and_per_row(tiny):
    from runtime.decode import Sampling, stream_batch

    hot = Sampling(temperature=1.5, top_p=0.95, seed=7)

    def draw(prompts, sampling):
        return np.stack(list(stream_batch(tiny, prompts, max_new_tokens=12, sampling=sampling,
                                          pad_id=0)), axis=1)

    alone = draw([PROMPTS[0]], [hot])[0]
    assert (draw([PROMPTS[0]], [hot])[0] == alone).all()               # same seed, same answer
    # the same row beside another (greedy) row draws the same tokens: its key is its own
    pair = draw([PROMPTS[0], PROMPTS[3]], [hot, Sampling()])
    assert (pair[0] == alone).all()
    assert list(pair[1]) == greedy_generate(tiny, [PROMPTS[3]], max_new_tokens=12, batch_size=1,
                                            **NO_END)[0]
    others = [draw([PROMPTS[0]], [Sampling(1.5, 0.95, seed)])[0] for seed in (8, 9, 10)]
    assert any((o != alone).any() for o in others)                    # other seeds, other draws


def test_rows_joining_a_running_batch_decode_as_alone(tiny):
    """Continuous batching: prompts that join a running batch (into a finished row's slot, or a
    wider batch) get the tokens they get alone — greedy, and seeded sampling — and the rows already
    running are not disturbed."""
    from flax import nnx

    from runtime.decode import RunningBatch, Sampling, stream_batch

    hot = Sampling(temperature=1.3, top_p=0.9, seed=5)
    n = 8

    def alone(prompt, sampling):
        return [int(s[0]) for s in stream_batch(tiny, [prompt], max_new_tokens=n,
                                                sampling=[sampling], pad_id=0)]

    rb = RunningBatch(nnx.split(tiny), cache_len=64, pad_id=0, max_rows=4)
    got = {0: [], 1: []}
    first = rb.start([PROMPTS[0], PROMPTS[4]], [Sampling(), hot])
    got[0].append(int(first[0]))
    got[1].append(int(first[1]))
    assert rb.rows == 2
    for _ in range(3):
        t = rb.step()
        got[0].append(int(t[0]))
        got[1].append(int(t[1]))
    # two more join after 3 steps: the batch widens to 4 rows
    assert rb.fits(len(PROMPTS[1]), n) and not rb.fits(len(PROMPTS[2]), n)   # 18 tokens: bucket 24
    rb.widen(4)
    got[2] = [rb.join(2, PROMPTS[1], Sampling())]
    got[3] = [rb.join(3, PROMPTS[3], hot)]
    for _ in range(n - 1):
        t = rb.step()
        for k in got:
            got[k].append(int(t[k]))
    assert got[0][:n] == alone(PROMPTS[0], Sampling())
    assert got[1][:n] == alone(PROMPTS[4], hot)
    assert got[2] == alone(PROMPTS[1], Sampling())
    assert got[3] == alone(PROMPTS[3], hot)
    # a row that is done gives its slot to a new prompt
    got[0] = [rb.join(0, PROMPTS[3], Sampling())]
    for _ in range(n - 1):
        got[0].append(int(rb.step()[0]))
    assert got[0] == alone(PROMPTS[3], Sampling())
