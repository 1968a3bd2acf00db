"""`CacheDataset`: a torch Dataset of the student's samples with their teacher signals, for any loop.

It is the trainer's own source (sources.cache_source: the student's sequence, the teacher
signals mapped onto it with on_student, a layer0 cache's recompute), so a foreign loop sees exactly
what `alignkd-train from-cache` sees. `PlanSampler` gives the trainer's data order, `step_counts`
the trainer's per-step normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from alignkd_cache.api.cache import Cache, open_cache
from alignkd_cache.losses import Normalisers, SampleCounts
from alignkd_cache.signals import TeacherSignal
from alignkd_cache.sources import MicroBatch, cache_source
from alignkd_cache.train import batch_plan


@dataclass
class CacheBatch:
    """A collated micro-batch. Not a dict on purpose: HF Trainer's `remove_unused_columns` strips
    only dict keys that the model's forward does not name, so nothing here is ever dropped."""

    KEYS = ("input_ids", "attention_mask", "labels", "pixel_values")

    micro: MicroBatch  # .student: the student's data.Batch; .signals / .teacher: what signals() needs

    def __len__(self) -> int:
        return len(self.micro.student.ids)

    # Read-only key access for tools that look tensors up by name (HF Trainer's token counts).
    def __contains__(self, key) -> bool:
        return key in self.KEYS

    def __getitem__(self, key: str) -> torch.Tensor | None:
        if key not in self.KEYS:
            raise KeyError(f"a CacheBatch has {self.KEYS}, not {key!r}")
        return getattr(self, key)

    @property
    def input_ids(self) -> torch.Tensor:
        return self.micro.student.input_ids

    @property
    def attention_mask(self) -> torch.Tensor:
        return self.micro.student.attention_mask

    @property
    def labels(self) -> torch.Tensor:
        """Unshifted: labels[b, p + 1] is what logits[b, p] predicts (IGNORE_INDEX elsewhere)."""
        return self.micro.student.labels

    @property
    def pixel_values(self) -> torch.Tensor | None:
        return self.micro.student.pixel_values


class CacheDataset(torch.utils.data.Dataset):
    """Items of the student's tokenized samples with their images and teacher signals.

    `student` is a loaded student (`load_student`); `device` is where a layer0 cache's stub
    recomputes. Use `collate_fn=dataset.collate`; any sampler works (`PlanSampler` for the
    trainer's order), and DataLoader workers may run `__getitem__` and `collate`.
    """

    def __init__(
        self, cache: Cache | str, student, image_root=None, expect_template: str | None = None, device="cpu"
    ):
        cache = open_cache(cache) if isinstance(cache, str) else cache
        self.cache = cache
        self.source = cache_source(cache.reader, student, image_root, expect_template, device)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        return self.source[i]

    def collate(self, items) -> CacheBatch:
        return CacheBatch(self.source.collate(items))

    def signals(self, batch: CacheBatch, device) -> list[TeacherSignal]:
        """One TeacherSignal per sample of `batch`, on the student's sequence, on `device`."""
        return self.source.signals(batch.micro, device)

    @property
    def samples(self):
        """The student's tokenized samples (data.TokenizedSample), in dataset order."""
        return self.source.samples

    @property
    def teacher_heads(self) -> int:
        return self.source.teacher_heads

    @property
    def teacher_dim(self) -> int:
        return self.source.teacher_dim

    @property
    def logit_targets(self) -> str:
        return self.cache.attrs["logit_targets"]


class PlanSampler(torch.utils.data.Sampler):
    """Dataset indices in `alignkd-train`'s order: batched by `batch_size` (DataLoader) they are the
    trainer's micro-batches, and sharded round-robin over ranks (Accelerate's default) each rank
    gets the trainer's. Each epoch is a permutation seeded by (seed, epoch); call set_epoch."""

    def __init__(self, n: int, batch_size: int, grad_accum: int = 1, world_size: int = 1, seed: int = 0):
        self.n, self.seed, self.epoch = n, seed, 0
        self.cut = (batch_size, grad_accum, world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        per_step = self.cut[0] * self.cut[1] * self.cut[2]
        steps_per_epoch = -(-self.n // per_step)
        plan = batch_plan(self.n, *self.cut, self.seed, self.epoch + 1)[-steps_per_epoch:]
        return iter([i for step in plan for micro in step for i in micro])


def step_counts(batches: list[CacheBatch]) -> Normalisers:
    """What every term of one optimizer step is divided by: the supervised tokens and the samples
    with an image of the step's micro-batches on every rank (summed over ranks when torch.distributed
    is initialised). Pass it to every micro-batch's loss of that step, so that how the step is cut
    into micro-batches, accumulation and ranks does not change the update."""
    samples = [s for b in batches for s in b.micro.student.samples]
    local = SampleCounts.of(samples).normalisers(list(range(len(samples))))
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    counts = torch.tensor([local.tokens, local.images], device=device)
    dist.all_reduce(counts)
    return Normalisers(int(counts[0]), int(counts[1]))


def backward_scale() -> int:
    """What to multiply a step-normalised loss by before backward: DDP averages gradients over
    ranks, and the terms are already divided by the whole step's counts, so the ranks' gradients
    must add up instead."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
