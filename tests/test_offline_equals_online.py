"""The proof: training from a cache gives the same signal as training with the teacher resident.

Same batch (the whole digit set: images, a multi-turn sample, text-only samples), same student and
adapter init; one loss and one backward per source, compared term by term and gradient by gradient.
"""

import dataclasses

import pytest
import torch
from conftest import build_digits_cache, loss_and_grads

from alignkd_cache.backends import load_backend
from alignkd_cache.build import BuildOptions, build_cache
from alignkd_cache.losses import LossConfig, parse_weights
from alignkd_cache.signals import pool_attention, pool_visual
from alignkd_cache.sources import (
    CacheSource,
    CompatibilityError,
    OnlineSource,
    SignalOptions,
    student_positions,
)
from alignkd_cache.store.reader import CacheReader
from alignkd_cache.tiny import build_tiny_llava


@pytest.fixture(scope="module")
def caches(tmp_path_factory, llava_teacher_dir, digits_dataset, llava_cache):
    """codecs -> a cache of the digits; the lossless one is the session's."""
    out = tmp_path_factory.mktemp("proof_caches") / "balanced"
    return {
        "lossless": llava_cache,
        "balanced": build_digits_cache(llava_teacher_dir, digits_dataset, out, codecs="balanced"),
    }


@pytest.fixture(scope="module")
def student(llava_student_dir):
    return load_backend(llava_student_dir)


@pytest.fixture(scope="module")
def teacher(llava_teacher_dir):
    backend = load_backend(llava_teacher_dir)
    backend.model.requires_grad_(False)
    return backend


