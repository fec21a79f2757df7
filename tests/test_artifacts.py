"""Corrupt or hostile artifacts end cleanly: a PlanError (exit code 2) naming the file and the key, or
a documented fallback — never a traceback, never a hang, never a half-written output.

- checkpoints: a damaged or inconsistent newest checkpoint is skipped for the one before it;
- `tune export`: a damaged adapter is refused before anything is written;
- model directories: a truncated model.safetensors, an index naming files outside the directory,
  and config.json fields of the wrong type or an absurd size are refused by `tune plan`, at once.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from compiler.models import resolve_model
from conftest import tiny_plan
from core.errors import PlanError

DROP = object()         # a config.json edit that removes the field


# ------------------------------------------------------------------------------ helpers

def _model_copy(src: Path, dst: Path, **config_edits) -> Path:
    """A copy of the model directory `src` at `dst`, config.json edited (DROP removes a field)."""
    shutil.copytree(src, dst)
    if config_edits:
        cfg = json.loads((dst / "config.json").read_text())
        for key, value in config_edits.items():
            if value is DROP:
                cfg.pop(key, None)
            else:
                cfg[key] = value
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _refused(model_dir: Path, *needles, file_name: str) -> PlanError:
    """resolve_model refuses model_dir within 1 s with a PlanError on model.path naming file_name
    and every needle."""
    t0 = time.perf_counter()
    with pytest.raises(PlanError) as info:
        resolve_model({"path": str(model_dir)})
    elapsed = time.perf_counter() - t0
    e = info.value
    assert elapsed < 1.0, f"refusal took {elapsed:.2f} s"
    assert e.key == "model.path" and e.hint, e
    assert e.file is not None and Path(e.file).name == file_name, e
    text = str(e)
    for needle in needles:
        assert needle in text, (needle, text)
    return e


def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_safetensors(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _refused_cli(result, *needles) -> str:
    rc, out, err = result
    text = " ".join(err.split())
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in out + err
    for needle in needles:
        assert needle in text, (needle, err)
    return text


# ------------------------------------------------------------------------------ 1. checkpoints

def _trees(seed=0):
    """Small LoRA and optimizer trees shaped like a run's (one factor pair, Adam moments, counts)."""
    rng = np.random.default_rng(seed)
    lora = {"q/lora_A": rng.normal(size=(2, 4, 8)).astype(np.float32),
            "q/lora_B": rng.normal(size=(2, 8, 4)).astype(np.float32)}
    opt = {"adam/count": np.int32(0), "adam/mu": {k: v * 0.1 for k, v in lora.items()},
           "lr/count": np.int32(0)}
    return lora, opt


def _save(run_dir, step, *, spe=4, plan_hash="h" * 64, **meta_edits):
    from runtime import checkpoint

    lora, opt = _trees(step)
    opt = {**opt, "adam/count": np.int32(step), "lr/count": np.int32(step)}
    path = checkpoint.save(run_dir, step=step, epoch=step // spe, index=step % spe,
                           rng=np.array([0, step], np.uint32), plan_hash=plan_hash, lora=lora,
                           opt_state=opt, extra={"tokens_seen": 10 * step})
    if meta_edits:
        _edit_checkpoint(path, meta_edits)
    return path


def _edit_checkpoint(path: Path, meta_edits=None, arrays=None) -> None:
    with np.load(path) as z:
        data = {k: z[k] for k in z.files}
    meta = json.loads(str(data["meta"]))
    meta.update(meta_edits or {})
    data["meta"] = np.array(json.dumps(meta))
    for k, v in (arrays or {}).items():
        if v is DROP:
            del data[k]
        else:
            data[k] = v
    np.savez(path, **data)


def _load(run_dir, *, total=8, spe=4, plan_hash="h" * 64):
    from runtime import checkpoint

    lora, opt = _trees()
    return checkpoint.load_latest(run_dir, plan_hash=plan_hash, total_steps=total,
                                  steps_per_epoch=spe, rng_template=np.zeros(2, np.uint32),
                                  lora_template=lora, opt_template=opt)


