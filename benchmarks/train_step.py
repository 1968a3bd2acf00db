"""What the cache buys the trainer: step time, peak memory and read throughput, side by side.

One run builds a tokenizer, a LLaVA teacher with ~4x the student's decoder parameters, the student,
a digit-grid VQA set (alignkd_cache.demo), and a cache of the teacher's signals; then trains the
same steps three ways through `train()` (so its `train_step`), each in a fresh subprocess (so peak
memory is that route's own):
- online: teacher resident, signals computed each step;
- cache: `from-cache`, the teacher never loads;
- student-only: CE alone, no teacher signal (the memory floor).
and times CacheReader over the whole cache.

Ratios (goals): cache step time / online step time (<= 0.5); cache peak memory / student-only
peak memory (<= 1.1); reader samples/s / cache training samples/s (>= 10).
Peak memory: torch.cuda.max_memory_allocated on CUDA, else the process's peak RSS (VmHWM).

    python benchmarks/train_step.py          # teacher hidden 512 x 8 layers, student 256 x 8
    python benchmarks/train_step.py --tiny   # a quick CPU run
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no peak-memory counter on this platform")


def route(args) -> dict:
    """One training route in this process; prints {step_s, samples_per_s, peak_mb}."""
    from alignkd_cache.losses import LossConfig, parse_weights
    from alignkd_cache.train import TrainOptions, from_cache, online

    work = Path(args.work)
    weights = "logit=0,vis=0,attn=0" if args.route == "student-only" else ""
    opts = TrainOptions(
        out=str(work / f"out-{args.route}"),
        loss=LossConfig(parse_weights(weights)),
        lr=1e-5,
        batch_size=args.batch_size,
        max_steps=args.steps,
        progress=False,
        seed=0,
    )
    if args.route == "online":
        online(
            str(work / "teacher"), str(work / "student"), work / "data" / "train.json", work / "data", opts
        )
    else:  # the cache route and the student-only floor both run without the teacher
        from_cache(str(work / "student"), str(work / "cache"), work / "data", opts)
    # Per-step wall time from metrics.jsonl (loading and saving excluded), first step as warm-up.
    rows = [json.loads(line) for line in (Path(opts.out) / "metrics.jsonl").read_text().splitlines()]
    step_s = statistics.median(r["seconds"] for r in rows[1:])
    return {"step_s": step_s, "samples_per_s": args.batch_size / step_s, "peak_mb": peak_memory_mb()}


def prepare(work: Path, tiny: bool, n_images: int) -> None:
    from alignkd_cache.build import BuildOptions, build_cache
    from alignkd_cache.demo.digits import build_digits_vqa, corpus
    from alignkd_cache.tiny import build_tiny_llava, build_tokenizer

    build_tokenizer(work / "tok", corpus=corpus())
    s_hidden, layers = (64, 2) if tiny else (256, 8)
    common = dict(layers=layers, image_size=56, patch_size=7, vision_hidden=64, vision_layers=2)
    # Twice the width at the same depth: ~4x the decoder parameters.
    build_tiny_llava(work / "teacher", work / "tok", hidden=2 * s_hidden, heads=8, seed=1, **common)
    build_tiny_llava(work / "student", work / "tok", hidden=s_hidden, heads=4, seed=2, **common)
    data = work / "data"
    build_digits_vqa(data, {"train": n_images})
    build_cache(
        str(work / "teacher"), data / "train.json", data, str(work / "cache"), BuildOptions(), progress=False
    )


def reader_rate(cache: str) -> float:
    from alignkd_cache.store.reader import CacheReader

    reader = CacheReader(cache)
    start = time.perf_counter()
    n = sum(len(batch) for batch in reader.prefetch(reader.ids, batch_size=16))
    return n / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--route", choices=["online", "cache", "student-only"], help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.steps = args.steps or (3 if args.tiny else 8)
    if args.route:
        print(json.dumps(route(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work, args.tiny, n_images=max(8, args.steps * args.batch_size // 3 + 1))
        results = {}
        for name in ("online", "cache", "student-only"):
            cmd = [
                sys.executable,
                __file__,
                "--route",
                name,
                "--work",
                tmp,
                "--steps",
                str(args.steps),
                "--batch-size",
                str(args.batch_size),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        read = reader_rate(str(work / "cache"))
    print(
        json.dumps(
            {
                "device": "cuda"
                if torch.cuda.is_available()
                else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
                "tiny": args.tiny,
                "steps": args.steps,
                "batch_size": args.batch_size,
                "routes": results,
                "reader_samples_per_s": read,
                "step_time_ratio": results["cache"]["step_s"] / results["online"]["step_s"],
                "memory_ratio": results["cache"]["peak_mb"] / results["student-only"]["peak_mb"],
                "reader_over_training": read / results["cache"]["samples_per_s"],
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
