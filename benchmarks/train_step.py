"""What the cache buys the trainer: step time, peak memory and read throughput, side by side.

One run builds a tokenizer, a LLaVA teacher with ~4x the student's decoder parameters, the student
(and a copy of it that has the teacher's vision tower), a digit-grid VQA set (alignkd_cache.demo),
a `stored` and a `layer0` cache of the teacher's signals; then trains the same steps five ways
through `train()` (so its `train_step`), each in a fresh subprocess (so peak memory is that route's
own), the routes interleaved over --rounds rounds:
- online: teacher resident, signals computed each step;
- cache: `from-cache` on the stored cache, the teacher never loads;
- layer0: `from-cache` on the layer0 cache, the stub recomputes attention and visual tokens with
  its own tower (the student's tower differs);
- layer0-shared: the same with the student whose tower is the teacher's (run once, both read it);
- student-only: CE alone, no teacher signal (the time and memory floor).
and times CacheReader over each cache.

Ratios (goals): cache step time / online step time (<= 0.5); cache peak memory / student-only
peak memory (<= 1.1); reader samples/s / cache training samples/s (>= 10); the layer0 routes' step
time against cache and student-only, and the recompute's share of their steps (metrics.jsonl's
signals_share). Peak memory: torch.cuda.max_memory_allocated on CUDA, else peak RSS (VmHWM).

    python benchmarks/train_step.py              # teacher hidden 512 x 8 layers, student 256 x 8
    python benchmarks/train_step.py --tiny       # a quick CPU run
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROUTES = ("online", "cache", "layer0", "layer0-shared", "student-only", "cache-lora")
# cache-lora: `from-cache` with a LoRA student (--lora r=8,alpha=16 on q/k/v/o, the projector trained).
LORA = "r=8,alpha=16,targets=q_proj+k_proj+v_proj+o_proj"


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no peak-memory counter on this platform")


def route(args) -> dict:
    """One training route in this process; prints {step_s, samples_per_s, peak_mb}."""
    from alignkd_cache.lora import lora_record
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
        lora=lora_record(LORA if args.route == "cache-lora" else None),
    )
    student, cache = {"layer0-shared": ("student-shared", "layer0"), "cache-lora": ("student", "cache")}.get(
        args.route, ("student", args.route)
    )
    if args.route == "online":
        online(str(work / "teacher"), str(work / student), work / "data" / "train.json", work / "data", opts)
    else:  # the cache routes and the student-only floor run without the teacher
        from_cache(
            str(work / student),
            str(work / ("cache" if cache == "student-only" else cache)),
            work / "data",
            opts,
        )
    # Per-step wall time from metrics.jsonl (loading and saving excluded), first step as warm-up.
    rows = [json.loads(line) for line in (Path(opts.out) / "metrics.jsonl").read_text().splitlines()][1:]
    step_s = statistics.median(r["seconds"] for r in rows)
    return {
        "step_s": step_s,
        "samples_per_s": args.batch_size / step_s,
        "peak_mb": peak_memory_mb(),
        "signals_share": statistics.median(r["signals_share"] for r in rows),
        "signals_route": rows[0]["signals_route"],
    }


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
    for kind in ("stored", "layer0"):
        out = work / ("cache" if kind == "stored" else "layer0")
        build_cache(
            str(work / "teacher"),
            data / "train.json",
            data,
            str(out),
            BuildOptions(signals=kind, progress=False),
        )
    # The student with the teacher's vision tower (as MobileVLM V2 1.7B has the 7B's): layer0-shared.
    shutil.copytree(work / "student", work / "student-shared")
    weights = load_file(str(work / "student" / "model.safetensors"))
    teacher = load_file(str(work / "teacher" / "model.safetensors"))
    weights |= {k: v for k, v in teacher.items() if "vision_tower" in k}
    save_file(weights, str(work / "student-shared" / "model.safetensors"), metadata={"format": "pt"})


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
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved rounds of every route.")
    parser.add_argument(
        "--routes", default=",".join(ROUTES), help="Comma-separated routes to run (default: all)."
    )
    parser.add_argument("--route", choices=ROUTES, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.steps = args.steps or (3 if args.tiny else 8)
    if args.route:
        print(json.dumps(route(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work, args.tiny, n_images=max(8, args.steps * args.batch_size // 3 + 1))
        runs = {name: [] for name in args.routes.split(",")}
        reads = {"stored": [], "layer0": []}
        for _ in range(args.rounds):  # interleaved, so a slow spell on a shared machine hits every route
            for name in runs:
                cmd = [sys.executable, __file__, "--route", name, "--work", tmp, "--steps", str(args.steps),
                       "--batch-size", str(args.batch_size)]  # fmt: skip
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            for kind in reads:
                reads[kind].append(reader_rate(str(work / ("cache" if kind == "stored" else "layer0"))))
    print(json.dumps(summary(args, runs, reads), indent=1))


def summary(args, runs: dict, reads: dict) -> dict:
    """Each route's medians over the rounds, and the ratios the goals are about."""
    routes = {
        name: {key: statistics.median(r[key] for r in rs) for key in ("step_s", "samples_per_s", "peak_mb", "signals_share")}
        | {"signals_route": rs[0]["signals_route"], "step_s_per_round": [round(r["step_s"], 4) for r in rs]}
        for name, rs in runs.items()
    }  # fmt: skip
    step = {name: r["step_s"] for name, r in routes.items()}
    memory = {name: r["peak_mb"] for name, r in routes.items()}
    read = {kind: statistics.median(v) for kind, v in reads.items()}
    return {
        "device": "cuda"
        if torch.cuda.is_available()
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "tiny": args.tiny,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "routes": routes,
        "reader_samples_per_s": read,
        "step_time_ratio": ratio(step, "cache", "online"),
        "memory_ratio": ratio(memory, "cache", "student-only"),
        "reader_over_training": read["stored"] / routes["cache"]["samples_per_s"]
        if "cache" in routes
        else None,
        "layer0_over_cache": ratio(step, "layer0", "cache"),
        "layer0_shared_over_cache": ratio(step, "layer0-shared", "cache"),
        "layer0_shared_over_student_only": ratio(step, "layer0-shared", "student-only"),
        "lora_over_full_step_time": ratio(step, "cache-lora", "cache"),
        "lora_over_full_memory": ratio(memory, "cache-lora", "cache"),
    }


def ratio(values: dict, a: str, b: str) -> float | None:
    """values[a] / values[b], or None when either route did not run (--routes)."""
    return values[a] / values[b] if a in values and b in values else None


if __name__ == "__main__":
    main()
