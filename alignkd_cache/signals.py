"""A sample's teacher signals (TeacherSignal), how they are taken from a forward and stored, the
sparse logit targets, and pooling onto a student's visual-token grid.

TeacherSignal is the one type a sample's teacher signals have from the backend to the losses: the
build extracts it from a teacher forward (`sample_signal`) and the writer stores it; the reader
returns it; a training source maps it onto the student's sequence (`TeacherSignal.for_student`)
and the losses take it. signal_spec.STORED_ARRAYS says how each field is stored.

Logit targets keep the cache small without losing what a loss needs:
- "topk": the k most likely ids with their log-probabilities under the FULL softmax, and the mass
  outside them (the tail), summed in log space so that it stays exact however small;
- "sampled": `draws` tokens drawn from the teacher's distribution, kept as unique ids with counts
  (random-sampling KD: counts / draws is an unbiased estimate of the distribution, top-k is not).
  Draws depend only on (seed, sample_id) and the sample's own logits, never on batch composition.

Pooling: visual tokens sit on a square grid per image (LDPv2's 12x12, LLaVA-1.5's 24x24). A teacher
grid maps onto a student grid when the student side divides the teacher side; a student token then
stands for a block of teacher tokens: their average (visual tokens), or the sum of their attention
mass. Each image of a sample pools on its own; an image with as many tokens on both sides maps one
to one (dynamic-resolution families of one processor).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import torch

from alignkd_cache.signal_spec import ONLINE_KINDS, SignalOptions, logit_positions


@dataclass
class LogitTargets:
    """Targets for one sample at `positions` (logits[p] predicts token p + 1)."""

    kind: str  # "topk" | "sampled" | "full"
    positions: torch.Tensor  # (n,) long
    ids: torch.Tensor | None  # (n, k) long; None for full
    values: torch.Tensor  # (n, k) float32: topk log-probs; sampled counts (0 = padding); full log-probs
    tail: torch.Tensor | None  # (n,) probability mass outside ids (topk); None for sampled and full

    def to(self, device) -> LogitTargets:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return LogitTargets(
            self.kind, move(self.positions), move(self.ids), move(self.values), move(self.tail)
        )


@dataclass
class TeacherSignal:
    """One sample's teacher signals, laid out on a token sequence (the teacher's, or after
    `for_student` the student's).

    attention: (H or 1 for a head mean, |T|, N_v) layer-0 text->vision probabilities over all the
        sample's visual positions (its images' tokens in order), each row normalised over its whole
        causal row; None for a text-only sample (and for a layer-0 cache until recomputed).
    visual: per image, its (N_v, D) projected visual tokens; [] for a text-only sample. While
        building, an image whose tokens another sample stores is None.
    logits: the logit targets; their positions index the sequence.
    image_keys: per image, the content key of the image the visual signals come from.
    """

    attention: torch.Tensor | None
    visual: list[torch.Tensor | None]
    logits: LogitTargets
    image_keys: list[str] = dataclasses.field(default_factory=list)

    def to(self, device) -> TeacherSignal:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return TeacherSignal(
            move(self.attention), [move(v) for v in self.visual], self.logits.to(device), self.image_keys
        )

    def for_student(
        self, positions: torch.Tensor, teacher_visual: list[int], student_visual: list[int]
    ) -> TeacherSignal:
        """The same signals on the student's sequence: logit `positions` mapped by the caller (see
        sources.student_positions), each image's visual signals pooled from the teacher's token
        count to the student's."""
        attention, visual = self.attention, list(self.visual)
        if list(teacher_visual) != list(student_visual):
            if attention is not None:
                columns = attention.split(list(teacher_visual), dim=-1)
                attention = torch.cat(
                    [
                        c if c.shape[-1] == n else pool_attention(c, n)
                        for c, n in zip(columns, student_visual, strict=True)
                    ],
                    dim=-1,
                )
            visual = [
                v if v is None or v.shape[0] == n else pool_visual(v, n)
                for v, n in zip(visual, student_visual, strict=True)
            ]
        return TeacherSignal(
            attention, visual, dataclasses.replace(self.logits, positions=positions), self.image_keys
        )


