"""Synthetic-signal stores for the store tests: real zarr + Parquet, built through the real writer."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from alignkd_cache.data import IGNORE_INDEX, TokenizedSample
from alignkd_cache.signals import LogitTargets, TeacherSignal
from alignkd_cache.store.codecs import resolve_preset
from alignkd_cache.store.finalize import finalize
from alignkd_cache.store.location import Location
from alignkd_cache.store.provenance import SCHEMA_VERSION
from alignkd_cache.store.writer import SampleResult, write_block

H, NV, D, VOCAB, K = 2, 9, 16, 300, 5
PREPROCESSING = {
    "template": "plain", "tokenizer": {"kind": "transformers", "class": "synthetic", "legacy": None},
    "image": {"pad_color": [122, 116, 104]}, "image_key": "sha256-of-padded-rgb",
}  # fmt: skip


def attrs_for(codecs: str = "balanced", logit_targets: str = "topk", block_size: int = 4) -> dict:
    options = {
        "template": "plain", "topk": K, "logit_targets": logit_targets, "logit_positions": "answer",
        "attn_heads": "all", "codecs": codecs, "batch_size": 2, "dtype": "float32", "device": "cpu",
        "limit": None, "max_length": 64, "on_too_long": "skip", "block_size": block_size, "draws": 50, "seed": 0,
    }  # fmt: skip
    return {
        "schema_version": SCHEMA_VERSION, "tool_version": "0.1.0", "created": "2025-01-01T00:00:00+00:00",
        "complete": False, "teacher": {"model_id": "synthetic", "config_sha256": "a" * 64, "weights_sha256": "b" * 64},
        "tokenizer_sha256": "c" * 64, "template": "plain", "preprocessing": PREPROCESSING, "dataset": {"file": "d.json", "sha256": "d" * 64},
        "options": options, "family": "llava", "num_visual_tokens": NV, "image_token_id": 5, "num_heads": H,
        "visual_dim": D, "vocab_size": VOCAB, "attn_heads": "all", "logit_targets": logit_targets, "topk": K,
        "logit_positions": "answer", "codecs": codecs, "encodings": resolve_preset(codecs),
        "logit_id_dtype": "uint16", "block_size": block_size,
    }  # fmt: skip


def synthetic_results(
    n: int, seed: int = 0, logit_targets: str = "topk", start: int = 0, image_keys: list[str] | None = None
) -> list[SampleResult]:
    """Samples start..start+n-1: every 4th text-only, every 5th skipped, every 7th with a second
    image (`extra.png`), images shared by pairs of samples (an even `start` keeps each pair in one
    call). `image_keys`: real files' content keys; pair p then uses file `img{p % len(image_keys)}.png`
    and its key, and the second image the last key (default: a file per pair, keyed by its name)."""
    rng = np.random.default_rng(seed)
    results, owner = [], {}
    for i in range(start, start + n):
        sid = f"s{i}"
        if i % 5 == 4:
            results.append(SampleResult(i, sid, skip_reason="12 tokens > max length 8"))
            continue
        pair = i // 2 if image_keys is None else i // 2 % len(image_keys)
        images = () if i % 4 == 3 else (f"img{pair}.png",) + (("extra.png",) if i % 7 == 6 else ())
        n_text = int(rng.integers(3, 7))
        ids = [1]
        for _ in images:
            ids += [5] * NV + rng.integers(6, VOCAB, 2).tolist()
        ids += rng.integers(6, VOCAB, n_text).tolist()
        labels = [IGNORE_INDEX] * (len(ids) - 2) + ids[-2:]
        grid = [{"role": "grid", "rows": 3, "cols": NV // 3}]
        sample = TokenizedSample(sid, images, ids, labels, (NV,) * len(images), 5, (grid,) * len(images))
        positions = np.array(sample.supervised_positions)
        attention = None
        if images:
            width = NV * len(images)
            logits = rng.normal(size=(H, len(sample.query_positions), width + 3)) * 3
            p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
            attention = p[..., :width].astype(np.float32)
        visual = [
            rng.normal(size=(NV, D)).astype(np.float32) * 4 if im not in owner else None for im in images
        ]
        for im in images:
            owner.setdefault(im, i)
        logp = np.log(rng.dirichlet(np.ones(VOCAB) * 0.1, size=len(positions)) + 1e-12)
        top = np.argsort(-logp, axis=1)[:, :K]
        if logit_targets == "topk":
            values = np.take_along_axis(logp, top, 1).astype(np.float32)
            tail = (1 - np.exp(values).sum(1)).clip(0).astype(np.float32)
        else:
            values = rng.integers(0, 10, size=top.shape).astype(np.float32)
            tail = None
        tensor = lambda x: None if x is None else torch.from_numpy(x)  # noqa: E731
        logits = LogitTargets(logit_targets, tensor(positions), tensor(top), tensor(values), tensor(tail))
        keys = [hashlib.sha256(im.encode()).hexdigest()[:32] for im in images]
        if image_keys:
            keys = [image_keys[pair], image_keys[-1]][: len(images)]
        signal = TeacherSignal(tensor(attention), [tensor(v) for v in visual], logits, keys)
        results.append(SampleResult(i, sid, images, sample=sample, signal=signal))
    return results


def write_synthetic_store(
    url,
    n: int = 14,
    codecs: str = "balanced",
    logit_targets: str = "topk",
    storage_options=None,
    block_size: int = 4,
):
    """Write n synthetic samples in blocks, like a build does, and finalize. Returns the results."""
    attrs = attrs_for(codecs, logit_targets, block_size)
    loc = Location(url, storage_options)
    loc.group("w").attrs.update(attrs)
    results = synthetic_results(n, logit_targets=logit_targets)
    bs = attrs["block_size"]
    plan_visual_rows(results, bs)
    num_blocks = -(-n // bs)
    for b in range(num_blocks):
        write_block(loc, b, results[b * bs : (b + 1) * bs], attrs)
    finalize(loc, attrs, n, num_blocks)
    return results


def plan_visual_rows(results: list[SampleResult], block_size: int) -> None:
    """The owner of an image gets the next token rows of its block, as build plans it; the others
    point at them."""
    refs, rows = {}, {}
    for r in results:
        if r.signal is None:
            continue
        r.visual_refs = []
        for image, visual in zip(r.images, r.signal.visual, strict=True):
            if visual is not None:
                b = r.index // block_size
                refs[image] = (b, rows.get(b, 0))
                rows[b] = refs[image][1] + len(visual)
                r.visual_refs.append(None)
            else:
                r.visual_refs.append(refs[image])
