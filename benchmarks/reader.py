"""Reader throughput: samples/s delivered by CacheReader, random order, three ways.

Writes a cache shaped like MobileVLM V2 7B's signals through the real writer (32 heads, |T| = 96
text rows x 144 visual keys, 144 x 4096 visual tokens, top-64 over 32000 ids at 48 answer positions,
balanced codecs; values are random: read cost depends on shapes and codecs, not on values), then reads
every sample in a shuffled order: one read() at a time; prefetch() (threaded batches of 16); and a torch
DataLoader with 2 forked workers. Then the same samples as a `layer0` cache (logit targets only, with a
real layer-0 stub of a tiny LLaVA: the reader never reads the stub per sample), prefetch() and the
DataLoader of both kinds interleaved over --repeats rounds, medians.

    python benchmarks/reader.py [--samples 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

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
GRID = 12  # MobileVLM V2's pooled grid: NV = GRID x GRID
PREPROCESSING = {
    "template": "v1", "tokenizer": {"kind": "sentencepiece", "class": "LlamaTokenizer", "legacy": False},
    "image": {"pad_color": [122, 116, 104]}, "image_key": "sha256-of-padded-rgb",
}  # fmt: skip


def write_cache(url: str, n: int, stub: dict | None = None) -> None:
    """A stored cache, or with `stub` ({\"dir\": a saved layer-0 stub, \"record\": its attrs record}) a layer0 one."""
    options = {"template": "v1", "topk": K, "logit_targets": "topk", "logit_positions": "answer", "attn_heads": "all",
               "codecs": "balanced", "batch_size": 8, "dtype": "bfloat16", "device": "cuda", "limit": None,
               "max_length": 2048, "on_too_long": "skip", "block_size": BLOCK, "draws": 50, "seed": 0}  # fmt: skip
    attrs = {"schema_version": SCHEMA_VERSION, "tool_version": "bench", "created": "2025-01-01T00:00:00+00:00",
             "complete": False, "teacher": {"model_id": "shape-only", "config_sha256": "0" * 64, "weights_sha256": "0" * 64},
             "tokenizer_sha256": "0" * 64, "template": "v1", "preprocessing": PREPROCESSING, "dataset": {"file": "bench", "sha256": "0" * 64},
             "options": options, "family": "mobilevlm", "num_visual_tokens": NV, "image_token_id": -200, "num_heads": H,
             "visual_dim": D, "vocab_size": VOCAB, "attn_heads": "all", "logit_targets": "topk", "topk": K,
             "logit_positions": "answer", "codecs": "balanced", "encodings": resolve_preset("balanced"),
             "logit_id_dtype": "uint16", "block_size": BLOCK}  # fmt: skip
    if stub is not None:
        options["signals"] = "layer0"
        attrs |= {"schema_version": SCHEMA_VERSION, "signals": "layer0", "layer0": stub["record"]}
    loc = Location(url)
    loc.group("w").attrs.update(attrs)
    if stub is not None:
        for path in sorted(p for p in stub["dir"].rglob("*") if p.is_file()):
            loc.write_bytes(f"layer0/{path.relative_to(stub['dir']).as_posix()}", path.read_bytes())
    rng = np.random.default_rng(0)
    for b in range(-(-n // BLOCK)):
        results = []
        for i in range(b * BLOCK, min(n, (b + 1) * BLOCK)):
            ids = [1] + [-200] * NV + rng.integers(3, VOCAB, T).tolist()
            labels = [IGNORE_INDEX] * (len(ids) - P) + ids[-P:]
            grid = [{"role": "grid", "rows": GRID, "cols": GRID}]
            sample = TokenizedSample(f"s{i}", (f"{i}.png",), ids, labels, (NV,), -200, (grid,))
            att = rng.dirichlet(np.ones(NV + 40) * 0.3, size=(H, T))[..., :NV].astype(np.float32)
            visual = torch.from_numpy(rng.normal(size=(NV, D)).astype(np.float32))
            logits = LogitTargets(
                "topk",
                torch.tensor(sample.supervised_positions),
                torch.from_numpy(rng.integers(0, VOCAB, (P, K))),
                torch.from_numpy(-rng.exponential(3, (P, K)).astype(np.float32)),
                torch.full((P,), 0.1),
            )
            if stub is None:
                signal = TeacherSignal(torch.from_numpy(att), [visual], logits, [f"{i:032x}"])
            else:
                signal = TeacherSignal(None, [None], logits, [f"{i:032x}"])
            results.append(SampleResult(i, f"s{i}", (f"{i}.png",), sample=sample, signal=signal))  # fmt: skip
        write_block(loc, b, results, attrs)
    finalize(loc, attrs, n, -(-n // BLOCK))


def rate(fn, n) -> float:
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


def tiny_stub(work: Path) -> dict:
    """A real layer-0 stub (of a tiny LLaVA) and its attrs record, as `build --signals layer0` makes."""
    from alignkd_cache.backends import load_backend
    from alignkd_cache.layer0 import save_layer0
    from alignkd_cache.store.stub import FORMAT, verify_layer0
    from alignkd_cache.tiny import build_tiny_llava, build_tokenizer

    build_tokenizer(work / "tok")
    teacher = load_backend(build_tiny_llava(work / "teacher", work / "tok", layers=2, hidden=64, heads=4))
    sha = save_layer0(teacher, work / "layer0")
    files = verify_layer0(work / "layer0")["files"]
    size = sum((work / "layer0" / name).stat().st_size for name in files)
    return {
        "dir": work / "layer0",
        "record": {"format": FORMAT, "sha256": sha, "files": files, "bytes": size},
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    url = str(work / "bench.zarr")
    write_cache(url, args.samples)
    reader = CacheReader(url)
    order = reader.ids[:]
    random.Random(0).shuffle(order)
    # Each row starts from a fresh reader (cold handles and LRU), side by side in this one run.
    unkept = CacheReader(url, cache_bytes=0)
    no_lru = rate(lambda: [unkept.read(i) for i in order], len(order))
    single = rate(lambda: [reader.read(i) for i in order], len(order))
    print("| reader | samples/s |\n|---|---|")
    print(
        f"| read() one at a time, no block LRU (cache_bytes=0) | {no_lru:.1f} |\n| read() one at a time | {single:.1f} |"
    )
    urls = {"stored": url, "layer0": str(work / "layer0.zarr")}
    write_cache(urls["layer0"], args.samples, tiny_stub(work / "stub"))
    rates = {(kind, how): [] for kind in urls for how in ("prefetch", "workers")}
    for _ in range(args.repeats):  # interleaved: a slow spell on a shared machine hits both kinds
        for kind, u in urls.items():
            fresh = CacheReader(u)
            rates[(kind, "prefetch")].append(
                rate(lambda r=fresh: list(r.prefetch(order, batch_size=16)), len(order))
            )
            loader = torch.utils.data.DataLoader(CacheDataset(CacheReader(u), order), batch_size=16, num_workers=2,
                                                 collate_fn=list, multiprocessing_context="fork")  # fmt: skip
            rates[(kind, "workers")].append(rate(lambda batches=loader: list(batches), len(order)))
    median = {key: statistics.median(v) for key, v in rates.items()}
    print(
        f"\n| reader, medians of {args.repeats} interleaved rounds | stored | layer0 | layer0 / stored |\n|---|---|---|---|"
    )
    for how, label in (
        ("prefetch", "prefetch(batch 16, threads)"),
        ("workers", "DataLoader, 2 fork workers"),
    ):
        a, b = median[("stored", how)], median[("layer0", how)]
        print(f"| {label} | {a:.1f} | {b:.1f} | {b / a:.1f}x |")
    sizes = {kind: sum(f.stat().st_size for f in Path(u).rglob("*") if f.is_file() and "layer0/" not in f.as_posix()[len(u):])
             for kind, u in urls.items()}  # fmt: skip
    print(
        f"\nstored bytes per sample (stub excluded): stored {sizes['stored'] / args.samples:,.0f}, layer0 {sizes['layer0'] / args.samples:,.0f}"
    )


if __name__ == "__main__":
    main()
