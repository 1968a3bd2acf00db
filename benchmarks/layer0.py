"""The layer-0 recipe's sizes and costs: stub bytes, cache bytes per sample, FLOPs, CPU time.

1. Stub bytes at MobileVLM V2 7B shapes in bf16, from the state-dict shapes of the real classes
   built on the meta device (no weights allocated), with the safetensors header: the whole layer 0
   (what alignkd_cache.layer0 saves) and a trimmed stub without v/o, the MLP, the final norm, lm_head.
2. Stored bytes per sample of a `layer0` cache (top-64 logit targets + manifest row) against
   `balanced` (docs/scaling.md's |T|, |P|, L and its per-sample balanced bytes), and the paper job.
3. FLOPs of the recompute at 7B -> 1.7B shapes, as a share of the student's forward + backward.
4. CPU time of recompute on a tiny LLaVA teacher's stub vs a tiny student's train step (forward,
   CE backward, AdamW), interleaved repeats, medians. The machine may be shared: medians only.

    python benchmarks/layer0.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from alignkd_cache.store.codecs import PRESETS, encode, int_dtype

VOCAB, HIDDEN, HEADS, INTERMEDIATE = 32000, 4096, 32, 11008  # MobileVLM V2 7B (LLaMA-2 7B LLM)
TOWER_PARAMS = 0.30e9  # CLIP ViT-L/14-336
TOWER_TOKENS = 577
STUDENT_PARAMS = 1.7e9
TOPK = 64
# docs/scaling.md sections 1 and 2: (|T|, |P|, L, balanced bytes per sample after zstd, samples).
STAGES = {"pre-training": (200, 200, 345, 2.05e6, 1.2e6), "fine-tuning": (500, 250, 680, 3.42e6, 2.4e6)}
# Parameters of layer 0 that the slice needs not (it reads q and k only).
TRIMMED = ("v_proj", "o_proj", "mlp.", "post_attention_layernorm", "lm_head", "model.norm.")


def safetensors_bytes(shapes: dict[str, tuple[int, ...]], itemsize: int = 2) -> int:
    """File size of a safetensors file: 8-byte length, JSON header padded to 8, then the data."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in sorted(shapes.items()):
        size = int(np.prod(shape)) * itemsize
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"))
    return 8 + len(text) + (-len(text)) % 8 + offset


