"""The Align-KD loss functions on plain tensors, with values worked out independently."""

import math

import pytest
import torch
import torch.nn.functional as F

from alignkd_cache.losses import (
    ChannelAdapter,
    HeadAdapter,
    LossConfig,
    attention_loss,
    cross_entropy,
    logit_loss,
    parse_weights,
    text_focus,
    top_visual_tokens,
    vis_settings,
    vision_loss,
)
from alignkd_cache.signals import LogitTargets


def attention_slice(heads, rows, keys, seed=0):
    """Rows of a causal softmax restricted to vision keys: positive, each row summing to < 1."""
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(heads, rows, keys + 5, generator=g).softmax(-1)
    return full[..., :keys]


# ---------------------------------------------------------------------------------------------
# Options


def test_parse_weights_defaults_and_switch_off():
    assert parse_weights("") == {"ce": 1.0, "logit": 1.0, "vis": 1.0, "attn": 1.0}
    assert parse_weights("attn=0, logit=0.5") == {"ce": 1.0, "logit": 0.5, "vis": 1.0, "attn": 0.0}
    with pytest.raises(ValueError, match="attn=0"):
        parse_weights("atn=0")
    with pytest.raises(ValueError, match="not a number"):
        parse_weights("vis=x")
    with pytest.raises(ValueError, match="at least one non-zero"):
        LossConfig(weights=parse_weights("ce=0,logit=0,vis=0,attn=0"))


def test_vis_presets_of_both_revisions_and_overrides():
    assert vis_settings("2025-01") == (16, 1.0)
    assert vis_settings("2024-12") == (32, 0.1)
    assert vis_settings("2024-12", topk=8) == (8, 0.1)
    assert vis_settings("2025-01", weight=0.0) == (16, 0.0)
    with pytest.raises(ValueError, match="2024-12"):
        vis_settings("2023")


# ---------------------------------------------------------------------------------------------
# Adapters


def test_head_adapter_is_a_1x1_conv_over_heads():
    adapter = HeadAdapter(4, 2)
    a = attention_slice(4, 3, 6)
    w, b = adapter.conv.weight[:, :, 0, 0], adapter.conv.bias
    expected = torch.einsum("st,trv->srv", w, a) + b[:, None, None]
    torch.testing.assert_close(adapter(a), expected)
    with pytest.raises(ValueError, match="head-mean cache"):
        adapter(attention_slice(1, 3, 6))


def test_channel_adapter_is_a_1x1_conv_over_channels():
    adapter = ChannelAdapter(8, 4)
    z = torch.randn(6, 8)
    expected = z @ adapter.conv.weight[:, :, 0].T + adapter.conv.bias
    torch.testing.assert_close(adapter(z), expected)
    with pytest.raises(ValueError, match="channels"):
        adapter(torch.randn(6, 5))


# ---------------------------------------------------------------------------------------------
# L_attn


def test_mse_adapter_is_mse_of_the_mapped_teacher_scaled_by_n_v_or_as_published():
    torch.manual_seed(0)
    adapter = HeadAdapter(4, 2)
    t, s = attention_slice(4, 3, 6, 1), attention_slice(2, 3, 6, 2)
    published = ((adapter(t) - s) ** 2).mean()
    loss = attention_loss([s, s], [t, t], "mse-adapter-2025-01", adapter)
    torch.testing.assert_close(loss, published)
    loss.backward()
    assert adapter.conv.weight.grad.abs().sum() > 0
    # Ours: both slices scaled by N_v = 6 (rows of O(1) entries) before the adapter and the MSE.
    scaled = ((adapter(6 * t) - 6 * s) ** 2).mean()
    torch.testing.assert_close(attention_loss([s], [t], "mse-adapter", adapter), scaled)
    assert scaled > 10 * published
    # Sum over samples instead of the mean.
    torch.testing.assert_close(attention_loss([s, s], [t, t], "mse-adapter", adapter, "sum"), 2 * scaled)


def test_mse_adapter_from_one_head_serves_a_head_mean_cache():
    adapter = HeadAdapter(1, 2)
    t = attention_slice(4, 3, 6, 1).mean(0, keepdim=True)
    s = attention_slice(2, 3, 6, 2)
    assert attention_loss([s], [t], "mse-adapter", adapter) > 0
    with pytest.raises(ValueError, match="kl-headmean"):
        attention_loss([s], [t], "mse-adapter", HeadAdapter(4, 2))


