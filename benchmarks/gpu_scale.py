"""Real-size benchmark: a MobileVLM-V2-7B-shaped teacher and a 1.7B-shaped student on one GPU.

    python benchmarks/gpu_scale.py --out results.json          # one H200-class GPU, fits 10 minutes
    python benchmarks/gpu_scale.py --tiny --out tiny.json      # the same code at toy size, on CPU

Both models get random weights in bf16, built from configs (no downloads) and written in the original
MobileVLM V2 checkpoint layout, so every measurement below loads them the way a user's checkpoint
loads (`load_backend`) and runs the project's real pipeline:

- forward: the teacher's capture forward (layer-0 text->vision slice) against its plain forward (sdpa;
  flash-attention 2 too when `flash_attn` is installed), and the cost of moving full logits to the
  host before the top-k (as the build does) against taking the top-k on the device;
- build: `alignkd_cache.build.build_cache` once per codec preset (writing overlapped with compute),
  samples/s, peak GPU memory, and bytes per sample per signal from `cache_info` of the built store;
- train: one student optimizer step fed from the cache against one fed by the resident teacher, with
  each one's peak GPU memory.

Data is synthetic and said so: random words from the offline tokenizer's corpus (v1 template, three
turns, 600-1200 tokens with 144 visual tokens) and random-noise images, each shared by two samples.
That is right for timing and memory; it is not a basis for compression ratios, because random
weights give near-uniform attention (docs/benchmarks.md "Codecs" measures codecs on real signals).

Every measurement is guarded: a failure is recorded in the JSON with its error and the rest still
runs. Medians over repeats after warm-up; ratios come from measurements taken in this one run. The
summary is printed once to stdout (progress goes to stderr) and rewritten to --out after every
section, so an interrupted run still leaves what it measured.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from alignkd_cache.backends import load_backend
from alignkd_cache.backends.capture import CAPTURE_ATTENTION
from alignkd_cache.backends.mobilevlm import (
    IMAGE_TOKEN_ID,
    LDPv2Projector,
    MobileVLM,
    MobileVLMBackend,
    llama_config,
)
from alignkd_cache.build import BuildOptions, build_cache
from alignkd_cache.data import (
    Record,
    SampleDataset,
    Tokenization,
    pad_id,
    read_records,
    tokenize,
    tokenize_all,
)
from alignkd_cache.distributed import World
from alignkd_cache.losses import LossConfig, parse_weights
from alignkd_cache.signals import logit_targets
from alignkd_cache.sources import CacheSource, Layer0Source, OnlineSource, SignalOptions
from alignkd_cache.store.codecs import PRESETS
from alignkd_cache.store.info import cache_info
from alignkd_cache.store.reader import CacheReader
from alignkd_cache.tiny import DEFAULT_CORPUS, build_tokenizer, mobilevlm_config
from alignkd_cache.train import TrainOptions, setup_trainee, source_signals, train_step

TEMPLATE = "v1"
SAMPLES_PER_IMAGE = 2  # every image serves two samples, so the build's image dedup is exercised
TURNS = 3
QUESTION_SHARE = 0.4  # of each sample's text budget; answers (the supervised part) get the rest


@dataclass(frozen=True)
class LLM:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    rms_eps: float
    max_positions: int


@dataclass(frozen=True)
class Tower:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    image_size: int
    patch_size: int


@dataclass(frozen=True)
class Scale:
    teacher: LLM
    student: LLM
    tower: Tower  # CLIP ViT; both models have one of this shape (their own random weights)
    grid: int  # LDPv2 pools to grid x grid visual tokens
    vocab: int
    tokens: tuple[int, int]  # total sequence length per sample, visual tokens included
    samples: int  # in the synthetic dataset (and so in each build)
    block_size: int  # build blocks: several per build, so writing overlaps compute
    batch_size: int  # teacher batch (forward and build)
    train_batch_size: int
    image_file: tuple[int, int]  # (width, height) of the image files before padding/resizing
    topk: int
    warmup: int
    repeats: int
    loader_workers: int  # DataLoader workers of the training measurements
    dtype: str  # of both models' weights (the student trains from float32 under autocast to this)


REAL = Scale(
    teacher=LLM(layers=32, hidden=4096, intermediate=11008, heads=32, rms_eps=1e-5, max_positions=4096),
    student=LLM(layers=24, hidden=2048, intermediate=5632, heads=16, rms_eps=1e-6, max_positions=2048),
    tower=Tower(layers=24, hidden=1024, intermediate=4096, heads=16, image_size=336, patch_size=14),
    grid=12,
    vocab=32000,
    tokens=(600, 1200),
    samples=128,
    block_size=32,
    batch_size=8,
    train_batch_size=4,
    image_file=(640, 480),
    topk=64,
    warmup=2,
    repeats=5,
    loader_workers=4,
    dtype="bfloat16",
)

TINY = Scale(
    teacher=LLM(layers=2, hidden=64, intermediate=128, heads=4, rms_eps=1e-5, max_positions=512),
    student=LLM(layers=2, hidden=32, intermediate=64, heads=2, rms_eps=1e-6, max_positions=512),
    tower=Tower(layers=2, hidden=32, intermediate=64, heads=2, image_size=32, patch_size=4),
    grid=4,
    vocab=512,
    tokens=(90, 160),
    samples=16,
    block_size=8,
    batch_size=4,
    train_batch_size=4,
    image_file=(40, 32),
    topk=16,
    warmup=1,
    repeats=2,
    loader_workers=0,
    # CPUs without native bf16 run it ~20x slower than float32 (measured on the CI machine); the
    # dtype is a parameter of the same code, so nothing else changes.
    dtype="float32",
)


# ---------------------------------------------------------------------------------------------
# Small tools: progress, timing, memory, guarded sections


class Run:
    """The summary being filled in, the clock, and the time budget."""

    def __init__(self, out: Path | None, budget_s: float, device: torch.device):
        self.out, self.budget_s, self.device = out, budget_s, device
        self.start = time.perf_counter()
        self.summary: dict = {"errors": {}, "skipped": {}}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def log(self, message: str) -> None:
        print(f"[gpu_scale {self.elapsed():7.1f}s] {message}", file=sys.stderr, flush=True)

    def save(self) -> None:
        self.summary["elapsed_s"] = round(self.elapsed(), 1)
        if self.out is not None:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text(json.dumps(self.summary, indent=1) + "\n")

    def node(self, path: str) -> dict:
        """The summary's dict at a dotted path ("forward.capture_sdpa"), created if new."""
        node = self.summary
        for key in path.split("."):
            node = node.setdefault(key, {})
        return node

    def guarded(self, path: str, fn, *args, **kwargs):
        """Run fn and merge a dict result into node(path); on failure record the error there (the
        rest of the run goes on). Past the time budget, record a skip instead of starting."""
        node = self.node(path)
        if self.elapsed() > self.budget_s:
            node["skipped"] = self.summary["skipped"][path] = f"time budget of {self.budget_s:.0f} s spent"
            self.log(f"{path}: skipped (time budget)")
            return None
        self.log(f"{path}: start")
        try:
            value = fn(*args, **kwargs)
            if isinstance(value, dict) and value is not node:
                node.update(value)
            self.log(f"{path}: done")
            return value
        except Exception as e:  # recorded, not raised: one failure must not lose the other figures
            node["error"] = self.summary["errors"][path] = f"{type(e).__name__}: {e}"
            node["traceback"] = traceback.format_exc()[-3000:]
            self.log(f"{path}: FAILED {node['error']}")
            return None
        finally:
            free_memory()
            self.save()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory() -> None:
    """Give dropped models' GPU memory back, so the next measurement's peak is its own."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def timed(fn, device: torch.device, warmup: int, repeats: int) -> dict:
    """Median wall time of fn() after `warmup` untimed calls, with the device synchronized."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "times_s": [round(t, 5) for t in times]}


