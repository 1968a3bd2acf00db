"""What a model's loading and forward report, computed the same way in our environment and in the
reference stacks' (tests/reference_*.py import it there: it needs torch alone)."""

from __future__ import annotations

import torch


def loading_report(info: dict, tokenizer) -> dict:
    """from_pretrained's output_loading_info, and the tokenizer's size (what a loader resizes to)."""
    return {
        "missing": sorted(info["missing_keys"]),
        "unexpected": sorted(info["unexpected_keys"]),
        "mismatched": [str(m) for m in info["mismatched_keys"]],
        "vocab": len(tokenizer),
    }


def next_token_logprobs(logits: torch.Tensor, ids: list[int], image_id: int) -> dict:
    """The log-prob `logits` (S, vocab) give each next text token of `ids` (S, visual positions as
    `image_id`), and those positions."""
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    text = [p for p in range(len(ids) - 1) if ids[p + 1] != image_id]
    return {"positions": text, "logprobs": [float(logprobs[p, ids[p + 1]]) for p in text]}
