"""Sparse logit targets, and pooling teacher visual signals onto a student's visual-token grid.

Logit targets keep the cache small without losing what a loss needs:
- "topk": the k most likely ids with their log-probabilities under the FULL softmax, and the mass
  outside them (the tail), summed in log space so that it stays exact however small;
- "sampled": `draws` tokens drawn from the teacher's distribution, kept as unique ids with counts
  (random-sampling KD: counts / draws is an unbiased estimate of the distribution, top-k is not).
  Draws depend only on (seed, sample_id) and the sample's own logits, never on batch composition.

Pooling: visual tokens sit on a square grid (LDPv2's 12x12, LLaVA-1.5's 24x24). A teacher grid maps
onto a student grid when the student side divides the teacher side; a student token then stands for
a block of teacher tokens: their average (visual tokens), or the sum of their attention mass.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

KINDS = ("topk", "sampled")


@dataclass
class LogitTargets:
    """Targets for one sample at `positions` (logits[p] predicts token p + 1)."""

    kind: str  # "topk" | "sampled"
    positions: torch.Tensor  # (n,) long
    ids: torch.Tensor  # (n, k) long
    values: torch.Tensor  # (n, k) float32: topk log-probs; sampled counts (0 = padding)
    tail: torch.Tensor | None  # (n,) probability mass outside ids (topk); None for sampled


def sample_seed(seed: int, sample_id: str) -> int:
    """A per-sample generator seed, stable across runs, machines and batchings."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()[:8], "little") >> 1


def logit_targets(
    logits: torch.Tensor,
    positions: torch.Tensor,
    kind: str = "topk",
    k: int = 64,
    draws: int = 50,
    seed: int = 0,
    sample_id: str = "",
) -> LogitTargets:
    """logits (S, vocab) of one sample -> targets at `positions`."""
    if kind not in KINDS:
        raise ValueError(f"unknown logit target kind {kind!r}; choose one of {KINDS}")
    positions = torch.as_tensor(positions, dtype=torch.long, device=logits.device)
    log_probs = torch.log_softmax(logits[positions].float(), dim=-1)
    if kind == "topk":
        if not 1 <= k <= log_probs.shape[-1]:
            raise ValueError(f"top-k needs 1 <= k <= vocab size {log_probs.shape[-1]}, got k={k}")
        values, ids = log_probs.topk(k, dim=-1)
        # The tail as a logsumexp over the other ids: 1 - sum(top-k) loses every tail below the
        # rounding error of that sum (~1e-7 in fp32), and the loss needs small tails exactly.
        others = log_probs.scatter(-1, ids, float("-inf"))
        tail = others.logsumexp(-1).exp() if k < log_probs.shape[-1] else torch.zeros_like(values[:, 0])
        return LogitTargets("topk", positions.cpu(), ids.cpu(), values.cpu(), tail.cpu())
    if draws < 1:
        raise ValueError(f"sampled targets need draws >= 1, got {draws}")
    return _sampled(log_probs.detach().cpu().double(), positions.cpu(), draws, sample_seed(seed, sample_id))


def _sampled(log_probs: torch.Tensor, positions: torch.Tensor, draws: int, seed: int) -> LogitTargets:
    """Inverse-CDF draws from a CPU generator, then unique ids per row with counts, most drawn first."""
    n = log_probs.shape[0]
    generator = torch.Generator().manual_seed(seed)
    uniform = torch.rand((n, draws), generator=generator, dtype=torch.float64)
    cdf = log_probs.exp().cumsum(-1)
    drawn = torch.searchsorted(cdf, uniform * cdf[:, -1:]).clamp(max=log_probs.shape[-1] - 1)
    drawn, _ = drawn.sort(dim=-1)
    # Each new id in a sorted row starts a slot; slot index = running count of starts - 1.
    starts = torch.ones_like(drawn, dtype=torch.bool)
    starts[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
    slot = starts.long().cumsum(-1) - 1
    width = int(slot.max()) + 1 if n else 0
    ids = torch.zeros((n, width), dtype=torch.long).scatter_(1, slot, drawn)
    counts = torch.zeros((n, width), dtype=torch.float32).scatter_add_(
        1, slot, torch.ones_like(drawn, dtype=torch.float32)
    )
    order = counts.argsort(dim=-1, descending=True, stable=True)
    return LogitTargets("sampled", positions, ids.gather(1, order), counts.gather(1, order), None)


def _block(n_teacher: int, n_student: int, what: str) -> tuple[int, int]:
    """(teacher grid side, block side), or a ValueError saying why the grids do not map."""
    side_t, side_s = round(n_teacher**0.5), round(n_student**0.5)
    if side_t * side_t != n_teacher or side_s * side_s != n_student:
        raise ValueError(
            f"{what}: cannot map {n_teacher} teacher visual tokens onto {n_student} student tokens; "
            "both must be square grids (a CLS token kept by a 'full' feature strategy breaks this)"
        )
    if side_s == 0 or side_t % side_s:
        raise ValueError(
            f"{what}: a {side_t}x{side_t} teacher grid does not split into {side_s}x{side_s} equal blocks; "
            "the student grid side must divide the teacher's"
        )
    return side_t, side_t // side_s


def _pool_last(x: torch.Tensor, n_student: int, what: str, reduce: str) -> torch.Tensor:
    """Pool the last axis (a flattened row-major grid) block by block."""
    side_t, f = _block(x.shape[-1], n_student, what)
    side_s = side_t // f
    grid = x.reshape(*x.shape[:-1], side_s, f, side_s, f)
    pooled = grid.sum(dim=(-3, -1)) if reduce == "sum" else grid.mean(dim=(-3, -1))
    return pooled.reshape(*x.shape[:-1], n_student)


def pool_visual(z: torch.Tensor, n_student: int) -> torch.Tensor:
    """Teacher visual tokens (..., N_t, D) -> (..., n_student, D), averaging each block."""
    if z.dim() < 2:
        raise ValueError(f"pool_visual: expected (N_t, D) visual tokens, got shape {tuple(z.shape)}")
    return _pool_last(z.transpose(-1, -2), n_student, f"pool_visual{tuple(z.shape)}", "mean").transpose(
        -1, -2
    )


def pool_attention(a: torch.Tensor, n_student: int) -> torch.Tensor:
    """Teacher attention (..., T, N_t) -> (..., T, n_student), summing each block's mass."""
    if a.dim() < 1:
        raise ValueError(f"pool_attention: expected (H, T, N_t) attention, got shape {tuple(a.shape)}")
    return _pool_last(a, n_student, f"pool_attention{tuple(a.shape)}", "sum")
