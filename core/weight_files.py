"""The safetensors files of a checkpoint or adapter directory, checked without reading their weights.

- `read_header`: a file's header, and proof that the file holds what the header promises — every
  tensor's bytes inside the file, as many as its dtype and shape need, the data section covered
  exactly (as the safetensors loader demands). A truncated or padded file is refused here, with its
  name, not half-way through loading it.
- `index_shards`: the shard files a `model.safetensors.index.json` names, each kept inside the model
  directory: an index is text anyone can write, so it may not lead the reader to `/etc/passwd`,
  `../x.safetensors` or through a linked folder elsewhere.

Shared by the compiler (`tune plan` checks a model before anything heavy) and the runtime (which
reads the weights, and checks again). Pure Python: no JAX, no numpy.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from core.errors import PlanError

# bytes per element of each safetensors dtype
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
MAX_HEADER = 100 * 2**20            # the safetensors format's own limit
INDEX_FILE = "model.safetensors.index.json"
_RESAVE = "re-download or re-save the weights with safetensors."


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, int]        # [start, end) within the data section


def read_header(path: Path, *, key: str, hint: str = _RESAVE) -> dict[str, TensorInfo]:
    """name → TensorInfo of a safetensors file; PlanError(key, file=path) if it is not a complete one.

    Reads the header only (at most MAX_HEADER bytes), whatever the file's size."""
    path = Path(path)

    def bad(why: str) -> PlanError:
        return PlanError(key, f"{path.name} is not a safetensors file, or not a complete one: {why}.",
                         file=str(path), hint=hint)

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise bad(f"it is {len(raw)} bytes long, shorter than a header")
            (n,) = struct.unpack("<Q", raw)
            if n < 2 or n > MAX_HEADER or 8 + n > size:
                raise bad(f"it announces a header of {n:,} bytes in a file of {size:,}")
            header = json.loads(f.read(n).decode("utf-8"))
    except PlanError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise bad(f"its header cannot be read ({e})") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    out = {name: _tensor_info(name, info, bad) for name, info in header.items()
           if name != "__metadata__"}
    _check_layout(out, size - 8 - n, bad)
    return out


def _tensor_info(name: str, info, bad) -> TensorInfo:
    if not isinstance(info, dict):
        raise bad(f"the header's entry for {name} is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise bad(f"the header gives {name} the unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_count(d) for d in shape):
        raise bad(f"the header gives {name} no valid shape (got {shape!r})")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise bad(f"the header gives {name} no valid data_offsets (got {offsets!r})")
    need = DTYPE_SIZES[dtype]
    for d in shape:             # stop early: a hostile shape may multiply to a number of any size
        need = min(need * d, 2**64)
    if offsets[1] - offsets[0] != need:
        raise bad(f"the header gives {name} ({dtype}, shape {shape}) {offsets[1] - offsets[0]:,} "
                  f"bytes where it needs {need:,}")
    return TensorInfo(dtype, tuple(shape), (offsets[0], offsets[1]))


def _count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_layout(tensors: dict[str, TensorInfo], data_size: int, bad) -> None:
    """The tensors' bytes lie back to back and fill the data section exactly: a truncated file (the
    last tensors cut off), a padded one, overlapping tensors or holes are all refused."""
    at = 0
    for name, t in sorted(tensors.items(), key=lambda kv: kv[1].offsets):
        start, end = t.offsets
        if start != at:
            raise bad(f"{name} starts at byte {start:,} of the data, expected {at:,} "
                      "(tensors overlap or leave a gap)")
        at = end
    if at > data_size:
        raise bad(f"it is truncated (its tensors need {at:,} bytes of data, the file holds "
                  f"{data_size:,})")
    if at < data_size:
        raise bad(f"it holds {data_size - at:,} bytes after its last tensor")


def index_shards(model_dir: Path, *, key: str) -> dict[str, Path] | None:
    """The weight map of `model_dir/model.safetensors.index.json` (tensor name → its shard file), or
    None when there is no index. PlanError(key, file=the index) when it is not a JSON object with a
    `weight_map` of names to file names, or when a shard lies outside model_dir: an absolute path,
    a `..`, or a folder that is a link elsewhere. A shard file may itself be a link into the
    Hugging Face cache's blobs/ of the same repository (that is how the cache stores files)."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if not index.is_file():
        return None

    def bad(why: str, hint: str = "re-download the checkpoint; its index names the shard files "
            "beside it.") -> PlanError:
        return PlanError(key, f"{INDEX_FILE} {why}.", file=str(index), hint=hint)

    try:
        doc = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise bad(f"is not valid JSON ({e})") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise bad("has no `weight_map` object (tensor name → shard file)")
    root = model_dir.resolve()
    allowed = [root] + ([root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [])
    shards = {}
    for name, file in weight_map.items():
        if not isinstance(file, str) or not file.strip():
            raise bad(f"maps {name} to {file!r}, not a file name")
        rel = Path(file)
        outside = rel.is_absolute() or ".." in rel.parts or "\\" in file or \
            not _inside((root / rel).parent.resolve(), [root])
        target = (root / rel).resolve()
        if outside or not _inside(target, allowed):
            raise bad(f"maps {name} to `{file}`, which lies outside the model directory "
                      f"{root}; shards are read from the model directory only",
                      hint="an index names shard files in its own directory "
                           "(model-00001-of-00002.safetensors); use the checkpoint as published.")
        shards[name] = root / rel
    return shards


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == r or path.is_relative_to(r) for r in roots)
