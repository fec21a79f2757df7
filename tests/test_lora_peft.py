"""LoRA against PEFT (float32 reference): logits, the supervised-token loss and its gradients; only LoRA
parameters are differentiated and optimised; the chunked cross-entropy equals the naive one."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from runtime.peft import load_peft_adapter, read_lora_config
from runtime.loss import chunked_cross_entropy
from core.architecture import MODULE_NAMES
from runtime.model import LoraConfig, LoRAParam
from runtime.weights import load_pretrained


@pytest.fixture(autouse=True)
def exact_matmuls():
    with jax.default_matmul_precision("highest"):
        yield


def peft_llama(path, adapter_dir, *, seed=0, rslora=False):
    """A PEFT LoRA (r=4, alpha=8, all 7 modules) on the tiny Llama at `path`, with random non-zero A
    and B, saved to adapter_dir."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    peft = get_peft_model(base, PeftLoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_rslora=rslora,
                                               target_modules=list(MODULE_NAMES), task_type="CAUSAL_LM"))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn_like(p))
    peft.save_pretrained(adapter_dir)
    return peft.eval()


@pytest.fixture(scope="module")
def pair(hf_tiny, tmp_path_factory):
    """(PEFT model, tune model with the same adapter loaded through load_peft_adapter)."""
    _, path = hf_tiny("llama")
    adapter_dir = tmp_path_factory.mktemp("peft-adapter")
    peft = peft_llama(path, adapter_dir)
    lora = read_lora_config(adapter_dir)
    assert lora == LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=tuple(sorted(MODULE_NAMES)))
    model = load_peft_adapter(load_pretrained(path, lora=lora), adapter_dir)
    return peft, model


def batch(B=2, T=17, vocab=128, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (B, T)).astype(np.int32)
    mask = np.zeros((B, T - 1), bool)
    mask[0, 5:], mask[1, 9:14] = True, True            # supervised spans (the "responses")
    targets = np.where(mask, ids[:, 1:], -100).astype(np.int32)
    return ids[:, :-1], targets, mask


