"""What the backends share for the layer-0 stub (alignkd_cache/layer0.py): the weights of decoder
layer 0 only, a config cut to one layer, a vision tower's feature selection, and the spliced
layer-0 forward of the families whose LLM runs on spliced embeddings (LLaVA, MobileVLM).

Each backend's `save_layer0_stub`, `recompute_layer0` and `layer0_tower` (the Backend protocol) is
built from these; layer0.py itself knows no family.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from alignkd_cache.backends import VLMOutput
from alignkd_cache.backends.capture import spliced_forward

_DEEPER_LAYER = re.compile(r"\.layers\.([1-9]\d*)\.")


def layer0_only(state: dict[str, torch.Tensor], tower_prefix: str) -> dict[str, torch.Tensor]:
    """Drop decoder layers >= 1 (the vision tower's own layers stay); own storage for safetensors."""
    return {
        name: t.detach().contiguous().clone()
        for name, t in state.items()
        if name.startswith(tower_prefix) or not _DEEPER_LAYER.search(name)
    }


def one_layer(config) -> None:
    """Cut a text config to its first decoder layer (in place)."""
    config.num_hidden_layers = 1
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:1]


def write_stub_files(out: Path, state: dict[str, torch.Tensor], tokenizer, image_processor) -> None:
    """The weights as one model.safetensors, then the tokenizer's and image processor's files."""
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out)
    image_processor.save_pretrained(out)


@dataclass
class TowerSelection:
    """A vision tower and which of its outputs the projector takes: the hidden state at `layer`,
    without its first (CLS) token when `drop_cls`. Equal weights and selection: equal features."""

    tower: torch.nn.Module
    layer: int
    drop_cls: bool

    def features(self, pixel_values: torch.Tensor, run_tower=None) -> torch.Tensor:
        """(n, 3, H, W) -> the tower features the projector takes (n, patches, mm_hidden).
        `run_tower` replaces the call of the tower (layer0.TowerOnce keeps its output)."""
        pixels = pixel_values.to(self.tower.device, self.tower.dtype)
        features = (run_tower or self.tower)(pixels, output_hidden_states=True).hidden_states[self.layer]
        return features[:, 1:] if self.drop_cls else features


def spliced_layer0(
    backend, batch, features: torch.Tensor | None, projector: torch.nn.Module, llm: torch.nn.Module
) -> VLMOutput:
    """A stub's layer-0 slices and visual tokens for a batch on its device (logits None): the tower
    features (given, or from the backend's own tower) through `projector`, spliced into `llm`'s
    embeddings, through its one layer with the capture."""
    visual = None
    if batch.pixel_values is not None:
        if features is None:
            features = backend.layer0_tower().features(batch.pixel_values)
        visual = projector(features.to(backend.model.device).to(backend.model.dtype))
    captured = spliced_forward(
        batch,
        embed_tokens=llm.get_input_embeddings(),
        decoder=llm,
        lm_head=torch.nn.Identity(),
        visual=visual,
        image_token_id=backend.image_token_id,
        capture=True,
    )
    return VLMOutput(None, captured.attention, visual)