def _truncate(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _garbage(path):
    path.write_bytes(os.urandom(4096))


def _empty(path):
    path.write_bytes(b"")


def _zip_cut(path):             # a zip whose members end early: the header survives
    raw = path.read_bytes()
    path.write_bytes(raw[:200] + raw[-1000:])


def _drop_meta(path):
    with np.load(path) as z:
        data = {k: z[k] for k in z.files if k != "meta"}
    np.savez(path, **data)


CORRUPT = {
    "truncated": (_truncate, "it cannot be read"),
    "garbage": (_garbage, "not a .npz archive"),
    "empty": (_empty, "not a .npz archive"),
    "members cut": (_zip_cut, "it cannot be read"),
    "step 999": (lambda p: _edit_checkpoint(p, {"step": 999}), "says step 999, outside this plan's 0..8"),
    "step of another name": (lambda p: _edit_checkpoint(p, {"step": 1, "epoch": 0, "index": 1}),
                             "says step 1, its name step 3"),
    "step a string": (lambda p: _edit_checkpoint(p, {"step": "3"}), "are not all integers"),
    "data position": (lambda p: _edit_checkpoint(p, {"epoch": 5}),
                      "is not where 3 steps of 4 per epoch lead"),
    "rng key": (lambda p: _edit_checkpoint(p, {"rng": [1, 2, 3]}), "rng key is not 2 unsigned"),
    "tokens_seen": (lambda p: _edit_checkpoint(p, {"extra": {"tokens_seen": -1}}),
                    "tokens_seen (-1) is not a count"),
    "meta not an object": (lambda p: _edit_checkpoint(p, arrays={"meta": np.array("[1, 2]")}),
                           "metadata is not a JSON object"),
    "no meta": (_drop_meta, "it has no metadata"),
    "optimizer count": (lambda p: _edit_checkpoint(p, arrays={"opt/adam/count": np.int32(7)}),
                        "its optimizer has taken 7 steps ('adam/count'), its metadata says 3"),
    "leaf missing": (lambda p: _edit_checkpoint(p, arrays={"lora/q/lora_B": DROP}),
                     "it has no 'lora/q/lora_B'"),
    "leaf shape": (lambda p: _edit_checkpoint(p, arrays={"lora/q/lora_A": np.zeros((2, 5, 8),
                                                                                   np.float32)}),
                   "'lora/q/lora_A' has shape (2, 5, 8), the run expects (2, 4, 8)"),
    "leaf not finite": (lambda p: _edit_checkpoint(p, arrays={"opt/adam/mu/q/lora_B": np.full(
        (2, 8, 4), np.nan, np.float32)}), "'opt/adam/mu/q/lora_B' holds values that are not finite"),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_a_bad_newest_checkpoint_falls_back_to_the_one_before(tmp_path, capsys, case):
    corrupt, why = CORRUPT[case]
    _save(tmp_path, 2)
    newest = _save(tmp_path, 3)
    corrupt(newest)
    capsys.readouterr()
    ckpt = _load(tmp_path)
    assert ckpt is not None and ckpt.step == 2 and ckpt.path.name == "step_00000002.npz"
    assert (ckpt.epoch, ckpt.index, ckpt.extra["tokens_seen"]) == (0, 2, 20)
    np.testing.assert_array_equal(ckpt.lora["q/lora_A"], _trees(2)[0]["q/lora_A"])
    err = " ".join(capsys.readouterr().err.split())
    assert f"skipping checkpoint {newest}: " in err and why in err, err


def test_no_valid_checkpoint_starts_from_step_0(tmp_path, capsys):
    for step in (2, 3):
        _truncate(_save(tmp_path, step))
    assert _load(tmp_path) is None
    err = capsys.readouterr().err
    assert err.count("skipping checkpoint") == 2
    assert "no valid checkpoint" in err and "training starts from step 0" in err


def test_another_plans_checkpoint_is_still_refused(tmp_path):
    _save(tmp_path, 2, plan_hash="o" * 64)
    with pytest.raises(PlanError, match="another plan") as info:
        _load(tmp_path)
    assert info.value.key == "checkpoint" and "fresh run directory" in str(info.value)


def test_a_skipped_later_checkpoint_does_not_push_out_good_ones(tmp_path):
    """Rotation keeps the newest two up to the step just written: an invalid step_00000999 left in
    the directory does not make it delete the checkpoints the run is writing."""
    from runtime import checkpoint

    _truncate(_save(tmp_path, 8, spe=4))
    (checkpoint.directory(tmp_path) / "step_00000008.npz").rename(
        checkpoint.directory(tmp_path) / "step_00000999.npz")
    for step in (1, 2, 3):
        _save(tmp_path, step)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == \
        ["step_00000002.npz", "step_00000003.npz", "step_00000999.npz"]
    assert _load(tmp_path).step == 3


@pytest.mark.slow
def test_training_resumes_from_the_newest_valid_checkpoint(tiny_chat_dir, tmp_path, capsys):
    """End to end: the run's newest checkpoint truncated, its metadata's step set to 999 in the one
    before: the run resumes from the valid one and reports the plan's own step count."""
    from runtime import checkpoint
    from runtime.run import train

    plan = tiny_plan(tiny_chat_dir, tmp_path, seq_len=32, batch_size=2, grad_accum=1, epochs=1,
                     n_train=12, n_val=2, checkpoint_every=1, pack=False)
    total = plan.schedule.total_steps
    assert total >= 4

    def stop(step):
        if step == 4:
            raise RuntimeError("killed")

    run = tmp_path / "run"
    with pytest.raises(RuntimeError):
        train(plan, run, on_step=stop)
    kept = checkpoint.list_checkpoints(run)
    assert [p.name for p in kept] == ["step_00000002.npz", "step_00000003.npz"]
    _truncate(kept[-1])
    capsys.readouterr()
    summary = train(plan, run)
    err = capsys.readouterr().err
    assert f"skipping checkpoint {kept[-1]}" in err and "resuming from step 2" in err
    assert summary.resumed_from == 2 and summary.steps == total
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------------------ 2. tune export

@pytest.fixture(scope="module")
def finished_run(tiny_chat_dir, tmp_path_factory):
    """A run directory as training leaves it (plan.json, adapter/ with non-zero factors), made
    without training: the tiny model's LoRA factors drawn at random."""
    import jax
    from flax import nnx

    from runtime.build import lora_config
    from runtime.model import LoRAParam
    from runtime.peft import save_peft_adapter
    from runtime.weights import load_pretrained

    run = tmp_path_factory.mktemp("finished")
    plan = tiny_plan(tiny_chat_dir, run, rank=4)
    model = load_pretrained(tiny_chat_dir, lora=lora_config(plan))
    leaves, treedef = jax.tree.flatten(nnx.state(model, LoRAParam))
    keys = jax.random.split(jax.random.key(0), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [0.1 * jax.random.normal(k, x.shape)
                                                   for k, x in zip(keys, leaves)]))
    save_peft_adapter(model, run / "adapter", base_model_name_or_path=str(tiny_chat_dir),
                      lora=lora_config(plan))
    plan.write(run / "plan.json")
    return run


def _rename_tensor(path):
    from safetensors.numpy import load_file, save_file

    t = load_file(str(path))
    k = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    t[k.replace("self_attn.q_proj", "mlp.gate_proj")] = t.pop(k)
    save_file(t, str(path))


def _reshape_tensor(path):
    from safetensors.numpy import load_file, save_file

    t = load_file(str(path))
    k = next(k for k in t if "layers.1.self_attn.v_proj.lora_B" in k)
    t[k] = np.zeros((t[k].shape[0], 8), np.float32)
    save_file(t, str(path))


def _nan_tensor(path):
    from safetensors.numpy import load_file, save_file

    t = load_file(str(path))
    k = next(iter(t))
    t[k] = np.full_like(t[k], np.inf)
    save_file(t, str(path))


def _drop_tensor(path):
    from safetensors.numpy import load_file, save_file

    t = load_file(str(path))
    del t["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"]
    save_file(t, str(path))


def _config_edit(**edits):
    def edit(path):
        config = path.parent / "adapter_config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), **edits}))
    return edit


ADAPTER_CASES = {
    "truncated": (_truncate, "adapter_model.safetensors", "it is truncated"),
    "garbage": (_garbage, "adapter_model.safetensors", "is not a safetensors file"),
    "cut by 1 byte": (lambda p: p.write_bytes(p.read_bytes()[:-1]), "adapter_model.safetensors",
                      "it is truncated"),
    "padded": (lambda p: p.write_bytes(p.read_bytes() + b"\0" * 16), "adapter_model.safetensors",
               "16 bytes after its last tensor"),
    "wrong names": (_rename_tensor, "adapter_model.safetensors",
                    "lacks model.layers.0.self_attn.q_proj.lora_A.weight; holds tensors this model "
                    "has no place for: model.layers.0.mlp.gate_proj.lora_A.weight."),
    "missing tensor": (_drop_tensor, "adapter_model.safetensors",
                       "lacks model.layers.0.self_attn.k_proj.lora_A.weight"),
    "wrong shape": (_reshape_tensor, "adapter_model.safetensors",
                    "model.layers.1.self_attn.v_proj.lora_B.weight [16, 8] (expected [16, 4])"),
    "not finite": (_nan_tensor, "adapter_model.safetensors", "values that are not finite"),
    "config rank": (_config_edit(r=8), "adapter_model.safetensors",
                    "holds tensors of the wrong shape: model.layers.0.self_attn.k_proj.lora_A.weight "
                    "[4, 32] (expected [8, 32])"),
    "config garbage": (lambda p: (p.parent / "adapter_config.json").write_text("{r: 4"),
                       "adapter_config.json", "not readable as JSON"),
    "config targets": (_config_edit(target_modules=["q_proj", 7]), "adapter_config.json",
                       "target_modules must list modules"),
}


@pytest.mark.parametrize("case", list(ADAPTER_CASES))
def test_export_refuses_a_damaged_adapter(finished_run, tune_cli, tmp_path, case):
    corrupt, file_name, needle = ADAPTER_CASES[case]
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    corrupt(run / "adapter" / "adapter_model.safetensors")
    out = tmp_path / "exported"
    t0 = time.perf_counter()
    text = _refused_cli(tune_cli("export", f"run={run}", "format=peft", f"out={out}"),
                        f"{run / 'adapter' / file_name}: run: ", needle)
    assert "Hint:" in text
    assert time.perf_counter() - t0 < 10
    assert not out.exists() and not list(tmp_path.glob(".exported.*")), "export left files"


def test_export_of_a_sound_adapter_and_merged_refusal(finished_run, tune_cli, tmp_path):
    """The check passes what training wrote (peft export works), and a merged export of a damaged
    adapter is refused too, before the merged checkpoint is written."""
    out = tmp_path / "peft"
    rc, _, err = tune_cli("export", f"run={finished_run}", "format=peft", f"out={out}")
    assert rc == 0, err
    assert (out / "adapter_model.safetensors").read_bytes() == \
        (finished_run / "adapter" / "adapter_model.safetensors").read_bytes()
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    _truncate(run / "adapter" / "adapter_model.safetensors")
    merged = tmp_path / "merged"
    _refused_cli(tune_cli("export", f"run={run}", "format=merged", f"out={merged}"),
                 "adapter_model.safetensors", "it is truncated")
    assert not merged.exists()


def test_loading_a_damaged_adapter_is_a_plan_error(finished_run, tiny_chat_dir, tmp_path):
    """Every command that loads a run's adapter (eval, generate, serve, export) goes through
    load_peft_adapter: a damaged file is a PlanError naming it, not a reader's exception."""
    from runtime.peft import load_peft_adapter, read_lora_config
    from runtime.weights import load_pretrained

    adapter = tmp_path / "adapter"
    shutil.copytree(finished_run / "adapter", adapter)
    _garbage(adapter / "adapter_model.safetensors")
    model = load_pretrained(tiny_chat_dir, lora=read_lora_config(adapter))
    with pytest.raises(PlanError) as info:
        load_peft_adapter(model, adapter)
    assert info.value.key == "run" and info.value.file == str(adapter / "adapter_model.safetensors")


# ------------------------------------------------------------------------------ 3. truncated weights

def _cut(n):
    def cut(path):
        path.write_bytes(path.read_bytes()[:-n])
    return cut


def _grow_shape(path):
    header, data = _header(path)
    header["model.norm.weight"]["shape"] = [64]          # 32 floats stored, 64 claimed
    _write_safetensors(path, header, data)


def _offsets_past_end(path):
    header, data = _header(path)
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    start, end = header[last]["data_offsets"]
    header[last]["data_offsets"] = [start + 10**12, end + 10**12]
    _write_safetensors(path, header, data)


def _huge_shape(path):
    header, data = _header(path)
    header["model.norm.weight"]["shape"] = [10**18, 10**18, 10**18]
    _write_safetensors(path, header, data)


WEIGHT_CASES = {
    "half": (_truncate, "it is truncated (its tensors need"),
    "last byte": (_cut(1), "it is truncated (its tensors need"),
    "header only": (lambda p: p.write_bytes(p.read_bytes()[:8 + _header_len(p)]),
                    "it is truncated"),
    "padded": (lambda p: p.write_bytes(p.read_bytes() + b"x" * 8), "8 bytes after its last tensor"),
    "shape beyond bytes": (_grow_shape, "model.norm.weight (F32, shape [64]) 128 bytes where it "
                                        "needs 256"),
    "offsets past the end": (_offsets_past_end, "starts at byte"),
    "absurd shape": (_huge_shape, "where it needs"),
    "garbage": (_garbage, "is not a safetensors file"),
    "empty": (_empty, "0 bytes long, shorter than a header"),
}


def _header_len(path):
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


@pytest.mark.parametrize("case", list(WEIGHT_CASES))
def test_damaged_model_weights_are_refused_at_compile_time(tiny_chat_dir, tmp_path, case):
    corrupt, needle = WEIGHT_CASES[case]
    model = _model_copy(tiny_chat_dir, tmp_path / "m")
    corrupt(model / "model.safetensors")
    _refused(model, "model.safetensors", needle, file_name="model.safetensors")


def test_truncated_weights_exit_2_from_tune_plan(tiny_chat_dir, tune_cli, tmp_path):
    model = _model_copy(tiny_chat_dir, tmp_path / "m")
    _cut(100)(model / "model.safetensors")
    _refused_cli(tune_cli("plan", f"model.path={model}", "hydra.run.dir=run"),
                 f"{model / 'model.safetensors'}: model.path:", "it is truncated")
    assert not (tmp_path / "run").exists()


def test_the_runtime_checks_the_weights_again(tiny_chat_dir, tmp_path):
    """Weights that change after `tune plan` (the run reads them later) are checked when loaded."""
    from runtime.weights import load_pretrained

    model = _model_copy(tiny_chat_dir, tmp_path / "m")
    _cut(1)(model / "model.safetensors")
    with pytest.raises(PlanError, match="it is truncated") as info:
        load_pretrained(model)
    assert info.value.file == str(model / "model.safetensors")


# ------------------------------------------------------------------------------ 4. index paths

def _sharded(tiny_chat_dir, dst: Path) -> tuple[Path, dict]:
    """The tiny model as two shards with an index, as transformers writes big checkpoints."""
    from safetensors.numpy import load_file, save_file

    model = _model_copy(tiny_chat_dir, dst)
    tensors = load_file(str(model / "model.safetensors"))
    (model / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        file = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(model / file))
        weight_map.update({n: file for n in part})
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return model, weight_map


def _point(model: Path, weight_map: dict, target: str) -> None:
    name = next(iter(weight_map))
    (model / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {**weight_map, name: target}}))


