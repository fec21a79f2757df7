"""GGUF export, checked against two independent references: the GGUF that llama.cpp's converter made of
SmolLM2 (the embedded model: its metadata and its Q8_0 tensor) and transformers' GGUF loader (which
reads our file back: exactly in f32, within each format's rounding otherwise)."""
import numpy as np
import pytest
import torch
from gguf import GGUFReader
from safetensors.numpy import load_file

from core.errors import PlanError
from compiler.gguf import embedded_gguf_path
from core.gguf import permute_qk, unpermute_qk
from runtime.gguf import write_gguf
from runtime.export import save_merged
from runtime.model import LoraConfig
from runtime.weights import to_hf_state_dict

LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.0,
                  targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))


def field(reader, key):
    f = reader.fields[key]
    parts = [f.parts[i] for i in f.data]
    return [bytes(p).decode() if p.dtype == np.uint8 else p.tolist() for p in parts]


def hf_from_gguf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                dtype=torch.float32).eval()


def logits(model, x):
    with torch.no_grad():
        return model(torch.as_tensor(x)).logits.numpy()


@pytest.fixture(scope="module")
def merged(smollm2_dir, tmp_path_factory):
    """(HF state dict of SmolLM2 with a random adapter folded in, its transformers checkpoint dir)."""
    import jax
    from flax import nnx
    from test_export import trained_like

    from runtime.model import LoRAParam

    model = trained_like(smollm2_dir, lora=LORA)
    # factors smaller than trained_like's, as after real training: the merged model stays sane
    nnx.update(model, jax.tree.map(lambda x: 0.2 * x, nnx.state(model, LoRAParam)))
    out = save_merged(model, tmp_path_factory.mktemp("merged") / "m", smollm2_dir)
    return to_hf_state_dict(model, merged=True), out


def test_permutation_round_trips_weights_and_biases():
    rng = np.random.default_rng(0)
    for shape in ((4 * 8, 5), (4 * 8,)):
        w = rng.normal(size=shape)
        back = unpermute_qk(permute_qk(w, 4), 4) if w.ndim == 2 else \
            unpermute_qk(permute_qk(w, 4)[:, None], 4)[:, 0]
        np.testing.assert_array_equal(back, w)


def test_metadata_and_q8_0_equal_llama_cpp_converter(smollm2_dir, tmp_path):
    """The base model exported as q8_0: every llama.* and tokenizer.* field is the one llama.cpp's
    converter wrote, and token_embd (Q8_0 in the embedded file, so its dequantized values
    re-quantize to the same blocks) is byte for byte the same tensor."""
    base = load_file(str(smollm2_dir / "model.safetensors"))
    out = write_gguf(base, smollm2_dir, tmp_path / "base.gguf", kind="q8_0", name="SmolLM2 base")
    ours, ref = GGUFReader(str(out)), GGUFReader(str(embedded_gguf_path()))
    keys = [k for k in ref.fields if k.startswith(("llama.", "tokenizer.")) or
            k in ("general.architecture", "general.quantization_version", "general.type")]
    assert len(keys) > 20
    for key in keys:
        assert key in ours.fields, key
        assert field(ours, key) == field(ref, key), key
    assert field(ours, "general.file_type") == [[7]]       # MOSTLY_Q8_0
    assert field(ours, "general.name") == ["SmolLM2 base"]
    ours_t = {t.name: t for t in ours.tensors}
    ref_t = {t.name: t for t in ref.tensors}
    assert set(ours_t) == set(ref_t)                       # tied: no output.weight in either
    emb_ours, emb_ref = ours_t["token_embd.weight"], ref_t["token_embd.weight"]
    assert emb_ref.tensor_type.name == "Q8_0" == emb_ours.tensor_type.name
    np.testing.assert_array_equal(np.asarray(emb_ours.data), np.asarray(emb_ref.data))
    assert {t.tensor_type.name for n, t in ours_t.items() if n.endswith("norm.weight")} == {"F32"}


def test_f32_gguf_logits_equal_the_merged_checkpoint(merged, tmp_path):
    from transformers import AutoModelForCausalLM

    state, merged_dir = merged
    out = write_gguf(state, merged_dir, tmp_path / "m.gguf", kind="f32", name="m")
    x = np.random.default_rng(0).integers(0, 49152, (2, 19))
    want = logits(AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval(), x)
    got = logits(hf_from_gguf(out), x)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)


