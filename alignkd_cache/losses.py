"""The Align-KD losses: plain functions shared by the cache and the online (teacher resident) trainer.

Method: ../shared/docs/alignkd-method.md sections 1-2. Every function takes the teacher's signals
already mapped to the student's sequence (same text rows T, same visual-token count N_v, logit
positions in student coordinates), so neither path has its own loss code.

Defaults are the paper's intent, built correctly; the public revisions' formulas are selectable by
name. What this module deliberately does not reproduce from the public code:
- the attention mask is text queries x vision keys (the public mask is the transpose: all zeros);
- the top-k "text focus" indexes visual keys only (the public one indexes all keys, off by one);
- logit KD runs in fp32 over supervised positions only (the public one: fp16, every position).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from alignkd_cache.data import IGNORE_INDEX

TERMS = ("ce", "logit", "vis", "attn")
ATTN_LOSSES = ("mse-adapter", "kl-headmean")
LOGIT_LOSSES = ("topk-tail", "topk-renorm", "sampled", "full")
# The target kind (LogitTargets.kind) each logit loss needs.
LOGIT_LOSS_TARGETS = {"topk-tail": "topk", "topk-renorm": "topk", "sampled": "sampled", "full": "full"}
DEFAULT_LOGIT_LOSS = {"topk": "topk-tail", "sampled": "sampled", "full": "full"}
# (k, weight of the top-k term) of the two public revisions.
VIS_PRESETS = {"2025-01": (16, 1.0), "2024-12": (32, 0.1)}

# Attention probabilities reach subnormal values; clamp before log so 0 * log 0 stays 0.
_TINY = torch.finfo(torch.float32).tiny


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
                "adapter built for 1 head, or --attn-loss kl-headmean"
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
class TeacherTargets:
    """One sample's teacher signals, already in the student's geometry.

    attention: (H_t or 1, |T|, N_v) layer-0 text->vision probabilities; None for text-only samples.
    visual: (N_v, D_t) projected visual tokens of the sample's image; None for text-only samples.
    logits: a LogitTargets (alignkd_cache.signals) whose positions index the student's sequence;
        kind "full" (online only) carries the teacher's full-vocabulary log-probs in `values`.
    """

    attention: torch.Tensor | None
    visual: torch.Tensor | None
    logits: object


@dataclass
class LossConfig:
    weights: dict[str, float]
    attn_loss: str = "mse-adapter"
    vis_topk: int = 16
    vis_topk_weight: float = 1.0
    logit_loss: str = "topk-tail"

    def __post_init__(self):
        if self.attn_loss not in ATTN_LOSSES:
            raise ValueError(f"unknown attention loss {self.attn_loss!r}; choose one of {ATTN_LOSSES}")
        if self.logit_loss not in LOGIT_LOSSES:
            raise ValueError(f"unknown logit loss {self.logit_loss!r}; choose one of {LOGIT_LOSSES}")
        if self.vis_topk < 1 or self.vis_topk_weight < 0:
            raise ValueError(
                f"--vis-topk must be >= 1 and --vis-topk-weight >= 0 (got {self.vis_topk}, {self.vis_topk_weight})"
            )
        if set(self.weights) != set(TERMS) or not any(self.weights.values()):
            raise ValueError(
                f"--weights must give each of {TERMS} a weight, at least one non-zero (got {self.weights})"
            )

    def on(self, term: str) -> bool:
        return self.weights[term] != 0


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


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token CE in fp32, mean over supervised tokens (logits[p] predicts labels[p + 1])."""
    return F.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )


def text_focus(attention: torch.Tensor) -> torch.Tensor:
    """How much the text looks at each visual token: (H, |T|, N_v) -> (N_v,), head mean, query sum."""
    return attention.float().mean(0).sum(0)


