"""DoRA, modules trained in full and quantised base weights, against PEFT (float32 reference): PEFT's
adapters load into tune with PEFT's logits and gradients, tune's export loads into PEFT with no
missing or unexpected keys and the same logits, the merged checkpoint equals PEFT's merge; the
quantisation formats stay within their error bounds and train."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from core.architecture import MODULE_NAMES
from runtime import quant
from runtime.peft import load_peft_adapter, read_lora_config, save_peft_adapter
from runtime.loss import chunked_cross_entropy
from runtime.model import FullParam, LoraConfig, LoRAParam
from runtime.weights import load_pretrained, to_hf_state_dict


@pytest.fixture(autouse=True)
def exact_matmuls():
    with jax.default_matmul_precision("highest"):
        yield


def batch(B=2, T=17, vocab=128, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (B, T)).astype(np.int32)
    mask = np.zeros((B, T - 1), bool)
    mask[0, 5:], mask[1, 9:14] = True, True
    targets = np.where(mask, ids[:, 1:], -100).astype(np.int32)
    return ids[:, :-1], targets, mask


def peft_model(path, adapter_dir, *, seed=0, **config):
    """A PEFT adapter on the tiny model at `path` with every adapter tensor (LoRA factors, DoRA
    magnitudes, modules to save) moved away from its initial value, saved to adapter_dir."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": list(MODULE_NAMES),
              "task_type": "CAUSAL_LM", **config}
    peft = get_peft_model(base, PeftLoraConfig(**config))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(0.3 * torch.randn_like(p))
            elif "lora_magnitude_vector" in name or "modules_to_save" in name:
                p.mul_(1.0 + 0.2 * torch.randn_like(p))
    peft.save_pretrained(adapter_dir)
    return peft.eval()


def peft_logits(model, ids):
    with torch.no_grad():
        return model(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()


def tune_logits(model, ids):
    return np.asarray(model.logits(model(jnp.asarray(ids))))


def reload_in_peft(path, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter_dir).eval()


def adapter_keys(adapter_dir):
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="np") as f:
        return set(f.keys())


# ------------------------------------------------------------------------------------------ DoRA

@pytest.mark.parametrize("kind", ["llama", "llama-bias", "smollm-tied", "mistral", "qwen2", "qwen3",
                                  "gemma2", "gemma3", "phi3"])
def test_dora_logits_equal_peft_both_ways(hf_tiny, tmp_path, kind):
    _, path = hf_tiny(kind)
    fused = {"target_modules": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]} \
        if kind == "phi3" else {}
    peft = peft_model(path, tmp_path / "peft", use_dora=True, seed=1, **fused)
    lora = read_lora_config(tmp_path / "peft")
    assert lora.kind == "dora"
    model = load_peft_adapter(load_pretrained(path, lora=lora), tmp_path / "peft")
    ids, _, _ = batch()
    ref = peft_logits(peft, ids)
    np.testing.assert_allclose(tune_logits(model, ids), ref, atol=1e-4, rtol=0)

    out = save_peft_adapter(model, tmp_path / "ours", base_model_name_or_path=str(path))
    assert adapter_keys(out) == adapter_keys(tmp_path / "peft")   # same names, nothing more or less
    back = reload_in_peft(path, out)
    assert back.peft_config["default"].use_dora
    np.testing.assert_allclose(peft_logits(back, ids), ref, atol=1e-5, rtol=0)


def test_dora_starts_as_the_base_model(hf_tiny):
    _, path = hf_tiny("llama")
    lora = LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=("q_proj", "down_proj"), kind="dora")
    model = load_pretrained(path, lora=lora, rngs=nnx.Rngs(3))
    ids = jnp.asarray(batch()[0])
    np.testing.assert_allclose(np.asarray(model(ids)), np.asarray(load_pretrained(path)(ids)),
                               atol=1e-5, rtol=0)
    w = np.asarray(model.layers.mlp.down_proj.weight[...])
    np.testing.assert_allclose(np.asarray(model.layers.mlp.down_proj.lora_magnitude_vector[...]),
                               np.linalg.norm(w, axis=-1), rtol=1e-6)


