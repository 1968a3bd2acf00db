"""Reader throughput: samples/s delivered by CacheReader, random order, three ways.

Writes a cache shaped like MobileVLM V2 7B's signals through the real writer (32 heads, |T| = 96
text rows x 144 visual keys, 144 x 4096 visual tokens, top-64 over 32000 ids at 48 answer positions,
balanced codecs; values are random: read cost depends on shapes and codecs, not on values), then reads
every sample in a shuffled order: one read() at a time; prefetch() (threaded batches of 16); and a torch
DataLoader with 2 forked workers.

    python benchmarks/reader.py [--samples 128]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time

import numpy as np
import torch

from alignkd_cache.data import IGNORE_INDEX, TokenizedSample
from alignkd_cache.signals import LogitTargets, TeacherSignal
from alignkd_cache.store.codecs import resolve_preset
from alignkd_cache.store.finalize import finalize
from alignkd_cache.store.location import Location
from alignkd_cache.store.provenance import SCHEMA_VERSION
from alignkd_cache.store.reader import CacheDataset, CacheReader
from alignkd_cache.store.writer import SampleResult, write_block

H, T, NV, D, VOCAB, K, P, BLOCK = 32, 96, 144, 4096, 32000, 64, 48, 64


def write_cache(url: str, n: int) -> None:
    options = {"template": "v1", "topk": K, "logit_targets": "topk", "logit_positions": "answer", "attn_heads": "all",
               "codecs": "balanced", "batch_size": 8, "dtype": "bfloat16", "device": "cuda", "limit": None,
               "max_length": 2048, "on_too_long": "skip", "block_size": BLOCK, "draws": 50, "seed": 0}  # fmt: skip
    attrs = {"schema_version": SCHEMA_VERSION, "tool_version": "bench", "created": "2025-01-01T00:00:00+00:00",
             "complete": False, "teacher": {"model_id": "shape-only", "config_sha256": "0" * 64, "weights_sha256": "0" * 64},
             "tokenizer_sha256": "0" * 64, "template": "v1", "dataset": {"file": "bench", "sha256": "0" * 64},
             "options": options, "family": "mobilevlm", "num_visual_tokens": NV, "image_token_id": -200, "num_heads": H,
             "visual_dim": D, "vocab_size": VOCAB, "attn_heads": "all", "logit_targets": "topk", "topk": K,
             "logit_positions": "answer", "codecs": "balanced", "encodings": resolve_preset("balanced"),
             "logit_id_dtype": "uint16", "block_size": BLOCK}  # fmt: skip
    loc = Location(url)
    loc.group("w").attrs.update(attrs)
    rng = np.random.default_rng(0)
    for b in range(-(-n // BLOCK)):
        results = []
        for i in range(b * BLOCK, min(n, (b + 1) * BLOCK)):
            ids = [1] + [-200] * NV + rng.integers(3, VOCAB, T).tolist()
            labels = [IGNORE_INDEX] * (len(ids) - P) + ids[-P:]
            sample = TokenizedSample(f"s{i}", f"{i}.png", ids, labels, 1, NV)
            att = rng.dirichlet(np.ones(NV + 40) * 0.3, size=(H, T))[..., :NV].astype(np.float32)
            visual = torch.from_numpy(rng.normal(size=(NV, D)).astype(np.float32))
            logits = LogitTargets(
                "topk",
                torch.tensor(sample.supervised_positions),
                torch.from_numpy(rng.integers(0, VOCAB, (P, K))),
                torch.from_numpy(-rng.exponential(3, (P, K)).astype(np.float32)),
                torch.full((P,), 0.1),
            )
            signal = TeacherSignal(torch.from_numpy(att), visual, logits, str(i))
            results.append(SampleResult(i, f"s{i}", image=f"{i}.png", sample=sample, signal=signal))  # fmt: skip
        write_block(loc, b, results, attrs)
    finalize(loc, attrs, n, -(-n // BLOCK))


def rate(fn, n) -> float:
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=128)
    args = parser.parse_args()
    url = tempfile.mkdtemp() + "/bench.zarr"
    write_cache(url, args.samples)
    reader = CacheReader(url)
    order = reader.ids[:]
    random.Random(0).shuffle(order)
    # Each row starts from a fresh reader (cold handles and LRU), side by side in this one run.
    unkept = CacheReader(url, cache_bytes=0)
    no_lru = rate(lambda: [unkept.read(i) for i in order], len(order))
    single = rate(lambda: [reader.read(i) for i in order], len(order))
    reader = CacheReader(url)
    prefetch = rate(lambda: [b for b in reader.prefetch(order, batch_size=16)], len(order))
    loader = torch.utils.data.DataLoader(CacheDataset(reader, order), batch_size=16, num_workers=2, collate_fn=list,
                                         multiprocessing_context="fork")  # fmt: skip
    workers = rate(lambda: [b for b in loader], len(order))
    print("| reader | samples/s |\n|---|---|")
    print(
        f"| read() one at a time, no block LRU (cache_bytes=0) | {no_lru:.1f} |\n"
        f"| read() one at a time | {single:.1f} |\n| prefetch(batch 16, threads) | {prefetch:.1f} |\n| DataLoader, 2 fork workers | {workers:.1f} |"
    )


if __name__ == "__main__":
    main()
