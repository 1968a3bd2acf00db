"""Cache sizes at Qwen2.5-VL-7B -> 3B shapes, both kinds, measured through the real writer.

Writes synthetic teacher signals shaped like Qwen2.5-VL-7B's (28 heads, D = 3584, top-64 logit
targets over the tokenizer's 151,665 ids, so int32 ids; one 448x448 image per sample -> a 32x32
grid of 14-px patches -> N_v = 256 visual tokens after the 2x2 merge) through
alignkd_cache.store.writer.write_block and store.finalize, as a build does, for two stages with
docs/scaling.md's assumptions (pre-training |T| = 200, |P| = 200; fine-tuning |T| = 500,
|P| = 250; L = PREFIX + N_v + |T| with a 15-token chat prefix before the image's pads):

- `stored` caches with the codec presets lossless / balanced / compact (attention, visual tokens,
  logit targets), and
- `layer0` caches (logit targets only; the stub's files are left out and counted apart),

then reports the bytes per sample found on disk, per array, next to the exact representation
before zstd. The layer-0 stub ("the teacher cut to one decoder layer plus its vision path": the
family's own checkpoint with num_hidden_layers = 1, as alignkd_cache/layer0.py writes it for
llava and mobilevlm) is counted from Qwen2.5-VL-7B's config: Qwen2_5_VLForConditionalGeneration
built on the meta device with one decoder layer, its parameters by group, bf16. The 3B student's
parameter count comes the same way (for the recompute's FLOP share).

Signal values are random but shaped like real ones: attention rows are causal softmax rows over
every key a query sees (logits ~ N(0, 1.5)), of which the visual columns are kept; visual tokens
~ N(0, --visual-sd); top-64 log-probs of a softmax over 4096 logits ~ N(0, 4), sorted,
with the tail mass; ids uniform over the vocabulary. zstd compresses random values
differently from real ones (docs/benchmarks.md, "Codecs", measured real signals), so the on-disk
figures are for these values; the representation sizes before zstd are exact for any values.

    python benchmarks/family_sizes.py              # ~1 min on 2 CPU cores
    python benchmarks/family_sizes.py --tiny       # seconds: tiny shapes, same fields

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from alignkd_cache.data import IGNORE_INDEX, TokenizedSample
from alignkd_cache.signals import LogitTargets, TeacherSignal
from alignkd_cache.store.codecs import PRESETS, SCALED, STORED_DTYPE, int_dtype, resolve_preset
from alignkd_cache.store.finalize import finalize
from alignkd_cache.store.location import Location
from alignkd_cache.store.provenance import SCHEMA_VERSION
from alignkd_cache.store.writer import SampleResult, write_block

IMAGE_TOKEN_ID = 151655  # <|image_pad|>
SHAPES = {
    # Qwen2.5-VL-7B: 28 query heads, hidden 3584, tokenizer 151,665 ids (the embedding has 152,064
    # rows; targets name tokenizer ids only), 448x448 -> 256 visual tokens.
    "full": dict(heads=28, dim=3584, vocab=151665, topk=64, image=448, prefix=15, samples=6,
                 stages={"pre-training": (1.2e6, 200, 200), "fine-tuning": (2.4e6, 500, 250)}),
    "tiny": dict(heads=2, dim=32, vocab=151665, topk=8, image=56, prefix=4, samples=2,
                 stages={"pre-training": (1.2e6, 6, 6), "fine-tuning": (2.4e6, 12, 6)}),
}  # fmt: skip
PATCH, MERGE = 14, 2
PREPROCESSING = {
    "template": "chat", "tokenizer": {"kind": "transformers", "class": "Qwen2TokenizerFast", "legacy": None},
    "image": {"pad_color": None, "processor": "Qwen2VLImageProcessorPil", "patch_size": PATCH,
              "merge_size": MERGE, "temporal_patch_size": 2},
    "image_key": "sha256-of-padded-rgb",
}  # fmt: skip
STAGE_SAMPLES = 3.6e6
PRESET_NAMES = ("lossless", "balanced", "compact")
TENSOR_BYTES = {"f32": 4, "f16": 2, "bf16": 2, "fixed_u16": 2, "sqrt_u8": 1, "fp8_row": 1}


def qwen_7b_text(layers: int) -> dict:
    return dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=layers,
                num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6,
                max_position_embeddings=128000,
                rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6})  # fmt: skip


def qwen_3b_text() -> dict:
    return dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                num_attention_heads=16, num_key_value_heads=2, rms_norm_eps=1e-6,
                max_position_embeddings=128000,
                rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6})  # fmt: skip


VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
              spatial_merge_size=2, temporal_patch_size=2, window_size=112,
              fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)  # fmt: skip


def param_groups(text: dict, out_hidden: int, tie: bool) -> dict[str, int]:
    """Parameter counts by group of Qwen2_5_VLForConditionalGeneration built on the meta device."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=dict(VISION, out_hidden_size=out_hidden), tie_word_embeddings=tie
    )
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    groups = {"embed_tokens": 0, "lm_head": 0, "decoder_layers": 0, "final_norm": 0}
    groups |= {"vision_tower": 0, "merger": 0}
    for name, p in model.named_parameters():  # tied weights are listed once
        n = p.numel()
        if ".visual.merger." in f".{name}":
            groups["merger"] += n
        elif "visual." in name:
            groups["vision_tower"] += n
        elif "embed_tokens" in name:
            groups["embed_tokens"] += n
        elif name.startswith("lm_head"):
            groups["lm_head"] += n
        elif ".layers." in name:
            groups["decoder_layers"] += n
        else:
            groups["final_norm"] += n
    groups["total"] = sum(groups.values())
    return groups