def sample_signal(
    forward, batch, j: int, sample, options, with_visual: bool | list[bool] = True, vocab: int | None = None
) -> TeacherSignal:
    """Sample j of a teacher forward (a backend's VLMOutput over `batch`) as a TeacherSignal on the
    teacher's sequence: the build and the resident teacher both take their signals here.

    `vocab`: the ids targets may name (Backend.vocab_size; None: every logit).
    `options`: a SignalOptions (a BuildOptions is one). `with_visual`: per image of the sample,
    whether its visual tokens are kept (False: another sample stores them); default all.
    Tensors stay on the forward's device; logit targets are computed there.
    """
    attention = None
    if forward.attention[j] is not None:
        attention = forward.attention[j].float()
        if options.attn_heads == "mean":
            attention = attention.mean(0, keepdim=True)
    rows = batch.image_index[j]
    keep = [True] * len(rows) if with_visual is True else with_visual
    visual = [forward.visual[r].float() if k else None for r, k in zip(rows, keep, strict=True)]
    positions = torch.tensor(logit_positions(sample, options.logit_positions), dtype=torch.long)
    logits = logit_targets(
        forward.logits[j, : len(sample.input_ids)],
        positions,
        kind=options.logit_targets,
        k=options.topk,
        draws=options.draws,
        seed=options.seed,
        sample_id=sample.id,
        vocab=vocab,
    )
    return TeacherSignal(attention, visual, logits, list(batch.image_keys[j]))


def sample_seed(seed: int, sample_id: str) -> int:
    """A per-sample generator seed, stable across runs, machines and batchings."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()[:8], "little") >> 1


def logit_targets(
    logits: torch.Tensor,
    positions: torch.Tensor,
    kind: str = SignalOptions.logit_targets,
    k: int = SignalOptions.topk,
    draws: int = SignalOptions.draws,
    seed: int = 0,
    sample_id: str = "",
    vocab: int | None = None,
) -> LogitTargets:
    """logits (S, vocab) of one sample -> targets at `positions` (on the logits' device, except
    sampled targets, which are drawn on the CPU).

    `vocab`: the ids a target may name (the tokenizer's; None: all). The probabilities stay those of
    the full softmax: the mass of the rows past `vocab` (a padded embedding) is in the top-k tail;
    sampled targets draw from the distribution over the `vocab` ids, renormalised."""
    if kind not in ONLINE_KINDS:
        raise ValueError(f"unknown logit target kind {kind!r}; choose one of {ONLINE_KINDS}")
    positions = torch.as_tensor(positions, dtype=torch.long, device=logits.device)
    log_probs = torch.log_softmax(logits[positions].float(), dim=-1)
    vocab = log_probs.shape[-1] if vocab is None else vocab
    if kind == "full":
        return LogitTargets("full", positions, None, log_probs, None)
    if kind == "topk":
        if not 1 <= k <= vocab:
            raise ValueError(f"top-k needs 1 <= k <= vocab size {vocab}, got k={k}")
        values, ids = log_probs[:, :vocab].topk(k, dim=-1)
        # The tail as a logsumexp over the other ids: 1 - sum(top-k) loses every tail below the
        # rounding error of that sum (~1e-7 in fp32), and the loss needs small tails exactly.
        others = log_probs.scatter(-1, ids, float("-inf"))
        tail = others.logsumexp(-1).exp() if k < log_probs.shape[-1] else torch.zeros_like(values[:, 0])
        return LogitTargets("topk", positions, ids, values, tail)
    if draws < 1:
        raise ValueError(f"sampled targets need draws >= 1, got {draws}")
    kept = log_probs[:, :vocab].detach().cpu().double()
    return _sampled(kept, positions.cpu(), draws, sample_seed(seed, sample_id))


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