@contextmanager
def peak_memory(device: torch.device, into: dict):
    """Sets into["peak_gpu_bytes"]: torch.cuda.max_memory_allocated over the block (resident
    tensors included). None on CPU, where there is no GPU memory to measure (see summary notes)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    yield
    if device.type == "cuda":
        synchronize(device)
        into["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated(device))
    else:
        into["peak_gpu_bytes"] = None


@contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# ---------------------------------------------------------------------------------------------
# Setup: models in the MobileVLM V2 layout, and a synthetic LLaVA-format dataset


def scaled_mobilevlm_config(llm: LLM, tower: Tower, grid: int, vocab: int, tokenizer) -> dict:
    """A MobileVLM V2 config.json (see docs/method.md §4) at the given sizes, the tower inside."""
    llama = {
        "vocab_size": vocab,
        "hidden_size": llm.hidden,
        "intermediate_size": llm.intermediate,
        "num_hidden_layers": llm.layers,
        "num_attention_heads": llm.heads,
        "num_key_value_heads": llm.heads,
        "max_position_embeddings": llm.max_positions,
        "rms_norm_eps": llm.rms_eps,
        "initializer_range": 0.02,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
    }
    return mobilevlm_config(llama, tower.hidden, grid, "random CLIP ViT (inside this checkpoint)")


def write_model(out: Path, llm: LLM, scale: Scale, tokenizer, device: torch.device, seed: int) -> dict:
    """Random bf16 weights, made on `device` (a 7B model inits in seconds on a GPU, minutes on a CPU),
    saved by MobileVLMBackend.save_pretrained in the original layout with the tower inside."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaForCausalLM

    config = scaled_mobilevlm_config(llm, scale.tower, scale.grid, scale.vocab, tokenizer)
    t = scale.tower
    vision_config = CLIPVisionConfig(
        hidden_size=t.hidden,
        intermediate_size=t.intermediate,
        num_hidden_layers=t.layers,
        num_attention_heads=t.heads,
        image_size=t.image_size,
        patch_size=t.patch_size,
        hidden_act="quick_gelu",
        initializer_range=0.02,
    )
    start = time.perf_counter()
    torch.manual_seed(seed)
    with torch.device(device), default_dtype(getattr(torch, scale.dtype)):
        model = MobileVLM(
            LlamaForCausalLM(llama_config(config)),
            LDPv2Projector(t.hidden, llm.hidden, scale.grid),
            CLIPVisionModel(vision_config),
        )
    params = sum(p.numel() for p in model.parameters())
    llm_params = sum(p.numel() for p in model.llm.parameters())
    # Saved from host memory: the state dict is cloned on save, which on the GPU would cost a second copy.
    MobileVLMBackend(model.cpu(), config, tokenizer, out.name, None, None).save_pretrained(out)
    del model
    free_memory()
    return {
        "params": params,
        "llm_params": llm_params,
        "files_bytes": sum(f.stat().st_size for f in out.iterdir() if f.is_file()),
        "make_and_save_s": round(time.perf_counter() - start, 2),
        "config": {
            k: config[k]
            for k in (
                "num_hidden_layers",
                "hidden_size",
                "intermediate_size",
                "num_attention_heads",
                "vocab_size",
            )
        },
    }


