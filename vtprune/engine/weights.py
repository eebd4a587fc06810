"""Read llava-hf safetensors checkpoints into the engine's own modules.

Three key layouts exist in the wild and all map to one set of names here:
- hub llava-hf/llava-1.5-7b-hf (transformers < 4.52): `vision_tower.vision_model.*`,
  `language_model.model.*`, `language_model.lm_head.weight`, `multi_modal_projector.*`
- transformers 4.52 - 4.57 save_pretrained: `model.vision_tower.vision_model.*`,
  `model.language_model.*`, `lm_head.weight`
- transformers 5.x save_pretrained: `vision_tower.*` (no `vision_model`), `language_model.model.*`,
  `language_model.lm_head.weight`
Only safetensors are read (never pickles), tensor by tensor, straight to the target device and dtype;
each file's header is checked first (safetensors_header), and shard names from an index must stay
inside the model directory.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings

import torch
from safetensors import safe_open

from ..errors import CheckpointError, VtpruneError
from ..files import check_file, fs_error
from ..validate import is_int, show
from .config import read_model_json
from .model import LlavaModel

_RULES = [
    (r"^model\.(vision_tower|multi_modal_projector|language_model|lm_head)\.", r"\1."),
    (r"^vision_tower\.vision_model\.", "vision_tower."),
    (r"^language_model\.model\.", "language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^vision_tower\.encoder\.layers\.", "vision.layers."),
    (r"^vision_tower\.", "vision."),
    (r"^multi_modal_projector\.", "projector."),
    (r"^language_model\.", "decoder."),
    (r"^lm_head\.", "decoder.lm_head."),
]
# Present in checkpoints, not needed by the engine (CLIP's last layers past vision_feature_layer,
# its post-layernorm, which LLaVA never uses, and rotary buffers some old exports carry).
_UNUSED = re.compile(r"^vision\.(post_layernorm\.|layers\.\d+\.)|rotary_emb\.inv_freq$")


def canonical_name(key: str) -> str:
    for pattern, repl in _RULES:
        key = re.sub(pattern, repl, key)
    return key


# safetensors dtypes -> bytes per element. Weights must be floating point: an integer or bool
# tensor where a weight belongs is a quantized export or a corrupt file, which the engine cannot run.
_FLOAT_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
_MAX_HEADER = 100_000_000  # the safetensors library's own limit on the JSON header


def _checkpoint_error(e: VtpruneError) -> CheckpointError:
    return e if isinstance(e, CheckpointError) else CheckpointError(str(e))


def safetensors_header(path: str, what: str = "checkpoint file") -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (dtype, shape)} of a safetensors file, after checking what the format promises:
    a regular readable file, a JSON header of the stated length, every tensor's bytes inside the
    file and matching its dtype and shape, floating-point dtypes only. Reads the header only."""
    try:
        path = check_file(path, what)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{what} {path}: cannot read it as safetensors ({size} bytes, too "
                                          f"short for a header)")
                n = int.from_bytes(head, "little")
                if n > _MAX_HEADER or 8 + n > size:
                    raise CheckpointError(f"{what} {path}: cannot read it as safetensors (not one, or "
                                          f"truncated: its header claims {n} bytes, the file has {size})")
                raw = f.read(n)
        except OSError as e:
            raise fs_error(what, path, e) from None
    except VtpruneError as e:
        raise _checkpoint_error(e) from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{what} {path}: cannot read it as safetensors (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{what} {path}: cannot read it as safetensors (its header is not a JSON object)")
    data = size - 8 - n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not (isinstance(info, dict) and isinstance(info.get("dtype"), str)
                and isinstance(info.get("shape"), list) and all(is_int(d) and d >= 0 for d in info["shape"])
                and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
                and all(is_int(o) for o in info["data_offsets"])):
            raise CheckpointError(f"{what} {path}: tensor '{name}' has a malformed header entry ({show(info)})")
        dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        if dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"{what} {path}: tensor '{name}' has dtype {dtype}; weights must be floating "
                                  f"point ({', '.join(_FLOAT_DTYPES)})")
        if not 0 <= begin <= end <= data:
            raise CheckpointError(f"{what} {path}: tensor '{name}' lies outside the file (bytes {begin}..{end} "
                                  f"of {data}): truncated")
        if end - begin != math.prod(shape) * _FLOAT_DTYPES[dtype]:
            raise CheckpointError(f"{what} {path}: tensor '{name}' holds {end - begin} bytes, its {dtype} shape "
                                  f"{list(shape)} needs {math.prod(shape) * _FLOAT_DTYPES[dtype]}")
        out[name] = (dtype, shape)
    return out


