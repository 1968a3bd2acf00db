"""The samples the fidelity tests run through both our data path and the official one."""

from __future__ import annotations

STRESS = [
    "a  b",
    "USER: hi ASSISTANT: 7</s>USER: x",
    "",
    "\nQ ASSISTANT: 7</s>",
    "  lead and trail  ",
    "é ü 日本 ☃ 🦙 \u2028",
    "x</s> y</s>\nz",
    "<unk>a<s>b",
    "▁under▁line",
    "tab\there\n\nnew",
    "12345 3.14 -0",
]


def _turns(*values):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


CASES = {
    # multi-turn, non-ASCII, digit-first answers, a wide image
    "multi_turn": {
        "image": "wide.png",
        "conversations": _turns(
            "<image>\nWhich digit is in the wide picture?",
            "7 is the digit.",
            "Ist es größer als 5? 日本語で答えて。",
            "Ja — 7 > 5。",
        ),
    },
    # <image> in the second human turn, after the question: moved to the front of that turn
    "image_in_turn_2": {
        "image": "tall.png",
        "conversations": _turns("Describe  the scan.", "A tall scan.", "What digit?\n<image>", "3"),
    },
    "single_char": {"image": "wide.png", "conversations": _turns("<image>\nYes or no?", "y")},
    "text_only": {"conversations": _turns("Say  two words:\na  b", "a  b")},
}

PLAIN_CASES = {
    "caption": {"image": "wide.png", "conversations": _turns("<image>", "A handwritten 7, über-wide.")},
    "digit_first": {"image": "tall.png", "conversations": _turns("Describe.\n<image>", "3 on a tall scan")},
}


def tokenizer_config(legacy) -> dict:
    """tokenizer_config.json as MobileVLM V2 ships it; legacy "absent" leaves the key out."""

    def token(content):
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
                "rstrip": False, "single_word": False}  # fmt: skip

    config = {
        "add_bos_token": True, "add_eos_token": False, "bos_token": token("<s>"), "eos_token": token("</s>"),
        "unk_token": token("<unk>"), "clean_up_tokenization_spaces": False, "model_max_length": 2048,
        "pad_token": None, "padding_side": "right", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
    }  # fmt: skip
    if legacy != "absent":
        config["legacy"] = legacy
    return config