def corpus_words() -> list[str]:
    words = {w.strip(".,?:'") for line in DEFAULT_CORPUS for w in line.split()}
    return sorted(w for w in words if w.isalnum())


def write_dataset(root: Path, tokenizer, scale: Scale, seed: int) -> dict:
    """A LLaVA-format JSON file of three-turn v1 conversations, sized in tokens, plus noise images."""
    rng, image_rng = random.Random(seed), np.random.default_rng(seed)
    images = root / "images"
    images.mkdir(parents=True)
    n_images = max(1, scale.samples // SAMPLES_PER_IMAGE)
    width, height = scale.image_file
    for i in range(n_images):
        pixels = image_rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"img{i:05d}.png")
    # Byte-level BPE splits text into space-led words before merging, so the token count of a text
    # made of " word" pieces is the sum of the pieces' counts: sample lengths can be set exactly.
    words = corpus_words()
    cost = {w: len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) for w in words}
    tok = Tokenization(tokenizer, TEMPLATE, IMAGE_TOKEN_ID, scale.grid**2, max_length=4 * scale.tokens[1])

    def text(budget: float) -> str:
        out, used = [], 0
        while used < budget or not out:
            word = rng.choice(words)
            out.append(word)
            used += cost[word]
        return " ".join(out)

    def record(i: int, texts: list[str]) -> dict:
        turns = []
        for turn in range(TURNS):
            question = ("<image>\n" if turn == 0 else "") + texts[2 * turn]
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": texts[2 * turn + 1]}]
        return {"id": f"s{i:06d}", "image": f"images/img{i % n_images:05d}.png", "conversations": turns}

    def length(rec: dict) -> int:
        return len(
            tokenize(Record(rec["id"], (rec["image"],), rec["conversations"], rec["id"]), tok).input_ids
        )

    records = []
    for i in range(scale.samples):
        target = rng.randint(*scale.tokens)
        base = length(record(i, ["a"] * (2 * TURNS)))
        budget = max(2 * TURNS, target - base)
        shares = [QUESTION_SHARE / TURNS, (1 - QUESTION_SHARE) / TURNS] * TURNS
        records.append(record(i, [text(budget * s) for s in shares]))
    path = root / "data.json"
    path.write_text(json.dumps(records))
    samples, skips = tokenize_all(read_records(path), tok)
    if skips:
        raise RuntimeError(f"synthetic data: {len(skips)} samples were skipped: {skips[:3]}")
    lengths = [len(s.input_ids) for s in samples]
    text_rows = [len(s.query_positions) for s in samples]
    supervised = [len(s.supervised_positions) for s in samples]
    return {
        "path": str(path),
        "image_root": str(root),
        "kind": "synthetic: random corpus words in three-turn v1 conversations, random-noise images",
        "samples": len(samples),
        "images": n_images,
        "samples_per_image": SAMPLES_PER_IMAGE,
        "image_file_wh": list(scale.image_file),
        "visual_tokens": scale.grid**2,
        "tokens": stats(lengths),
        "text_rows_T": stats(text_rows),
        "supervised_positions": stats(supervised),
    }