def test_logits_equal_peft(pair):
    peft, model = pair
    ids, _, _ = batch()
    with torch.no_grad():
        ref = peft(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    ours = np.asarray(model.logits(model(jnp.asarray(ids))))
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_rslora_logits_equal_peft_both_ways(hf_tiny, tmp_path):
    """rsLoRA (scale alpha/sqrt(r)): PEFT's adapter loads into tune with its logits, and tune's export
    loads into PEFT with its logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from runtime.peft import save_peft_adapter

    _, path = hf_tiny("llama")
    peft = peft_llama(path, tmp_path / "peft", seed=3, rslora=True)
    lora = read_lora_config(tmp_path / "peft")
    assert lora.rslora and lora.scale == pytest.approx(8 / 2)
    model = load_peft_adapter(load_pretrained(path, lora=lora), tmp_path / "peft")
    ids, _, _ = batch()
    with torch.no_grad():
        ref = peft(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model.logits(model(jnp.asarray(ids)))), ref, atol=1e-4, rtol=0)
    out = save_peft_adapter(model, tmp_path / "ours", base_model_name_or_path=str(path))
    back = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                                     out).eval()
    assert back.peft_config["default"].use_rslora
    with torch.no_grad():
        again = back(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(again, ref, atol=1e-5, rtol=0)


def _tune_loss(graphdef, frozen, ids, targets, mask):
    def loss(lora):
        model = nnx.merge(graphdef, lora, frozen)
        total, n = chunked_cross_entropy(model(jnp.asarray(ids)), model.lm_head(), jnp.asarray(targets),
                                         jnp.asarray(mask), chunk=7)
        return total / n
    return loss


def test_loss_and_lora_gradients_equal_peft(pair):
    peft, model = pair
    ids, targets, mask = batch()
    # PEFT: mean token cross-entropy over the supervised tokens
    peft.zero_grad()
    logits = peft(torch.as_tensor(ids, dtype=torch.long)).logits
    ref_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 torch.as_tensor(targets, dtype=torch.long).reshape(-1),
                                                 ignore_index=-100)
    ref_loss.backward()
    ref_grads = {n.removeprefix("base_model.model.").replace(".default", ""): p.grad.numpy()
                 for n, p in peft.named_parameters() if "lora_" in n}

    graphdef, lora, frozen = nnx.split(model, LoRAParam, ...)
    loss, grads = jax.value_and_grad(_tune_loss(graphdef, frozen, ids, targets, mask))(lora)
    np.testing.assert_allclose(float(loss), ref_loss.item(), rtol=1e-5)

    flat = nnx.to_flat_state(grads)
    assert len(flat) == 2 * len(MODULE_NAMES)
    checked = 0
    for path, g in flat:
        path = tuple(map(str, path))
        for i in range(model.cfg.num_layers):
            ref = ref_grads[f"model.layers.{i}.{'.'.join(path[1:])}.weight"]
            got = np.asarray(g[...])[i]
            rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
            assert rel <= 1e-4, (path, i, rel)
            checked += 1
    assert checked == len(ref_grads)


def test_only_lora_parameters_are_differentiated(pair):
    _, model = pair
    ids, targets, mask = batch()

    def loss_fn(model):
        total, n = chunked_cross_entropy(model(jnp.asarray(ids)), model.lm_head(), jnp.asarray(targets),
                                         jnp.asarray(mask), chunk=16)
        return total / n

    grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, LoRAParam))(model)
    paths = [tuple(map(str, p)) for p, _ in nnx.to_flat_state(grads)]
    assert paths and all(p[-1] in ("lora_A", "lora_B") for p in paths)

    # the trainer's split: the optimizer state is built from the LoRA state only
    _, lora, frozen = nnx.split(model, LoRAParam, ...)
    lora, frozen = nnx.as_pure(lora), nnx.as_pure(frozen)
    opt_state = optax.adamw(1e-3).init(lora)
    lora_sizes = sorted(x.size for x in jax.tree.leaves(lora))
    frozen_shapes = {x.shape for x in jax.tree.leaves(frozen)}
    moments = sorted(x.size for x in jax.tree.leaves(opt_state) if x.ndim > 0)
    assert moments == sorted(lora_sizes * 2)                     # mu and nu of each LoRA factor
    assert not frozen_shapes & {x.shape for x in jax.tree.leaves(opt_state)}
    assert all("lora" in str(p[-1]) for p, _ in nnx.to_flat_state(nnx.state(model, LoRAParam)))
    assert not any(isinstance(v, LoRAParam) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Not(LoRAParam))))


def test_dropout_only_when_not_deterministic(pair):
    from runtime.model import Llama

    _, model = pair
    lora = LoraConfig(rank=4, alpha=8.0, dropout=0.3, targets=model.lora.targets)
    _, lora_state, frozen = nnx.split(model, LoRAParam, ...)
    dropped = nnx.eval_shape(lambda: Llama(model.cfg, lora=lora, rngs=nnx.Rngs(0)))
    nnx.update(dropped, lora_state, frozen)
    ids = jnp.asarray(batch()[0])

    @nnx.jit(static_argnames="deterministic")
    def run(m, deterministic, key):
        return m(ids, deterministic=deterministic, rngs=nnx.Rngs(dropout=key))

    base = np.asarray(nnx.jit(lambda m: m(ids))(model))
    np.testing.assert_array_equal(np.asarray(nnx.jit(lambda m: m(ids))(dropped)), base)
    np.testing.assert_array_equal(np.asarray(run(dropped, True, jax.random.key(1))), base)
    a, b, c = (np.asarray(run(dropped, False, jax.random.key(s))) for s in (1, 1, 2))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - base).max() > 1e-3 and np.abs(a - c).max() > 1e-3
    with pytest.raises(ValueError, match="rngs"):
        dropped(ids, deterministic=False)


def test_lora_init_like_peft(hf_tiny):
    """A ~ U(±1/√in) (kaiming_uniform with a=√5), B = 0: the adapted model starts as the base."""
    _, path = hf_tiny("llama")
    lora = LoraConfig(rank=8, alpha=16.0, dropout=0.0, targets=("q_proj", "down_proj"))
    model = load_pretrained(path, lora=lora, rngs=nnx.Rngs(3))
    base = load_pretrained(path)
    ids = jnp.asarray(batch()[0])
    np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(base(ids)))
    a = np.asarray(model.layers.mlp.down_proj.lora_A[...])
    assert a.shape == (2, 8, 96) and a.dtype == np.float32
    assert np.abs(a).max() <= 1 / np.sqrt(96) and np.abs(a).max() > 0.8 / np.sqrt(96)
    assert not np.asarray(model.layers.mlp.down_proj.lora_B[...]).any()
    assert model.layers.self_attn.k_proj.lora_A is None
    # one independent draw per stacked variable, reproducible from the rngs
    again = load_pretrained(path, lora=lora, rngs=nnx.Rngs(3))
    np.testing.assert_array_equal(a, np.asarray(again.layers.mlp.down_proj.lora_A[...]))
    assert not np.allclose(a[0], a[1])
    assert not np.allclose(np.asarray(model.layers.self_attn.q_proj.lora_A[...])[:, :, :64], a[:, :, :64])


# ------------------------------------------------------------------------------ chunked cross-entropy

def _naive_ce(hidden, w, targets, mask):
    logits = jnp.einsum("btd,vd->btv", hidden, w).astype(jnp.float32)
    lp = jax.nn.log_softmax(logits, axis=-1)
    t = jnp.where(mask, targets, 0)
    nll = -jnp.take_along_axis(lp, t[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * mask), jnp.sum(mask.astype(jnp.float32))


def _ce_inputs(B=3, T=11, D=16, V=50, seed=0):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    hidden = jax.random.normal(k1, (B, T, D))
    w = jax.random.normal(k2, (V, D)) * 0.5
    targets = jax.random.randint(k3, (B, T), 0, V)
    mask = jax.random.bernoulli(k4, 0.6, (B, T))
    targets = jnp.where(mask, targets, -100)                        # ignored targets may be anything
    return hidden, w, targets, mask


@pytest.mark.parametrize("chunk", [1, 5, 33, 1000])
def test_chunked_ce_equals_naive(chunk):
    hidden, w, targets, mask = _ce_inputs()
    total, n = jax.jit(chunked_cross_entropy, static_argnums=4)(hidden, w, targets, mask, chunk)
    ref_total, ref_n = _naive_ce(hidden, w, targets, mask)
    np.testing.assert_allclose(float(total), float(ref_total), rtol=1e-5)
    assert float(n) == float(ref_n)

    def mean(f):
        return lambda h, w: (lambda s, c: s / c)(*f(h, w, targets, mask))

    g = jax.jit(jax.grad(mean(lambda *a: chunked_cross_entropy(*a, chunk)), argnums=(0, 1)))(hidden, w)
    g_ref = jax.jit(jax.grad(mean(_naive_ce), argnums=(0, 1)))(hidden, w)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("capacity", [20, 24, 33])           # ≥ the 20 supervised positions
def test_supervised_ce_equals_naive_and_computes_only_the_supervised_logits(capacity):
    from runtime.loss import supervised_cross_entropy

    hidden, w, _, _ = _ce_inputs(B=4, T=10, D=16, V=50, seed=3)
    mask = jnp.zeros((4, 10), bool).at[:, 5:].set(True)             # 20 of 40 positions
    targets = jnp.where(mask, jax.random.randint(jax.random.key(9), (4, 10), 0, 50), -100)
    f = jax.jit(lambda h, w: supervised_cross_entropy(h, w, targets, mask, capacity=capacity, chunk=7))
    total, n = f(hidden, w)
    ref_total, ref_n = _naive_ce(hidden, w, targets, mask)
    np.testing.assert_allclose(float(total), float(ref_total), rtol=1e-5)
    assert float(n) == float(ref_n) == 20

    def mean(loss):
        return lambda h, w: (lambda s, c: s / c)(*loss(h, w))

    g = jax.grad(mean(lambda h, w: supervised_cross_entropy(h, w, targets, mask, capacity=capacity,
                                                            chunk=7)), argnums=(0, 1))(hidden, w)
    g_ref = jax.grad(mean(lambda h, w: _naive_ce(h, w, targets, mask)), argnums=(0, 1))(hidden, w)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    # the head runs over `capacity` positions in chunks of 7 (ceil(capacity / 7) chunks), not over
    # all 40 (6 chunks)
    jaxpr = jax.make_jaxpr(lambda h, w: supervised_cross_entropy(h, w, targets, mask,
                                                                 capacity=capacity, chunk=7))
    scans = [e.params["length"] for e in _eqns(jaxpr(hidden, w).jaxpr) if e.primitive.name == "scan"]
    assert scans == [-(-capacity // 7)]


def test_supervised_capacity_bounds_every_packing():
    from core.packing import epoch_rows, example_slots, supervised_capacity

    rng = np.random.default_rng(0)
    for trial in range(100):
        seq = int(rng.choice([32, 64, 128]))
        lengths = rng.integers(2, seq + 2, size=int(rng.integers(5, 200)))
        prompts = np.minimum(rng.integers(0, seq, size=len(lengths)), lengths - 1)
        rows, pack = int(rng.integers(1, 9)), bool(trial % 2)
        sup = lengths - np.maximum(prompts, 1)
        cap = supervised_capacity(lengths, sup, seq, rows, pack=pack)
        assert cap % 8 == 0 or cap == rows * seq
        most = 0
        for epoch in range(3):
            r = epoch_rows([example_slots(n) for n in lengths], seq, pack=pack, seed=trial,
                           epoch=epoch)
            per_row = [int(sum(sup[i] for i in row)) for row in r]
            most = max(most, max(sum(per_row[k:k + rows]) for k in range(0, len(per_row), rows)))
        assert most <= cap
        if not pack:                          # exact: the `rows` largest, rounded up to 8
            assert cap == min(rows * seq, 8 * -(-int(np.sort(sup)[::-1][:rows].sum()) // 8))


def _eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in (param if isinstance(param, (tuple, list)) else (param,)):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _eqns(inner)


def _largest_intermediate(jaxpr) -> int:
    biggest = 0
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            biggest = max(biggest, int(np.prod(getattr(v.aval, "shape", ()) or (1,))))
        for param in eqn.params.values():
            for sub in (param if isinstance(param, (tuple, list)) else (param,)):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    biggest = max(biggest, _largest_intermediate(inner))
    return biggest


def test_chunked_ce_never_builds_full_logits():
    B, T, D, V, chunk = 2, 64, 8, 500, 16
    hidden, w, targets, mask = _ce_inputs(B, T, D, V)
    grad_fn = jax.grad(lambda h, w: chunked_cross_entropy(h, w, targets, mask, chunk)[0], argnums=(0, 1))
    biggest = _largest_intermediate(jax.make_jaxpr(grad_fn)(hidden, w).jaxpr)
    assert biggest < B * T * V / 4                # the chunk's [16, 500] logits, not [128, 500]
    naive = jax.grad(lambda h, w: _naive_ce(h, w, targets, mask)[0], argnums=(0, 1))
    assert _largest_intermediate(jax.make_jaxpr(naive)(hidden, w).jaxpr) >= B * T * V