def _loss_of(graphdef, frozen, ids, targets, mask):
    def loss(trained):
        model = nnx.merge(graphdef, trained, frozen)
        total, n = chunked_cross_entropy(model(jnp.asarray(ids)), model.lm_head(),
                                         jnp.asarray(targets), jnp.asarray(mask), chunk=7,
                                         softcap=model.cfg.final_softcap)
        return total / n
    return loss


def _peft_loss_and_grads(peft, ids, targets):
    peft.zero_grad()
    logits = peft(torch.as_tensor(ids, dtype=torch.long)).logits
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), torch.as_tensor(targets, dtype=torch.long).reshape(-1),
        ignore_index=-100)
    loss.backward()
    grads = {}
    for n, p in peft.named_parameters():
        if p.grad is None:
            continue
        n = n.removeprefix("base_model.model.").replace(".default", "")
        n = n.replace(".modules_to_save", "").replace("lora_magnitude_vector.weight",
                                                      "lora_magnitude_vector")
        grads[n] = p.grad.numpy()
    return loss.item(), grads


def _compare_grads(model, grads, ref_grads):
    """Every tune gradient against PEFT's under the same HF name; returns how many were compared."""
    from runtime.weights import hf_names

    checked = 0
    for path, g in nnx.to_flat_state(grads):
        path = tuple(map(str, path))
        names = hf_names(path, model.cfg.num_layers)
        g = np.asarray(g[...])
        for i, name in enumerate(names):
            ref = ref_grads[name + ("" if path[-1] in ("lora_magnitude_vector",) or
                                    not path[-1].startswith("lora") else ".weight")]
            got = g[i] if path[0] == "layers" else g
            if name == "model.embed_tokens.weight":
                # torch's nn.Embedding(padding_idx=pad) gives the pad token's row no gradient; tune
                # trains it (the pad id is often the end-of-turn token a chat fine-tune must learn)
                pad = 0
                assert not ref[pad].any() and got[pad].any()
                got, ref = np.delete(got, pad, axis=0), np.delete(ref, pad, axis=0)
            rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
            assert rel <= 1e-4, (name, rel)
            checked += 1
    return checked


def test_dora_loss_and_gradients_equal_peft(hf_tiny, tmp_path):
    """The gradients of A, B and the magnitude, with the weight norm a constant (as PEFT)."""
    _, path = hf_tiny("llama")
    peft = peft_model(path, tmp_path / "peft", use_dora=True, seed=2)
    model = load_peft_adapter(load_pretrained(path, lora=read_lora_config(tmp_path / "peft")),
                              tmp_path / "peft")
    ids, targets, mask = batch()
    ref_loss, ref_grads = _peft_loss_and_grads(peft, ids, targets)
    graphdef, trained, frozen = nnx.split(model, LoRAParam, ...)
    loss, grads = jax.value_and_grad(_loss_of(graphdef, frozen, ids, targets, mask))(trained)
    assert float(loss) == pytest.approx(ref_loss, rel=1e-5)
    assert _compare_grads(model, grads, ref_grads) == len(ref_grads) == \
        3 * len(MODULE_NAMES) * model.cfg.num_layers


