"""The layer-0 stub recomputes exactly what the full teacher's capture forward stores (fp32, CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from test_backends import dataset_batch

from alignkd_cache.backends import load_backend
from alignkd_cache.layer0 import (
    load_layer0,
    recompute,
    save_layer0,
    tower_features,
    tower_sha256,
)
from alignkd_cache.store.stub import verify_layer0
from alignkd_cache.tiny import build_tiny_mobilevlm

TOL = 1e-5


@pytest.fixture(scope="module")
def mobilevlm_gqa_teacher_dir(models_root, tokenizer_dir):
    """MobileVLM with 4 query heads on 2 kv heads (the LLaVA teacher fixture is grouped already)."""
    return build_tiny_mobilevlm(
        models_root / "layer0_mobilevlm_gqa", tokenizer_dir, layers=3, hidden=64, heads=4, kv_heads=2, seed=6
    )


@pytest.fixture(scope="module", params=["llava_teacher_dir", "mobilevlm_gqa_teacher_dir"])
def teacher_and_stub(request, tmp_path_factory):
    teacher = load_backend(request.getfixturevalue(request.param))
    stub_dir = tmp_path_factory.mktemp("layer0") / "layer0"
    save_layer0(teacher, stub_dir)
    return teacher, stub_dir


@pytest.mark.parametrize("attn_heads", ["all", "mean"])
def test_stub_recomputes_the_full_teachers_capture(teacher_and_stub, digits_dataset, attn_heads):
    teacher, stub_dir = teacher_and_stub
    stub = load_layer0(stub_dir)
    assert stub.family == teacher.family
    text = stub.model.config.text_config if stub.family == "llava" else stub.model.llm.config
    assert text.num_hidden_layers == 1 and text.num_key_value_heads < text.num_attention_heads
    batch = dataset_batch(teacher, digits_dataset)  # right-padded, text-only and multi-turn samples inside
    assert any(len(v) == 0 for v in batch.visual_positions) and (batch.attention_mask == 0).any()
    with torch.inference_mode():
        full = teacher.forward(batch, capture=True)
    got = recompute(stub, batch, attn_heads=attn_heads)
    torch.testing.assert_close(got.visual, full.visual.float(), rtol=0, atol=TOL)
    for want, have in zip(full.attention, got.attention, strict=True):
        if want is None:
            assert have is None
            continue
        want = want.float().mean(0, keepdim=True) if attn_heads == "mean" else want.float()
        assert have.shape == want.shape and have.dtype == torch.float32
        torch.testing.assert_close(have, want, rtol=0, atol=TOL)


def test_shared_tower_features_give_the_unshared_result(teacher_and_stub, digits_dataset):
    teacher, stub_dir = teacher_and_stub
    stub = load_layer0(stub_dir)
    assert tower_sha256(stub) == tower_sha256(teacher)
    batch = dataset_batch(teacher, digits_dataset)
    with torch.inference_mode():
        features = tower_features(teacher, batch.pixel_values)  # the "student's" tower, same weights
    shared = recompute(stub, batch, features=features)
    alone = recompute(stub, batch)
    torch.testing.assert_close(shared.visual, alone.visual, rtol=0, atol=0)
    other = recompute(stub, batch, features=features + 1)  # the features given are the ones used
    assert not torch.allclose(other.visual, alone.visual)
    for a, b in zip(shared.attention, alone.attention, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_stub_keeps_layer0_only_and_is_smaller(teacher_and_stub):
    teacher, stub_dir = teacher_and_stub
    with safe_open(str(stub_dir / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    llm_layers = {
        n.split(".layers.")[1].split(".")[0] for n in names if ".layers." in n and "vision" not in n
    }
    assert llm_layers == {"0"}
    assert any("self_attn.q_proj" in n for n in names) and any("vision" in n for n in names)
    manifest = json.loads((stub_dir / "layer0.json").read_text())
    assert manifest["teacher"] == teacher.fingerprint()


def test_tower_hash_tells_towers_apart(llava_teacher_dir, llava_student_dir):
    assert tower_sha256(load_backend(llava_teacher_dir)) != tower_sha256(load_backend(llava_student_dir))


def test_tampered_stub_is_refused_naming_the_file(teacher_and_stub, tmp_path):
    _, stub_dir = teacher_and_stub
    copy = tmp_path / "layer0"
    copy.mkdir()
    for p in stub_dir.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    verify_layer0(copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one byte of the last tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.safetensors does not match its sha256") as e:
        load_layer0(copy)
    assert "\n" not in str(e.value)
    (copy / "extra.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"extra\.bin"):
        verify_layer0(copy)