@pytest.mark.parametrize("kind", ["f16", "bf16", "q8_0"])
def test_quantized_weights_read_back_within_rounding(merged, tmp_path, kind):
    """transformers dequantizes each weight matrix to within the format's rounding of ours (q/k
    rows in their own order again); norms stay exact."""
    state, merged_dir = merged
    out = write_gguf(state, merged_dir, tmp_path / f"m-{kind}.gguf", kind=kind, name="m")
    assert out.stat().st_size < {"f16": 0.52, "bf16": 0.52, "q8_0": 0.28}[kind] * 4 * sum(
        v.size for v in state.values())
    back = {k: v.numpy() for k, v in hf_from_gguf(out).state_dict().items()}
    for name, want in state.items():
        got, want = back[name], np.asarray(want, np.float32)
        if want.ndim == 1:
            np.testing.assert_array_equal(got, want, err_msg=name)
            continue
        if kind == "q8_0":
            # blocks of 32 along a row share a scale d = max|x|/127, stored as f16: the error is at
            # most d/2 plus 127 times d's own rounding (2^-11 relative)
            d = np.abs(want.reshape(want.shape[0], -1, 32)).max(-1, keepdims=True) / 127
            err = np.abs(got - want).reshape(d.shape[0], -1, 32)
            assert (err <= d * (0.5 + 127 * 2 ** -11) + 1e-7).all(), (name, (err / d).max())
        else:
            rtol = 2 ** -11 if kind == "f16" else 2 ** -8
            np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-7, err_msg=name)


def test_other_architectures_are_refused_with_the_way_out(hf_tiny, tmp_path):
    _, path = hf_tiny("qwen2")
    with pytest.raises(PlanError) as e:
        write_gguf(load_file(str(path / "model.safetensors")), path, tmp_path / "q.gguf",
                   kind="f16", name="q")
    assert e.value.key == "format" and "qwen2" in str(e.value) and "merged" in str(e.value)
    assert not (tmp_path / "q.gguf").exists()


def test_tune_export_command(tune_cli, tmp_path, smollm2_dir):
    """`tune export` of a trained run: merged loads in transformers and equals PEFT's merge of the same
    adapter; gguf is written under the run; an existing output, a run without an adapter and an
    unknown format are refused (exit 2) and leave nothing behind."""
    from peft import PeftModel
    from test_cli import flat, no_run_dirs
    from test_export import trained_like
    from transformers import AutoModelForCausalLM

    from runtime.peft import save_peft_adapter

    rc, out, err = tune_cli("plan", "+recipe=finance", "hydra.run.dir=trained")
    assert rc == 0, err
    adapter = save_peft_adapter(trained_like(smollm2_dir, lora=LORA), tmp_path / "trained" / "adapter")

    rc, out, err = tune_cli("export", "run=trained", "format=merged")
    assert rc == 0, err
    merged = tmp_path / "trained" / "export" / "merged"
    assert "exported (merged)" in err and str(merged) in flat(err)
    x = np.random.default_rng(1).integers(0, 49152, (1, 15))
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    want = logits(PeftModel.from_pretrained(base, adapter).merge_and_unload().eval(), x)
    got = logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval(), x)
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)

    rc, out, err = tune_cli("export", "run=trained", "format=gguf", "gguf_type=q8_0")
    assert rc == 0, err
    gguf = tmp_path / "trained" / "export" / "trained-q8_0.gguf"
    assert field(GGUFReader(str(gguf)), "general.file_type") == [[7]]

    rc, out, err = tune_cli("export", "run=trained", "format=gguf", "gguf_type=q8_0")
    assert rc == 2 and "exists" in flat(err) and str(gguf) in flat(err)
    rc, out, err = tune_cli("export", "run=trained", "format=peft", "out=shared/adapter")
    assert rc == 0, err
    assert (tmp_path / "shared" / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (adapter / "adapter_model.safetensors").read_bytes()
    rc, out, err = tune_cli("export", "run=trained", "format=onnx")
    assert rc == 2 and "format" in flat(err) and "gguf" in flat(err)
    rc, out, err = tune_cli("plan", "+recipe=finance", "hydra.run.dir=untrained")
    rc, out, err = tune_cli("export", "run=untrained", "format=merged")
    assert rc == 2 and "no trained adapter" in flat(err)
    assert not (tmp_path / "untrained" / "export").exists()
    assert sorted(p.name for p in (tmp_path / "trained" / "export").iterdir()) == \
        ["merged", "trained-q8_0.gguf"]          # no temporary folder left behind
    assert no_run_dirs(tmp_path)