def test_dora_merged_equals_peft_merge(hf_tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    from runtime.export import save_merged

    _, path = hf_tiny("qwen2")
    peft = peft_model(path, tmp_path / "peft", use_dora=True, seed=4)
    model = load_peft_adapter(load_pretrained(path, lora=read_lora_config(tmp_path / "peft")),
                              tmp_path / "peft")
    ids, _, _ = batch()
    ref = peft_logits(peft, ids)
    merged = save_merged(model, tmp_path / "merged", path)
    hf = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    np.testing.assert_allclose(peft_logits(hf, ids), ref, atol=1e-4, rtol=0)
    with torch.no_grad():
        peft_merged = peft.merge_and_unload().state_dict()
    ours = to_hf_state_dict(model, merged=True)
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        np.testing.assert_allclose(ours[name], peft_merged[name].numpy(), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------ modules in full

@pytest.mark.parametrize("kind, modules", [
    ("llama", ["lm_head", "model.norm", "input_layernorm"]),
    ("qwen3", ["embed_tokens", "q_norm", "post_attention_layernorm"]),
    ("gemma2", ["pre_feedforward_layernorm", "post_feedforward_layernorm", "model.norm"]),
    ("gemma3", ["k_norm", "input_layernorm", "lm_head"]),
])
def test_modules_to_save_logits_and_gradients_equal_peft(hf_tiny, tmp_path, kind, modules):
    _, path = hf_tiny(kind)
    peft = peft_model(path, tmp_path / "peft", seed=5, target_modules=["q_proj", "v_proj"],
                      modules_to_save=modules)
    lora = read_lora_config(tmp_path / "peft")
    assert set(lora.train_modules) == {"norm" if m == "model.norm" else m for m in modules}
    model = load_peft_adapter(load_pretrained(path, lora=lora), tmp_path / "peft")
    ids, targets, mask = batch()
    ref = peft_logits(peft, ids)
    np.testing.assert_allclose(tune_logits(model, ids), ref, atol=1e-4, rtol=0)

    ref_loss, ref_grads = _peft_loss_and_grads(peft, ids, targets)
    graphdef, trained, frozen = nnx.split(model, LoRAParam, ...)
    loss, grads = jax.value_and_grad(_loss_of(graphdef, frozen, ids, targets, mask))(trained)
    assert float(loss) == pytest.approx(ref_loss, rel=1e-5)
    assert _compare_grads(model, grads, ref_grads) == len(ref_grads)
    full = [p for p, v in nnx.to_flat_state(trained) if isinstance(v, FullParam)]
    assert len(full) == len(modules)

    out = save_peft_adapter(model, tmp_path / "ours", base_model_name_or_path=str(path))
    assert adapter_keys(out) == adapter_keys(tmp_path / "peft")
    np.testing.assert_allclose(peft_logits(reload_in_peft(path, out), ids), ref, atol=1e-5, rtol=0)


def test_tied_head_is_trained_as_the_embedding(hf_tiny, tmp_path):
    """With tied embeddings `lm_head` names the embedding matrix: one matrix is trained (input and
    output stay one), and the export lists both names so that PEFT restores both copies."""
    import json

    _, path = hf_tiny("smollm-tied")
    lora = LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=("q_proj",), train_modules=("lm_head",))
    model = load_pretrained(path, lora=lora)
    assert isinstance(model.embed_tokens.weight, FullParam) and model.unembed is None
    ids, targets, mask = batch()
    graphdef, trained, frozen = nnx.split(model, LoRAParam, ...)
    grads = jax.grad(_loss_of(graphdef, frozen, ids, targets, mask))(trained)
    g = np.asarray(grads["embed_tokens"]["weight"][...])
    assert np.abs(g[np.unique(ids)]).sum() > 0            # input side ...
    assert np.abs(g[np.setdiff1d(np.arange(128), ids)]).sum() > 0   # ... and output side
    trained = jax.tree.map(lambda x, d: x - 0.5 * d, trained, grads)
    nnx.update(model, trained)
    out = save_peft_adapter(model, tmp_path / "ours", base_model_name_or_path=str(path))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["lm_head", "embed_tokens"]
    keys = adapter_keys(out)
    assert {"base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"} <= keys
    np.testing.assert_allclose(peft_logits(reload_in_peft(path, out), ids), tune_logits(model, ids),
                               atol=1e-4, rtol=0)
    again = load_peft_adapter(load_pretrained(path, lora=read_lora_config(out)), out)
    np.testing.assert_array_equal(tune_logits(again, ids), tune_logits(model, ids))


def test_trained_modules_get_optimizer_state_and_the_rest_none(hf_tiny):
    _, path = hf_tiny("llama")
    lora = LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=("q_proj",),
                      train_modules=("norm", "lm_head"))
    model = load_pretrained(path, lora=lora)
    _, trained, frozen = nnx.split(model, LoRAParam, ...)
    trained, frozen = nnx.as_pure(trained), nnx.as_pure(frozen)
    opt = optax.adamw(1e-3).init(trained)
    sizes = sorted(x.size for x in jax.tree.leaves(trained))
    assert sizes == sorted([2 * 4 * 64, 2 * 64 * 4, 64, 128 * 64])     # A, B, norm, head
    assert sorted(x.size for x in jax.tree.leaves(opt) if x.ndim > 0) == sorted(sizes * 2)
    assert "unembed" not in frozen and "unembed" in trained
    with pytest.raises(ValueError, match="both LoRA targets and trained in full"):
        LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=("q_proj",), train_modules=("q_proj",))