def compare(student, teacher, cache_dir, digits_dataset, cfg, topk=64, bf16=False, attn_heads="all"):
    data, root = digits_dataset
    offline = CacheSource(CacheReader(str(cache_dir)), student, root)
    online = OnlineSource(teacher, student, data, root, SignalOptions(topk=topk, attn_heads=attn_heads))
    assert [s.input_ids for s in offline.samples] == [s.input_ids for s in online.samples]
    return loss_and_grads(student, offline, cfg, bf16=bf16), loss_and_grads(student, online, cfg, bf16=bf16)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_lossless_cache_gives_the_online_loss_and_gradients(student, teacher, caches, digits_dataset, bf16):
    cfg = LossConfig(parse_weights(""))
    (off, g_off), (on, g_on) = compare(student, teacher, caches["lossless"], digits_dataset, cfg, bf16=bf16)
    print(f"\nlossless cache vs online ({'bf16' if bf16 else 'fp32'}):", {k: (off[k], on[k]) for k in off})
    for term in ("loss", "ce", "logit", "vis", "attn"):
        assert off[term] > 0, term
        assert abs(off[term] - on[term]) <= 1e-5, (term, off[term], on[term])
    torch.testing.assert_close(g_off, g_on, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def pair_cache(tmp_path_factory, llava_teacher_dir, two_image_dataset):
    return build_digits_cache(llava_teacher_dir, two_image_dataset, tmp_path_factory.mktemp("pairs") / "c")


@pytest.mark.parametrize("pooled", [False, True], ids=["same grid", "pooled per image"])
def test_two_image_samples_give_the_online_loss_and_gradients(
    student, teacher, pair_cache, two_image_dataset, tokenizer_dir, tmp_path, pooled
):
    """Several images per sample (text between them), one image, text-only: the cache stores each
    image's tokens and the sample's whole attention slice, and gives the online terms; a student with
    a 4x4 grid gets each image's 8x8 teacher grid pooled on its own."""
    if pooled:
        student = load_backend(
            build_tiny_llava(
                tmp_path / "small", tokenizer_dir, layers=2, hidden=32, heads=2, image_size=16, seed=5
            )
        )
    assert CacheReader(str(pair_cache)).row("pair")["num_visual"] == [teacher.num_visual_tokens] * 2
    cfg = LossConfig(parse_weights(""))
    (off, g_off), (on, g_on) = compare(student, teacher, pair_cache, two_image_dataset, cfg)
    for term in ("loss", "ce", "logit", "vis", "attn"):
        assert off[term] > 0, term
        assert abs(off[term] - on[term]) <= 1e-5, (term, off[term], on[term])
    torch.testing.assert_close(g_off, g_on, rtol=1e-4, atol=1e-6)
    if pooled:  # each image's columns pooled from its own teacher columns, in the sample's order
        source = CacheSource(CacheReader(str(pair_cache)), student, two_image_dataset[1])
        _, _, cached = source.sample(0)
        mapped = source[0][2]
        assert student.num_visual_tokens == 16 and [v.shape[0] for v in mapped.visual] == [16, 16]
        for k, columns in enumerate(cached.attention.split(teacher.num_visual_tokens, dim=-1)):
            torch.testing.assert_close(
                mapped.attention[..., 16 * k : 16 * (k + 1)], pool_attention(columns, 16)
            )
            torch.testing.assert_close(mapped.visual[k], pool_visual(cached.visual[k], 16))


def test_balanced_lossy_cache_is_within_one_percent(student, teacher, caches, digits_dataset):
    cfg = LossConfig(parse_weights(""))
    (off, g_off), (on, g_on) = compare(student, teacher, caches["balanced"], digits_dataset, cfg)
    cosine = float(torch.nn.functional.cosine_similarity(g_off, g_on, dim=0))
    rel = {k: abs(off[k] - on[k]) / abs(on[k]) for k in off}
    print(f"\nbalanced cache vs online: relative loss differences {rel}, gradient cosine {cosine:.6f}")
    assert rel["loss"] <= 0.01
    assert cosine >= 0.999


def test_kl_headmean_and_revision_presets_agree_too(student, teacher, caches, digits_dataset):
    cfg = LossConfig(parse_weights(""), attn_loss="kl-headmean", vis_topk=32, vis_topk_weight=0.1)
    (off, g_off), (on, g_on) = compare(student, teacher, caches["lossless"], digits_dataset, cfg)
    assert abs(off["attn"] - on["attn"]) <= 1e-5 and off["attn"] > 0
    torch.testing.assert_close(g_off, g_on, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("attn_loss", ["mse-adapter", "kl-headmean"])
def test_head_mean_cache_gives_the_online_head_mean_loss(
    student, teacher, tmp_path, llava_teacher_dir, digits_dataset, attn_loss
):
    """The online source takes its signals with the build's own extraction, head mean included."""
    data, root = digits_dataset
    options = BuildOptions(codecs="lossless", batch_size=4, attn_heads="mean")
    build_cache(
        str(llava_teacher_dir),
        data,
        root,
        str(tmp_path / "mean"),
        dataclasses.replace(options, progress=False),
    )
    cfg = LossConfig(parse_weights(""), attn_loss=attn_loss)
    (off, g_off), (on, g_on) = compare(
        student, teacher, tmp_path / "mean", digits_dataset, cfg, attn_heads="mean"
    )
    assert off["attn"] > 0 and abs(off["attn"] - on["attn"]) <= 1e-5
    torch.testing.assert_close(g_off, g_on, rtol=1e-4, atol=1e-6)


def test_full_vocabulary_online_equals_topk_tail_with_k_the_vocabulary(student, teacher, digits_dataset):
    data, root = digits_dataset
    vocab = teacher.model.get_output_embeddings().weight.shape[0]
    cfg = LossConfig(parse_weights("ce=0,vis=0,attn=0"), logit_loss="topk-tail")
    topk = loss_and_grads(
        student, OnlineSource(teacher, student, data, root, SignalOptions(topk=vocab)), cfg
    )[0]
    full_cfg = LossConfig(parse_weights("ce=0,vis=0,attn=0"), logit_loss="full")
    full = loss_and_grads(
        student, OnlineSource(teacher, student, data, root, SignalOptions(logit_targets="full")), full_cfg
    )[0]
    assert full["logit"] == pytest.approx(topk["logit"], abs=1e-5)


def test_mismatched_tokenizer_or_template_is_refused(student, caches, digits_dataset, mobilevlm_student_dir):
    _, root = digits_dataset
    reader = CacheReader(str(caches["lossless"]))
    # The MobileVLM student's tokenizer lacks LLaVA's added <image> token: another vocabulary.
    with pytest.raises(CompatibilityError, match="tokenizer: the cache's teacher tokenizer"):
        CacheSource(reader, load_backend(mobilevlm_student_dir), root)
    with pytest.raises(
        CompatibilityError, match="template: the cache was tokenized with template 'v1', not 'plain'"
    ):
        CacheSource(reader, student, root, expect_template="plain")
    CacheSource(reader, student, root, expect_template="v1")


def test_logit_targets_must_sit_exactly_at_the_supervised_positions(student, teacher, digits_dataset):
    """Logit KD is normalised by the supervised-token count, so its targets must cover exactly those
    positions: a cache with targets on the prompt, or missing an answer token, is refused."""
    data, root = digits_dataset
    source = OnlineSource(teacher, student, data, root)
    t, s = source.teacher_samples[0], source.samples[0]
    exact = torch.tensor(t.supervised_positions)
    assert student_positions(exact, t, t).tolist() == t.supervised_positions
    for wrong in (exact[1:], torch.cat([exact, torch.tensor([t.visual_positions[-1] + 1])])):
        with pytest.raises(CompatibilityError, match="not exactly at the positions"):
            student_positions(wrong, t, s)