def test_kl_headmean_is_kl_of_row_normalised_head_means():
    t, s = attention_slice(4, 3, 6, 1), attention_slice(2, 3, 6, 2)
    p = t.mean(0) / t.mean(0).sum(-1, keepdim=True)
    q = s.mean(0) / s.mean(0).sum(-1, keepdim=True)
    expected = sum(p[r, v] * math.log(p[r, v] / q[r, v]) for r in range(3) for v in range(6)) / 3
    loss = attention_loss([s], [t], "kl-headmean")
    assert loss.item() == pytest.approx(float(expected), rel=1e-5)
    # Same distribution over the image, different total mass on it: the renormalised KL is 0.
    assert attention_loss([t * 0.5], [t], "kl-headmean").item() == pytest.approx(0.0, abs=1e-6)
    # A head-mean cache (one head) gives the same value as the full slice it came from.
    torch.testing.assert_close(attention_loss([s], [t.mean(0, keepdim=True)], "kl-headmean"), loss)


def published_vt_loss_2024_12(teacher_attn, student_attn, t_v_mask):
    """fqhank/Align-KD 2024-12-05, trainer.py get_vt_loss, verbatim but for the fp16 cast of the result.
    teacher_attn (B, H_t, L, L), student_attn (B, H_s, L, L), t_v_mask (B, H_s, L, L)."""
    s = t_v_mask.shape[0] * t_v_mask.shape[1] * t_v_mask.shape[2] * t_v_mask.shape[3]
    teacher_front_attn, front_attn = (
        teacher_attn.mean(1).to(torch.float32),
        student_attn.mean(1).to(torch.float32),
    )
    t_v_mask = t_v_mask[:, 0, :, :].to(torch.float32)
    kl_tv = (teacher_front_attn * t_v_mask + 1e-8) * torch.log(
        (teacher_front_attn * t_v_mask + 1e-8) / (front_attn * t_v_mask + 1e-8)
    )
    return kl_tv.mean() * (s / t_v_mask.sum())


def test_kl_headmean_2024_12_is_the_published_unnormalised_kl():
    # Full causal layer-0 attention over BOS, 6 visual tokens, 4 text tokens; the mask selects text
    # queries x vision keys (the paper's orientation, not the public code's transposed mask).
    g = torch.Generator().manual_seed(3)
    length, vision, text = 11, slice(1, 7), slice(7, 11)
    causal = torch.ones(length, length).tril().bool()

    def full(heads):
        return torch.randn(1, heads, length, length, generator=g).masked_fill(~causal, -1e9).softmax(-1)

    teacher, student = full(4), full(2)
    mask = torch.zeros(1, 2, length, length, dtype=torch.bool)
    mask[:, :, text, vision] = True
    expected = published_vt_loss_2024_12(teacher, student, mask)
    t, s = teacher[0][:, text, vision], student[0][:, text, vision]
    loss = attention_loss([s], [t], "kl-headmean-2024-12")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # Not renormalised: it differs from our kl-headmean, and a head-mean cache gives the same value.
    assert loss.item() != pytest.approx(attention_loss([s], [t], "kl-headmean").item(), rel=1e-2)
    torch.testing.assert_close(attention_loss([s], [t.mean(0, keepdim=True)], "kl-headmean-2024-12"), loss)


def test_attention_loss_refuses_mismatched_geometry():
    with pytest.raises(ValueError, match="visual-token count"):
        attention_loss([attention_slice(2, 3, 6)], [attention_slice(4, 3, 4)], "kl-headmean")
    with pytest.raises(ValueError, match="mse-adapter"):
        attention_loss([attention_slice(2, 3, 6)], [attention_slice(4, 3, 6)], "mse-heads")


# ---------------------------------------------------------------------------------------------
# L_vis and the text focus


def test_text_focus_and_top_tokens_index_visual_keys_only():
    a = attention_slice(2, 4, 9)
    a[:, :, 7] += 0.2  # the text looks at visual token 7 most
    a[:, 1, 2] += 0.3  # ... and token 2 second (one query only, summed over queries)
    torch.testing.assert_close(text_focus(a), a.mean(0).sum(0))
    top = top_visual_tokens(a, 2)
    assert top.tolist() == [7, 2]
    # k larger than N_v keeps every token, never an index past the image.
    top = top_visual_tokens(a, 50)
    assert sorted(top.tolist()) == list(range(9))