# ------------------------------------------------------------------------------ quantised weights

def test_nf4_levels_are_the_qlora_table():
    from scipy.stats import norm

    # QLoRA's construction: quantiles of N(0, 1) with an exact zero, normalised to [-1, 1]
    offset = 0.9677083
    pos = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    neg = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    levels = np.sort(np.concatenate([pos, [0.0], neg]))
    levels /= np.abs(levels).max()
    np.testing.assert_allclose(quant.NF4, levels, atol=1e-6)


@pytest.mark.parametrize("fmt", quant.FORMATS)
@pytest.mark.parametrize("shape", [(3, 48, 64), (2, 33, 70), (1, 5, 7)])
def test_quantise_dequantise_within_the_format_bound(fmt, shape):
    rng = np.random.default_rng(0)
    w = rng.standard_normal(shape).astype(np.float32) * rng.uniform(0.01, 1.0, shape[:-1])[..., None]
    w[0, 1] = 0.0                                  # an all-zero row
    w[-1, -1, -1] = 25.0                           # an outlier
    codes, scales = quant.quantize(w, fmt)
    assert (codes.dtype, codes.shape, scales.shape) == (
        (np.int8 if fmt == "int8" else np.uint8,) + tuple(
            (shape[0],) + s for s in quant.stored_shapes(fmt, *shape[1:])))
    back = np.asarray(quant.dequantize(jnp.asarray(codes), jnp.asarray(scales), fmt, shape[1:]))
    err = np.abs(back - w)
    assert (err <= quant.error_bound(w, fmt) * (1 + 1e-5) + 1e-7).all()
    assert not back[0, 1].any()
    rel = np.linalg.norm(back - w) / np.linalg.norm(w)
    assert rel < {"int8": 0.02, "nf4": 0.12}[fmt]
    dense = shape[0] * shape[1] * shape[2] * 4
    if shape[-1] >= 64:                             # (tiny rows: the scales dominate)
        assert codes.nbytes + scales.nbytes < dense * {"int8": 0.3, "nf4": 0.2}[fmt]


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_quantised_base_stays_close_and_trains(hf_tiny, fmt):
    """The quantised model's logits stay near the float model's, the stored codes are what the model
    holds (not float copies), gradients reach the LoRA factors, and the merged export dequantises."""
    _, path = hf_tiny("llama")
    targets = ("q_proj", "v_proj")
    plain = load_pretrained(path, lora=LoraConfig(4, 8.0, 0.0, targets), rngs=nnx.Rngs(1))
    q = load_pretrained(path, lora=LoraConfig(4, 8.0, 0.0, targets, quantize=fmt, kind="dora"),
                        rngs=nnx.Rngs(1))
    w = q.layers.mlp.up_proj
    assert w.weight[...].dtype == (jnp.int8 if fmt == "int8" else jnp.uint8)
    ids, targets_, mask = batch()
    # exactly the float model whose linear weights went through quantise → dequantise
    ref_model = load_pretrained(path, lora=LoraConfig(4, 8.0, 0.0, targets), rngs=nnx.Rngs(1))
    for part, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                        ("mlp", ("gate_proj", "up_proj", "down_proj"))):
        for name in names:
            lin = getattr(getattr(ref_model.layers, part), name)
            w = np.asarray(lin.weight[...])
            lin.weight[...] = quant.dequantize(*quant.quantize(w, fmt), fmt, w.shape[1:])
    a, b = tune_logits(ref_model, ids), tune_logits(q, ids)
    np.testing.assert_allclose(b, a, atol=1e-4 * np.abs(a).max(), rtol=0)
    rel = np.linalg.norm(tune_logits(plain, ids) - b) / np.linalg.norm(b)
    assert 0 < rel < {"int8": 0.05, "nf4": 0.4}[fmt], rel     # tiny random weights: nf4 is rough
    graphdef, trained, frozen = nnx.split(q, LoRAParam, ...)
    grads = jax.grad(_loss_of(graphdef, frozen, ids, targets_, mask))(trained)
    assert all(np.abs(np.asarray(g[...])).sum() > 0 for _, g in nnx.to_flat_state(grads)
               if _[-1] != "lora_A")          # B and m move first (A's gradient is 0 while B = 0)
    hf = to_hf_state_dict(q, merged=True)
    name = "model.layers.0.mlp.up_proj.weight"
    ref = np.asarray(plain.layers.mlp.up_proj.weight[...])[0]
    assert hf[name].dtype == np.float32 and hf[name].shape == ref.shape
    assert (np.abs(hf[name] - ref) <= quant.error_bound(ref[None], fmt)[0] * (1 + 1e-5) + 1e-7).all()


