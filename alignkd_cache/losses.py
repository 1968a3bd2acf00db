"""The Align-KD losses: plain functions shared by the cache and the online (teacher resident) trainer.

Method: docs/method.md §1-3. Every function takes the teacher's signals
already mapped to the student's sequence (same text rows T, same visual-token count N_v, logit
positions in student coordinates), so neither path has its own loss code.

Defaults are the paper's intent, built correctly; the public revisions' formulas are selectable by
name. What this module deliberately does not reproduce from the public code:
- the attention mask is text queries x vision keys (the public mask is the transpose: all zeros);
- the top-k "text focus" indexes visual keys only (the public one indexes all keys, off by one);
- logit KD runs in fp32 over supervised positions only (the public one: fp16, every position).

Reductions: every term is a sum over its units (supervised tokens for CE and logit KD, samples with
an image for the attention and visual terms) divided by a Normalisers count. The trainer passes the
counts of the whole optimizer step (all micro-batches, all ranks), so how a step is cut into
micro-batches and ranks does not change the update; without them a term is a mean over its call.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from alignkd_cache.data import IGNORE_INDEX
from alignkd_cache.options import ATTN_LOSSES, LOGIT_LOSSES, TERMS, LossConfig
from alignkd_cache.signals import TeacherSignal

ADAPTER_ATTN_LOSSES = ("mse-adapter", "mse-adapter-2025-01")
# The target kind (signals.LogitTargets.kind) each logit loss needs.
LOGIT_LOSS_TARGETS = {"topk-tail": "topk", "topk-renorm": "topk", "sampled": "sampled", "full": "full"}
DEFAULT_LOGIT_LOSS = {"topk": "topk-tail", "sampled": "sampled", "full": "full"}
# (k, weight of the top-k term) of the two public revisions.
VIS_PRESETS = {"2025-01": (16, 1.0), "2024-12": (32, 0.1)}

# Attention probabilities reach subnormal values; clamp before log so 0 * log 0 stays 0.
_TINY = torch.finfo(torch.float32).tiny
# The 2024-12 revision's smoothing of both head-mean slices before its KL.
_KL_2024_12_EPS = 1e-8


class HeadAdapter(nn.Module):
    """A learned 1x1 conv over heads: a teacher slice (H_t, |T|, N_v) -> (H_s, |T|, N_v)."""

    def __init__(self, teacher_heads: int, student_heads: int):
        super().__init__()
        self.conv = nn.Conv2d(teacher_heads, student_heads, kernel_size=1)

    def forward(self, attention: torch.Tensor) -> torch.Tensor:
        if attention.shape[0] != self.conv.in_channels:
            raise ValueError(
                f"the attention adapter maps {self.conv.in_channels} teacher heads, but the teacher slice "
                f"has {attention.shape[0]} (shape {tuple(attention.shape)}); a head-mean cache needs an "
                "adapter built for 1 head, or --attn-loss kl-headmean (or kl-headmean-2024-12)"
            )
        return self.conv(attention.unsqueeze(0)).squeeze(0)


class ChannelAdapter(nn.Module):
    """A learned 1x1 conv over channels: teacher visual tokens (N_v, D_t) -> (N_v, D_s)."""

    def __init__(self, teacher_dim: int, student_dim: int):
        super().__init__()
        self.conv = nn.Conv1d(teacher_dim, student_dim, kernel_size=1)

    def forward(self, visual: torch.Tensor) -> torch.Tensor:
        if visual.shape[-1] != self.conv.in_channels:
            raise ValueError(
                f"the visual adapter maps {self.conv.in_channels} teacher channels, but the teacher tokens "
                f"have {visual.shape[-1]} (shape {tuple(visual.shape)})"
            )
        return self.conv(visual.T.unsqueeze(0)).squeeze(0).T


@dataclass
class Normalisers:
    """What the terms are divided by. tokens: supervised tokens (CE and logit KD, which run at the
    same positions); images: samples with an image (attention and visual terms, which are per sample
    because the attention and the top-k focus depend on the sample's text)."""

    tokens: int
    images: int

    @classmethod
    def of(cls, batch) -> Normalisers:
        """The counts of one micro-batch alone: each term becomes a mean over this batch."""
        tokens = int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
        return cls(tokens, sum(bool(rows) for rows in batch.image_index))


@dataclass
class SampleCounts:
    """Per dataset sample, what the Normalisers count: its supervised tokens and whether it has an
    image. A source holds these as arrays (a cache's come from its manifest's columns), so that
    the trainer needs no per-sample objects for its normalisers."""

    tokens: np.ndarray  # int64
    images: np.ndarray  # bool

    @classmethod
    def of(cls, samples) -> SampleCounts:
        tokens = np.array([len(s.supervised_positions) for s in samples], np.int64)
        return cls(tokens, np.array([bool(s.images) for s in samples], bool))

    def normalisers(self, indices: list[int]) -> Normalisers:
        """The counts of these samples together."""
        return Normalisers(int(self.tokens[indices].sum()), int(self.images[indices].sum()))


def parse_weights(text: str) -> dict[str, float]:
    """'ce=1,logit=1,vis=1,attn=1' -> dict; terms not named keep weight 1, weight 0 switches one off."""
    weights = dict.fromkeys(TERMS, 1.0)
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or name.strip() not in TERMS:
            raise ValueError(
                f"bad --weights item {item!r}; write term=value with term in {TERMS}, e.g. attn=0"
            )
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"bad --weights value in {item!r}: {value!r} is not a number") from None
    return weights


