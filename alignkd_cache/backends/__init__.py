"""Model backends: one small protocol, one file per model family.

A backend wraps a VLM (teacher or student) and runs one forward that returns the three Align-KD
signals. The same code serves the teacher (under `torch.no_grad()`) and the student (with grad).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch


@dataclass
class VLMOutput:
    """What one forward returns for a whole Batch, teacher or student (the student's losses read it
    directly; a teacher's becomes one signals.TeacherSignal per sample through sample_signal).

    logits: (B, S, vocab), every position; logits[b, p] predicts input_ids[b, p + 1].
    attention: per sample, the layer-0 text->vision probabilities (H, |T|, N_v) over all its
        visual positions (N_v summed over its images), each row normalised over its whole causal
        row (so it sums to < 1); None for text-only samples.
    visual: the projector outputs, one (N_v, D) per image of the batch (batch.image_index names a
        sample's); a (n_images, N_v, D) tensor where every image has the same count; None when the
        batch has no image.
    """

    logits: torch.Tensor
    attention: list[torch.Tensor | None]
    visual: torch.Tensor | list[torch.Tensor] | None


@runtime_checkable
class Backend(Protocol):
    family: str
    model: torch.nn.Module
    tokenizer: object
    image_token_id: int  # the id the data layer writes at visual positions
    num_visual_tokens: int | None  # N_v per image; None: the processor sets each image's (encode)
    image_processor: object  # its settings are recorded in a cache's `preprocessing`
    pad_color: tuple[int, int, int] | None  # square-padding fill: int(255 * image_mean); None: no padding
    num_heads: int  # layer-0 query heads (H)
    visual_dim: int  # D of the projected visual tokens (= LLM hidden size)
    vocab_size: int  # the logits' width: the ids the logit targets and losses use

    def preprocess(self, image):
        """An RGB PIL image -> its pixels for collate_pixels ((3, H, W) after square padding and
        the processor, for a fixed-size family)."""

    def collate_pixels(self, per_sample: list[list]) -> torch.Tensor | dict | None:
        """Per sample, its images' `preprocess` outputs -> the batch's image inputs (Batch.pixel_values)."""

    def image_layouts(self, n_images: int, processed=None, images=()) -> list[list[dict]]:
        """How the processor laid out each of a sample's `n_images` images: per image, segments
        `data.segment(role, rows, cols)` in the order its visual tokens are stored, covering exactly
        its visual-token count (docs/cache-format.md, "Image layouts"). A fixed-count family gives
        its one layout without arguments; a processor-driven family derives it from `processed`, what
        its processor returned for the sample's images (grids, tiles, sizes), and `images` (them)."""

    def forward(self, batch, capture: bool = True) -> VLMOutput:
        """Run the model. capture=False skips the attention slice (plain sdpa everywhere)."""

    def save_pretrained(self, out_dir: str | Path) -> None:
        """Write a directory that `load_backend` (and the family's own tools) load back."""

    def fingerprint(self) -> dict:
        """{'model_id', 'config_sha256', 'weights_sha256', 'tokenizer_sha256'} for provenance."""

    # The layer-0 stub (alignkd_cache/layer0.py, `--signals layer0`): all that is per family.

    def save_layer0_stub(self, out_dir: Path) -> None:
        """Write into the existing, empty `out_dir` this checkpoint cut to decoder layer 0 (its
        config with num_hidden_layers = 1; the embeddings, layer 0 and the whole vision path, inside)
        plus its tokenizer and image-processor files: a directory `load_backend` loads unchanged."""

    def layer0_tower(self):
        """The vision tower and feature selection (backends.one_layer.TowerSelection) a student of
        this family can share with its stub (layer0.TowerOnce), or None: the stub runs its own."""

    def recompute_layer0(self, batch, features: torch.Tensor | None = None) -> VLMOutput:
        """On a stub: the batch's (already on the model's device) layer-0 slices and visual tokens,
        as `forward(batch, capture=True)` gives them, with logits None. `features`: the
        `layer0_tower` features of batch.pixel_values from an equal tower (then the stub's tower
        does not run); only for a family whose layer0_tower is not None."""


def detect_family(path: str | Path) -> str:
    """'llava', 'mobilevlm' or a transformers-native family's model_type (backends.transformers_vlm),
    from the checkpoint's config.json (a local directory or a hub id); any other model_type is
    refused in one line naming it and the supported ones."""
    from alignkd_cache.backends.checkpoint import resolve_checkpoint

    return _family(resolve_checkpoint(path), path)


def _family(local: Path, path: str | Path) -> str:
    """The family of the resolved checkpoint `local` (`path`: what the user gave, for messages)."""
    config_file = local / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"model {path}: {config_file} is missing, so this is not a Hugging Face checkpoint; "
            "give the folder that holds config.json, the *.safetensors and the tokenizer"
        )
    config = json.loads(config_file.read_text())
    model_type = config.get("model_type", "")
    if model_type == "mobilevlm" or "mm_projector_type" in config:
        return "mobilevlm"
    if model_type == "llava" or (not model_type and "vision_config" in config):
        return "llava"
    from alignkd_cache.backends.transformers_vlm import SUPPORTED_MODEL_TYPES, UnsupportedFamily

    if model_type in SUPPORTED_MODEL_TYPES:
        return model_type
    supported = ", ".join(sorted(("llava", "mobilevlm", *SUPPORTED_MODEL_TYPES)))
    raise UnsupportedFamily(
        f"model {path}: model_type {model_type!r} is not supported; supported: {supported}"
    )


def load_backend(
    path: str | Path, *, dtype=torch.float32, device="cpu", family: str | None = None, **kwargs
) -> Backend:
    """Load a teacher or student by local path or hub id (`org/name[@revision]`, see resolve_checkpoint).

    The reference is resolved here, once, to a local directory (for a hub id without a revision: one
    snapshot), and everything after reads that directory, so the family, the weights, the tokenizer
    and the processor all come from the same files."""
    from alignkd_cache.backends.checkpoint import resolve_checkpoint

    local = resolve_checkpoint(path)
    family = family or _family(local, path)
    if family == "llava":
        from alignkd_cache.backends.llava import LlavaBackend

        return LlavaBackend.load(local, dtype=dtype, device=device, model_id=str(path), **kwargs)
    if family == "mobilevlm":
        from alignkd_cache.backends.mobilevlm import MobileVLMBackend

        return MobileVLMBackend.load(local, dtype=dtype, device=device, model_id=str(path), **kwargs)
    from alignkd_cache.backends.transformers_vlm import SUPPORTED_MODEL_TYPES, TransformersVLM

    if family in SUPPORTED_MODEL_TYPES:
        if kwargs:
            raise ValueError(
                f"{path}: options {sorted(kwargs)} do not apply to a {family} checkpoint; drop them"
            )
        return TransformersVLM.load(local, dtype=dtype, device=device, model_id=str(path))
    raise ValueError(
        f"unknown model family {family!r}; choose one of llava, mobilevlm, {', '.join(SUPPORTED_MODEL_TYPES)}"
    )
