"""Short-answer VQA evaluation: greedy answers and exact-match accuracy.

Each record's last assistant turn is the reference answer; the prompt is the record tokenized
exactly as in training, cut where that answer starts. Decoding reruns the whole sequence per new
token (no KV cache): answers are a few tokens, and it keeps to the Backend protocol, so both model
families evaluate through the same code they train with.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from alignkd_cache.data import (
    IGNORE_INDEX,
    ROLES,
    Record,
    TokenizedSample,
    check_images,
    collate,
    load_images,
    pad_id,
    read_records,
    tokenization_for,
    tokenize_all,
)
from alignkd_cache.progress import progress_bar
from alignkd_cache.signal_spec import SignalOptions


def normalise(text: str) -> str:
    """Lower case, whitespace collapsed, one trailing full stop dropped ("Seven." == "seven")."""
    return " ".join(text.lower().split()).removesuffix(".").strip()


def prompt_of(sample: TokenizedSample) -> TokenizedSample:
    """The sample cut just before its last supervised run (the answer to be generated)."""
    labels = sample.labels
    start = max(
        i for i in range(1, len(labels)) if labels[i] != IGNORE_INDEX and labels[i - 1] == IGNORE_INDEX
    )
    return dataclasses.replace(sample, input_ids=sample.input_ids[:start], labels=[IGNORE_INDEX] * start)


def trained_template(model_dir: Path | None) -> str | None:
    """The template an `alignkd-train` output was trained with (its alignkd_train.json), if recorded."""
    record = Path(model_dir) / "alignkd_train.json" if model_dir is not None else None
    if record is None or not record.is_file():
        return None
    return json.loads(record.read_text()).get("signals", {}).get("template")


def reference_answer(record: Record) -> str:
    return [t["value"] for t in record.conversations if ROLES[t["from"]] == "assistant"][-1]


@dataclass
class Prediction:
    id: str
    prediction: str
    answer: str
    correct: bool


@torch.no_grad()
def greedy_answers(
    backend, prompts: list[TokenizedSample], image_root, max_new_tokens: int = 16, batch_size: int = 8
):
    """Greedy continuations (decoded, special tokens dropped) of each prompt, in order."""
    tokenizer = backend.tokenizer
    eos, pad = tokenizer.eos_token_id, pad_id(tokenizer)
    backend.model.eval()
    answers = []
    bar = progress_bar(len(prompts), "eval", unit="prompt")
    for start in range(0, len(prompts), batch_size):
        group = prompts[start : start + batch_size]
        images = [
            [(backend.preprocess(p), key) for p, key in load_images(s, image_root, backend.pad_color)]
            for s in group
        ]
        ids = [list(s.input_ids) for s in group]
        new: list[list[int]] = [[] for _ in group]
        done = [False] * len(group)
        for _ in range(max_new_tokens):
            samples = [
                dataclasses.replace(s, input_ids=i, labels=[IGNORE_INDEX] * len(i))
                for s, i in zip(group, ids, strict=True)
            ]
            logits = backend.forward(
                collate(samples, images, pad, backend.collate_pixels), capture=False
            ).logits
            if 0 <= backend.image_token_id < logits.shape[-1]:
                # The image placeholder is not text: generating it would feed an unspliced image id back.
                logits[..., backend.image_token_id] = float("-inf")
            for b, seq in enumerate(ids):
                if done[b]:
                    continue
                token = int(logits[b, len(seq) - 1].argmax())
                if token == eos:
                    done[b] = True
                    continue
                seq.append(token)
                new[b].append(token)
            if all(done):
                break
        answers += [tokenizer.decode(n, skip_special_tokens=True) for n in new]
        bar.update(len(group))
    bar.close()
    return answers


def own_generate(backend, record: Record, image_root, max_new_tokens: int) -> str:
    """The greedy answer to the record's conversation up to its last answer, through the model's own
    `generate` and processor (backends.transformers_vlm)."""
    turns = [(ROLES[t["from"]], t["value"]) for t in record.conversations][:-1]
    pictures = [picture for picture, _ in load_images(record, image_root, None)]
    return backend.generate(turns, pictures, max_new_tokens)


def evaluate(
    backend,
    data,
    image_root,
    template: str = "v1",
    max_new_tokens: int = 16,
    batch_size: int = 8,
    predictions: str | Path | None = None,
) -> dict:
    records = {r.id: r for r in read_records(data)}
    tok = tokenization_for(backend, template, SignalOptions.max_length, image_root)
    samples, skips = tokenize_all(list(records.values()), tok)
    check_images(samples, image_root)
    if backend.num_visual_tokens is None:  # a transformers-native family: through its own generate
        outputs = [own_generate(backend, records[s.id], image_root, max_new_tokens) for s in samples]
    else:
        outputs = greedy_answers(
            backend, [prompt_of(s) for s in samples], image_root, max_new_tokens, batch_size
        )
    results = []
    for s, out in zip(samples, outputs, strict=True):
        answer = reference_answer(records[s.id])
        results.append(Prediction(s.id, out.strip(), answer, normalise(out) == normalise(answer)))
    correct = sum(r.correct for r in results)
    if predictions is not None:
        with open(predictions, "w") as f:
            for r in results:
                f.write(json.dumps(r.__dict__) + "\n")
    return {
        "data": str(data),
        "n": len(results),
        "correct": correct,
        "accuracy": correct / len(results) if results else 0.0,
        "skipped": {s.id: s.reason for s in skips},
    }
