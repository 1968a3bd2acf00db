"""What layer-0 capture costs: time against a plain sdpa forward, memory against output_attentions.

Default (`--family mobilevlm`): one run builds a random MobileVLM V2-shaped teacher (8 layers, 144 visual tokens, ~1k-token
sequences by default), then measures side by side:
- time: the capture forward (CAPTURE_ATTENTION, slice in layer 0) and the plain forward (transformers'
  sdpa in every layer), interleaved, median of --repeats each;
- peak memory of three routes: plain sdpa, capture, and the usual alternative of eager attention with
  output_attentions=True and slicing layer 0 afterwards. On CUDA: torch.cuda.max_memory_allocated
  above what was allocated before the forward. On CPU: each route runs in a fresh subprocess, which
  resets the kernel's peak-RSS counter (/proc/self/clear_refs) after loading and reports VmHWM minus
  VmRSS before the forward, so only memory the forward itself touched counts.

    python benchmarks/capture.py            # the 8-layer, 1k-token teacher
    python benchmarks/capture.py --tiny     # a quick CPU smoke run

`--family qwen2_5_vl`: time only, at Qwen2.5-VL-7B's text shapes through the transformers-native
backend (TransformersVLM.run, the family's own forward with M-RoPE). A random model from
transformers.Qwen2_5_VLConfig with the 7B text widths (hidden 3584, 28 query heads on 4 kv heads,
intermediate 18944, M-RoPE sections [16, 24, 24], rope_theta 1e6) but --layers decoder layers
(default 1) and a --vocab-row lm_head (default 8192; the 7B's is 152064): both run identically on
the two routes and capture adds work in layer 0 only, so fewer layers and rows make the measured
ratio an upper bound of the 7B's. The vision tower is small (1 block, hidden 64; the 7B's has 32
blocks of 1280): it runs identically on both routes. One 448x448 image per sample as the processor
would give it (a 32x32 grid of 14-px patches, 1024 x 1176 pixel_values, image_grid_thw [1, 32, 32])
-> 256 visual tokens after the 2x2 merge, in a 1024-token sequence. The model is loaded with
attn_implementation {"text_config": CAPTURE_ATTENTION, "vision_config": "sdpa"} as
TransformersVLM.load does; capture=False then returns sdpa's output without scoring. Routes
interleaved, medians of --repeats; `slice_ms` times the capture's extra work alone
(text_to_vision_slice on the same shapes), a noise-free check of the ratio.

    python benchmarks/capture.py --family qwen2_5_vl          # ~5 min on 2 CPU cores
    python benchmarks/capture.py --family qwen2_5_vl --tiny   # seconds

Prints one JSON object; the goals are time_ratio <= 1.05 and memory_ratio <= 0.3 (time only for
qwen2_5_vl).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from alignkd_cache.backends.capture import CAPTURE_ATTENTION, text_to_vision_slice
from alignkd_cache.backends.mobilevlm import MobileVLMBackend
from alignkd_cache.data import TokenizedSample, collate
from alignkd_cache.tiny import build_tiny_mobilevlm, build_tokenizer

SIZES = {
    "full": dict(layers=8, hidden=512, heads=8, grid=12, image_size=48, seq_len=1024, batch=2),
    "tiny": dict(layers=2, hidden=64, heads=4, grid=4, image_size=32, seq_len=128, batch=2),
}
ROUTES = ("plain", "capture", "output_attentions")


def build_model(root: Path, size: dict) -> Path:
    build_tokenizer(root / "tok")
    return build_tiny_mobilevlm(
        root / "teacher",
        root / "tok",
        layers=size["layers"],
        hidden=size["hidden"],
        heads=size["heads"],
        grid=size["grid"],
        image_size=size["image_size"],
        patch_size=4,
        vision_hidden=64,
        vision_heads=4,
    )


def make_batch(backend: MobileVLMBackend, size: dict):
    """`batch` samples of seq_len tokens: BOS, the image, then random text (its length is what matters)."""
    generator = torch.Generator().manual_seed(0)
    n_v, samples, images = backend.num_visual_tokens, [], []
    for i in range(size["batch"]):
        text = torch.randint(
            3, len(backend.tokenizer), (size["seq_len"] - 1 - n_v,), generator=generator
        ).tolist()
        ids = [backend.tokenizer.bos_token_id] + [backend.image_token_id] * n_v + text
        samples.append(TokenizedSample(f"s{i}", (f"x{i}",), ids, ids, (n_v,), backend.image_token_id))
        pixels = torch.randn(3, size["image_size"], size["image_size"], generator=generator)
        images.append([(pixels, f"k{i}")])
    return collate(samples, images, backend.tokenizer.pad_token_id, backend.collate_pixels)


ATTENTION = {"plain": "sdpa", "capture": CAPTURE_ATTENTION, "output_attentions": "eager"}


def select_route(backend: MobileVLMBackend, route: str) -> None:
    """Switching the attention implementation walks the model, so it stays outside the timed region."""
    backend.model.llm.set_attn_implementation(ATTENTION[route])


def run_route(backend: MobileVLMBackend, batch, route: str):
    llm = backend.model.llm
    if route in ("plain", "capture"):
        return backend.forward(batch, capture=route == "capture")
    # The alternative: every layer eager, every probability kept, layer 0's T x V sliced afterwards.
    visual = backend.encode_images(batch.pixel_values)
    embeds = llm.get_input_embeddings()(batch.input_ids.clamp(min=0))
    for b, rows in enumerate(batch.image_index):
        if rows:
            embeds[b, batch.visual_positions[b]] = torch.cat([visual[r] for r in rows])
    out = llm(
        inputs_embeds=embeds, attention_mask=batch.attention_mask, output_attentions=True, use_cache=False
    )
    return [
        out.attentions[0][b][:, t][:, :, v]
        for b, (t, v) in enumerate(zip(batch.query_positions, batch.visual_positions, strict=True))
    ]


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory(model_dir: Path, size: dict, route: str, device: str) -> float:
    """MiB the route's forward needs above what was resident before it (see the module doc)."""
    backend = MobileVLMBackend.load(model_dir, device=device)
    batch = make_batch(backend, size).to(device)
    with torch.no_grad():
        if device == "cuda":
            torch.cuda.synchronize()
            select_route(backend, route)
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            run_route(backend, batch, route)
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - before) / 2**20
        select_route(backend, route)
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = _status_kb("VmRSS")
        run_route(backend, batch, route)
        return (_status_kb("VmHWM") - before) / 1024