def top_visual_tokens(attention: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (into the N_v visual tokens, never BOS or text) of the k tokens the text looks at most."""
    focus = text_focus(attention)
    return focus.topk(min(k, focus.numel())).indices


def attention_loss(
    student: list[torch.Tensor], teacher: list[torch.Tensor], kind: str, adapter: HeadAdapter | None = None
) -> torch.Tensor:
    """Layer-0 text-query x vision-key attention, mean over samples.

    mse-adapter: MSE between adapter(teacher) (H_t -> H_s heads) and the student slice.
    kl-headmean: both slices averaged over heads; per text query, each row is renormalised into a
    distribution over the visual keys, and KL(teacher || student) is averaged over the queries.
    Renormalising makes it a true KL about *where in the image* a query looks; raw masses sum to
    less than 1 (the rest of the causal row is text), and a KL on them is not a divergence.
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
        if kind == "mse-adapter":
            if adapter is None:
                raise ValueError("--attn-loss mse-adapter needs a HeadAdapter")
            losses.append(F.mse_loss(adapter(t), s))
        else:
            p = t.mean(0)
            p = p / p.sum(-1, keepdim=True)
            q = s.mean(0)
            q = q / q.sum(-1, keepdim=True)
            kl = torch.xlogy(p, p) - p * q.clamp_min(_TINY).log()
            losses.append(kl.sum(-1).mean())
    return torch.stack(losses).mean()


def vision_loss(
    student: list[torch.Tensor],
    teacher: list[torch.Tensor],
    attention: list[torch.Tensor],
    adapter: ChannelAdapter,
    k: int,
    weight: float,
) -> torch.Tensor:
    """MSE(adapter(teacher), student) over all N_v tokens + weight * MSE over the top-k focus tokens.

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
    return torch.stack(losses).mean()


def logit_loss(student_logits: list[torch.Tensor], targets: list, kind: str) -> torch.Tensor:
    """Forward KL(teacher || student) in fp32 at the targets' positions, mean over positions.

    student_logits: per sample (S, vocab). targets: per sample a LogitTargets.
    - topk-tail: the k teacher probabilities plus one tail bucket (the teacher's stored mass outside
      the k ids; the student's is 1 - its own top-k mass), so the student's whole distribution counts.
    - topk-renorm: teacher and student both renormalised over the k ids.
    - sampled: counts / draws as the target, against the student's full softmax at the sampled ids
      (the unbiased sampled-KD estimator; up to the targets' entropy, a cross-entropy).
    - full: the teacher's full-vocabulary log-probs (online only).
    """
    need = LOGIT_LOSS_TARGETS.get(kind)
    if need is None:
        raise ValueError(f"unknown logit loss {kind!r}; choose one of {LOGIT_LOSSES}")
    total, count = 0.0, 0
    for logits, t in zip(student_logits, targets, strict=True):
        if t.kind != need:
            raise ValueError(
                f"--logit-loss {kind} needs {need!r} teacher targets but these are {t.kind!r}; "
                f"use --logit-loss {DEFAULT_LOGIT_LOSS[t.kind]}"
            )
        log_q = logits[t.positions].float().log_softmax(-1)
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
            p_log = t.values.float()
            q_log = log_q.gather(-1, t.ids)
            p_tail = t.tail.float()
            q_tail = (1 - q_log.exp().sum(-1)).clamp_min(_TINY)
            kl = (p_log.exp() * (p_log - q_log)).sum(-1) + torch.xlogy(p_tail, p_tail) - p_tail * q_tail.log()
        total = total + kl.sum()
        count += kl.numel()
    if count == 0:
        raise ValueError("no supervised positions in this batch to distil logits at")
    return total / count


def total_loss(
    student, batch, targets: list[TeacherTargets], cfg: LossConfig, adapters: nn.ModuleDict
) -> tuple[torch.Tensor, dict[str, float | None]]:
    """CE + weighted Align-KD terms for one micro-batch; terms with weight 0 are not computed.

    student: the student's Signals; batch: the student's Batch. Returns (loss, {term: value | None}).
    """
    terms: dict[str, torch.Tensor] = {}
    if cfg.on("ce"):
        terms["ce"] = cross_entropy(student.logits, batch.labels)
    if cfg.on("logit"):
        terms["logit"] = logit_loss(list(student.logits), [t.logits for t in targets], cfg.logit_loss)
    with_image = [i for i, j in enumerate(batch.image_index) if j is not None]
    if with_image and cfg.on("attn"):
        terms["attn"] = attention_loss(
            [student.attention[i] for i in with_image],
            [_need(targets[i].attention, "attention", batch.ids[i]) for i in with_image],
            cfg.attn_loss,
            adapters["attn"] if cfg.attn_loss == "mse-adapter" else None,
        )
    if with_image and cfg.on("vis"):
        terms["vis"] = vision_loss(
            [student.visual[batch.image_index[i]] for i in with_image],
            [_need(targets[i].visual, "visual tokens", batch.ids[i]) for i in with_image],
            [
                _need(targets[i].attention, "attention (for the top-k focus)", batch.ids[i])
                for i in with_image
            ],
            adapters["vis"],
            cfg.vis_topk,
            cfg.vis_topk_weight,
        )
    loss = sum(cfg.weights[name] * value for name, value in terms.items())
    logged = {name: (float(terms[name].detach()) if name in terms else None) for name in TERMS}
    # A batch of text-only samples has no vis/attn term: log 0 for an enabled term, None for a disabled one.
    for name in ("vis", "attn"):
        if cfg.on(name) and name not in terms:
            logged[name] = 0.0
    return loss, logged


def _need(value, what: str, sample_id: str):
    if value is None:
        raise ValueError(
            f"sample {sample_id!r} has an image but the teacher signals hold no {what}; "
            "rebuild the cache with that signal or switch the term off with --weights"
        )
    return value