def stats(values: list[int]) -> dict:
    return {
        "min": min(values),
        "median": statistics.median(values),
        "max": max(values),
        "mean": statistics.fmean(values),
    }


# ---------------------------------------------------------------------------------------------
# Measurement 1: the teacher's forward, with and without the layer-0 capture


def measure_forward(run: Run, scale: Scale, teacher_dir: Path, data: dict) -> dict:
    device = run.device
    result = run.node("forward")
    # Timed twice: the first load also pays one-time costs (imports, device init, a cold page
    # cache) that a build started after it does not, so the second is what each build pays.
    for key in ("teacher_first_load_s", "teacher_load_s"):
        start = time.perf_counter()
        backend = load_backend(teacher_dir, dtype=getattr(torch, scale.dtype), device=device)
        synchronize(device)
        result[key] = round(time.perf_counter() - start, 2)
    tok = Tokenization(backend.tokenizer, TEMPLATE, backend.image_token_id, backend.num_visual_tokens)
    samples, _ = tokenize_all(read_records(data["path"]), tok)
    dataset = SampleDataset(
        samples[: scale.batch_size],
        data["image_root"],
        backend.preprocess,
        pad_id(backend.tokenizer),
        backend.pad_color,
    )
    batch = dataset.collate([dataset[i] for i in range(len(dataset))]).to(device)
    result["batch"] = {"samples": len(batch.ids), "padded_length": int(batch.input_ids.shape[1])}

    # What the build's main thread does before each forward: read, pad and preprocess the images,
    # collate. It runs between forwards, not beside them, so it adds to the GPU's idle time.
    def prepare():
        dataset.collate([dataset[i] for i in range(len(dataset))]).to(device)

    run.guarded("forward.prepare_batch", timed, prepare, device, scale.warmup, scale.repeats)

    def forward(capture: bool):
        with torch.inference_mode():
            return backend.forward(batch, capture=capture)

    def measure(capture: bool) -> dict:
        out: dict = {}
        with peak_memory(device, out):
            out |= timed(lambda: forward(capture), device, scale.warmup, scale.repeats)
        out["samples_per_s"] = len(batch.ids) / out["median_s"]
        return out

    run.guarded("forward.capture_sdpa", measure, True)
    run.guarded("forward.plain_sdpa", measure, False)

    def topk(on_device: bool) -> dict:
        signals = forward(True)
        lengths = [len(s.input_ids) for s in batch.samples]

        def targets():
            for j, n in enumerate(lengths):
                logits = signals.logits[j, :n]
                logit_targets(
                    logits if on_device else logits.float().cpu(), batch.supervised_positions[j], k=scale.topk
                )

        return timed(targets, device, scale.warmup, scale.repeats)

    # The build takes the top-k on the device (build.py), moving only k ids and values per position;
    # topk_on_host measures the alternative, moving each sample's full (S, vocab) logits to the
    # host first (~100 MB per sample at 7B shapes).
    run.guarded("forward.topk_on_host", topk, False)
    run.guarded("forward.topk_on_device", topk, True)
    if importlib.util.find_spec("flash_attn") is None or device.type != "cuda":
        result["plain_flash"] = {
            "not_run": "flash_attn is not installed" if device.type == "cuda" else "needs CUDA"
        }
    else:
        # Last: it switches the LLM's attention implementation and back.
        def flash() -> dict:
            llm = backend.model.llm
            llm.set_attn_implementation("flash_attention_2")
            try:
                return measure(False)
            finally:
                llm.set_attn_implementation(CAPTURE_ATTENTION)

        run.guarded("forward.plain_flash", flash)
    return result