def vis_settings(preset: str, topk: int | None = None, weight: float | None = None) -> tuple[int, float]:
    """(k, top-k weight) of a named public revision, each overridable."""
    if preset not in VIS_PRESETS:
        raise ValueError(f"unknown --vis-preset {preset!r}; choose one of {sorted(VIS_PRESETS)}")
    k, w = VIS_PRESETS[preset]
    return (k if topk is None else topk), (w if weight is None else weight)


# ---------------------------------------------------------------------------------------------
# The terms


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token CE in fp32 over supervised tokens (logits[p] predicts labels[p + 1]); mean or sum."""
    return F.cross_entropy(
        logits[:, :-1].float().flatten(0, 1),
        labels[:, 1:].flatten(),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )


def _reduce(per_item: list[torch.Tensor], reduction: str) -> torch.Tensor:
    total = torch.stack(per_item).sum()
    return total / len(per_item) if reduction == "mean" else total


def text_focus(attention: torch.Tensor) -> torch.Tensor:
    """How much the text looks at each visual token: (H, |T|, N_v) -> (N_v,), head mean, query sum."""
    return attention.float().mean(0).sum(0)


def top_visual_tokens(attention: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (into the N_v visual tokens, never BOS or text) of the k tokens the text looks at most."""
    focus = text_focus(attention)
    return focus.topk(min(k, focus.numel())).indices