@pytest.mark.parametrize("target", ["/etc/passwd", "../outside.safetensors",
                                    "linked/model-00001-of-00002.safetensors",
                                    "evil.safetensors", "sub/../../outside.safetensors"])
def test_an_index_never_leads_outside_the_model_directory(tiny_chat_dir, tmp_path, monkeypatch,
                                                          target):
    """Refused by `tune plan` and by the runtime's loader, and the file is never opened."""
    import compiler.models
    import runtime.weights

    model, weight_map = _sharded(tiny_chat_dir, tmp_path / "m")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(model / "model-00001-of-00002.safetensors", tmp_path / "outside.safetensors")
    shutil.copy(model / "model-00001-of-00002.safetensors",
                outside / "model-00001-of-00002.safetensors")
    (model / "linked").symlink_to(outside, target_is_directory=True)        # a folder elsewhere
    (model / "evil.safetensors").symlink_to("/etc/passwd")                   # a file elsewhere
    _point(model, weight_map, target)

    opened = []
    for module in (compiler.models, runtime.weights):
        real = module.read_header
        monkeypatch.setattr(module, "read_header",
                            lambda p, real=real, **kw: (opened.append(Path(p)), real(p, **kw))[1])
    real_open = runtime.weights.safe_open
    monkeypatch.setattr(runtime.weights, "safe_open",
                        lambda p, **kw: (opened.append(Path(p)), real_open(p, **kw))[1])

    e = _refused(model, "model.safetensors.index.json", f"`{target}`",
                 "outside the model directory", file_name="model.safetensors.index.json")
    assert e.file == str(model / "model.safetensors.index.json")
    with pytest.raises(PlanError, match="outside the model directory"):
        runtime.weights.load_pretrained(model)
    assert opened == [], f"opened {opened}"