def stub_shapes_7b() -> dict[str, tuple[int, ...]]:
    """The stub's tensors under MobileVLM's original names, from the real classes on meta."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from alignkd_cache.backends.mobilevlm import PROJECTOR_PREFIX, TOWER_PREFIX, LDPv2Projector

    llm_config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=1,
        num_attention_heads=HEADS,
        tie_word_embeddings=False,
    )
    tower_config = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14,
    )  # fmt: skip
    with torch.device("meta"):
        llm, projector = LlamaForCausalLM(llm_config), LDPv2Projector(1024, HIDDEN)
        tower = CLIPVisionModel(tower_config)
    shapes = {k: tuple(v.shape) for k, v in llm.state_dict().items()}
    shapes |= {PROJECTOR_PREFIX + k: tuple(v.shape) for k, v in projector.state_dict().items()}
    tower_shapes = tower.state_dict().items()
    shapes |= {TOWER_PREFIX + k.removeprefix("vision_model."): tuple(v.shape) for k, v in tower_shapes}
    return shapes


def stub_sizes() -> dict:
    shapes = stub_shapes_7b()
    trimmed = {k: s for k, s in shapes.items() if "vision_tower" in k or not any(p in k for p in TRIMMED)}
    tower = sum(int(np.prod(s)) for k, s in shapes.items() if "vision_tower" in k)
    return {
        "whole_layer0_bytes": safetensors_bytes(shapes),
        "trimmed_bytes": safetensors_bytes(trimmed),
        "tower_params": tower,
    }


def layer0_sample_bytes(positions: int, tokens: int, preset: str = "balanced") -> int:
    """Stored bytes of one sample's top-k targets (writer's encodings) + its manifest row estimate."""
    values, _ = encode(PRESETS[preset]["logprobs"], np.zeros((positions, TOPK), np.float32))
    ids = positions * TOPK * int_dtype(VOCAB - 1).itemsize
    tail = positions * 4  # logit_tail is always f32
    manifest = 4 * (tokens + 2 * positions)  # docs/scaling.md section 2: ids and positions, int32
    return values.nbytes + ids + tail + manifest


def cache_sizes(stub_bytes: int) -> dict:
    out, total = {}, stub_bytes
    for stage, (_, positions, tokens, balanced, samples) in STAGES.items():
        per_sample = layer0_sample_bytes(positions, tokens)
        out[stage] = {"layer0_bytes": per_sample, "balanced_bytes": balanced, "ratio": balanced / per_sample}
        total += per_sample * samples
    out["paper_job_tb_with_stub"] = total / 1e12
    return out


def flops() -> dict:
    """Per fine-tuning sample. Recompute: 2 x params x tokens for layer 0 (all of it runs) over L,
    the projector over 576 patches, the tower over 577 tokens unless shared. Student: 6 x 1.7e9 x L."""
    _, _, tokens, _, _ = STAGES["fine-tuning"]
    layer0 = 4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTERMEDIATE
    projector = 1024 * HIDDEN + HIDDEN * HIDDEN
    shared = 2 * layer0 * tokens + 2 * projector * 576
    unshared = shared + 2 * TOWER_PARAMS * TOWER_TOKENS
    student = 6 * STUDENT_PARAMS * tokens
    return {
        "recompute_shared_tflop": shared / 1e12,
        "recompute_unshared_tflop": unshared / 1e12,
        "student_step_tflop": student / 1e12,
        "share_shared": shared / student,
        "share_unshared": unshared / student,
    }


def digits_batch(backend, root: Path, n: int = 8):
    from PIL import Image
    from sklearn.datasets import load_digits

    from alignkd_cache.data import SampleDataset, Tokenization, read_records, tokenize_all

    digits, records = load_digits(), []
    for i in range(n):
        pixels = (digits.images[i] * (255.0 / 16.0)).astype(np.uint8)
        Image.fromarray(pixels, mode="L").resize((40, 32)).save(root / f"d{i}.png")
        conversation = [
            {"from": "human", "value": "<image>\nWhich digit is this?"},
            {"from": "gpt", "value": f"It is {digits.target[i]}"},
        ]
        records.append({"id": f"d{i}", "image": f"d{i}.png", "conversations": conversation})
    (root / "data.json").write_text(json.dumps(records))
    tok = Tokenization(backend.tokenizer, "v1", backend.image_token_id, backend.num_visual_tokens)
    samples, _ = tokenize_all(read_records(root / "data.json"), tok)
    dataset = SampleDataset(
        samples, root, backend.preprocess, backend.tokenizer.pad_token_id, backend.pad_color
    )
    return dataset.collate([dataset[i] for i in range(len(dataset))])


CE_ONLY = "ce=1,logit=0,vis=0,attn=0"


def cpu_times(repeats: int) -> dict:
    from alignkd_cache.backends import load_backend
    from alignkd_cache.layer0 import load_layer0, recompute, save_layer0
    from alignkd_cache.losses import LossConfig, parse_weights
    from alignkd_cache.sources import MicroBatch
    from alignkd_cache.tiny import build_tiny_llava, build_tokenizer
    from alignkd_cache.train import Trainee, train_step, trainable_model_parameters

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_tokenizer(root / "tok")
        teacher = load_backend(
            build_tiny_llava(root / "t", root / "tok", layers=3, hidden=64, heads=4, kv_heads=2)
        )
        student = load_backend(
            build_tiny_llava(root / "s", root / "tok", layers=2, hidden=32, heads=2, seed=2)
        )
        save_layer0(teacher, root / "layer0")
        stub = load_layer0(root / "layer0")
        batch = digits_batch(student, root)
        # The trainer's own step, cross-entropy only: what a recompute adds to.
        student.model.train()
        optimizer = torch.optim.AdamW(trainable_model_parameters(student.model), lr=1e-5)
        trainee = Trainee(student, torch.nn.ModuleDict(), LossConfig(parse_weights(CE_ONLY)), None)
        micro = MicroBatch(batch, None, None)
        steps = {
            "recompute": lambda: recompute(stub, batch),
            "student_train_step": lambda: train_step(trainee, [micro], lambda m: None, None, optimizer),
        }
        times = {name: [] for name in steps}
        for _ in range(repeats + 1):  # the first round warms up and is dropped
            for name, step in steps.items():
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    medians = {f"{name}_median_ms": 1e3 * statistics.median(t[1:]) for name, t in times.items()}
    medians["recompute_over_step"] = medians["recompute_median_ms"] / medians["student_train_step_median_ms"]
    return medians | {"batch": len(batch.ids), "repeats": repeats, "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    sizes = stub_sizes()
    report = {
        "stub_7b": sizes,
        "cache": cache_sizes(sizes["whole_layer0_bytes"]),
        "flops_7b_to_1.7b": flops(),
        "cpu_tiny": cpu_times(args.repeats),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
