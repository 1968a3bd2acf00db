"""Tiny random checkpoints of today's transformers-native VLM families, built offline.

`tiny_checkpoint(model_type, out_dir, role=...)` writes a directory `TransformersVLM.load` (and
transformers' own `from_pretrained`) read back: the family's config classes with a tiny text and
vision config, random weights in safetensors, a small byte-level BPE tokenizer trained here with the
family's special tokens, the family's real PIL image processor with small sizes (so a non-square
image still gives several tiles / a dynamic grid, with few visual tokens) and a chat template in the
family's format. No video processor is written (it would need torchvision).

"teacher" is wider and deeper than "student" and has a padded vocabulary (more embedding rows than
len(tokenizer), like Qwen2.5-VL 7B's 152064 against 3B's 151936); both share the tokenizer and the
image processor, so visual-token counts agree between them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from alignkd_cache.backends.transformers_vlm import without_video

SUPPORTED = ("qwen2_5_vl", "qwen3_vl", "internvl", "smolvlm", "llava_onevision")

_CORPUS = [
    "What is in the image? It is a digit. Which digit is top-left? 7",
    "Describe the picture. Two scans of handwritten digits, one above the other.",
    "Is there a 3 in the image? yes no 0 1 2 3 4 5 6 7 8 9",
    "Что это? Это цифра. 数字 图片 是 什么",
    "How many digits are there? There are four. Hello world, the answer follows.",
]

_QWEN_TOKENS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
}

_QWEN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# InternVL (HF-format InternVL3) writes <IMG_CONTEXT> once per image; the processor expands it to
# <img> + <IMG_CONTEXT> * (image_seq_length * tiles) + </img>.
_INTERNVL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_LLAVA_OV_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tokenizer(specials: list[str], named: dict[str, str], eos: str, pad: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=eos, pad_token=pad, extra_special_tokens=named
    )


def _sizes(role: str) -> dict:
    if role == "teacher":
        return {"hidden": 64, "heads": 4, "kv": 2, "layers": 3, "ffn": 128, "vis_layers": 2, "vocab_pad": 64}
    if role == "student":
        return {"hidden": 32, "heads": 2, "kv": 1, "layers": 2, "ffn": 64, "vis_layers": 1, "vocab_pad": 0}
    raise ValueError(f"role must be 'teacher' or 'student', not {role!r}")


def _text(s: dict, tok, vocab: int, **extra) -> dict:
    return {
        "vocab_size": vocab,
        "hidden_size": s["hidden"],
        "intermediate_size": s["ffn"],
        "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv"],
        "max_position_embeddings": 1024,
        "bos_token_id": None,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        **extra,
    }


def _vision_common(s: dict) -> dict:
    return {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "num_hidden_layers": s["vis_layers"],
    }


def _build(model_type: str, s: dict):
    """(config, processor) for one family and role."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if model_type in ("qwen2_5_vl", "qwen3_vl"):
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *_QWEN_TOKENS.values()]
        tok = _tokenizer(specials, _QWEN_TOKENS, eos="<|im_end|>", pad="<|endoftext|>")
        vocab = len(tok) + s["vocab_pad"]
        ids = {
            "image_token_id": tok.convert_tokens_to_ids("<|image_pad|>"),
            "video_token_id": tok.convert_tokens_to_ids("<|video_pad|>"),
            "vision_start_token_id": tok.convert_tokens_to_ids("<|vision_start|>"),
            "vision_end_token_id": tok.convert_tokens_to_ids("<|vision_end|>"),
        }
        head_dim = s["hidden"] // s["heads"]
        if model_type == "qwen2_5_vl":
            from transformers import Qwen2_5_VLConfig, Qwen2_5_VLProcessor

            patch = 14
            vision = {
                "depth": s["vis_layers"],
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_heads": 2,
                "patch_size": patch,
                "window_size": 56,
                "fullatt_block_indexes": [s["vis_layers"] - 1],
                "out_hidden_size": s["hidden"],
            }
            rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
            config = Qwen2_5_VLConfig(
                text_config=_text(s, tok, vocab, rope_parameters=rope), vision_config=vision, **ids
            )
            proc_cls = without_video(Qwen2_5_VLProcessor)
        else:
            from transformers import Qwen3VLConfig, Qwen3VLProcessor

            patch = 16
            vision = {
                "depth": s["vis_layers"] + 1,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_heads": 2,
                "patch_size": patch,
                "num_position_embeddings": 64,
                "deepstack_visual_indexes": list(range(s["vis_layers"])),
                "out_hidden_size": s["hidden"],
            }
            rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True}
            config = Qwen3VLConfig(
                text_config=_text(s, tok, vocab, head_dim=head_dim, rope_parameters=rope),
                vision_config=vision,
                **ids,
            )
            proc_cls = without_video(Qwen3VLProcessor)
        factor = patch * 2
        image_processor = Qwen2VLImageProcessorPil(
            size={"shortest_edge": 2 * factor * factor, "longest_edge": 6 * factor * factor},
            patch_size=patch,
            merge_size=2,
            temporal_patch_size=2,
        )
        processor = proc_cls(
            image_processor=image_processor, tokenizer=tok, video_processor=None, chat_template=_QWEN_TEMPLATE
        )
        return config, processor

    if model_type == "internvl":
        from transformers import InternVLConfig, InternVLProcessor
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

        named = {
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        }
        tok = _tokenizer(
            ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *named.values()],
            named,
            eos="<|im_end|>",
            pad="<|endoftext|>",
        )
        size = 56  # 4x4 patches of 14, pixel-shuffled by 0.5 -> 4 tokens per tile
        vision = {**_vision_common(s), "image_size": [size, size], "patch_size": [14, 14]}
        config = InternVLConfig(
            vision_config=vision,
            text_config={**_text(s, tok, len(tok) + s["vocab_pad"]), "model_type": "qwen2"},
            image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
            image_seq_length=4,
        )
        image_processor = GotOcr2ImageProcessorPil(
            size={"height": size, "width": size}, crop_to_patches=True, min_patches=1, max_patches=4
        )
        processor = without_video(InternVLProcessor)(
            image_processor=image_processor,
            tokenizer=tok,
            video_processor=None,
            image_seq_length=4,
            chat_template=_INTERNVL_TEMPLATE,
        )
        return config, processor

    if model_type == "smolvlm":
        from transformers import SmolVLMConfig, SmolVLMProcessor
        from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
        from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

        named = {
            "image_token": "<image>",
            "fake_image_token": "<fake_token_around_image>",
            "global_image_token": "<global-img>",
            "end_of_utterance_token": "<end_of_utterance>",
            "video_token": "<video>",
        }
        rows = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
        tok = _tokenizer(
            ["<|endoftext|>", "<|im_start|>", *named.values(), *rows],
            named,
            eos="<end_of_utterance>",
            pad="<|endoftext|>",
        )
        tile, patch = 32, 8  # 4x4 patches per tile, pixel-shuffled by 2 -> 4 tokens per tile
        config = SmolVLMConfig(
            vision_config={**_vision_common(s), "image_size": tile, "patch_size": patch},
            text_config={**_text(s, tok, len(tok) + s["vocab_pad"]), "model_type": "llama"},
            image_token_id=tok.convert_tokens_to_ids("<image>"),
            scale_factor=2,
        )
        image_processor = SmolVLMImageProcessorPil(
            size={"longest_edge": 2 * tile}, max_image_size={"longest_edge": tile}, do_image_splitting=True
        )
        processor = without_video(SmolVLMProcessor)(
            image_processor=image_processor,
            tokenizer=tok,
            video_processor=None,
            image_seq_len=4,
            chat_template=DEFAULT_CHAT_TEMPLATE,
        )
        return config, processor

    if model_type == "llava_onevision":
        from transformers import LlavaOnevisionConfig, LlavaOnevisionProcessor
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )

        named = {"image_token": "<image>", "video_token": "<video>"}
        tok = _tokenizer(
            ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *named.values()],
            named,
            eos="<|im_end|>",
            pad="<|endoftext|>",
        )
        size, patch = 16, 8  # 2x2 patch features per crop
        pinpoints = [[size, size], [size, 2 * size], [2 * size, size], [2 * size, 2 * size]]
        config = LlavaOnevisionConfig(
            vision_config={
                **_vision_common(s),
                "model_type": "siglip_vision_model",
                "image_size": size,
                "patch_size": patch,
            },
            text_config={**_text(s, tok, len(tok) + s["vocab_pad"]), "model_type": "qwen2"},
            image_token_index=tok.convert_tokens_to_ids("<image>"),
            video_token_index=tok.convert_tokens_to_ids("<video>"),
            image_grid_pinpoints=pinpoints,
            vision_feature_select_strategy="full",
            vision_feature_layer=-1,
        )
        image_processor = LlavaOnevisionImageProcessorPil(
            size={"height": size, "width": size}, image_grid_pinpoints=pinpoints
        )
        processor = without_video(LlavaOnevisionProcessor)(
            image_processor=image_processor,
            tokenizer=tok,
            video_processor=None,
            num_image_tokens=(size // patch) ** 2,
            vision_feature_select_strategy="full",
            chat_template=_LLAVA_OV_TEMPLATE,
        )
        return config, processor

    raise ValueError(f"no tiny checkpoint for model_type {model_type!r}; supported: {', '.join(SUPPORTED)}")


def tiny_checkpoint(model_type: str, out_dir, *, role: str = "teacher", seed: int = 0) -> Path:
    """Write a tiny random `model_type` checkpoint with its processor files to out_dir; return it."""
    from transformers import AutoModelForImageTextToText

    out = Path(out_dir)
    config, processor = _build(model_type, _sizes(role))
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    (out / "alignkd_tiny.json").write_text(json.dumps({"model_type": model_type, "role": role, "seed": seed}))
    return out
