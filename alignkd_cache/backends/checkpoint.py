"""Where a model comes from and what exactly it is: checkpoint resolution (once per command, at the
boundary) and fingerprints.

Fingerprints let a cache refuse a student whose tokenizer differs from the teacher's, and let a
reader tell which teacher wrote a store.

- config_sha256: sha256 of the config as canonical JSON (sorted keys), without fields that change
  with the library version or the way it was loaded (transformers_version, dtype, attention choice).
- weights_sha256: for models up to WEIGHTS_HASH_LIMIT bytes, sha256 over the sorted state-dict
  names, dtypes, shapes and bytes as loaded (so the same checkpoint in bf16 and fp32 differ, as
  their outputs do). Above that, reading every byte of a 14 GB teacher would cost minutes, so the
  hash covers the source safetensors files' headers (every tensor name, dtype, shape and offset) and
  their sizes, plus the load dtype: it pins the checkpoint, though not a bit flip inside a tensor.
- tokenizer_sha256: sha256 of the vocabulary (token -> id, sorted) and the special-token ids, so
  the same tokenizer saved by different library versions hashes the same.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import torch

WEIGHTS_HASH_LIMIT = 1 << 30
_VOLATILE_CONFIG_KEYS = {
    "transformers_version",
    "_name_or_path",
    "dtype",
    "torch_dtype",
    "_attn_implementation_autoset",
}


def resolve_checkpoint(path: str | Path) -> Path:
    """A local directory as is; anything else is a hub id, `org/name` or `org/name@revision`, found in
    (or, unless HF_HUB_OFFLINE is set, downloaded into) huggingface_hub's cache, as transformers does."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    repo_id, _, revision = str(path).partition("@")
    if local.exists() or str(path).startswith((".", "/", "~")) or repo_id.count("/") != 1:
        raise FileNotFoundError(
            f"model {path}: no such directory and not a hub id (org/name[@revision]); "
            "give a checkpoint folder or a hub id"
        )
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        # Offline, say so (as transformers does): given a commit hash, snapshot_download would still
        # ask the hub for the file list.
        return Path(
            snapshot_download(
                repo_id, revision=revision or None, local_files_only=constants.is_offline_mode()
            )
        )
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(
            f"model {path}: no such directory, and as a hub id not in the Hugging Face cache while the hub "
            "cannot be reached (HF_HUB_OFFLINE set or no network); download it once online, or fix the path"
        ) from e
    except HfHubHTTPError as e:
        raise FileNotFoundError(
            f"model {path}: no such directory, and the hub refused it as an id ({str(e).splitlines()[0]}); "
            "fix the path, or check the id, the revision and your HF_TOKEN"
        ) from e


def hub_revision(local: Path | None) -> str | None:
    """The commit hash of a checkpoint resolved from the hub cache (`.../snapshots/<hash>`), else None."""
    return local.name if local is not None and local.parent.name == "snapshots" else None


def _strip(value):
    if isinstance(value, dict):
        return {
            str(k): _strip(v)
            for k, v in value.items()
            if k not in _VOLATILE_CONFIG_KEYS and not str(k).startswith("_attn_implementation")
        }
    return value


def config_sha256(config: dict) -> str:
    return hashlib.sha256(json.dumps(_strip(config), sort_keys=True, default=str).encode()).hexdigest()


def _state_hash(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _files_hash(files: list[Path], dtype: torch.dtype) -> str:
    digest = hashlib.sha256(f"dtype={dtype}|".encode())
    for file in sorted(files, key=lambda f: f.name):
        with open(file, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            digest.update(f"{file.name}|{file.stat().st_size}|".encode())
            digest.update(f.read(header_len))
    return digest.hexdigest()


def weights_sha256(model: torch.nn.Module, files: list[Path], dtype: torch.dtype) -> tuple[str, str]:
    """(hash, method): 'state_dict' for small models, 'safetensors_headers' for big ones (see module doc)."""
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if size <= WEIGHTS_HASH_LIMIT or not files:
        return _state_hash(model), "state_dict"
    return _files_hash(files, dtype), "safetensors_headers"


def tokenizer_sha256(tokenizer) -> str:
    specials = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "unk")}
    payload = {"vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]), "special": specials}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def fingerprint(backend, config: dict) -> dict:
    """What a cache records about the model that made it (see Backend.fingerprint)."""
    files = sorted(backend.source.glob("*.safetensors")) if backend.source is not None else []
    weights, method = weights_sha256(backend.model, files, backend.model.dtype)
    return {
        "model_id": backend.model_id,
        "revision": hub_revision(backend.source),
        "family": backend.family,
        "config_sha256": config_sha256(config),
        "weights_sha256": weights,
        "weights_method": method,
        "tokenizer_sha256": tokenizer_sha256(backend.tokenizer),
    }
