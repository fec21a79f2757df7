"""`tune export`: a finished run's adapter in the formats the rest of the ecosystem reads — the PEFT
adapter directory as it is (runtime/peft.py writes it), `save_merged`'s plain transformers checkpoint
with the LoRA deltas folded into the weights, or a GGUF file of that merged model (runtime/gguf.py).
"""
from __future__ import annotations

import shutil
from pathlib import Path

from safetensors.numpy import save_file

from core.architecture import unfold_expert_tensors
from runtime.model import Llama
from runtime.weights import to_hf_state_dict, vision_tensors

# Files a transformers checkpoint directory needs besides its weights (a multimodal one's image
# processor too).
_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt",
               "added_tokens.json", "chat_template.jinja", "chat_template.json",
               "preprocessor_config.json", "processor_config.json")


def save_merged(model: Llama, out_dir, model_dir) -> Path:
    """A transformers checkpoint of base + (alpha/r)·B@A: model.safetensors in the base's parameter dtype
    plus config.json, generation_config.json and the tokenizer files copied from model_dir. The
    text model of a multimodal checkpoint is written under the names model_dir's weights give it,
    beside their vision tensors, copied through as they are."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if model.cfg.multimodal:
        legacy, state = vision_tensors(model_dir)
        state.update(to_hf_state_dict(model, merged=True, legacy=legacy))
    else:
        # a mixture's experts one tensor each, as save_pretrained writes them
        state = unfold_expert_tensors(to_hf_state_dict(model, merged=True), model.cfg)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in _SIDE_FILES:
        src = Path(model_dir) / name
        if src.exists():
            shutil.copyfile(src, out / name)
    return out


EXPORT_FORMATS = ("peft", "merged", "gguf")


def export_run(plan, run_dir, out, *, fmt: str, gguf_type: str) -> Path:
    """A finished run's adapter as `fmt`: peft (the adapter directory as it is), merged (a
    transformers checkpoint with the adapter folded in) or gguf (a GGUF file of the merged model,
    weights in gguf_type). The adapter is checked whole first (check_adapter): a damaged one is
    refused before anything is written. Written beside `out` and renamed into place: never half a
    result. (A run with a classification head exports as peft only: tune/commands.export.)"""
    import os
    import tempfile

    from runtime.build import scoring_model, trained_dir
    from runtime.gguf import write_gguf

    run_dir, out = Path(run_dir), Path(out)
    if plan.adapter.kind != "full":
        check_adapter(plan, trained_dir(plan, run_dir))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if fmt == "peft":
            shutil.copytree(trained_dir(plan, run_dir), tmp / "x")
        else:
            model = scoring_model(plan, trained_dir(plan, run_dir))
            if fmt == "merged":
                save_merged(model, tmp / "x", plan.model.dir)
            else:
                write_gguf(to_hf_state_dict(model, merged=True), Path(plan.model.dir), tmp / "x",
                           kind=gguf_type, name=f"{plan.model.name} + {run_dir.name}")
        os.replace(tmp / "x", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def check_adapter(plan, adapter_dir) -> None:
    """The run's adapter/, checked whole before it is exported: adapter_config.json a LoRA config
    tune reads, adapter_model.safetensors complete and holding exactly the tensors that config
    gives the plan's model (names, shapes), all finite (runtime/peft.verify_adapter). PlanError
    (key `run`) naming the file otherwise. The adapter's own config, not the plan's adapter
    section, says what it is: that is how PEFT and `tune eval run=` read it too."""
    from flax import nnx

    from runtime.model import EXACT
    from runtime.peft import read_lora_config, verify_adapter

    lora = read_lora_config(adapter_dir, model_config=plan.model.config)
    abstract = nnx.eval_shape(lambda: Llama(plan.model.config, lora=lora, compute=EXACT,
                                            rngs=nnx.Rngs(0)))
    verify_adapter(adapter_dir, abstract)