def test_vision_loss_all_tokens_plus_weighted_topk():
    torch.manual_seed(0)
    adapter = ChannelAdapter(8, 4)
    t, s = torch.randn(9, 8), torch.randn(9, 4)
    a = attention_slice(2, 4, 9)
    a[:, :, [1, 5]] += 0.5
    mapped = adapter(t)
    all_mse = ((mapped - s) ** 2).mean()
    top_mse = ((mapped[[1, 5]] - s[[1, 5]]) ** 2).mean()
    loss = vision_loss([s], [t], [a], adapter, k=2, weight=0.1)
    torch.testing.assert_close(loss, all_mse + 0.1 * top_mse)
    torch.testing.assert_close(vision_loss([s], [t], [a], adapter, k=2, weight=0.0), all_mse)


# ---------------------------------------------------------------------------------------------
# L_logit and CE


def topk_targets(teacher_logits, positions, k):
    log_p = teacher_logits[positions].double().log_softmax(-1)
    values, ids = log_p.topk(k, dim=-1)
    tail = (1 - values.exp().sum(-1)).clamp_min(0)
    return LogitTargets("topk", positions, ids, values.float(), tail.float())


def reference_topk_tail(student_rows, ids, values, tail):
    """float64, bucket by bucket: the student's tail as the sum of its other probabilities, the
    decoded teacher's k + 1 buckets divided by their sum; KL summed over buckets, mean over rows."""
    q = student_rows.double().softmax(-1)
    others = torch.ones_like(q, dtype=torch.bool).scatter(-1, ids, False)
    q_buckets = torch.cat([q.gather(-1, ids), (q * others).sum(-1, keepdim=True)], -1)
    p = torch.cat([values.double().exp(), tail.double()[:, None]], -1)
    p = p / p.sum(-1, keepdim=True)
    return (p * (p / q_buckets).log()).sum(-1).mean()


@pytest.mark.parametrize("teacher_tail", ["1e-3", "3x the student's"])
def test_topk_tail_value_and_gradient_match_float64_for_tails_down_to_1e_12(teacher_tail):
    """A confident student (tail 1e-2 ... 1e-12, as for most positions of a 32k vocabulary with
    k = 64) keeps its tail's value and gradient: 1 - sum(top-k) in fp32 would round it to 0."""
    g = torch.Generator().manual_seed(0)
    vocab, k = 500, 8
    tails = torch.tensor([1e-2, 1e-4, 1e-6, 1e-8, 1e-10, 1e-12], dtype=torch.float64)
    n = len(tails)
    ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(n)])
    rows = torch.randn(n, vocab, generator=g, dtype=torch.float64)
    top = torch.zeros(n, vocab, dtype=torch.bool).scatter(-1, ids, True)
    # Lift the k ids by c so that the mass outside them is exactly the wanted tail.
    outside = (rows.exp() * ~top).sum(-1)
    inside = (rows.exp() * top).sum(-1)
    c = (outside * (1 - tails) / tails / inside).log()
    rows = rows + top * c[:, None]
    q = rows.softmax(-1)
    assert torch.allclose((q * ~top).sum(-1), tails, rtol=1e-9, atol=0)
    # The teacher: its own log-probs on the same k ids, with the tail asked for.
    p_tail = torch.full((n,), 1e-3, dtype=torch.float64) if teacher_tail == "1e-3" else 3 * tails
    p_k = torch.rand(n, k, generator=g, dtype=torch.float64) + 0.1
    p_k = p_k / p_k.sum(-1, keepdim=True) * (1 - p_tail[:, None])
    targets = LogitTargets("topk", torch.arange(n), ids, p_k.log().float(), p_tail.float())

    student = rows.float().requires_grad_()
    loss = logit_loss([student], [targets], "topk-tail")
    loss.backward()
    reference_rows = rows.clone().requires_grad_()
    expected = reference_topk_tail(reference_rows, ids, targets.values, targets.tail)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    grad, ref = student.grad.double(), reference_rows.grad
    torch.testing.assert_close(grad[top], ref[top], rtol=1e-4, atol=1e-7)
    # The tail ids' gradients are as small as their probabilities: compare them relatively.
    torch.testing.assert_close(grad[~top], ref[~top], rtol=1e-3, atol=0)


