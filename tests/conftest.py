"""Shared session fixtures: a real tokenizer, tiny real models of both families, a digit dataset.

Everything is built offline once per test session into a temporary directory and loaded back
through the same code paths a user's checkpoint takes.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alignkd_cache.build import BuildOptions, build_cache
from alignkd_cache.tiny import build_tiny_llava, build_tiny_mobilevlm, build_tokenizer

DIGIT_SIDE = 32  # the tiny vision towers' input size


def pytest_configure(config):
    """One torch thread per test process, as in the subprocesses: pytest-xdist runs one test process
    per core, and more threads than cores only spin."""
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    """The slow end-to-end runs first, each module's in its order: pytest-xdist's workers then start
    on the long tests and steal the short ones at the end, instead of one worker finishing a long
    run alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def models_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tokenizer_dir(models_root) -> Path:
    out = models_root / "tokenizer"
    build_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def llava_teacher_dir(models_root, tokenizer_dir) -> Path:
    """3 layers, hidden 64, 4 query heads sharing 2 kv heads (grouped-query), 64 visual tokens."""
    return build_tiny_llava(
        models_root / "llava_teacher", tokenizer_dir, layers=3, hidden=64, heads=4, kv_heads=2, seed=1
    )


@pytest.fixture(scope="session")
def llava_student_dir(models_root, tokenizer_dir) -> Path:
    """2 layers, hidden 32, 2 heads, same tokenizer and vision input size as the teacher."""
    return build_tiny_llava(
        models_root / "llava_student", tokenizer_dir, layers=2, hidden=32, heads=2, seed=2
    )


@pytest.fixture(scope="session")
def mobilevlm_teacher_dir(models_root, tokenizer_dir) -> Path:
    """3 layers, hidden 64, 4 heads, 16 visual tokens; CLIP tower in a separate directory."""
    return build_tiny_mobilevlm(
        models_root / "mobilevlm_teacher",
        tokenizer_dir,
        layers=3,
        hidden=64,
        heads=4,
        tower="separate",
        seed=3,
    )


@pytest.fixture(scope="session")
def mobilevlm_student_dir(models_root, tokenizer_dir) -> Path:
    """2 layers, hidden 32, 2 heads, 16 visual tokens; CLIP tower inside the checkpoint."""
    return build_tiny_mobilevlm(
        models_root / "mobilevlm_student", tokenizer_dir, layers=2, hidden=32, heads=2, tower="inside", seed=4
    )


QUESTIONS = ["Which digit is this?", "What number is in the picture?", "Describe the image."]


