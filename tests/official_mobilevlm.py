"""MobileVLM V2's own data path, re-implemented independently of alignkd_cache for the fidelity tests.

Written from Meituan-AutoML/MobileVLM (mobilevlm/conversation.py conv_vicuna_v1, mobilevlm/utils.py
tokenizer_image_token and expand2square, mobilevlm/train/train.py preprocess_multimodal,
preprocess_v1, preprocess_plain), line for line where it matters. `tokenizer(text)` must return
{"input_ids": [...]} with BOS, as transformers' slow LlamaTokenizer does. Imports nothing from
alignkd_cache, so tests/official_goldens.json can be regenerated with transformers 4.33.1.
"""

from __future__ import annotations

IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def preprocess_multimodal(conversations):
    out = []
    for sentence in conversations:
        value = sentence["value"]
        if "<image>" in value:
            value = ("<image>\n" + value.replace("<image>", "").strip()).strip()
        out.append({"from": sentence["from"], "value": value})
    return out


def get_prompt_v1(conversations) -> str:
    # SeparatorStyle.TWO with sep " " and sep2 "</s>"; roles USER / ASSISTANT.
    seps = [" ", "</s>"]
    ret = SYSTEM + seps[0]
    for i, sentence in enumerate(conversations):
        role = "USER" if sentence["from"] == "human" else "ASSISTANT"
        message = sentence["value"]
        ret += role + ": " + message + seps[i % 2] if message else role + ":"
    return ret


def tokenizer_image_token(prompt: str, tokenizer) -> list[int]:
    chunks = [tokenizer(chunk)["input_ids"] for chunk in prompt.split("<image>")]
    input_ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(chunks[0][0])
    separated = [
        x
        for pair in zip(chunks, [[IMAGE_TOKEN_INDEX] * (offset + 1)] * len(chunks), strict=True)
        for x in pair
    ][:-1]
    for x in separated:
        input_ids.extend(x[offset:])
    return input_ids


def preprocess_v1(conversations, tokenizer, has_image: bool) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, voided): voided when the official length check fails ("tokenization
    mismatch"), in which case every label is IGNORE_INDEX, as the official code leaves it."""
    conversation = get_prompt_v1(conversations)

    def length(text):
        return len(tokenizer_image_token(text, tokenizer) if has_image else tokenizer(text)["input_ids"])

    input_ids = (
        tokenizer_image_token(conversation, tokenizer) if has_image else tokenizer(conversation)["input_ids"]
    )
    target = list(input_ids)
    total_len = sum(1 for t in input_ids if t != tokenizer.pad_token_id)
    sep = " ASSISTANT: "
    cur_len = 1
    target[:cur_len] = [IGNORE_INDEX] * cur_len
    for rou in conversation.split("</s>"):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = length(rou)
        instruction_len = length(parts[0]) - 2
        target[cur_len : cur_len + instruction_len] = [IGNORE_INDEX] * len(
            target[cur_len : cur_len + instruction_len]
        )
        cur_len += round_len
    target[cur_len:] = [IGNORE_INDEX] * len(target[cur_len:])
    voided = cur_len != total_len
    if voided:
        target = [IGNORE_INDEX] * len(target)
    return input_ids, target, voided


def preprocess_plain(conversations, tokenizer) -> tuple[list[int], list[int]]:
    assert len(conversations) == 2 and "<image>" in conversations[0]["value"]
    conversation = "<image>" + conversations[1]["value"] + "\n"
    input_ids = tokenizer_image_token(conversation, tokenizer)
    target = list(input_ids)
    n = len(tokenizer_image_token("<image>", tokenizer))
    target[:n] = [IGNORE_INDEX] * n
    return input_ids, target


def expand2square(pil_img, background_color):
    from PIL import Image

    width, height = pil_img.size
    if width == height:
        return pil_img
    if width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    result = Image.new(pil_img.mode, (height, height), background_color)
    result.paste(pil_img, ((height - width) // 2, 0))
    return result
