"""HF LLaVA (`LlavaForConditionalGeneration`) and any checkpoint of that shape, as a Backend.

The projector output comes from the model's own `get_image_features` with the config's vision
feature layer and select strategy; the LLM runs on spliced embeddings through CAPTURE_ATTENTION
(layer 0 records the text->vision slice, every layer computes sdpa). The vision tower stays sdpa.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import AutoImageProcessor, LlavaForConditionalGeneration

from alignkd_cache.backends import VLMOutput
from alignkd_cache.backends.capture import CAPTURE_ATTENTION, spliced_forward
from alignkd_cache.backends.checkpoint import fingerprint
from alignkd_cache.backends.one_layer import (
    TowerSelection,
    layer0_only,
    one_layer,
    spliced_layer0,
    write_stub_files,
)
from alignkd_cache.backends.saving import save_model_like_source
from alignkd_cache.backends.tokenizer import load_tokenizer
from alignkd_cache.data import segment, stack_pixels
from alignkd_cache.images import pad_color, pad_to_square


class LlavaBackend:
    family = "llava"

    def __init__(
        self,
        model: LlavaForConditionalGeneration,
        tokenizer,
        image_processor,
        model_id: str,
        source: Path | None,
    ):
        self.model, self.tokenizer, self.image_processor = model, tokenizer, image_processor
        self.model_id, self.source = model_id, source
        # LlavaImageProcessor(do_pad=True)'s fill: tuple(int(x*255) for x in image_mean).
        self.pad_color = pad_color(image_processor.image_mean)
        config = model.config
        self.image_token_id = int(config.image_token_id)
        self.num_heads = int(config.text_config.num_attention_heads)
        self.visual_dim = int(config.text_config.hidden_size)
        vision = config.vision_config
        layer, strategy = config.vision_feature_layer, config.vision_feature_select_strategy
        if not isinstance(layer, int):
            raise ValueError(
                f"{model_id}: vision_feature_layer {layer!r} (several layers) is not supported; use one layer"
            )
        self.feature_layer, self.select_strategy = layer, strategy
        self.grid = vision.image_size // vision.patch_size
        self.num_visual_tokens = self.grid**2 + (1 if strategy == "full" else 0)

    @classmethod
    def load(
        cls, local: Path, dtype=torch.float32, device="cpu", model_id: str | None = None, **kwargs
    ) -> LlavaBackend:
        """From a resolved checkpoint directory (load_backend resolves); `model_id`: what the user named."""
        model_id = model_id or str(local)
        if kwargs:
            raise ValueError(
                f"{model_id}: options {sorted(kwargs)} do not apply to an HF LLaVA checkpoint "
                "(its vision tower is inside it); drop them"
            )
        model = LlavaForConditionalGeneration.from_pretrained(
            local,
            dtype=dtype,
            attn_implementation={"text_config": CAPTURE_ATTENTION, "vision_config": "sdpa"},
            use_safetensors=True,
        )
        model.to(device).eval()
        tokenizer = load_tokenizer(local)
        image_processor = AutoImageProcessor.from_pretrained(local)
        return cls(model, tokenizer, image_processor, model_id, local)

    collate_pixels = staticmethod(stack_pixels)

    def image_layouts(self, n_images: int, processed=None, images=()) -> list[list[dict]]:
        """Backend protocol: every image is the tower's fixed patch grid (24 x 24 for LLaVA 1.5's
        336-pixel CLIP at patch 14), after the CLS token with the "full" feature strategy."""
        layout = [segment("cls", 1, 1)] if self.select_strategy == "full" else []
        return [[*layout, segment("grid", self.grid, self.grid)] for _ in range(n_images)]

    @property
    def vocab_size(self) -> int:
        return self.model.lm_head.out_features

    def preprocess(self, image) -> torch.Tensor:
        """Pad to a square with the processor's mean, as LlavaImageProcessor(do_pad=True), then process."""
        image = pad_to_square(image, self.pad_color)
        return self.image_processor(image, return_tensors="pt")["pixel_values"][0]

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(n, 3, H, W) -> projected visual tokens (n, N_v, D)."""
        out = self.model.model.get_image_features(
            pixel_values=pixel_values.to(self.model.device, self.model.dtype),
            vision_feature_layer=self.feature_layer,
            vision_feature_select_strategy=self.select_strategy,
        )
        return torch.stack(list(out.pooler_output))

    def forward(self, batch, capture: bool = True) -> VLMOutput:
        batch = batch.to(self.model.device)
        visual = self.encode_images(batch.pixel_values) if batch.pixel_values is not None else None
        return spliced_forward(
            batch,
            embed_tokens=self.model.get_input_embeddings(),
            decoder=self.model.model.language_model,
            lm_head=self.model.lm_head,
            visual=visual,
            image_token_id=self.image_token_id,
            capture=capture,
        )

    def save_pretrained(self, out_dir) -> None:
        """As the source checkpoint was (saving.py). transformers' save_pretrained gives the tensors
        their checkpoint names (it reverts the renames it applies on loading); only those are kept."""
        save_model_like_source(self.model, self.source, Path(out_dir))

    def fingerprint(self) -> dict:
        return fingerprint(self, self.model.config.to_dict())

    # ---------------------------------------------------------------- the layer-0 stub (layer0.py)

    def save_layer0_stub(self, out_dir) -> None:
        """This checkpoint with text_config.num_hidden_layers = 1: layer 0, the embeddings, the
        vision tower, the projector and the lm_head (in-memory tensor names, which load as they are)."""
        out = Path(out_dir)
        config = copy.deepcopy(self.model.config)
        one_layer(config.text_config)
        config.save_pretrained(out)
        state = layer0_only(self.model.state_dict(), "model.vision_tower.")
        write_stub_files(out, state, self.tokenizer, self.image_processor)

    def layer0_tower(self) -> TowerSelection:
        return TowerSelection(
            self.model.model.vision_tower, self.feature_layer, self.select_strategy == "default"
        )

    def recompute_layer0(self, batch, features: torch.Tensor | None = None) -> VLMOutput:
        """On a stub: the batch's layer-0 slices and visual tokens (logits None); `features`: the
        layer0_tower features of batch.pixel_values from an equal tower, else the stub's own runs."""
        return spliced_layer0(
            self, batch, features, self.model.model.multi_modal_projector, self.model.model.language_model
        )