def measure_time(backend: MobileVLMBackend, batch, repeats: int, device: str) -> dict[str, float]:
    times: dict[str, list[float]] = {"plain": [], "capture": []}
    with torch.no_grad():
        for route in times:  # warm-up
            select_route(backend, route)
            run_route(backend, batch, route)
        for _ in range(repeats):
            for route in times:
                select_route(backend, route)
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                run_route(backend, batch, route)
                if device == "cuda":
                    torch.cuda.synchronize()
                times[route].append(time.perf_counter() - start)
    return {route: statistics.median(values) * 1000 for route, values in times.items()}


# ---------------------------------------------------------------- Qwen2.5-VL (transformers-native)

# Qwen2.5-VL-7B-Instruct's text config (vision: 32 blocks of 1280, merger to 3584), with few layers.
QWEN_SIZES = {
    "full": dict(layers=1, hidden=3584, heads=28, kv_heads=4, intermediate=18944, vocab=8192,
                 mrope=[16, 24, 24], image=448, seq_len=1024, batch=1),
    "tiny": dict(layers=1, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=512,
                 mrope=[2, 3, 3], image=112, seq_len=128, batch=1),
}  # fmt: skip
PATCH, MERGE, TEMPORAL = 14, 2, 2


def build_qwen(size: dict, device: str):
    """A random Qwen2.5-VL TransformersVLM: the processor (tokenizer with Qwen's special tokens and
    M-RoPE's mm_token_type_ids) of the tiny family checkpoint, the model at `size`."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from alignkd_cache.backends.transformers_vlm import TransformersVLM
    from alignkd_cache.tiny_families import _build, _sizes

    tiny_config, processor = _build("qwen2_5_vl", _sizes("teacher"))
    tok = processor.tokenizer
    ids = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    text = {
        "vocab_size": max(size["vocab"], len(tok)),
        "hidden_size": size["hidden"],
        "intermediate_size": size["intermediate"],
        "num_hidden_layers": size["layers"],
        "num_attention_heads": size["heads"],
        "num_key_value_heads": size["kv_heads"],
        "max_position_embeddings": 128000,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "mrope_section": size["mrope"], "rope_theta": 1e6},
        "bos_token_id": None,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    vision = {
        "depth": 1,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_heads": 2,
        "patch_size": PATCH,
        "spatial_merge_size": MERGE,
        "temporal_patch_size": TEMPORAL,
        "window_size": 112,
        "fullatt_block_indexes": [0],
        "tokens_per_second": 2,
        "out_hidden_size": size["hidden"],
    }
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, **{k: getattr(tiny_config, k) for k in ids}
    )
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration._from_config(
        config,
        dtype=torch.float32,
        attn_implementation={"text_config": CAPTURE_ATTENTION, "vision_config": "sdpa"},
    )
    model.to(device).eval()
    return TransformersVLM("qwen2_5_vl", model, processor, "random Qwen2.5-VL-7B-shaped")


def qwen_inputs(backend, size: dict):
    """(input_ids, attention_mask, pixel_inputs, num_visual): per sample a chat prefix, one image
    (<|vision_start|>, N_v x <|image_pad|>, <|vision_end|>), then random text up to seq_len."""
    generator = torch.Generator().manual_seed(0)
    tok = backend.tokenizer
    grid = size["image"] // PATCH
    n_v = grid * grid // MERGE**2
    special = set(tok.all_special_ids) | set(tok.get_added_vocab().values())
    ordinary = torch.tensor([i for i in range(len(tok)) if i not in special])
    prefix = tok("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    start, end = (tok.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>"))
    rows = []
    for _ in range(size["batch"]):
        head = prefix["input_ids"] + [start] + [backend.image_token_id] * n_v + [end]
        picks = torch.randint(len(ordinary), (size["seq_len"] - len(head),), generator=generator)
        rows.append(head + ordinary[picks].tolist())
    input_ids = torch.tensor(rows)
    patches = grid * grid * size["batch"]
    pixel_inputs = {
        "pixel_values": torch.randn(patches, 3 * TEMPORAL * PATCH * PATCH, generator=generator),
        "image_grid_thw": torch.tensor([[1, grid, grid]] * size["batch"]),
    }
    return input_ids, torch.ones_like(input_ids), pixel_inputs, [[n_v]] * size["batch"]


def run_qwen(args) -> dict:
    size = dict(QWEN_SIZES["tiny" if args.tiny else "full"])
    for key in ("layers", "vocab", "seq_len", "batch"):
        if getattr(args, key) is not None:
            size[key] = getattr(args, key)
    repeats = args.repeats or (3 if args.tiny else 7)
    backend = build_qwen(size, args.device)
    input_ids, mask, pixels, num_visual = qwen_inputs(backend, size)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    # The capture's extra work alone, on the shapes layer 0 hands it (post-RoPE q and k).
    head_dim = size["hidden"] // size["heads"]
    is_image = input_ids[0] == backend.image_token_id
    visual = is_image.nonzero().flatten()
    text = ((torch.arange(len(is_image)) > visual[0]) & ~is_image).nonzero().flatten()
    q = torch.randn(size["heads"], len(is_image), head_dim, device=args.device)
    k = torch.randn(size["kv_heads"], len(is_image), head_dim, device=args.device)
    key_mask = torch.ones(len(is_image), dtype=torch.bool, device=args.device)
    text, visual = text.to(args.device), visual.to(args.device)

    def forward(capture: bool):
        return backend.run(input_ids, mask, pixels, capture=capture, num_visual=num_visual)

    def one_slice():
        for _ in range(size["batch"]):
            text_to_vision_slice(q, k, head_dim**-0.5, key_mask, text, visual)

    routes = {"plain": lambda: forward(False), "capture": lambda: forward(True), "slice": one_slice}
    times: dict[str, list[float]] = {route: [] for route in routes}
    with torch.no_grad():
        _, attention, kept = forward(True)  # warm-up, and a check of what capture returns
        assert attention[0].shape == (size["heads"], len(text), len(visual)), attention[0].shape
        assert kept[0][0].shape == (len(visual), size["hidden"]), kept[0][0].shape
        forward(False)
        for _ in range(repeats):  # interleaved: a slow spell on a shared machine hits every route
            for route, fn in routes.items():
                sync()
                start = time.perf_counter()
                fn()
                sync()
                times[route].append(time.perf_counter() - start)
    ms = {route: statistics.median(values) * 1000 for route, values in times.items()}
    paired = [c / p for c, p in zip(times["capture"], times["plain"], strict=True)]
    params = sum(p.numel() for p in backend.model.parameters())
    return {
        "model": f"{'tiny Qwen2.5-VL' if args.tiny else 'Qwen2.5-VL-7B-shaped'} text (hidden {size['hidden']}, {size['heads']} heads on "
        f"{size['kv_heads']} kv heads, intermediate {size['intermediate']}, M-RoPE {size['mrope']}), "
        f"{size['layers']} decoder layer(s), lm_head {backend.model.config.text_config.vocab_size} rows, "
        f"vision tower 1 block of hidden 64; random weights, {params:,} parameters",
        "family": "qwen2_5_vl",
        "layers": size["layers"],
        "vocab_rows": backend.model.config.text_config.vocab_size,
        "image": f"{size['image']}x{size['image']}",
        "visual_tokens": len(visual),
        "text_query_rows": len(text),
        "batch": size["batch"],
        "seq_len": size["seq_len"],
        "dtype": "float32",
        "device": args.device
        if args.device != "cpu"
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "load_average": list(os.getloadavg()),
        "repeats": repeats,
        "plain_sdpa_ms": round(ms["plain"], 2),
        "capture_ms": round(ms["capture"], 2),
        "time_ratio": round(ms["capture"] / ms["plain"], 4),
        "paired_ratio_median": round(statistics.median(paired), 4),
        "paired_ratios": [round(r, 4) for r in paired],
        "slice_ms": round(ms["slice"], 2),
        "slice_over_plain": round(ms["slice"] / ms["plain"], 4),
        "goals": {"time_ratio": 1.05},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", choices=("mobilevlm", "qwen2_5_vl"), default="mobilevlm")
    parser.add_argument("--tiny", action="store_true", help="a small model and sequence: a quick smoke run")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed forwards per route (default 10, tiny 5; qwen2_5_vl 7, tiny 3)",
    )
    for flag in ("layers", "vocab", "seq-len", "batch"):
        parser.add_argument(f"--{flag}", type=int, default=None, help="qwen2_5_vl only: override the size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--memory-child", nargs=2, metavar=("MODEL_DIR", "ROUTE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.family == "qwen2_5_vl":
        print(json.dumps(run_qwen(args), indent=2))
        return
    name = "tiny" if args.tiny else "full"
    size = SIZES[name]
    if args.memory_child:
        print(json.dumps(measure_memory(Path(args.memory_child[0]), size, args.memory_child[1], args.device)))
        return
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp), size)
        backend = MobileVLMBackend.load(model_dir, device=args.device)
        batch = make_batch(backend, size).to(args.device)
        ms = measure_time(backend, batch, args.repeats or (5 if args.tiny else 10), args.device)
        memory = {}
        for route in ROUTES:
            command = [
                sys.executable,
                __file__,
                "--device",
                args.device,
                "--memory-child",
                str(model_dir),
                route,
            ]
            if args.tiny:
                command.insert(2, "--tiny")
            memory[route] = json.loads(
                subprocess.run(command, check=True, capture_output=True, text=True)
                .stdout.strip()
                .splitlines()[-1]
            )
    result = {
        "model": f"MobileVLM V2-shaped, {size['layers']} layers, hidden {size['hidden']}, {size['heads']} heads, "
        f"{backend.num_visual_tokens} visual tokens",
        "batch": size["batch"],
        "seq_len": size["seq_len"],
        "device": args.device
        if args.device != "cpu"
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "plain_sdpa_ms": round(ms["plain"], 2),
        "capture_ms": round(ms["capture"], 2),
        "time_ratio": round(ms["capture"] / ms["plain"], 3),
        "memory_method": "cuda max_memory_allocated"
        if args.device == "cuda"
        else "subprocess VmHWM - VmRSS after clear_refs",
        "peak_mib": {route: round(value, 1) for route, value in memory.items()},
        "memory_ratio": round(memory["capture"] / memory["output_attentions"], 3),
        "goals": {"time_ratio": 1.05, "memory_ratio": 0.3},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