def test_sound_indexes_still_load(tiny_chat_dir, tmp_path):
    """Shards beside their index load, also when the files are links into a Hugging Face cache's
    blobs/ (as snapshot_download leaves them)."""
    from runtime.weights import load_pretrained

    model, weight_map = _sharded(tiny_chat_dir, tmp_path / "m")
    assert resolve_model({"path": str(model)}).config.num_layers == 2
    load_pretrained(model)

    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, f in enumerate(sorted(model.iterdir())):
        shutil.copy(f, blobs / f"blob{i}")
        (snapshot / f.name).symlink_to(Path("../../blobs") / f"blob{i}")
    assert resolve_model({"path": str(snapshot)}).config.num_layers == 2
    load_pretrained(snapshot)


# ------------------------------------------------------------------------------ 5. config.json

CONFIG_CASES = [
    # absurd sizes: refused before anything sized by them runs
    (dict(num_hidden_layers=100_000_000), "num_hidden_layers=100000000 is out of range",
     "an integer from 1 to 1,024"),
    (dict(vocab_size=10**12), "vocab_size=1000000000000 is out of range"),
    (dict(hidden_size=10**6), "hidden_size=1000000 is out of range"),
    (dict(intermediate_size=2**21), "intermediate_size=2097152 is out of range"),
    (dict(num_attention_heads=4096), "num_attention_heads=4096 is out of range"),
    (dict(num_key_value_heads=2048), "num_key_value_heads=2048 is out of range"),
    (dict(max_position_embeddings=2**40), "max_position_embeddings=1099511627776 is out of range"),
    (dict(head_dim=10**9), "head_dim=1000000000 is out of range"),
    (dict(num_hidden_layers=10**30), "num_hidden_layers=1000000000000000000000000000000 is out"),
    # zero or negative
    (dict(num_hidden_layers=0), "num_hidden_layers=0 is out of range"),
    (dict(hidden_size=-32), "hidden_size=-32 is out of range"),
    (dict(num_attention_heads=0), "num_attention_heads=0 is out of range"),
    (dict(num_key_value_heads=0), "num_key_value_heads=0 is out of range"),
    (dict(vocab_size=-5), "vocab_size=-5 is out of range"),
    (dict(intermediate_size=0), "intermediate_size=0 is out of range"),
    (dict(head_dim=0), "head_dim=0 is out of range"),
    (dict(rms_norm_eps=0), "rms_norm_eps=0 is out of range"),
    (dict(rms_norm_eps=float("nan")), "rms_norm_eps=NaN is not a finite number"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": -1}),
     "rope_parameters.rope_theta=-1 is out of range"),
    # wrong types
    (dict(num_hidden_layers="2"), 'num_hidden_layers="2" has the wrong type (a string)'),
    (dict(num_hidden_layers=2.5), "num_hidden_layers=2.5 has the wrong type (a fraction)"),
    (dict(num_hidden_layers=None), "config.json gives num_hidden_layers=null"),
    (dict(num_hidden_layers=True), "num_hidden_layers=true has the wrong type (a boolean)"),
    (dict(hidden_size=[32]), "hidden_size=[32] has the wrong type (a list)"),
    (dict(vocab_size={"n": 96}), 'vocab_size={"n": 96} has the wrong type (an object)'),
    (dict(intermediate_size="64"), 'intermediate_size="64" has the wrong type'),
    (dict(num_key_value_heads=False), "num_key_value_heads=false has the wrong type"),
    (dict(max_position_embeddings="256"), 'max_position_embeddings="256" has the wrong type'),
    (dict(rms_norm_eps="1e-5"), 'rms_norm_eps="1e-5" has the wrong type'),
    (dict(tie_word_embeddings="false"), 'tie_word_embeddings="false" has the wrong type',
     "true or false"),
    (dict(attention_bias=1), "attention_bias=1 has the wrong type"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": "big"}),
     'rope_parameters.rope_theta="big" has the wrong type'),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": "2"}),
     'rope_scaling.factor="2" has the wrong type'),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}),
     "RoPE scaling 'llama3' needs `low_freq_factor`"),
    (dict(eos_token_id="</s>"), 'eos_token_id="</s>" has the wrong type'),
    (dict(eos_token_id=10**6), "eos_token_id=1000000 is not a token id of the vocabulary",
     "a token id from 0 to 95"),
    (dict(bos_token_id=[1, "x"]), 'bos_token_id=[1, "x"] has the wrong type'),
    (dict(pad_token_id=-2), "pad_token_id=-2 is not a token id"),
    (dict(num_hidden_layers=DROP), "config.json lacks `num_hidden_layers`"),
    # sizes that do not fit together
    (dict(hidden_size=30, head_dim=DROP), "hidden_size=30 is not divisible by num_attention_heads=4"),
    (dict(num_key_value_heads=3), "4 attention heads do not group evenly over 3 key/value heads"),
    (dict(num_key_value_heads=8), "4 attention heads do not group evenly over 8 key/value heads"),
    (dict(head_dim=7), "head_dim=7 is odd"),
    (dict(architectures=[{"a": 1}], model_type=["llama"]), "is not supported"),
]