# ---------------------------------------------------------------------------------------------
# Measurement 2: the real build pipeline, once per codec preset


def measure_build(
    run: Run,
    scale: Scale,
    teacher_dir: Path,
    data: dict,
    preset: str,
    store: Path,
    load_s: float | None,
    signals: str = "stored",
) -> dict:
    device = run.device
    options = BuildOptions(
        signals=signals,
        template=TEMPLATE,
        topk=scale.topk,
        codecs=preset,
        batch_size=scale.batch_size,
        dtype=scale.dtype,
        device=str(device),
        block_size=scale.block_size,
        progress=False,
    )
    result: dict = {"options": options.recorded()}
    with peak_memory(device, result):
        start = time.perf_counter()
        build_cache(str(teacher_dir), data["path"], data["image_root"], str(store), options)
        synchronize(device)
        wall = time.perf_counter() - start
    info = cache_info(str(store))
    written = info["counts"]["written"]
    result |= {
        "wall_s": round(wall, 2),
        "samples": written,
        "samples_per_s_end_to_end": written / wall,
        # One teacher load is part of every build; the forward section timed one load on its own.
        "samples_per_s_excluding_load": written / (wall - load_s)
        if load_s is not None and wall > load_s
        else None,
        "encodings": info["encodings"],
        "bytes_per_sample": {s: v["bytes_per_sample"] for s, v in info["signals"].items()},
        "raw_fp16_per_sample": {s: v["raw_fp16_per_sample"] for s, v in info["signals"].items()},
        "ratio_to_raw_fp16": {s: v["ratio"] for s, v in info["signals"].items()}
        | {"total": info["total"]["ratio"]},
        "total_bytes_per_sample": info["total"]["bytes_per_sample"],
        "stub_bytes": info["stub"]["bytes"] if info["stub"] else None,
        "images": info["counts"].get("images"),
        "visual_bytes_per_image": info["signals"]["visual"]["bytes_per_sample"]
        * written
        / max(1, info["counts"].get("images") or 1),
    }
    return result


# ---------------------------------------------------------------------------------------------
# Measurement 3: a training step fed from the cache, and one fed by the resident teacher


def measure_training(run: Run, scale: Scale, student, source) -> dict:
    """The trainer's step (alignkd_cache.train.train_step: targets outside the student's autocast,
    student forward, the shared losses, backward, clipping, AdamW) at batch size
    `train_batch_size`, under autocast to the scale's dtype (bf16: what `--bf16` gives), with
    batches from a DataLoader over the source.

    Timed here rather than by running train() itself: at these sizes its end-of-run checkpoint
    (about 20 GB of weights and AdamW state) would take more of the time budget than the steps."""
    device = run.device
    cfg = LossConfig(weights=parse_weights(""))  # ce, logit, vis and attn all on
    # The trainer's own setup (what trains, the adapters, AdamW); bf16 autocast as --bf16 gives it.
    opts = TrainOptions(out="", loss=cfg, bf16=scale.dtype == "bfloat16", device=str(device))
    trainee, optimizer = setup_trainee(student, source, opts, World(device=device))
    steps = scale.warmup + scale.repeats
    loader = iter(
        torch.utils.data.DataLoader(
            torch.utils.data.Subset(source, range(steps * scale.train_batch_size)),
            batch_size=scale.train_batch_size,
            collate_fn=source.collate,
            num_workers=scale.loader_workers,
        )
    )
    losses = []

    def step():
        result = train_step(
            trainee, [next(loader)], source_signals(source, device), None, optimizer, None, 1.0
        )
        losses.append(result["loss"])

    for _ in range(scale.warmup):  # the first steps also allocate AdamW's state
        step()
    result: dict = {}
    with peak_memory(device, result):
        result |= timed(step, device, 0, scale.repeats)
    if not all(np.isfinite(losses)):
        raise RuntimeError(f"non-finite training loss: {losses}")
    result |= {
        "batch_size": scale.train_batch_size,
        "samples_per_s": scale.train_batch_size / result["median_s"],
        "loss_first_last": [losses[0], losses[-1]],
        "loader_workers": scale.loader_workers,
    }
    return result


