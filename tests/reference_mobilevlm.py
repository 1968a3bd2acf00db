"""Load a checkpoint with MobileVLM's official code in its own environment and print what it computes.

Run by tests/test_reference_stacks.py inside the official environment (transformers 4.33.1, tokenizers
0.13.3; tests/reference_env.py makes it): `python reference_mobilevlm.py CHECKPOINT IMAGE CONVERSATION`.
Prints one JSON object: the loading report of from_pretrained (missing, unexpected, mismatched keys),
the tokenizer's ids for the conversation (official preprocess_v1, expanded to the visual tokens) and
the log-prob the model gives each next text token. Imports nothing from alignkd_cache.

The model code is a minimal copy of Meituan-AutoML/MobileVLM at commit
688fdec914810485c8766da96c63d9d2ce15f750 (Apache-2.0): mobilevlm/model/mobilellama.py
(MobileVLMConfig, MobileLlamaModel, MobileLlamaForCausalLM), mobilevlm/model/mobilevlm.py
(MobileVLMMetaModel.__init__, encode_images, the single-image splice of
prepare_inputs_labels_for_multimodal, load_pretrained_model's tokenizer and processor steps),
mobilevlm/model/vision_encoder.py (CLIPVisionTower, build_vision_tower) and
mobilevlm/model/vision_projector.py (LDPNetV2Projector). Left out: training, generation, LoRA, the
other projectors. The only deviation: fp32 on the CPU instead of fp16 on CUDA.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn
from official_mobilevlm import IMAGE_TOKEN_INDEX, expand2square, preprocess_multimodal, preprocess_v1
from PIL import Image
from reference_report import loading_report, next_token_logprobs
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
)

# --------------------------------------------------------------------- vision_encoder.py


class CLIPVisionTower(nn.Module):
    def __init__(self, vision_tower, args, delay_load=False):
        super().__init__()
        self.is_loaded = False
        self.vision_tower_name = vision_tower
        self.select_layer = args.mm_vision_select_layer
        self.select_feature = getattr(args, "mm_vision_select_feature", "patch")
        if not delay_load:
            self.load_model()
        else:
            self.cfg_only = CLIPVisionConfig.from_pretrained(self.vision_tower_name)
            self.vision_tower = CLIPVisionModel.from_pretrained(self.vision_tower_name)  # dummy-load

    def load_model(self):
        self.image_processor = CLIPImageProcessor.from_pretrained(self.vision_tower_name)
        self.vision_tower = CLIPVisionModel.from_pretrained(self.vision_tower_name)
        self.vision_tower.requires_grad_(False)
        self.is_loaded = True

    def load_image_processor(self):
        self.image_processor = CLIPImageProcessor.from_pretrained(self.vision_tower_name)
        self.is_loaded = True

    def feature_select(self, image_forward_outs):
        image_features = image_forward_outs.hidden_states[self.select_layer]
        if self.select_feature == "patch":
            image_features = image_features[:, 1:]
        elif self.select_feature != "cls_patch":
            raise ValueError(f"Unexpected select feature: {self.select_feature}")
        return image_features

    @torch.no_grad()
    def forward(self, images):
        image_forward_outs = self.vision_tower(
            images.to(device=self.device, dtype=self.dtype), output_hidden_states=True
        )
        return self.feature_select(image_forward_outs).to(images.dtype)

    @property
    def dtype(self):
        return self.vision_tower.dtype

    @property
    def device(self):
        return self.vision_tower.device


def build_vision_tower(model_cfg, **kwargs):
    vision_tower = getattr(model_cfg, "mm_vision_tower", getattr(model_cfg, "vision_tower", None))
    is_absolute_path_exists = os.path.exists(vision_tower)
    known = is_absolute_path_exists or vision_tower.startswith("openai") or vision_tower.startswith("laion")
    if known and getattr(model_cfg, "vision_tower_type", None) == "clip":
        return CLIPVisionTower(vision_tower, args=model_cfg, **kwargs)
    raise ValueError(f"Unknown vision tower: {vision_tower}")


# --------------------------------------------------------------------- vision_projector.py


class FeatureIRLayer(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, x):
        return self.mlp(x)


class TokenDownLayer(nn.Module):
    def __init__(self, shape) -> None:
        super().__init__()
        self.dwn = nn.Sequential(nn.AdaptiveAvgPool2d(shape))

    def forward(self, x):
        b, num_tokens, c = x.shape
        h = int(math.sqrt(num_tokens))
        assert h * h == num_tokens
        x = x.permute(0, 2, 1).reshape(b, -1, h, h)
        x = self.dwn(x)
        return x.flatten(2).transpose(1, 2)


class PosInjectLayer(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, stride: int = 1) -> None:
        super().__init__()
        self.peg = nn.Sequential(nn.Conv2d(in_dim, out_dim, 3, stride, 1, bias=True, groups=out_dim))

    def forward(self, x):
        b, num_tokens, c = x.shape
        h = int(math.sqrt(num_tokens))
        assert h * h == num_tokens
        cnn_feat = x.transpose(1, 2).view(b, c, h, h)
        x = self.peg(cnn_feat) + cnn_feat
        return x.flatten(2).transpose(1, 2)


class LDPNetV2Projector(nn.Module):
    def __init__(self, config=None):
        super().__init__()
        inc, ouc = config.mm_hidden_size, config.hidden_size
        self.mlp = FeatureIRLayer(inc, ouc)
        self.dwn = TokenDownLayer((12, 12))
        self.peg = PosInjectLayer(ouc, ouc, stride=1)

    def forward(self, x):
        return self.peg(self.dwn(self.mlp(x)))


def build_vision_projector(config):
    projector_type = getattr(config, "mm_projector_type", "linear")
    if projector_type.startswith("ldpnetv2"):
        return LDPNetV2Projector(config)
    raise ValueError(f"Unknown projector type: {projector_type}")


# --------------------------------------------------------------------- mobilevlm.py, mobilellama.py


class MobileVLMMetaModel:
    def __init__(self, config):
        super().__init__(config)
        if hasattr(config, "mm_vision_tower"):
            self.vision_tower = build_vision_tower(config, delay_load=True)
            self.mm_projector = build_vision_projector(config)

    def get_vision_tower(self):
        vision_tower = getattr(self, "vision_tower", None)
        return vision_tower[0] if type(vision_tower) is list else vision_tower


class MobileVLMConfig(LlamaConfig):
    model_type = "mobilevlm"


class MobileLlamaModel(MobileVLMMetaModel, LlamaModel):
    config_class = MobileVLMConfig


class MobileLlamaForCausalLM(LlamaForCausalLM):
    config_class = MobileVLMConfig

    def __init__(self, config):
        super(LlamaForCausalLM, self).__init__(config)
        self.model = MobileLlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_model(self):
        return self.model

    def encode_images(self, images):
        image_features = self.get_model().get_vision_tower()(images)
        return self.get_model().mm_projector(image_features)

    def splice(self, cur_input_ids, image_features):
        """prepare_inputs_labels_for_multimodal for one sample, no labels, mm_use_im_start_end off."""
        image_token_indices = torch.where(cur_input_ids == IMAGE_TOKEN_INDEX)[0]
        cur_new_input_embeds = []
        cur_image_idx = 0
        while image_token_indices.numel() > 0:
            image_token_start = image_token_indices[0]
            cur_new_input_embeds.append(self.get_model().embed_tokens(cur_input_ids[:image_token_start]))
            cur_new_input_embeds.append(image_features[cur_image_idx])
            cur_image_idx += 1
            cur_input_ids = cur_input_ids[image_token_start + 1 :]
            image_token_indices = torch.where(cur_input_ids == IMAGE_TOKEN_INDEX)[0]
        if cur_input_ids.numel() > 0:
            cur_new_input_embeds.append(self.get_model().embed_tokens(cur_input_ids))
        return torch.cat(cur_new_input_embeds, dim=0)[None]


AutoConfig.register("mobilevlm", MobileVLMConfig)
AutoModelForCausalLM.register(MobileVLMConfig, MobileLlamaForCausalLM)


def main(checkpoint: str, image_path: str, conversation_file: str) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, use_fast=False)
    model, info = MobileLlamaForCausalLM.from_pretrained(
        checkpoint, torch_dtype=torch.float32, output_loading_info=True
    )
    model.eval()
    vision_tower = model.get_model().get_vision_tower()
    vision_tower.load_image_processor()
    processor = vision_tower.image_processor
    image = expand2square(
        Image.open(image_path).convert("RGB"), tuple(int(x * 255) for x in processor.image_mean)
    )
    pixels = processor.preprocess(image, return_tensors="pt")["pixel_values"]
    conversations = preprocess_multimodal(json.loads(Path(conversation_file).read_text()))
    input_ids, _, _ = preprocess_v1(conversations, tokenizer, has_image=True)
    with torch.no_grad():
        features = model.encode_images(pixels)
        embeds = model.splice(torch.tensor(input_ids), features)
        logits = model(inputs_embeds=embeds).logits[0]
    n = features.shape[1]
    expanded = [x for t in input_ids for x in ([t] * n if t == IMAGE_TOKEN_INDEX else [t])]
    return {
        **loading_report(info, tokenizer),
        "input_ids": expanded,
        **next_token_logprobs(logits, expanded, IMAGE_TOKEN_INDEX),
    }


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4])))