@pytest.mark.slow
def test_a_short_qlora_run_tracks_plain_lora(smollm2_dir):
    """SmolLM2-135M (real weights), 10 steps of the same batches: the int8 and nf4 runs start where
    plain LoRA starts and their losses stay within a few percent of its, on average over the run (a
    10-step memorisation run is jumpy step by step)."""
    from conftest import schedule, synthetic_examples
    from runtime.batching import Batcher, BatchShape
    from runtime.build import optimizer as make_optimizer
    from runtime.train import make_train_step, split_model

    ids, pl = synthetic_examples(16, seed=7, vocab=2000, max_len=32)
    batcher = Batcher(ids, pl, BatchShape(1, 8, 32), pack=False, seed=0)
    batches = [{k: jnp.asarray(v) for k, v in batcher.batch(0, i).items()}
               for i in range(batcher.steps_per_epoch)]
    losses = {}
    for fmt in ("none", "int8", "nf4"):
        lora = LoraConfig(rank=8, alpha=16.0, dropout=0.0, targets=("q_proj", "v_proj"), quantize=fmt)
        graphdef, trained, frozen = split_model(load_pretrained(smollm2_dir, lora=lora,
                                                                rngs=nnx.Rngs(0)))
        opt, lr_fn = make_optimizer(schedule(10, lr=2e-3, lr_schedule="constant"))
        step = make_train_step(graphdef, opt, lr_fn, ce_chunk=256, dropout=False, loss_tokens=None, packed=True)
        opt_state, out = opt.init(trained), []
        for s in range(10):
            trained, opt_state, m = step(trained, opt_state, frozen, batches[s % len(batches)],
                                         jax.random.PRNGKey(0), jnp.int32(s))
            out.append(float(m["loss"]))
        losses[fmt] = np.array(out)
    plain = losses["none"]
    assert plain[-1] < plain[0] * 0.7, plain                     # the run learns
    for fmt, first, mean in (("int8", 0.002, 0.015), ("nf4", 0.01, 0.06)):
        rel = np.abs(losses[fmt] - plain) / plain
        assert rel[0] < first and rel.mean() < mean, (fmt, rel, losses[fmt], plain)


def test_smollm2_dora_with_trained_modules_loads_in_peft(tmp_path, smollm2_dir):
    """The embedded SmolLM2-135M (tied head), DoRA on all linear layers plus the final norm and the
    head trained in full, every adapter tensor moved: PEFT reproduces tune's logits. (smollm2_dir:
    converted first, in a TUNE_HOME where nothing has converted it yet.)"""
    path = smollm2_dir
    lora = LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=tuple(MODULE_NAMES), kind="dora",
                      train_modules=("norm", "lm_head"))
    model = load_pretrained(path, lora=lora, rngs=nnx.Rngs(0))
    state = nnx.state(model, LoRAParam)
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(state))))
    nnx.update(model, jax.tree.map(
        lambda p: p + 0.02 * jnp.abs(p).mean() * jax.random.normal(next(keys), p.shape, p.dtype)
        if p.ndim and p.shape[-1] != 4 else p + 0.05 * jax.random.normal(next(keys), p.shape, p.dtype),
        state))
    out = save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(path))
    ids = np.random.default_rng(0).integers(0, 49152, (2, 24)).astype(np.int32)
    ours = tune_logits(model, ids)
    peft = reload_in_peft(path, out)
    ref = peft_logits(peft, ids)
    with peft.disable_adapter():
        base = peft_logits(peft, ids)
    assert np.abs(ours - base).max() > 0.1                 # the adapter changes the model ...
    # over 30 layers float32 rounding alone moves logits of magnitude ~30 by ~1e-4 (as for the base
    # model in test_model_logits): the bound is that noise
    np.testing.assert_allclose(ref, ours, atol=5e-4, rtol=0)
    assert (ref.argmax(-1) == ours.argmax(-1)).all()
