"""Sparse logit targets against the full softmax, and grid pooling against hand-computed blocks."""

from __future__ import annotations

import pytest
import torch

from alignkd_cache.backends import load_backend
from alignkd_cache.build import BuildOptions
from alignkd_cache.data import SampleDataset, Tokenization, read_records, tokenize_all
from alignkd_cache.signals import logit_targets, pool_attention, pool_visual


def _logits(seed=0, n=7, vocab=300):
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_topk_log_probs_and_tail_match_full_softmax():
    logits = _logits()
    positions = torch.tensor([0, 2, 3, 6])
    targets = logit_targets(logits, positions, kind="topk", k=16)
    full = torch.log_softmax(logits[positions].double(), -1)
    assert targets.kind == "topk" and targets.ids.shape == (4, 16) and targets.values.dtype == torch.float32
    torch.testing.assert_close(targets.values.double(), full.gather(1, targets.ids), atol=1e-6, rtol=0)
    # The k ids are the k most likely, in order.
    torch.testing.assert_close(targets.values.double(), full.topk(16, -1).values, atol=1e-6, rtol=0)
    expected_tail = 1 - full.exp().gather(1, targets.ids).sum(-1)
    torch.testing.assert_close(targets.tail.double(), expected_tail, atol=1e-6, rtol=0)
    assert torch.equal(targets.positions, positions)
    everything = logit_targets(logits, positions, kind="topk", k=logits.shape[-1])
    assert float(everything.tail.max()) < 1e-6


def test_topk_tail_keeps_its_value_when_tiny():
    """A confident teacher's tail (1e-9 ... 1e-30) is summed in log space: 1 - sum(top-k) would give
    rounding noise of ~1e-7 instead."""
    logits = _logits(n=4, vocab=300)
    logits[:, :8] += torch.tensor([25.0, 35.0, 50.0, 80.0])[:, None]
    targets = logit_targets(logits, torch.arange(4), kind="topk", k=8)
    full = torch.log_softmax(logits.double(), -1)
    expected = full[:, 8:].exp().sum(-1)
    assert float(expected.max()) < 1e-7 and float(expected.min()) > 1e-35
    torch.testing.assert_close(targets.tail.double(), expected, rtol=1e-5, atol=0)


def test_sampled_targets_are_reproducible_and_unbiased():
    logits = _logits(n=3, vocab=50) / 3
    positions = torch.arange(3)
    a = logit_targets(logits, positions, kind="sampled", draws=50, seed=7, sample_id="s1")
    b = logit_targets(logits, positions, kind="sampled", draws=50, seed=7, sample_id="s1")
    c = logit_targets(logits, positions, kind="sampled", draws=50, seed=7, sample_id="s2")
    assert a.kind == "sampled" and a.tail is None
    assert torch.equal(a.ids, b.ids) and torch.equal(a.values, b.values)
    assert not torch.equal(a.ids, c.ids), "another sample id must draw independently"
    assert torch.equal(a.values.sum(-1), torch.full((3,), 50.0))
    for row_ids, row_counts in zip(a.ids, a.values, strict=True):
        real = row_ids[row_counts > 0]
        assert len(real) == len(set(real.tolist())), "ids must be unique within a position"
        assert torch.all(row_counts[:-1] >= row_counts[1:]), "most drawn first"
    # Many draws estimate the teacher's distribution.
    many = logit_targets(logits, positions, kind="sampled", draws=40000, seed=1, sample_id="x")
    estimate = torch.zeros(3, 50).scatter_add_(1, many.ids, many.values) / 40000
    torch.testing.assert_close(estimate, torch.softmax(logits, -1), atol=0.015, rtol=0)


def test_bad_target_options_are_refused():
    with pytest.raises(ValueError, match="unknown logit target kind"):
        logit_targets(_logits(), [0], kind="bogus")
    # Full-vocabulary targets are for a resident teacher only: a cache cannot hold them.
    with pytest.raises(ValueError, match="--logit-targets 'full' is online only"):
        BuildOptions(logit_targets="full")
    with pytest.raises(ValueError, match="k=0"):
        logit_targets(_logits(), [0], k=0)


def test_sampled_targets_do_not_depend_on_batching(llava_teacher_dir, digits_dataset):
    """Targets from a padded batch equal targets from each sample run alone."""
    teacher = load_backend(llava_teacher_dir)
    json_path, image_root = digits_dataset
    tok = Tokenization(teacher.tokenizer, "v1", teacher.image_token_id, teacher.num_visual_tokens)
    samples, _ = tokenize_all(read_records(json_path)[:4], tok)
    dataset = SampleDataset(
        samples, image_root, teacher.preprocess, teacher.tokenizer.pad_token_id, teacher.pad_color
    )
    with torch.no_grad():
        batch = dataset.collate([dataset[i] for i in range(len(dataset))])
        together = teacher.forward(batch, capture=False).logits
        for b, sample in enumerate(samples):
            alone = teacher.forward(dataset.collate([dataset[b]]), capture=False).logits[0]
            positions = batch.supervised_positions[b]
            x = logit_targets(together[b], positions, kind="sampled", seed=3, sample_id=sample.id)
            y = logit_targets(alone, positions, kind="sampled", seed=3, sample_id=sample.id)
            assert torch.equal(x.ids, y.ids) and torch.equal(x.values, y.values), sample.id


def test_pool_visual_averages_blocks():
    z = torch.arange(16.0).reshape(16, 1).repeat(1, 3)  # a 4x4 grid, value = flat index
    pooled = pool_visual(z, 4)
    # Block (0, 0) holds flat indices 0, 1, 4, 5; block (1, 1) holds 10, 11, 14, 15.
    torch.testing.assert_close(pooled[:, 0], torch.tensor([2.5, 4.5, 10.5, 12.5]))
    assert pooled.shape == (4, 3)
    assert torch.equal(pool_visual(z, 16), z)


def test_pool_attention_sums_mass_over_the_same_blocks():
    a = torch.rand(2, 5, 36)
    pooled = pool_attention(a, 9)
    assert pooled.shape == (2, 5, 9)
    torch.testing.assert_close(pooled.sum(-1), a.sum(-1))
    grid = a.reshape(2, 5, 6, 6)
    torch.testing.assert_close(pooled[..., 4], grid[..., 2:4, 2:4].sum((-1, -2)))
    # The key picked as "most looked at" follows the block that holds it.
    z = torch.randn(36, 8)
    torch.testing.assert_close(pool_visual(z, 9)[4], z.reshape(6, 6, 8)[2:4, 2:4].mean((0, 1)))


@pytest.mark.parametrize(
    ("n_teacher", "n_student", "message"),
    [(577, 144, "square grids"), (576, 100, "does not split"), (144, 143, "square grids")],
)
def test_pooling_refuses_grids_it_cannot_map(n_teacher, n_student, message):
    with pytest.raises(ValueError, match=message):
        pool_visual(torch.zeros(n_teacher, 4), n_student)
    with pytest.raises(ValueError, match=message):
        pool_attention(torch.zeros(2, 3, n_teacher), n_student)
