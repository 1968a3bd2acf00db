"""Codec choices on REAL captured signals: bytes/sample vs raw fp16, loss error, gradient cosine.

Builds a tiny real LLaVA teacher (alignkd_cache.tiny), captures a lossless cache over a digit VQA
set, then for every encoding of every lossy signal measures:
- stored bytes per sample (encoded + zstd-1 + crc32c, as the writer stores them) vs raw fp16;
- the relative error of that signal's Align-KD loss term computed from decoded targets;
- the cosine between the gradient (w.r.t. the student's prediction) from decoded and exact targets.
The loss is a faithful proxy of the Align-KD terms with fixed random adapters (documented in
docs/benchmarks.md): MSE of a random 1x1 head adapter(teacher attention) vs a student slice, MSE of
a random channel adapter(teacher visual) vs student tokens, and forward KL on top-k with tail.
Tiny random teachers have flatter attention than a trained 7B: rerun on a real teacher for defaults.

    python benchmarks/codecs.py [--samples 48] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from zarr.codecs import Crc32cCodec, ZstdCodec  # noqa: F401 - the chain measured below

from alignkd_cache.build import BuildOptions, build_cache
from alignkd_cache.signals import TeacherSignal
from alignkd_cache.store import codecs
from alignkd_cache.store.reader import CacheReader
from alignkd_cache.tiny import build_tiny_llava, build_tokenizer


def stored_bytes(array: np.ndarray) -> int:
    import numcodecs

    return len(numcodecs.Zstd(level=1).encode(np.ascontiguousarray(array))) + 4


def dataset(root: Path, n: int) -> Path:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    (root / "images").mkdir(parents=True)
    records = []
    for i in range(n):
        px = (digits.images[i] * (255 / 16)).astype(np.uint8)
        Image.fromarray(px, mode="L").resize((56, 56)).save(root / f"images/{i}.png")
        records.append({"id": f"d{i}", "image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhich digit is shown in this picture, and describe the image?"},
            {"from": "gpt", "value": f"It is {digits.target[i]}. A photo of handwritten digits on a grid."}]})  # fmt: skip
    (root / "data.json").write_text(json.dumps(records))
    return root / "data.json"


def term_losses(sample, adapters, student):
    """(attention MSE, visual MSE, top-k KL) and the student tensors they are differentiable in."""
    head, chan = adapters
    a_s = student["attn"].clone().requires_grad_(True)
    v_s = student["vis"].clone().requires_grad_(True)
    z_s = student["logits"][: len(sample.logits.positions)].clone().requires_grad_(True)
    l_attn = ((head(sample.attention.unsqueeze(0)).squeeze(0) - a_s) ** 2).mean()
    l_vis = ((chan(sample.visual.T.unsqueeze(0)).squeeze(0).T - v_s) ** 2).mean()
    logq = torch.log_softmax(z_s, -1)
    p = sample.logits.values.exp()
    tail_q = (1 - logq.gather(1, sample.logits.ids).exp().sum(1)).clamp_min(1e-12)
    l_kl = -(p * logq.gather(1, sample.logits.ids)).sum(1) - sample.logits.tail * tail_q.log()
    l_kl = l_kl.mean()
    return [(l_attn, a_s), (l_vis, v_s), (l_kl, z_s)]


def measure(exact_reader, samples, signal, encoding, adapters, students):
    size = raw = 0
    errs, coss = [], []
    for sid, student in zip(samples, students, strict=True):
        s = exact_reader.read(sid)
        values = {"attention": s.attention, "visual": s.visual, "logprobs": s.logits.values}[signal].numpy()
        flat = values.reshape(-1, values.shape[-1])
        q, scale = codecs.encode(encoding, flat)
        size += stored_bytes(q) + (stored_bytes(scale) if scale is not None else 0)
        raw += flat.size * 2
        decoded = torch.from_numpy(codecs.decode(encoding, q, scale).reshape(values.shape))
        approx = with_decoded(s, signal, decoded)
        term = ["attention", "visual", "logprobs"].index(signal)
        (l0, x0), (l1, x1) = (
            term_losses(s, adapters, student)[term],
            term_losses(approx, adapters, student)[term],
        )
        g0, g1 = torch.autograd.grad(l0, x0)[0], torch.autograd.grad(l1, x1)[0]
        errs.append(abs(l1.item() - l0.item()) / abs(l0.item()))
        coss.append(torch.nn.functional.cosine_similarity(g0.flatten(), g1.flatten(), dim=0).item())
    return size / len(samples), raw / len(samples), float(np.max(errs)), float(np.min(coss))


def with_decoded(s: TeacherSignal, signal: str, decoded: torch.Tensor) -> TeacherSignal:
    """The signal with one of its parts replaced by its decoded approximation."""
    if signal == "logprobs":
        return replace(s, logits=replace(s.logits, values=decoded))
    return replace(s, **{signal: decoded})


OPTIONS = {
    "attention": ["f32", "f16", "bf16", "fixed_u16", "sqrt_u8"],
    "visual": ["f32", "f16", "bf16", "fp8_row"],
    "logprobs": ["f32", "f16", "bf16"],
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp())
    build_tokenizer(tmp / "tok")
    teacher = build_tiny_llava(
        tmp / "teacher",
        tmp / "tok",
        layers=2,
        hidden=64,
        heads=8,
        kv_heads=8,
        seed=1,
        image_size=48,
        patch_size=4,
    )
    data = dataset(tmp / "data", args.samples)
    opts = BuildOptions(codecs="lossless", topk=16, template="v1", batch_size=8)
    build_cache(
        str(teacher), data, tmp / "data", str(tmp / "exact.zarr"), dataclasses.replace(opts, progress=False)
    )
    reader = CacheReader(str(tmp / "exact.zarr"))
    heads, dim = reader.attrs["num_heads"], reader.attrs["visual_dim"]
    adapters = (torch.nn.Conv2d(heads, 4, 1), torch.nn.Conv1d(dim, 32, 1))
    for p in (*adapters[0].parameters(), *adapters[1].parameters()):
        p.requires_grad_(False)
    students = []
    for sid in reader.ids:  # a student that is close to, but not at, the teacher: realistic residuals
        s = reader.read(sid)
        with torch.no_grad():
            attn = adapters[0](s.attention.unsqueeze(0)).squeeze(0)
            vis = adapters[1](s.visual.T.unsqueeze(0)).squeeze(0).T
        students.append({
            "attn": attn + 0.1 * attn.std() * torch.randn_like(attn),
            "vis": vis + 0.1 * vis.std() * torch.randn_like(vis),
            "logits": torch.randn(len(s.logits.positions), reader.attrs["vocab_size"]) * 2,
        })  # fmt: skip
    rows = []
    for signal, encodings in OPTIONS.items():
        for enc in encodings:
            size, raw, err, cos = measure(reader, reader.ids, signal, enc, adapters, students)
            rows.append((signal, enc, size, raw, err, cos))
            print(
                f"{signal:10s} {enc:10s} {size:10.0f} B {raw / size:6.2f}x  loss rel err max {err:.2e}  grad cos min {cos:.6f}"
            )
    table = [
        "| signal | encoding | bytes/sample | vs raw fp16 | loss rel. error (max) | grad cosine (min) |",
        "|---|---|---|---|---|---|",
    ]
    table += [f"| {s} | {e} | {b:.0f} | {r / b:.2f}x | {err:.1e} | {c:.6f} |" for s, e, b, r, err, c in rows]
    print("\n".join(table))
    if args.write:
        print(f"(paste the table into {args.write}, section Codecs)")


if __name__ == "__main__":
    main()