@pytest.mark.parametrize("case", CONFIG_CASES,
                         ids=[f"{i}-{','.join(c[0])}" for i, c in enumerate(CONFIG_CASES)])
def test_config_json_fields_are_checked_before_any_work(tiny_chat_dir, tmp_path, case):
    """Table-driven: each field tune reads gets type and range checks (core/architecture.py
    CONFIG_FIELDS), and sizes that do not fit together are named."""
    edits, *needles = case
    model = _model_copy(tiny_chat_dir, tmp_path / "m", **edits)
    _refused(model, *needles, file_name="config.json")


def test_a_pad_token_id_of_minus_one_means_none(tiny_chat_dir, tmp_path):
    """Older Llama configs say "no pad token" with pad_token_id=-1: read as none (the tokenizer's
    pad token, else the end token, pads), not refused."""
    from compiler.models import resolve_model

    model = _model_copy(tiny_chat_dir, tmp_path / "m", pad_token_id=-1)
    assert resolve_model({"path": str(model)}).pad_token_id == 0       # the tokenizer's <pad>


@pytest.mark.parametrize("text, needle", [
    ("{bad json", "is not valid JSON"),
    ("[1, 2]", "config.json must hold a JSON object, got list"),
    ('"a string"', "config.json must hold a JSON object, got str"),
    ("null", "config.json must hold a JSON object, got NoneType"),
    ("", "is not valid JSON"),
    ("[" * 100_000, "is not valid JSON"),
])
def test_config_json_that_is_not_an_object(tiny_chat_dir, tmp_path, text, needle):
    model = _model_copy(tiny_chat_dir, tmp_path / "m")
    (model / "config.json").write_text(text)
    _refused(model, needle, file_name="config.json")