def test_topk_tail_is_exactly_zero_when_the_student_equals_the_decoded_teacher():
    """Quantised log-probs and tail need not sum to 1; the loss renormalises the decoded buckets, so it
    and its gradient vanish when the student puts exactly those buckets' mass on them."""
    g = torch.Generator().manual_seed(1)
    vocab, k, n = 300, 16, 5
    teacher = torch.randn(n, vocab, generator=g) * 3
    exact = topk_targets(teacher, torch.arange(n), k)
    # Decoded from bf16, as a lossy cache would give them back.
    values, tail = exact.values.bfloat16().float(), exact.tail.bfloat16().float()
    assert (values.double().exp().sum(-1) + tail.double() - 1).abs().max() > 1e-4
    decoded = LogitTargets("topk", exact.positions, exact.ids, values, tail)
    p = torch.cat([values.double().exp(), tail.double()[:, None]], -1)
    p = p / p.sum(-1, keepdim=True)
    student = (p[:, -1:] / (vocab - k)).log().expand(n, vocab).clone()
    student.scatter_(-1, exact.ids, p[:, :-1].log())
    student = student.float().requires_grad_()
    loss = logit_loss([student], [decoded], "topk-tail")
    loss.backward()
    assert abs(loss.item()) < 1e-6
    assert student.grad.abs().max() < 1e-6


def full_kl(teacher_logits, student_logits, positions):
    p = teacher_logits[positions].log_softmax(-1)
    q = student_logits[positions].log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean()


def test_topk_tail_with_k_equal_vocab_is_the_full_kl():
    torch.manual_seed(0)
    t, s = torch.randn(7, 11), torch.randn(7, 11)
    pos = torch.tensor([2, 3, 5])
    loss = logit_loss([s], [topk_targets(t, pos, 11)], "topk-tail")
    torch.testing.assert_close(loss, full_kl(t, s, pos), atol=1e-5, rtol=1e-5)
    assert loss.dtype == torch.float32


def test_topk_tail_is_the_kl_of_k_ids_plus_one_bucket():
    torch.manual_seed(1)
    t, s = torch.randn(6, 20), torch.randn(6, 20)
    pos = torch.tensor([1, 4])
    targets = topk_targets(t, pos, 3)
    expected = 0.0
    for r, p_row in enumerate(pos):
        p, q = t[p_row].softmax(-1), s[p_row].softmax(-1)
        ids = targets.ids[r]
        p_k, q_k = p[ids], q[ids]
        expected += (p_k * (p_k / q_k).log()).sum() + (1 - p_k.sum()) * (
            (1 - p_k.sum()) / (1 - q_k.sum())
        ).log()
    loss = logit_loss([s], [targets], "topk-tail")
    assert loss.item() == pytest.approx(float(expected) / 2, rel=1e-5)
    # Identical distributions: 0, and the student's tail is its own (not renormalised).
    assert logit_loss([t], [targets], "topk-tail").item() == pytest.approx(0.0, abs=1e-6)


def test_topk_renorm_compares_distributions_renormalised_over_the_k_ids():
    torch.manual_seed(2)
    t, s = torch.randn(6, 20), torch.randn(6, 20)
    pos = torch.tensor([0, 3])
    targets = topk_targets(t, pos, 4)
    p = t[pos].gather(-1, targets.ids).log_softmax(-1)
    q = s[pos].gather(-1, targets.ids).log_softmax(-1)
    expected = (p.exp() * (p - q)).sum(-1).mean()
    torch.testing.assert_close(logit_loss([s], [targets], "topk-renorm"), expected)
    # Shifting the student's logits off the k ids changes nothing after renormalisation.
    s2 = s.clone()
    mask = torch.ones_like(s2, dtype=torch.bool)
    mask[pos.unsqueeze(1), targets.ids] = False
    s2[mask] += 3.0
    torch.testing.assert_close(logit_loss([s2], [targets], "topk-renorm"), expected)


def test_sampled_counts_proportional_to_the_teacher_give_the_full_kl():
    torch.manual_seed(3)
    t, s = torch.randn(5, 9), torch.randn(5, 9)
    pos = torch.tensor([1, 2, 4])
    p = t[pos].softmax(-1)
    ids = torch.arange(9).expand(3, 9).contiguous()
    targets = LogitTargets("sampled", pos, ids, p * 1000, None)
    torch.testing.assert_close(
        logit_loss([s], [targets], "sampled"), full_kl(t, s, pos), atol=1e-5, rtol=1e-5
    )
    # Padding (count 0) contributes nothing.
    padded = LogitTargets(
        "sampled",
        pos,
        torch.cat([ids, torch.zeros(3, 2, dtype=torch.long)], 1),
        torch.cat([p * 1000, torch.zeros(3, 2)], 1),
        None,
    )
    torch.testing.assert_close(logit_loss([s], [padded], "sampled"), full_kl(t, s, pos), atol=1e-5, rtol=1e-5)


