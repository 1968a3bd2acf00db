"""llava-hf in the first transformers release that has it (4.36.0): make a checkpoint, or load one.

Run by tests/test_reference_stacks.py inside that release's environment (tests/reference_env.py):

- `python reference_llava.py make OUT SENTENCEPIECE_MODEL`: a tiny random llava-hf checkpoint written
  by 4.36's own save_pretrained, laid out as llava-hf/llava-1.5-7b-hf is (a LLaMA SentencePiece
  tokenizer with `<image>` and `<pad>` added after its vocabulary, slow and fast files, a CLIP
  processor, generation_config.json);
- `python reference_llava.py check CHECKPOINT IMAGE REQUEST`: load CHECKPOINT as a llava-hf user does
  (LlavaForConditionalGeneration, AutoTokenizer, CLIPImageProcessor) and print one JSON object: the
  loading report, the tokenizer's ids for REQUEST's texts, and the log-prob of each next text token
  of REQUEST's input_ids (the image as one `<image>` id, which the model expands itself).

Imports nothing from alignkd_cache.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from official_mobilevlm import expand2square
from PIL import Image
from reference_report import loading_report, next_token_logprobs
from transformers import (
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaTokenizerFast,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

IMAGE, PAD = "<image>", "<pad>"


def make(out: str, sentencepiece_model: str) -> None:
    slow = Path(out) / "slow-tokenizer"
    slow.mkdir(parents=True)
    (slow / "tokenizer.model").write_bytes(Path(sentencepiece_model).read_bytes())
    tokenizer = LlamaTokenizerFast.from_pretrained(str(slow), from_slow=True)
    tokenizer.add_tokens([IMAGE], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": PAD})
    vision = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16,
        patch_size=4, projection_dim=16,
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    processor.save_pretrained(out)
    for leftover in slow.iterdir():
        leftover.unlink()
    slow.rmdir()


def check(checkpoint: str, image_path: str, request_file: str) -> dict:
    request = json.loads(Path(request_file).read_text())
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model, info = LlavaForConditionalGeneration.from_pretrained(
        checkpoint, torch_dtype=torch.float32, output_loading_info=True
    )
    model.eval()
    processor = CLIPImageProcessor.from_pretrained(checkpoint)
    image = Image.open(image_path).convert("RGB")
    image = expand2square(image, tuple(int(x * 255) for x in processor.image_mean))
    pixels = processor(image, return_tensors="pt")["pixel_values"]
    image_id = model.config.image_token_index
    ids = request["input_ids"]
    one_image = [t for i, t in enumerate(ids) if t != image_id or i == 0 or ids[i - 1] != image_id]
    with torch.no_grad():
        inputs = torch.tensor([one_image])
        logits = model(input_ids=inputs, attention_mask=torch.ones_like(inputs), pixel_values=pixels).logits[
            0
        ]
    return {
        **loading_report(info, tokenizer),
        "text_ids": [tokenizer(t)["input_ids"] for t in request["texts"]],
        **next_token_logprobs(logits, ids, image_id),
    }


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(*sys.argv[2:4])
    else:
        print(json.dumps(check(*sys.argv[2:5])))
