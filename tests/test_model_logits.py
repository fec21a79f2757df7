"""The NNX decoder against transformers (float32 reference): logits of every supported family, packed
sequences, KV-cache decoding, remat, and checkpoint loading errors."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from core.architecture import ModelConfig
from runtime.model import EXACT, Llama
from runtime.weights import load_pretrained, to_hf_state_dict

KINDS = ["llama", "llama-bias", "llama3-rope", "linear-rope", "mqa", "mha", "smollm-tied", "mistral",
         "mistral-window", "qwen2", "qwen3", "gemma2", "gemma3", "gemma3-tied", "phi3", "phi3-window",
         "mixtral", "qwen3-moe"]


@pytest.fixture(autouse=True)
def exact_matmuls():
    with jax.default_matmul_precision("highest"):
        yield


def tokens(B=2, T=17, vocab=128, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (B, T)).astype(np.int32)


def torch_logits(model, ids, **kw):
    with torch.no_grad():
        return model(torch.as_tensor(ids, dtype=torch.long), **kw).logits.float().numpy()


def tune_logits(model, ids, **kw):
    return np.asarray(model.logits(model(jnp.asarray(ids), **kw)))


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers(hf_tiny, kind):
    ref_model, path = hf_tiny(kind)
    model = load_pretrained(path)
    ids = tokens()
    np.testing.assert_allclose(tune_logits(model, ids), torch_logits(ref_model, ids), atol=1e-4, rtol=0)


def test_phi3_longrope_short_sequences_and_config(hf_tiny):
    """Within its pretraining length (8) LongRoPE turns by the short factors; the config reads as
    transformers' (half of each head turned, the attention factor √(1 + ln 64 / ln 8))."""
    ref_model, path = hf_tiny("phi3")
    model = load_pretrained(path)
    cfg = model.cfg
    scaling = dict(cfg.rope_scaling)
    assert (cfg.fused, cfg.rotary_dim, scaling["rope_type"]) == (True, 8, "longrope")
    assert scaling["attention_factor"] == pytest.approx((1 + np.log(64) / np.log(8)) ** 0.5)
    assert cfg.linear_names() == ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    ids = tokens(T=8, seed=3)
    np.testing.assert_allclose(tune_logits(model, ids), torch_logits(ref_model, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_param_count_equals_transformers(hf_tiny, kind):
    ref_model, path = hf_tiny(kind)
    cfg = ModelConfig.from_hf(json.loads((path / "config.json").read_text()))
    assert cfg.param_count() == ref_model.num_parameters()


@pytest.mark.parametrize("kind", ["llama", "mqa", "mistral-window", "qwen3", "gemma2", "gemma3",
                                  "phi3-window", "mixtral"])
def test_logits_in_attention_blocks_match_transformers(hf_tiny, kind):
    """17 tokens in causal blocks of 4 query rows (the last block partial): grouped, multi-query and
    sliding-window attention, q/k norms, soft-capped scores, two RoPE bases."""
    ref_model, path = hf_tiny(kind)
    model = load_pretrained(path, compute=EXACT.but(attention_block=4))
    ids = tokens()
    np.testing.assert_allclose(tune_logits(model, ids), torch_logits(ref_model, ids), atol=1e-4, rtol=0)


def test_config_switches(hf_tiny):
    cfg = ModelConfig.from_hf(json.loads((hf_tiny("qwen3")[1] / "config.json").read_text()))
    assert (cfg.qk_norm, cfg.head_dim, cfg.attention_bias, cfg.family) == (True, 24, False, "qwen3")
    cfg = ModelConfig.from_hf(json.loads((hf_tiny("qwen2")[1] / "config.json").read_text()))
    assert cfg.attention_bias and not cfg.o_bias
    cfg = ModelConfig.from_hf(json.loads((hf_tiny("llama3-rope")[1] / "config.json").read_text()))
    assert dict(cfg.rope_scaling)["rope_type"] == "llama3" and cfg.rope_theta == 500000.0
    assert ModelConfig.from_hf(json.loads((hf_tiny("mistral-window")[1] / "config.json").read_text())
                               ).sliding_windows == (5, 5)
    assert ModelConfig.from_hf(json.loads((hf_tiny("smollm-tied")[1] / "config.json").read_text())
                               ).tie_word_embeddings


def test_gemma_config_styles_and_defaults():
    """Gemma 3 as transformers 4 wrote it (rope_theta / rope_local_base_freq / rope_scaling, the
    layer pattern implied) reads as transformers 5's rope_parameters per layer type; keys Gemma 2
    leaves out take transformers' defaults; what tune does not compute is refused by name."""
    base = dict(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=7,
                num_attention_heads=2, head_dim=4)
    old = ModelConfig.from_hf({**base, "model_type": "gemma3_text", "rope_theta": 1e6,
                               "rope_local_base_freq": 1e4, "sliding_window": 512,
                               "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
    assert (old.rope_theta, old.local_rope_theta) == (1e6, 1e4)
    assert dict(old.rope_scaling) == {"rope_type": "linear", "factor": 8.0}
    assert old.sliding_windows == (512,) * 5 + (0, 512)     # every 6th layer global
    assert old.query_scale == 256 ** -0.5 and old.tie_word_embeddings and old.qk_norm
    g2 = ModelConfig.from_hf({**base, "architectures": ["Gemma2ForCausalLM"]})
    assert (g2.attn_softcap, g2.final_softcap, g2.local_rope_theta) == (50.0, 30.0, None)
    assert g2.sliding_windows == (4096, 0) * 3 + (4096,) and not g2.qk_norm
    assert g2.embed_scale == 8 ** 0.5 and g2.norm_offset == 1.0 and g2.activation == "gelu_tanh"
    off = ModelConfig.from_hf({**base, "model_type": "gemma2", "attn_logit_softcapping": None,
                               "final_logit_softcapping": None})
    assert (off.attn_softcap, off.final_softcap) == (None, None)
    assert {"pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight"} <= {
        n.split(".", 3)[-1] for n in g2.tensor_shapes()}
    for bad, match in (({"use_bidirectional_attention": True}, "bidirectional"),
                       ({"hidden_activation": "relu"}, "hidden_activation 'relu'"),
                       ({"layer_types": ["full_attention"]}, "layer_types"),
                       ({"rope_parameters": {"full_attention": {"rope_type": "default"},
                                             "sliding_attention": {"rope_type": "linear",
                                                                   "factor": 2.0}}},
                        "sliding layers")):
        with pytest.raises(ValueError, match=match):
            ModelConfig.from_hf({**base, "model_type": "gemma3_text", **bad})


def test_config_old_style_and_refusals():
    old = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
               num_attention_heads=2, rope_theta=123.0,
               rope_scaling={"type": "linear", "factor": 2.0})            # transformers < 5 spelling
    cfg = ModelConfig.from_hf(old)
    assert cfg.rope_theta == 123.0 and dict(cfg.rope_scaling) == {"rope_type": "linear", "factor": 2.0}
    assert cfg.num_kv_heads == 2 and cfg.head_dim == 4
    for rope_type in ("yarn", "dynamic", "longrope"):
        with pytest.raises(ValueError, match=rope_type):
            ModelConfig.from_hf({**old, "rope_scaling": {"rope_type": rope_type, "factor": 2.0}})
    with pytest.raises(ValueError, match="gpt2"):
        ModelConfig.from_hf({**old, "model_type": "gpt2"})


@pytest.mark.parametrize("block", [0, 5])     # segments that cross attention blocks' boundaries
@pytest.mark.parametrize("kind", ["qwen3", "gemma3", "phi3-window", "mixtral", "qwen3-moe"])
def test_packed_rows_equal_separate_runs(hf_tiny, block, kind):
    _, path = hf_tiny(kind)
    model = load_pretrained(path, compute=EXACT.but(attention_block=block))
    a, b = tokens(1, 7, seed=1)[0], tokens(1, 6, seed=2)[0]
    T = 16
    packed = np.zeros((1, T), np.int32)
    packed[0, :7], packed[0, 7:13] = a, b
    segment_ids = np.array([[1] * 7 + [2] * 6 + [0] * 3], np.int32)
    positions = np.array([list(range(7)) + list(range(6)) + [0, 0, 0]], np.int32)
    out = tune_logits(model, packed, positions=jnp.asarray(positions), segment_ids=jnp.asarray(segment_ids))
    assert np.isfinite(out).all()                                    # padding rows too
    np.testing.assert_allclose(out[0, :7], tune_logits(model, a[None])[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(out[0, 7:13], tune_logits(model, b[None])[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["gemma3", "mistral-window"])
def test_window_skipping_blocks_train_as_whole_rows(hf_tiny, kind):
    """Query blocks that skip the keys before a sliding window — every layer's (Mistral), or the
    local layers' beside full ones in one scan (Gemma 3, a branch per layer) — give whole-row
    attention's LoRA gradients under remat."""
    from runtime.model import LoraConfig
    from runtime.train import split_model

    _, path = hf_tiny(kind)
    lora = LoraConfig(rank=4, alpha=8, dropout=0.0, targets=("q_proj", "v_proj"))
    ids = jnp.asarray(tokens())

    def grads(block):
        model = load_pretrained(path, lora=lora, rngs=nnx.Rngs(1),
                                compute=EXACT.but(attention_block=block, remat="dots"))
        assert model._skipped_window(ids.shape[1]) == (5 if block else 0)
        g, trained, frozen = split_model(model)
        segments = jnp.ones(ids.shape, jnp.int32)       # a mask, which the windows then narrow
        loss = lambda p: jnp.mean(nnx.merge(g, frozen, p).logits(  # noqa: E731
            nnx.merge(g, frozen, p)(ids, segment_ids=segments)) ** 2)
        return jax.tree.leaves(jax.jit(jax.grad(loss))(trained))

    for a, b in zip(grads(4), grads(0)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)


def test_remat_policies_same_values_and_grads(hf_tiny):
    _, path = hf_tiny("llama")
    ids = jnp.asarray(tokens())
    results = []
    for remat in ("none", "dots", "full"):
        model = load_pretrained(path, compute=EXACT.but(remat=remat))
        graphdef, state = nnx.split(model)

        @jax.jit
        def f(state):
            m = nnx.merge(graphdef, state)
            return jnp.sum(m(ids) ** 2)

        value, grads = jax.value_and_grad(f)(state)
        results.append((value, jax.tree.leaves(grads)))
    for value, grads in results[1:]:
        np.testing.assert_allclose(value, results[0][0], rtol=1e-6)
        for g, g0 in zip(grads, results[0][1]):
            # recomputation reorders float sums: equal up to rounding, relative to the gradient's scale
            np.testing.assert_allclose(g, g0, rtol=0, atol=1e-5 * float(np.abs(g0).max()))


def _greedy_with_cache(model, prompt, valid, n):
    """Batched greedy decoding through Llama.decode: prefill the padded prompts, then 1 token a step."""
    decode = nnx.jit(Llama.decode)
    B, P = prompt.shape
    positions = np.maximum(np.cumsum(valid, 1) - 1, 0).astype(np.int32)
    lengths = valid.sum(1).astype(np.int32)
    last = (P - 1 - np.argmax(valid[:, ::-1], 1)).astype(np.int32)       # last real prompt token
    cache = model.init_cache(B, P + n)
    logits, cache = decode(model, jnp.asarray(prompt), jnp.asarray(positions), cache,
                           valid=jnp.asarray(valid), last=jnp.asarray(last))
    out = [np.argmax(np.asarray(logits), -1)]
    for i in range(n - 1):
        logits, cache = decode(model, jnp.asarray(out[-1][:, None], jnp.int32),
                               jnp.asarray((lengths + i)[:, None]), cache)
        out.append(np.argmax(np.asarray(logits)[:, 0], -1))
    return np.stack(out, 1)


def _greedy_full_recompute(model, prompt, n):
    """Greedy decoding with no cache: the whole sequence is re-run for every token (right-padded to a
    fixed length, which causal attention ignores, so it is one compiled program)."""
    forward = nnx.jit(lambda m, ids: m.logits(m(ids)))
    L = len(prompt) + n
    ids = np.zeros((1, L), np.int32)
    ids[0, :len(prompt)] = prompt
    for t in range(len(prompt), L):
        ids[0, t] = int(np.argmax(np.asarray(forward(model, jnp.asarray(ids)))[0, t - 1]))
    return ids[0, len(prompt):].tolist()


@pytest.mark.parametrize("kind", ["llama", "qwen3", "mistral-window", "gemma2", "gemma3",
                                  "phi3-window", "mixtral", "qwen3-moe"])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_cached_greedy_equals_full_recomputation(hf_tiny, kind, padding):
    _, path = hf_tiny(kind)
    model = load_pretrained(path)
    prompts = [tokens(1, 9, seed=3)[0], tokens(1, 4, seed=4)[0], tokens(1, 6, seed=5)[0]]
    P = max(len(p) for p in prompts)
    batch = np.zeros((len(prompts), P), np.int32)
    valid = np.zeros((len(prompts), P), bool)
    for i, p in enumerate(prompts):
        sl = slice(P - len(p), P) if padding == "left" else slice(0, len(p))
        batch[i, sl], valid[i, sl] = p, True
    got = _greedy_with_cache(model, batch, valid, 8)
    for i, p in enumerate(prompts):
        assert got[i].tolist() == _greedy_full_recompute(model, p, 8)


@pytest.mark.parametrize("kind, lengths, new", [
    ("llama", (7, 4), 8), ("gemma2", (7, 4), 8), ("gemma3", (7, 4), 8), ("mixtral", (7, 4), 8),
    ("qwen3-moe", (7, 4), 8),
    ("phi3", (5, 3), 3),        # LongRoPE within its pretraining length (8): the short factors
    ("phi3", (10, 9), 6)])      # past it from the prompt on: the long factors
def test_cached_greedy_equals_transformers_generate(hf_tiny, kind, lengths, new):
    """Greedy decoding through the KV cache, token for token as transformers' generate. (A Phi-3
    generation that crosses its pretraining length mid-way is re-run whole by transformers with
    the long factors; tune's cache keeps the keys it turned with the short ones — the compiler
    warns where that can happen.)"""
    ref_model, path = hf_tiny(kind)
    model = load_pretrained(path)
    prompts = [tokens(1, n, seed=6 + i)[0] for i, n in enumerate(lengths)]
    P = max(lengths)
    batch = np.zeros((2, P), np.int32)
    valid = np.zeros((2, P), bool)
    for i, p in enumerate(prompts):
        batch[i, P - len(p):], valid[i, P - len(p):] = p, True           # transformers pads left
    got = _greedy_with_cache(model, batch, valid, new)
    with torch.no_grad():
        ref = ref_model.generate(torch.as_tensor(batch, dtype=torch.long),
                                 attention_mask=torch.as_tensor(valid, dtype=torch.long),
                                 max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                 pad_token_id=0, eos_token_id=None)[:, P:].numpy()
    np.testing.assert_array_equal(got, ref)


def test_decode_prefill_logits_equal_forward(hf_tiny):
    _, path = hf_tiny("qwen2")
    model = load_pretrained(path)
    ids = tokens(2, 11)
    cache = model.init_cache(2, 16)
    logits, cache = model.decode(jnp.asarray(ids), jnp.asarray(np.tile(np.arange(11), (2, 1))), cache)
    np.testing.assert_allclose(np.asarray(logits), tune_logits(model, ids), atol=1e-5, rtol=0)
    assert int(cache.index) == 11


def test_sharded_checkpoint_and_round_trip(hf_tiny, tmp_path):
    ref_model, _ = hf_tiny("qwen2")
    ref_model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    model = load_pretrained(tmp_path)
    ids = tokens()
    np.testing.assert_allclose(tune_logits(model, ids), torch_logits(ref_model, ids), atol=1e-4, rtol=0)
    ours = to_hf_state_dict(model)
    theirs = {k: v.numpy() for k, v in ref_model.state_dict().items()}
    assert set(ours) == set(theirs)
    for k in ours:
        np.testing.assert_array_equal(ours[k], theirs[k])


def test_missing_and_unexpected_tensors_are_named(hf_tiny, tmp_path):
    from safetensors.numpy import load_file, save_file

    _, path = hf_tiny("llama")
    tensors = load_file(str(path / "model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    partial = dict(tensors)
    del partial["model.layers.1.mlp.up_proj.weight"]
    save_file(partial, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_pretrained(tmp_path)
    extra = {**tensors, "model.layers.0.mlp.extra.weight": np.zeros(3, np.float32),
             "model.rotary_emb.inv_freq": np.zeros(8, np.float32)}            # the buffer is ignored
    save_file(extra, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.extra\.weight"):
        load_pretrained(tmp_path)


def test_bfloat16_params_and_compute(hf_tiny):
    ref_model, path = hf_tiny("llama")
    model = load_pretrained(path, compute=EXACT.but(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16))
    hidden = model(jnp.asarray(tokens()))
    assert hidden.dtype == jnp.bfloat16
    assert model.layers.self_attn.q_proj.weight[...].dtype == jnp.bfloat16
    # bf16 is not a reference-exact mode: only close to float32
    diff = np.abs(np.asarray(model.logits(hidden)) - torch_logits(ref_model, tokens()))
    assert diff.mean() < 0.05


def test_smollm2_matches_transformers():
    """The real embedded SmolLM2-135M (converted from GGUF by compiler/models.py) against transformers.
    Over 30 layers float32 rounding alone moves logits of magnitude ~20 by ~1e-4 (transformers' own
    float32 logits are that far from its float64 ones), so the bound is relative to that noise:
    within 4× it. (It held within 2× on the AVX-512 CPU this suite first ran on; XLA:CPU's float32
    products on an AVX2-only EPYC sum in another order: 3.0× transformers' error, measured there.)"""
    models = pytest.importorskip("compiler.models")
    from transformers import AutoModelForCausalLM

    model_dir = models.resolve_model({"name": "smollm2-135m", "path": None}).dir
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model = load_pretrained(model_dir)
    assert model.cfg.tie_word_embeddings and model.cfg.num_layers == 30
    ids = tokens(2, 12, vocab=49152, seed=9)
    ours, ref32 = tune_logits(model, ids), torch_logits(ref, ids)
    ref64 = torch_logits(ref.double(), ids)
    np.testing.assert_allclose(ours, ref32, atol=5e-4, rtol=0)
    assert np.abs(ours - ref64).max() <= 4 * np.abs(ref32 - ref64).max() + 1e-5
    assert (ours.argmax(-1) == ref64.argmax(-1)).all()


def test_mixed_matmul_is_one_bfloat16_product_each_way():
    """mixed_matmul: forward x Wᵀ and the input gradient g W are bfloat16 × bfloat16 products
    accumulated in float32 (compared with float64 products of the same rounded operands); W, frozen,
    gets no gradient."""
    from runtime.model import mixed_matmul

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 64)).astype(np.float32)
    w = rng.standard_normal((48, 64)).astype(np.float32)
    g = rng.standard_normal((3, 5, 48)).astype(np.float32)
    as_bf16 = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32), np.float64)
    y, vjp = jax.vjp(mixed_matmul, jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(g))
    assert y.dtype == jnp.float32 and dx.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), as_bf16(x) @ as_bf16(w).T, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(dx), as_bf16(g) @ as_bf16(w), rtol=1e-5, atol=1e-4)
    assert not np.any(np.asarray(dw))
    # and it is not the float32 product: the operands were rounded
    assert np.abs(np.asarray(y) - x.astype(np.float64) @ w.T).max() > 1e-3


def test_bfloat16_matmuls_under_float32_compute(hf_tiny):
    """matmul_dtype=bfloat16 with float32 compute: activations stay float32, the frozen projections go
    through mixed_matmul, a module trained in full does not; logits and LoRA gradients stay close to
    the float32 model's."""
    from runtime.model import LoraConfig
    from runtime.train import split_model

    ref_model, path = hf_tiny("llama")
    lora = LoraConfig(rank=4, alpha=8, dropout=0.0, targets=("q_proj", "v_proj", "down_proj"),
                      train_modules=("o_proj",))
    exact = load_pretrained(path, lora=lora, rngs=nnx.Rngs(1))
    mixed = load_pretrained(path, lora=lora, rngs=nnx.Rngs(1), compute=EXACT.but(matmul_dtype=jnp.bfloat16))
    assert mixed.layers.self_attn.q_proj.mixed and mixed.layers.mlp.up_proj.mixed
    assert not mixed.layers.self_attn.o_proj.mixed and not exact.layers.self_attn.q_proj.mixed
    ids = jnp.asarray(tokens())
    hidden = mixed(ids)
    assert hidden.dtype == jnp.float32
    ref = torch_logits(ref_model, tokens())
    diff = np.abs(np.asarray(mixed.logits(hidden)) - ref)
    assert 1e-5 < diff.max() and diff.mean() < 0.02 * np.abs(ref).mean()

    def grads(model):
        g, trained, frozen = split_model(model)
        loss = lambda p: jnp.mean(nnx.merge(g, frozen, p).logits(nnx.merge(g, frozen, p)(ids)) ** 2)
        return jax.tree.leaves(jax.grad(loss)(trained))

    for a, b in zip(grads(mixed), grads(exact)):
        assert np.linalg.norm(np.asarray(a) - np.asarray(b)) <= 0.03 * np.linalg.norm(np.asarray(b)) + 1e-8


def test_remat_dots_keeps_the_bfloat16_products():
    """runtime.remat=dots saves the frozen projections' outputs whether they are float32 einsums or
    bfloat16 mixed_matmul calls (a custom VJP the dots policy cannot see into): the residuals a layer
    keeps have the same shapes in both modes, and the gradients equal remat=none's."""
    from jax._src.ad_checkpoint import saved_residuals

    from runtime.model import LoraConfig
    from runtime.train import split_model

    cfg = ModelConfig.from_hf(dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=64, hidden_size=32,
        intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=64, tie_word_embeddings=True))
    lora = LoraConfig(rank=2, alpha=4, dropout=0.0, targets=("q_proj", "v_proj"))
    ids = jnp.asarray(tokens(2, 9, vocab=64))

    def loss_and_residuals(matmul_dtype, remat):
        model = Llama(cfg, lora=lora, rngs=nnx.Rngs(0), compute=EXACT.but(remat=remat, matmul_dtype=matmul_dtype))
        g, trained, frozen = split_model(model)
        loss = lambda p: jnp.sum(nnx.merge(g, frozen, p)(ids) ** 2)
        kept = sorted(r.shape for r, _ in saved_residuals(loss, trained))
        return jax.tree.leaves(jax.grad(loss)(trained)), kept

    _, kept_f32 = loss_and_residuals(None, "dots")
    grads_dots, kept_bf16 = loss_and_residuals(jnp.bfloat16, "dots")
    grads_none, _ = loss_and_residuals(jnp.bfloat16, "none")
    assert kept_bf16 == kept_f32
    for a, b in zip(grads_dots, grads_none):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(np.abs(b).max()))