def test_full_targets_and_kind_mismatch():
    torch.manual_seed(4)
    t, s = torch.randn(5, 9), torch.randn(5, 9)
    pos = torch.tensor([0, 3])
    full = LogitTargets("full", pos, None, t[pos].log_softmax(-1), None)
    torch.testing.assert_close(logit_loss([s], [full], "full"), full_kl(t, s, pos))
    with pytest.raises(ValueError, match="use --logit-loss full"):
        logit_loss([s], [full], "topk-tail")
    with pytest.raises(ValueError, match="use --logit-loss topk-tail"):
        logit_loss([s], [topk_targets(t, pos, 3)], "sampled")


def test_logit_loss_touches_only_the_target_positions_in_fp32():
    torch.manual_seed(5)
    t = torch.randn(8, 12)
    s = torch.randn(8, 12, dtype=torch.bfloat16, requires_grad=True)
    pos = torch.tensor([5, 6])
    loss = logit_loss([s], [topk_targets(t, pos, 4)], "topk-tail")
    assert loss.dtype == torch.float32
    loss.backward()
    rows_with_grad = s.grad.abs().sum(-1).nonzero().flatten().tolist()
    assert rows_with_grad == [5, 6]


def test_cross_entropy_is_next_token_mean_over_supervised():
    torch.manual_seed(6)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, -100, -100]])
    expected = F.cross_entropy(
        torch.stack([logits[0, 1], logits[0, 2], logits[1, 0], logits[1, 1]]), torch.tensor([3, 4, 1, 2])
    )
    torch.testing.assert_close(cross_entropy(logits, labels), expected)


# ---------------------------------------------------------------------------------------------
# On a real student forward


def test_attention_loss_is_nonzero_and_trains_layer0_queries_and_keys(llava_student_dir, digits_dataset):
    """Guard against the public code's zero mask (vision queries x text keys: all zeros under causal
    attention, so L_attn was the adapter bias squared and trained nothing)."""
    from alignkd_cache.backends import load_backend
    from alignkd_cache.data import SampleDataset, Tokenization, read_records, tokenize_all

    data, root = digits_dataset
    student = load_backend(llava_student_dir)
    tok = Tokenization(student.tokenizer, "v1", student.image_token_id, student.num_visual_tokens)
    samples, _ = tokenize_all(read_records(data), tok)
    dataset = SampleDataset(
        [s for s in samples if s.images][:3], root, student.preprocess, 0, student.pad_color
    )
    batch = dataset.collate([dataset[i] for i in range(3)])
    signals = student.forward(batch, capture=True)
    # A teacher slice with more heads: the student's own slice, perturbed and repeated.
    teacher = [torch.cat([a.detach(), a.detach().flip(-1)]) for a in signals.attention]
    for a, sample in zip(teacher, batch.samples, strict=True):
        assert a.shape == (2 * student.num_heads, len(sample.query_positions), student.num_visual_tokens)
    torch.manual_seed(0)
    loss = attention_loss(
        signals.attention, teacher, "mse-adapter", HeadAdapter(2 * student.num_heads, student.num_heads)
    )
    assert loss > 1e-6
    loss.backward()
    layers = student.model.model.language_model.layers
    assert layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert layers[0].self_attn.k_proj.weight.grad.abs().sum() > 0
    # Only layer 0's attention is distilled: deeper layers get nothing from this term.
    assert layers[1].self_attn.q_proj.weight.grad is None


def test_top_k_focus_indices_fall_inside_the_visual_positions(llava_student_dir, digits_dataset):
    from alignkd_cache.backends import load_backend
    from alignkd_cache.data import SampleDataset, Tokenization, read_records, tokenize_all

    data, root = digits_dataset
    student = load_backend(llava_student_dir)
    for template in ("plain", "v1"):  # image right after BOS, and after ~35 system-prompt tokens
        tok = Tokenization(student.tokenizer, template, student.image_token_id, student.num_visual_tokens)
        samples, _ = tokenize_all(read_records(data), tok)
        dataset = SampleDataset(
            [s for s in samples if s.images], root, student.preprocess, 0, student.pad_color
        )
        batch = dataset.collate([dataset[i] for i in range(len(dataset))])
        with torch.no_grad():
            signals = student.forward(batch, capture=True)
        for i, sample in enumerate(batch.samples):
            top = top_visual_tokens(signals.attention[i], 16)
            positions = set((sample.visual_positions[0] + top).tolist())
            assert len(positions) == 16 and positions <= set(sample.visual_positions)