def test_an_absurd_layer_count_ends_tune_plan_at_once(tiny_chat_dir, tune_cli, tmp_path):
    """`tune plan` with num_hidden_layers=100000000 used to loop over every layer's tensors."""
    model = _model_copy(tiny_chat_dir, tmp_path / "m", num_hidden_layers=100_000_000)
    _refused_cli(tune_cli("plan", f"model.path={model}", "hydra.run.dir=run"),
                 f"{model / 'config.json'}: model.path: num_hidden_layers=100000000 is out of range")
    assert not (tmp_path / "run").exists()


def test_generation_config_ids_are_checked(tiny_chat_dir, tmp_path):
    model = _model_copy(tiny_chat_dir, tmp_path / "m")
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, "x"]}))
    _refused(model, 'eos_token_id=[2, "x"] has the wrong type', file_name="generation_config.json")
    (model / "generation_config.json").write_text("[]")
    _refused(model, "generation_config.json must hold a JSON object",
             file_name="generation_config.json")


def test_the_runtime_reads_config_json_through_the_same_checks(tiny_chat_dir, tmp_path):
    from core.architecture import read_config

    model = _model_copy(tiny_chat_dir, tmp_path / "m", num_hidden_layers=100_000_000)
    t0 = time.perf_counter()
    with pytest.raises(PlanError, match="num_hidden_layers=100000000 is out of range") as info:
        read_config(model)
    assert time.perf_counter() - t0 < 1.0
    assert info.value.file == str(model / "config.json")