@pytest.fixture(scope="session")
def digits_dataset(tmp_path_factory) -> tuple[Path, Path]:
    """(json_path, image_root): 8 real scanned digits from scikit-learn as PNGs, LLaVA conversations,
    one multi-turn sample and two text-only samples."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits")
    images = root / "images"
    images.mkdir()
    digits = load_digits()
    records = []
    for i in range(8):
        pixels = (digits.images[i] * (255.0 / 16.0)).astype(np.uint8)
        # Every other image is wider than tall, so the square padding step is exercised.
        size = (DIGIT_SIDE + 8 * (i % 2), DIGIT_SIDE)
        Image.fromarray(pixels, mode="L").resize(size, Image.BILINEAR).save(images / f"digit_{i}.png")
        label = int(digits.target[i])
        conversations = [
            {"from": "human", "value": f"<image>\n{QUESTIONS[i % len(QUESTIONS)]}"},
            {"from": "gpt", "value": f"It is {label}"},
        ]
        if i == 3:
            conversations += [
                {"from": "human", "value": "Is it a 3?"},
                {"from": "gpt", "value": "yes" if label == 3 else "no"},
            ]
        records.append({"id": f"digit-{i}", "image": f"images/digit_{i}.png", "conversations": conversations})
    records.insert(
        2,
        {
            "id": "text-0",
            "conversations": [
                {"from": "human", "value": "Count to three."},
                {"from": "gpt", "value": "one two three"},
            ],
        },
    )
    records.append(
        {
            "id": "text-1",
            "conversations": [{"from": "human", "value": "Say nine."}, {"from": "gpt", "value": "nine 9"}],
        }
    )
    path = root / "digits.json"
    path.write_text(json.dumps(records, indent=1))
    return path, root


# A command run as a user runs it: offline, one thread per process (two cores are shared).
SUBPROCESS_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run_ok(*args) -> subprocess.CompletedProcess:
    """Run a command (offline, one thread) and assert that it succeeded, showing its stderr if not."""
    result = subprocess.run(args, capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="session")
def two_image_dataset(digits_dataset, tmp_path_factory):
    """A sample with two differently sized images (one in a later turn, text between them), a
    sample with one, and a text-only one, over the digit scans."""
    _, root = digits_dataset
    records = [
        {
            "id": "pair",
            "image": ["images/digit_1.png", "images/digit_4.png"],
            "conversations": [
                {"from": "human", "value": "<image>\nWhich digit is this?"},
                {"from": "gpt", "value": "It is 1"},
                {"from": "human", "value": "And this one? <image>"},
                {"from": "gpt", "value": "It is 4"},
            ],
        },
        {
            "id": "one",
            "image": "images/digit_2.png",
            "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "2"}],
        },
        {
            "id": "none",
            "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "hello"}],
        },
    ]
    path = tmp_path_factory.mktemp("pairs") / "pairs.json"
    path.write_text(json.dumps(records))
    return path, root


def build_digits_cache(teacher_dir, digits_dataset, out: Path, **options) -> Path:
    """A cache of the digits by `teacher_dir`: lossless, batch 4, unless `options` say otherwise."""
    data, root = digits_dataset
    opts = BuildOptions(**{"codecs": "lossless", "batch_size": 4, "progress": False, **options})
    build_cache(str(teacher_dir), data, root, str(out), opts)
    return out


@pytest.fixture(scope="session")
def llava_cache(tmp_path_factory, llava_teacher_dir, digits_dataset) -> Path:
    """The llava teacher's lossless signals for the digits, built once for every test that only
    reads them (tests that change a cache copy it first)."""
    return build_digits_cache(llava_teacher_dir, digits_dataset, tmp_path_factory.mktemp("shared") / "llava")


@pytest.fixture(scope="session")
def cli_built_cache(llava_teacher_dir, digits_dataset, tmp_path_factory):
    """(store, image_root, args): `alignkd-cache build` run in-process on the digits, for the CLI
    tests that read a cache (its build's output is checked here)."""
    from click.testing import CliRunner

    from alignkd_cache.cli.cache import main

    path, root = digits_dataset
    out = tmp_path_factory.mktemp("cli") / "c.zarr"
    args = ["build", "--teacher", str(llava_teacher_dir), "--data", str(path), "--image-root", str(root),
            "--out", str(out), "--topk", "8", "--block-size", "4", "--batch-size", "2"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "10 written, 0 skipped, 8 images" in result.output
    return out, root, args


def loss_and_grads(student, source, cfg, seed=0, bf16=False):
    """Loss terms ("loss" and each term computed) and the flat gradient (student + adapters) of one
    batch of every sample of `source`: what the offline = online tests compare between sources.

    bf16: the targets and the student's forward inside one bf16 autocast, as a caller that does not
    know which source it has may well do: the teacher must still run as the build runs it."""
    import torch

    from alignkd_cache.losses import total_loss
    from alignkd_cache.train import build_adapters, trainable_model_parameters

    student.model.train()
    params = trainable_model_parameters(student.model)
    adapters = build_adapters(cfg, source.teacher_heads, source.teacher_dim, student, seed)
    student.model.zero_grad(set_to_none=True)
    micro = source.collate([source[i] for i in range(len(source))])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        targets = source.signals(micro, "cpu")
        output = student.forward(micro.student, capture=True)
    loss, terms = total_loss(output, micro.student, targets, cfg, adapters)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in params + list(adapters.parameters()) if p.grad is not None])
    return {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in terms.items()}}, grads