def measure_train(
    run: Run, scale: Scale, teacher_dir: Path, student_dir: Path, data: dict, store: Path, layer0_store: Path
) -> dict:
    device = run.device
    result = run.node("train")
    result["cache"] = store.name
    # As `alignkd-train` loads a student: float32 master weights; the forwards run under autocast.
    student = load_backend(student_dir, device=device)
    cache = CacheSource(CacheReader(str(store)), student, data["image_root"])
    run.guarded("train.from_cache", measure_training, run, scale, student, cache)
    del cache
    free_memory()

    def layer0() -> dict:
        source = Layer0Source(CacheReader(str(layer0_store)), student, data["image_root"], device=device)
        return measure_training(run, scale, student, source) | {"route": source.route}

    if layer0_store.exists():
        run.guarded("train.layer0", layer0)
        free_memory()

    def online() -> dict:
        teacher = load_backend(teacher_dir, dtype=getattr(torch, scale.dtype), device=device)
        teacher.model.eval().requires_grad_(False)
        options = SignalOptions(template=TEMPLATE, topk=scale.topk)
        source = OnlineSource(teacher, student, data["path"], data["image_root"], options)
        return measure_training(run, scale, student, source)

    run.guarded("train.online", online)
    return result


# ---------------------------------------------------------------------------------------------
# The run


def ratios(summary: dict) -> dict:
    """Ratios of measurements from this run, where both sides were measured."""

    def get(*path):
        node = summary
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        return node

    def total(*values):
        return sum(values) if all(isinstance(v, int | float) for v in values) else None

    def ratio(a, b):
        return a / b if isinstance(a, int | float) and isinstance(b, int | float) and b else None

    out = {
        "capture_over_plain_sdpa": ratio(
            get("forward", "capture_sdpa", "median_s"), get("forward", "plain_sdpa", "median_s")
        ),
        "capture_over_plain_flash": ratio(
            get("forward", "capture_sdpa", "median_s"), get("forward", "plain_flash", "median_s")
        ),
        "capture_peak_over_plain_peak": ratio(
            get("forward", "capture_sdpa", "peak_gpu_bytes"), get("forward", "plain_sdpa", "peak_gpu_bytes")
        ),
        "topk_host_over_device": ratio(
            get("forward", "topk_on_host", "median_s"), get("forward", "topk_on_device", "median_s")
        ),
        # Above 1: serial host work per batch (images, then a top-k after moving the full logits,
        # which the build avoids by taking it on the device) would take longer than the teacher's
        # forward, so the GPU would idle more than it works.
        "host_prepare_and_topk_over_capture_forward": ratio(
            total(get("forward", "prepare_batch", "median_s"), get("forward", "topk_on_host", "median_s")),
            get("forward", "capture_sdpa", "median_s"),
        ),
        "online_step_over_cache_step": ratio(
            get("train", "online", "median_s"), get("train", "from_cache", "median_s")
        ),
        "online_peak_over_cache_peak": ratio(
            get("train", "online", "peak_gpu_bytes"), get("train", "from_cache", "peak_gpu_bytes")
        ),
        "layer0_step_over_cache_step": ratio(
            get("train", "layer0", "median_s"), get("train", "from_cache", "median_s")
        ),
        "layer0_build_over_balanced_build_samples_per_s": ratio(
            get("build", "layer0", "samples_per_s_excluding_load"),
            get("build", "balanced", "samples_per_s_excluding_load"),
        ),
        "balanced_over_layer0_bytes_per_sample": ratio(
            get("build", "balanced", "total_bytes_per_sample"),
            get("build", "layer0", "total_bytes_per_sample"),
        ),
    }
    for preset in PRESETS:
        out[f"build_{preset}_over_capture_forward_samples_per_s"] = ratio(
            get("build", preset, "samples_per_s_excluding_load"),
            get("forward", "capture_sdpa", "samples_per_s"),
        )
    return out


