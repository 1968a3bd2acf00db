"""What layer-0 capture costs: time against a plain sdpa forward, memory against output_attentions.

One run builds a random MobileVLM V2-shaped teacher (8 layers, 144 visual tokens, ~1k-token
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

Prints one JSON object; the goals are time_ratio <= 1.05 and memory_ratio <= 0.3.
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

from alignkd_cache.backends.capture import CAPTURE_ATTENTION
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
        samples.append(TokenizedSample(f"s{i}", "x", ids, ids, 1, n_v))
        images.append((torch.randn(3, size["image_size"], size["image_size"], generator=generator), f"k{i}"))
    return collate(samples, images, backend.tokenizer.pad_token_id)


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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="a small model and sequence: a quick smoke run")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed forwards per route (default 10, tiny 5)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--memory-child", nargs=2, metavar=("MODEL_DIR", "ROUTE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
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
