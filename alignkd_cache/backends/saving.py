"""A trained model written as its source checkpoint was: the student's own format, not ours.

Only the weights change in training, so only the weight files are written: each under the source's
file name (so sharded as the source was, and its index stays valid), with the source's keys, dtypes
and header metadata. Every other file of the source (config.json, the tokenizer files, the
processor's, generation_config.json, chat templates, the weight index) is copied byte for byte:
re-serialising them through this transformers release would write formats older releases and other
tools cannot read. Files the output already holds (the run's own metrics and provenance) are kept.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

INDEX_FILE = "model.safetensors.index.json"
# Pickled or foreign weight formats a checkpoint may carry beside its safetensors: copied, they would
# ship the untrained weights.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


def weight_files(source: Path) -> list[str]:
    """The source's safetensors weight files: its index's shards, else model.safetensors."""
    index = source / INDEX_FILE
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return ["model.safetensors"]


def source_layout(source: Path) -> dict[str, tuple[dict[str, torch.dtype], dict | None]]:
    """file name -> ({key: dtype}, header metadata) for each of the source's weight files."""
    layout = {}
    for name in weight_files(source):
        with safe_open(str(source / name), framework="pt") as f:
            dtypes = {key: f.get_slice(key).get_dtype() for key in f.keys()}  # noqa: SIM118
            layout[name] = ({key: _DTYPES[dtype] for key, dtype in dtypes.items()}, f.metadata())
    return layout


def source_keys(source: Path) -> set[str]:
    return {key for dtypes, _ in source_layout(source).values() for key in dtypes}


# safetensors' dtype names (get_slice().get_dtype()) -> torch dtypes
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def save_like_source(source: Path, out: Path, state: dict[str, torch.Tensor]) -> None:
    """Write `state` (named as the source's weights are) into `out` in the source's layout and copy the
    source's other files. Every source key must be in `state`, and nothing else: a tensor the source
    does not have, or one it has and we lost, would make a checkpoint its own code loads differently."""
    layout = source_layout(source)
    expected = source_keys(source)
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        raise ValueError(
            f"cannot save in the layout of {source}: missing {missing[:3]}, not in the source {extra[:3]} "
            "(the model no longer matches its checkpoint); report this with both lists"
        )
    out.mkdir(parents=True, exist_ok=True)
    for name, (dtypes, metadata) in layout.items():
        # A copy each: safetensors refuses tensors sharing storage (tied embeddings).
        tensors = {key: state[key].detach().to("cpu", dtype, copy=True) for key, dtype in dtypes.items()}
        save_file(tensors, str(out / name), metadata=metadata)
    for path in sorted(source.iterdir()):
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES) and not (out / path.name).exists():
            shutil.copyfile(path, out / path.name)


def save_model_like_source(model, source: Path, out: Path) -> None:
    """A transformers model written as its source checkpoint was: transformers' save_pretrained gives
    the tensors their checkpoint names (it reverts the renames it applies on loading); only those
    tensors are kept, in the source's files, and every other file is the source's (save_like_source)."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".saving-") as scratch:
        model.save_pretrained(scratch)
        state = {
            k: v for name in weight_files(Path(scratch)) for k, v in load_file(Path(scratch) / name).items()
        }
        save_like_source(source, out, state)