def machine(device: torch.device) -> dict:
    import transformers
    import zarr

    out = {
        "device": str(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "zarr": zarr.__version__,
        "cpu_count": os.cpu_count(),
        "flash_attn_installed": importlib.util.find_spec("flash_attn") is not None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out |= {"gpu": props.name, "gpu_memory_bytes": props.total_memory, "cuda": torch.version.cuda}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="toy sizes on CPU: the same code, in seconds")
    parser.add_argument("--out", type=Path, help="also write the JSON summary here")
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument(
        "--workdir", type=Path, help="where models, data and caches go (default: a temp dir, removed)"
    )
    parser.add_argument(
        "--budget-s", type=float, default=540.0, help="skip measurements that would start after this"
    )
    args = parser.parse_args(argv)

    scale = TINY if args.tiny else REAL
    if args.tiny:
        # Toy tensors gain nothing from intra-op threads, and on a shared CI machine they lose a lot.
        torch.set_num_threads(1)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    run = Run(args.out, args.budget_s, device)
    run.summary |= {
        "mode": "tiny" if args.tiny else "real",
        "machine": machine(device),
        "scale": asdict(scale),
        "notes": {
            "weights": f"random, {scale.dtype}; the student trains from float32 master weights"
            + (" under bf16 autocast, as alignkd-train --bf16 does" if scale.dtype == "bfloat16" else ""),
            "data": "synthetic token ids and random-noise images: right for timing and memory, not for compression ratios",
            "timing": f"median of {scale.repeats} repeats after {scale.warmup} warm-up calls; ratios from this one run",
            "peak_gpu_bytes": (
                "torch.cuda.max_memory_allocated over the measurement, resident weights included"
                if device.type == "cuda"
                else "null: no CUDA device, and torch.cuda.max_memory_allocated measures GPU memory only"
            ),
        },
    }
    work = Path(tempfile.mkdtemp(prefix="gpu_scale_", dir=args.workdir))
    try:
        run.log(f"mode {run.summary['mode']} on {device}; work dir {work}")
        tokenizer = build_tokenizer(work / "tokenizer")
        models_ok = all(
            run.guarded(f"setup.{name}", write_model, work / name, llm, scale, tokenizer, device, seed=seed)
            is not None
            for name, llm, seed in (("teacher", scale.teacher, 1), ("student", scale.student, 2))
        )
        data = run.guarded("setup.data", write_dataset, work / "data", tokenizer, scale, seed=0)
        if not models_ok or data is None:
            raise RuntimeError("setup failed; see setup in the summary")
        teacher_dir, student_dir = work / "teacher", work / "student"

        run.guarded("forward", measure_forward, run, scale, teacher_dir, data)
        load_s = run.node("forward").get("teacher_load_s")

        def build(preset: str, signals: str = "stored") -> None:
            name = preset if signals == "stored" else signals
            store = work / f"cache-{name}"
            run.guarded(
                f"build.{name}", measure_build, run, scale, teacher_dir, data, preset, store, load_s, signals
            )

        # The order puts what only this run can tell first: should the budget run out, the lossless
        # build goes (its sizes follow exactly from the representation, docs/scaling.md).
        for preset in [p for p in PRESETS if p != "lossless"]:
            build(preset)
        if "samples" not in run.node("build.balanced"):
            raise RuntimeError("the balanced build failed, so there is no cache to train from")
        build("balanced", signals="layer0")  # logit targets + the layer-0 stub; no capture in the build
        run.guarded(
            "train",
            measure_train,
            run,
            scale,
            teacher_dir,
            student_dir,
            data,
            work / "cache-balanced",
            work / "cache-layer0",
        )
        build("lossless")
    except Exception as e:
        run.summary["errors"]["run"] = f"{type(e).__name__}: {e}"
        run.log(f"stopped: {run.summary['errors']['run']}")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    run.summary["ratios"] = ratios(run.summary)
    run.save()
    print(json.dumps(run.summary, indent=1))
    return 1 if run.summary["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