def attention_loss(
    student: list[torch.Tensor],
    teacher: list[torch.Tensor],
    kind: str,
    adapter: HeadAdapter | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Layer-0 text-query x vision-key attention: one value per sample, then mean or sum over samples.

    mse-adapter: MSE between adapter(N_v * teacher) (H_t -> H_s heads) and N_v * student over the
      slice's entries. Scaled by N_v, a row spread evenly over the image has entries 1 instead of
      1/N_v, and the term's gradient is of the order of CE's at weight 1 (docs/training.md).
    mse-adapter-2025-01: the same without the scale, as the 2025-01 revision publishes it.
    kl-headmean: both slices averaged over heads, each row (text query) renormalised into a
      distribution over the visual keys, KL(teacher || student) summed over keys, mean over queries.
      Renormalising makes it a true KL about *where in the image* a query looks; raw masses sum to
      less than 1 (the rest of the causal row is text), and a KL on them is not a divergence.
    kl-headmean-2024-12: the 2024-12 revision as published: head means, not renormalised, each entry
      (p + 1e-8) log((p + 1e-8) / (q + 1e-8)), mean over the entries times the student's head count
      (its normalisation counts the head axis of its mask).
    """
    if kind not in ATTN_LOSSES:
        raise ValueError(f"unknown attention loss {kind!r}; choose one of {ATTN_LOSSES}")
    losses = []
    for s, t in zip(student, teacher, strict=True):
        s, t = s.float(), t.float()
        if s.shape[1:] != t.shape[1:]:
            raise ValueError(
                f"student attention {tuple(s.shape)} and teacher attention {tuple(t.shape)} differ in "
                "(text rows, visual keys); map the teacher to the student's visual-token count first"
            )
        if kind in ADAPTER_ATTN_LOSSES:
            if adapter is None:
                raise ValueError(f"--attn-loss {kind} needs a HeadAdapter")
            scale = s.shape[-1] if kind == "mse-adapter" else 1
            losses.append(F.mse_loss(adapter(t * scale), s * scale))
        elif kind == "kl-headmean":
            p = t.mean(0)
            p = p / p.sum(-1, keepdim=True)
            q = s.mean(0)
            q = q / q.sum(-1, keepdim=True)
            kl = torch.xlogy(p, p) - p * q.clamp_min(_TINY).log()
            losses.append(kl.sum(-1).mean())
        else:
            p, q = t.mean(0) + _KL_2024_12_EPS, s.mean(0) + _KL_2024_12_EPS
            losses.append(s.shape[0] * (p * (p.log() - q.log())).mean())
    return _reduce(losses, reduction)


def vision_loss(
    student: list[torch.Tensor],
    teacher: list[torch.Tensor],
    attention: list[torch.Tensor],
    adapter: ChannelAdapter,
    k: int,
    weight: float,
    reduction: str = "mean",
) -> torch.Tensor:
    """MSE(adapter(teacher), student) over all N_v tokens + weight * MSE over the top-k focus tokens,
    per sample; mean or sum over samples.

    attention: the teacher's slice per sample, for the text focus (the top-k depends on the text, so
    it is per sample even when samples share an image).
    """
    losses = []
    for s, t, a in zip(student, teacher, attention, strict=True):
        mapped = adapter(t.float())
        s = s.float()
        if mapped.shape != s.shape:
            raise ValueError(
                f"teacher visual tokens map to {tuple(mapped.shape)} but the student's are {tuple(s.shape)}; "
                "map the teacher to the student's visual-token count first"
            )
        loss = F.mse_loss(mapped, s)
        if weight:
            top = top_visual_tokens(a, k)
            loss = loss + weight * F.mse_loss(mapped[top], s[top])
        losses.append(loss)
    return _reduce(losses, reduction)


def logit_loss(
    student_logits: list[torch.Tensor], targets: list, kind: str, reduction: str = "mean"
) -> torch.Tensor:
    """Forward KL(teacher || student) in fp32 at the targets' positions; mean or sum over positions.

    student_logits: per sample (S, vocab). targets: per sample a LogitTargets.
    - topk-tail: k + 1 buckets, the k teacher ids and the rest of the vocabulary. The student's tail
      is computed in log space (logsumexp over the other ids minus the full logsumexp), so it keeps
      its value and gradient however small it is. The decoded teacher's buckets (stored log-probs and
      tail, quantised) are renormalised to sum to 1, so the loss and its gradient are 0 exactly when
      the student's buckets equal them.
    - topk-renorm: teacher and student both renormalised over the k ids.
    - sampled: counts / draws as the target, against the student's full softmax at the sampled ids
      (the unbiased sampled-KD estimator; up to the targets' entropy, a cross-entropy).
    - full: the teacher's full-vocabulary log-probs (online only).
    """
    need = LOGIT_LOSS_TARGETS.get(kind)
    if need is None:
        raise ValueError(f"unknown logit loss {kind!r}; choose one of {LOGIT_LOSSES}")
    kls = []
    for logits, t in zip(student_logits, targets, strict=True):
        if t.kind != need:
            raise ValueError(
                f"--logit-loss {kind} needs {need!r} teacher targets but these are {t.kind!r}; "
                f"use --logit-loss {DEFAULT_LOGIT_LOSS[t.kind]}"
            )
        rows = logits[t.positions].float()
        log_q = rows.log_softmax(-1)
        if kind == "full":
            p_log = t.values.float()
            kl = (p_log.exp() * (p_log - log_q)).sum(-1)
        elif kind == "sampled":
            counts = t.values.float()
            p = counts / counts.sum(-1, keepdim=True)
            kl = (torch.xlogy(p, p) - p * log_q.gather(-1, t.ids)).sum(-1)
        elif kind == "topk-renorm":
            p_log = t.values.float().log_softmax(-1)
            q_log = log_q.gather(-1, t.ids).log_softmax(-1)
            kl = (p_log.exp() * (p_log - q_log)).sum(-1)
        else:
            if t.tail is None:
                raise ValueError(
                    "--logit-loss topk-tail needs the teacher's tail mass; these targets have none"
                )
            # The k ids are masked with the most negative finite value, not -inf: with k = vocab the
            # tail bucket is empty (~-3e38, not NaN), and the teacher's (rounding) tail is set to 0.
            others = rows.scatter(-1, t.ids, torch.finfo(rows.dtype).min)
            q_tail = others.logsumexp(-1) - rows.logsumexp(-1)
            q_log = torch.cat([log_q.gather(-1, t.ids), q_tail[:, None]], -1)
            p_tail = t.tail.float().clamp_min(0) * (t.ids.shape[-1] < rows.shape[-1])
            p_log = torch.cat([t.values.float(), p_tail.log()[:, None]], -1)
            p = p_log.log_softmax(-1).exp()
            kl = (torch.xlogy(p, p) - p * q_log).sum(-1)
        kls.append(kl)
    kl = torch.cat(kls)
    if kl.numel() == 0:
        raise ValueError("no supervised positions in this batch to distil logits at")
    return kl.mean() if reduction == "mean" else kl.sum()


def total_loss(
    student,
    batch,
    signals: list[TeacherSignal],
    cfg: LossConfig,
    adapters: nn.ModuleDict,
    norm: Normalisers | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CE + weighted Align-KD terms for one micro-batch; terms with weight 0 are not computed.

    student: the student's VLMOutput; batch: the student's Batch. Each term is its sum over this
    micro-batch divided by `norm` (default: this micro-batch's own counts, i.e. its mean). Returns
    (loss, {term: value}) for the terms computed. A micro-batch with nothing to compute (text-only
    samples with only the image terms on) gives a zero loss that has no graph: skip its backward.
    """
    norm = norm or Normalisers.of(batch)
    tokens, images = max(norm.tokens, 1), max(norm.images, 1)
    terms: dict[str, torch.Tensor] = {}
    if cfg.on("ce"):
        terms["ce"] = cross_entropy(student.logits, batch.labels, "sum") / tokens
    if cfg.on("logit"):
        logits = [t.logits for t in signals]
        terms["logit"] = logit_loss(list(student.logits), logits, cfg.logit_loss, "sum") / tokens
    with_image = [i for i, rows in enumerate(batch.image_index) if rows]
    if with_image and cfg.on("attn"):
        terms["attn"] = (
            attention_loss(
                [student.attention[i] for i in with_image],
                [_need(signals[i].attention, "attention", batch.ids[i]) for i in with_image],
                cfg.attn_loss,
                adapters["attn"] if cfg.attn_loss in ADAPTER_ATTN_LOSSES else None,
                "sum",
            )
            / images
        )
    if with_image and cfg.on("vis"):
        terms["vis"] = (
            vision_loss(
                [torch.cat([student.visual[r] for r in batch.image_index[i]]) for i in with_image],
                [_visual(signals[i], batch.ids[i]) for i in with_image],
                [
                    _need(signals[i].attention, "attention (for the top-k focus)", batch.ids[i])
                    for i in with_image
                ],
                adapters["vis"],
                cfg.vis_topk,
                cfg.vis_topk_weight,
                "sum",
            )
            / images
        )
    loss = torch.zeros((), device=student.logits.device)
    for name, value in terms.items():
        loss = loss + cfg.weights[name] * value
    return loss, terms


def _visual(signal: TeacherSignal, sample_id: str) -> torch.Tensor:
    """A sample's teacher visual tokens, its images' in order, as one (N_v, D)."""
    if not signal.visual or any(v is None for v in signal.visual):
        _need(None, "visual tokens", sample_id)
    return torch.cat(signal.visual)


def _need(value, what: str, sample_id: str):
    if value is None:
        raise ValueError(
            f"sample {sample_id!r} has an image but the teacher signals hold no {what}; "
            "rebuild the cache with that signal or switch the term off with --weights"
        )
    return value