def stub_and_flops(shape: dict, stages: dict) -> dict:
    """The layer-0 stub at 7B (bf16) and the recompute's FLOPs against the 3B student's step."""
    stub = param_groups(qwen_7b_text(1), 3584, tie=False)
    # The stub as layer0 saves it for these families: no lm_head (its config ties it to the
    # embeddings, and the recompute stops at layer 0's attention scores).
    stub["total"] -= stub.pop("lm_head")
    full = param_groups(qwen_7b_text(28), 3584, tie=False)
    student = param_groups(qwen_3b_text(), 2048, tie=True)
    layer0 = stub["decoder_layers"]
    out = {
        "stub_formula": "embed_tokens (152064 x 3584) + decoder layer 0 (q/k/v with biases, o, "
        "gate/up/down 3584 x 18944, 2 norms) + final norm (no lm_head: tied to the embeddings in the stub) "
        "+ vision tower (patch embed, 32 blocks of 1280) + merger (5120 -> 5120 -> 3584); bf16 = 2 B "
        "per parameter (+ a safetensors header of some KB)",
        "stub_params_7b": stub,
        "stub_bf16_bytes": 2 * stub["total"],
        "teacher_7b_params": full["total"],
        "stub_share_of_teacher": round(stub["total"] / full["total"], 4),
        "student_3b_params": student,
    }
    patches = (shape["image"] // PATCH) ** 2
    n_v = patches // MERGE**2
    _, t, _ = stages["fine-tuning"]
    tokens = shape["prefix"] + n_v + t
    recompute_shared = 2 * layer0 * tokens + 2 * stub["merger"] * n_v
    recompute_own = recompute_shared + 2 * stub["vision_tower"] * patches
    student_llm = student["total"] - student["vision_tower"] - student["merger"]
    student_step = 6 * student_llm * tokens
    out["flops_fine_tuning_sample"] = {
        "tokens": tokens,
        "recompute_tflop_shared_tower": round(recompute_shared / 1e12, 3),
        "recompute_tflop_own_tower": round(recompute_own / 1e12, 3),
        "student_3b_llm_step_tflop": round(student_step / 1e12, 3),
        "share_shared_tower": round(recompute_shared / student_step, 4),
        "share_own_tower": round(recompute_own / student_step, 4),
        "formula": "2 x params x tokens: layer 0 over L, merger over N_v, tower over the patches "
        "(own tower); student 6 x LLM params x L; attention's quadratic term left out",
    }
    return out


def attrs_for(shape: dict, preset: str, kind: str, n: int) -> dict:
    options = {"template": "chat", "topk": shape["topk"], "logit_targets": "topk", "logit_positions": "answer",
               "attn_heads": "all", "codecs": preset, "batch_size": 8, "dtype": "bfloat16", "device": "cuda",
               "limit": None, "max_length": 4096, "on_too_long": "skip", "block_size": n, "draws": 50, "seed": 0,
               "signals": kind}  # fmt: skip
    return {"schema_version": SCHEMA_VERSION, "signals": kind, "tool_version": "bench",
            "created": "2025-01-01T00:00:00+00:00", "complete": False,
            "teacher": {"model_id": "Qwen2.5-VL-7B-shaped (random)", "config_sha256": "0" * 64, "weights_sha256": "0" * 64},
            "tokenizer_sha256": "0" * 64, "template": "chat",
            "preprocessing": PREPROCESSING,
            "dataset": {"file": "bench", "sha256": "0" * 64}, "options": options, "family": "qwen2_5_vl",
            "num_visual_tokens": None, "image_token_id": IMAGE_TOKEN_ID, "num_heads": shape["heads"],
            "visual_dim": shape["dim"], "vocab_size": shape["vocab"], "attn_heads": "all",
            "logit_targets": "topk", "topk": shape["topk"], "logit_positions": "answer", "codecs": preset,
            "encodings": resolve_preset(preset), "logit_id_dtype": int_dtype(shape["vocab"] - 1).name,
            "block_size": n}  # fmt: skip


def synthetic(shape: dict, t: int, p: int, n: int, kind: str, visual_sd: float) -> list[SampleResult]:
    """n samples: chat prefix, one image's N_v pads, then |T| text rows of which the last |P|
    are supervised. Same seed for every preset, so the presets encode the same values."""
    rng = np.random.default_rng(0)
    n_v = (shape["image"] // PATCH) ** 2 // MERGE**2
    heads, k = shape["heads"], shape["topk"]
    results = []
    for i in range(n):
        ids = rng.integers(0, 151643, shape["prefix"]).tolist() + [IMAGE_TOKEN_ID] * n_v
        ids += rng.integers(0, 151643, t).tolist()
        labels = [IGNORE_INDEX] * (len(ids) - p) + ids[-p:]
        side = shape["image"] // PATCH // MERGE  # Qwen's merged patch grid of a square image
        grid = [{"role": "grid", "rows": side, "cols": side}]
        sample = TokenizedSample(f"s{i}", (f"{i}.png",), ids, labels, (n_v,), IMAGE_TOKEN_ID, (grid,))
        positions = sample.supervised_positions
        query = np.array(sample.query_positions)
        width = len(ids)
        attention = visual = None
        if kind == "stored":
            # Causal softmax rows over every key each text query sees; the visual columns are kept.
            logits = rng.normal(0.0, 1.5, size=(heads, len(query), width)).astype(np.float32)
            logits[:, np.arange(width)[None, :] > query[:, None]] = -np.inf
            logits -= logits.max(-1, keepdims=True)
            probs = np.exp(logits)
            probs /= probs.sum(-1, keepdims=True)
            attention = torch.from_numpy(
                np.ascontiguousarray(probs[..., shape["prefix"] : shape["prefix"] + n_v])
            )
            visual = torch.from_numpy((rng.normal(0.0, visual_sd, (n_v, shape["dim"]))).astype(np.float32))
        # Log-softmax over a 4096-id stand-in vocabulary (logits ~ N(0, 4)): top-k sorted, the rest is tail.
        scores = rng.normal(0.0, 4.0, (len(positions), 4096))
        scores -= np.log(np.exp(scores - scores.max(1, keepdims=True)).sum(1, keepdims=True)) + scores.max(
            1, keepdims=True
        )
        values = -np.sort(-scores, axis=1)[:, :k].astype(np.float32)
        tail = np.clip(1 - np.exp(values.astype(np.float64)).sum(1), 0, 1).astype(np.float32)
        targets = LogitTargets(
            "topk",
            torch.tensor(positions),
            torch.from_numpy(rng.integers(0, shape["vocab"], (len(positions), k))),
            torch.from_numpy(np.ascontiguousarray(values)),
            torch.from_numpy(tail),
        )
        signal = TeacherSignal(attention, [visual], targets, [f"{i:032x}"])
        results.append(SampleResult(i, f"s{i}", (f"{i}.png",), sample=sample, signal=signal))
    return results


def disk_bytes(root: Path) -> dict[str, int]:
    """Bytes on disk by array (blocks/b*/<array>/...), the manifest, and the rest (metadata)."""
    out: dict[str, int] = {}
    for f in root.rglob("*"):
        if not f.is_file():
            continue
        rel = f.relative_to(root).parts
        if rel[0] == "blocks" and len(rel) > 3:
            key = rel[2]
        elif rel[-1] == "manifest.parquet":
            key = "manifest"
        else:
            key = "metadata"
        out[key] = out.get(key, 0) + f.stat().st_size
    return out


def representation_bytes(shape: dict, preset: str, kind: str, t: int, p: int) -> dict[str, int]:
    """Exact bytes per sample of the stored representation before zstd (manifest left out)."""
    enc = PRESETS[preset]
    n_v = (shape["image"] // PATCH) ** 2 // MERGE**2
    rows = shape["heads"] * t
    out = {
        "logit_ids": p * shape["topk"] * int_dtype(shape["vocab"] - 1).itemsize,
        "logit_values": p * shape["topk"] * TENSOR_BYTES[enc["logprobs"]],
        "logit_tail": 4 * p,
    }
    if kind == "stored":
        out["attention"] = rows * n_v * TENSOR_BYTES[enc["attention"]]
        out["attention_scale"] = 4 * rows if enc["attention"] in SCALED else 0
        out["visual"] = n_v * shape["dim"] * TENSOR_BYTES[enc["visual"]]
        assert np.dtype(STORED_DTYPE[enc["visual"]]).itemsize == TENSOR_BYTES[enc["visual"]]
    return out


def write_and_measure(work: Path, shape: dict, stage: str, preset: str, kind: str, args) -> dict:
    _, t, p = shape["stages"][stage]
    n = args.samples or shape["samples"]
    url = work / f"{stage}-{kind}-{preset}.zarr"
    attrs = attrs_for(shape, preset, kind, n)
    loc = Location(str(url))
    loc.group("w").attrs.update(attrs)
    results = synthetic(shape, t, p, n, kind, args.visual_sd)
    start = time.perf_counter()
    write_block(loc, 0, results, attrs)
    finalize(loc, attrs, n, 1)
    seconds = time.perf_counter() - start
    if kind == "stored":  # the reader opens it and decodes a sample: a valid cache
        from alignkd_cache.store.reader import CacheReader

        reader = CacheReader(str(url))
        reader.read(reader.ids[0])
    found = disk_bytes(url)
    shutil.rmtree(url)
    per_sample = {k: round(v / n) for k, v in sorted(found.items())}
    signal = sum(v for k, v in found.items() if k not in ("manifest", "metadata")) / n
    rep = representation_bytes(shape, preset, kind, t, p)
    return {
        "samples_written": n,
        "on_disk_bytes_per_sample": per_sample,
        "on_disk_total_per_sample": round(sum(found.values()) / n),
        "on_disk_signal_arrays_per_sample": round(signal),
        "before_zstd_bytes_per_sample": rep | {"total": sum(rep.values())},
        "write_and_finalize_s": round(seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: a quick smoke run")
    parser.add_argument("--samples", type=int, default=None, help="samples written per cache (default 6)")
    parser.add_argument("--visual-sd", type=float, default=1.0, help="sd of the random visual tokens")
    args = parser.parse_args()
    shape = SHAPES["tiny" if args.tiny else "full"]
    stages = shape["stages"]
    n_v = (shape["image"] // PATCH) ** 2 // MERGE**2
    result = {
        "shapes": {
            "teacher": "Qwen2.5-VL-7B" if not args.tiny else "tiny",
            "heads": shape["heads"],
            "visual_dim": shape["dim"],
            "target_vocab": shape["vocab"],
            "logit_id_dtype": int_dtype(shape["vocab"] - 1).name,
            "topk": shape["topk"],
            "image": f"{shape['image']}x{shape['image']}",
            "visual_tokens": n_v,
            "stages": {
                s: {"samples": S, "T": t, "P": p, "L": shape["prefix"] + n_v + t}
                for s, (S, t, p) in stages.items()
            },
            "distinct_images_per_sample": 1,
            "visual_sd": args.visual_sd,
        },
        "load_average": list(os.getloadavg()),
        "caches": {},
    }
    work = Path(tempfile.mkdtemp(prefix="family_sizes-"))
    try:
        for stage in stages:
            for kind in ("stored", "layer0"):
                for preset in PRESET_NAMES:
                    result["caches"][f"{stage}/{kind}/{preset}"] = write_and_measure(
                        work, shape, stage, preset, kind, args
                    )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    extra = stub_and_flops(shape, stages)
    result["layer0_stub"] = extra
    totals = {}
    for kind in ("stored", "layer0"):
        for preset in PRESET_NAMES:
            on_disk = sum(
                stages[s][0] * result["caches"][f"{s}/{kind}/{preset}"]["on_disk_total_per_sample"]
                for s in stages
            )
            before = sum(
                stages[s][0]
                * result["caches"][f"{s}/{kind}/{preset}"]["before_zstd_bytes_per_sample"]["total"]
                for s in stages
            )
            stub = extra["stub_bf16_bytes"] if kind == "layer0" else 0
            totals[f"{kind}/{preset}"] = {
                "on_disk_tb": round((on_disk + stub) / 1e12, 3),
                "before_zstd_tb": round((before + stub) / 1e12, 3),
            }
    result["paper_job_3.6M_samples"] = totals | {
        "note": "1.2M pre-training + 2.4M fine-tuning samples; layer0 totals include the 7B stub "
        "(bf16) once; before_zstd leaves the manifest out, on_disk includes it"
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