def read_tensors(path: str, what: str, expected: dict[str, tuple[int, ...]] | None = None,
                 hint: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (on the CPU), header checked first (safetensors_header);
    with `expected` ({name: shape}), exactly those names with those shapes, or the error naming
    the first one that differs (`hint` is appended to a name mismatch)."""
    header = safetensors_header(path, what)
    path = os.fspath(path)
    if expected is not None:
        for key, (_, shape) in header.items():
            if key not in expected:
                raise CheckpointError(f"{what} {path}: unexpected tensor '{key}'{hint}")
            if tuple(shape) != tuple(expected[key]):
                raise CheckpointError(f"{what} {path}: tensor '{key}' has shape {list(shape)}, expected "
                                      f"{list(expected[key])} for this config")
        missing = [k for k in expected if k not in header]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(f"{what} {path}: missing tensor '{missing[0]}'{more}{hint}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in header}
    except Exception as e:  # noqa: BLE001 - safetensors' own error types, after the header checks passed
        raise CheckpointError(f"{what} {path}: cannot read ({' '.join(str(e).split())})") from None


def _shard_name(name, index: str) -> str:
    """A shard file name from the index, refused if it could leave the model directory."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise CheckpointError(f"{index}: shard name {show(name)} is not a file name")
    norm = os.path.normpath(name)
    if os.path.isabs(name) or norm == ".." or norm.startswith(".." + os.sep) or norm == ".":
        raise CheckpointError(f"{index}: shard name {show(name)} leaves the model directory (refused)")
    if not name.endswith(".safetensors"):
        raise CheckpointError(f"{index}: shard name {show(name)} is not a .safetensors file (only safetensors "
                              f"are loaded)")
    return norm


def checkpoint_files(model_dir: str) -> list[str]:
    """The checkpoint's safetensors files: the shards named by model.safetensors.index.json (names
    inside the model directory only), or the directory's model*.safetensors."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.lexists(index):
        data = read_model_json(index, "safetensors index")
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"safetensors index {index}: expected a non-empty \"weight_map\" object "
                                  f"(tensor name -> shard file)")
        files = sorted({_shard_name(f, f"safetensors index {index}") for f in weight_map.values()})
    else:
        try:
            names = os.listdir(model_dir)
        except OSError as e:
            raise _checkpoint_error(fs_error("model directory", model_dir, e)) from None
        files = sorted(f for f in names if f.startswith("model") and f.endswith(".safetensors"))
        if not files:
            bins = [f for f in names if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))]
            hint = " (found pickle files, which are never loaded: convert them to safetensors)" if bins else ""
            raise CheckpointError(f"no model*.safetensors files in {model_dir}{hint}")
    paths = [os.path.join(model_dir, f) for f in files]
    for p in paths:
        if not os.path.lexists(p):
            raise CheckpointError(f"checkpoint shard missing: {p}")
    return paths


def load_weights(model: LlavaModel, model_dir: str, device, dtype) -> None:
    """Fill every parameter of `model` (built on the meta device) from the checkpoint."""
    expected = dict(model.named_parameters())
    loaded: dict[str, torch.Tensor] = {}
    for path in checkpoint_files(model_dir):
        header = safetensors_header(path, "checkpoint file")
        names = {}
        for key, (_, shape) in header.items():
            name = canonical_name(key)
            if name not in expected:
                if not _UNUSED.search(name):
                    warnings.warn(f"checkpoint tensor '{key}' is not used by the engine", stacklevel=2)
                continue
            want = tuple(expected[name].shape)
            if shape != want:
                raise CheckpointError(f"checkpoint tensor '{key}' has shape {list(shape)}, "
                                      f"expected {list(want)} for this config ({path})")
            if name in loaded or name in names.values():
                raise CheckpointError(f"checkpoint tensor '{key}' ({path}) appears twice in the checkpoint")
            names[key] = name
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for key, name in names.items():
                    loaded[name] = f.get_tensor(key).to(device=device, dtype=dtype)
        except Exception as e:  # noqa: BLE001 - safetensors' own error types, after the header checks passed
            raise CheckpointError(f"checkpoint file {path}: cannot read ({' '.join(str(e).split())})") from None
    if "decoder.lm_head.weight" not in loaded and model.cfg.text.tie_word_embeddings \
            and "decoder.embed_tokens.weight" in loaded:
        loaded["decoder.lm_head.weight"] = loaded["decoder.embed_tokens.weight"]
    missing = [n for n in expected if n not in loaded]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"checkpoint is missing tensor '{missing[0]}'{more} in {model_dir}")
    model.load_state_dict(loaded, strict=False, assign=True)
    for p in model.parameters():
        p.requires_grad_(False)
