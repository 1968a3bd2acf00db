"""`AlignKDLoss` (the adapters and the terms), `DistillationModel` (the student and that loss as one
module for an optimizer, DDP, HF Trainer or Accelerate), and the layer-0 capture for a student
forward the user runs themselves. All three are the trainer's own code (losses.total_loss,
train.build_adapters, train.Trainee, backends/capture.py) behind a stable signature.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from alignkd_cache.api.dataset import CacheBatch, CacheDataset
from alignkd_cache.backends import VLMOutput
from alignkd_cache.backends.capture import CaptureRequest, layer0_capture
from alignkd_cache.data import Batch
from alignkd_cache.losses import DEFAULT_LOGIT_LOSS, LossConfig, Normalisers, parse_weights, total_loss
from alignkd_cache.signals import TeacherSignal
from alignkd_cache.train import Trainee, build_adapters, keep_vision_tower_in_eval, trainable_model_parameters


def loss_config(weights: str = "", logit_targets: str = "topk", **options) -> LossConfig:
    """The CLI's defaults: `weights` as `--weights` ('attn=0' switches a term off), the logit loss
    that fits the cache's targets; `options` are LossConfig's other fields."""
    options.setdefault("logit_loss", DEFAULT_LOGIT_LOSS[logit_targets])
    return LossConfig(parse_weights(weights), **options)


class AlignKDLoss(nn.Module):
    """The Align-KD terms of a micro-batch, with the adapters they learn (seeded as the trainer seeds
    them: the same `seed` gives `alignkd-train`'s init). Put its parameters in your optimizer."""

    def __init__(self, config: LossConfig, teacher_heads: int, teacher_dim: int, student, seed: int = 0):
        super().__init__()
        self.config = config
        self.adapters = build_adapters(config, teacher_heads, teacher_dim, student, seed)

    @classmethod
    def for_dataset(
        cls, dataset: CacheDataset, student, config: LossConfig | None = None, seed: int = 0
    ) -> AlignKDLoss:
        config = config or loss_config(logit_targets=dataset.logit_targets)
        return cls(config, dataset.teacher_heads, dataset.teacher_dim, student, seed)

    def forward(
        self,
        outputs: VLMOutput,
        batch: CacheBatch | Batch,
        signals: list[TeacherSignal],
        norm: Normalisers | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(weighted total, {term: value}); each term is its sum over the micro-batch divided by
        `norm` (`step_counts` of the optimizer step; None: this micro-batch's own counts)."""
        student = batch.micro.student if isinstance(batch, CacheBatch) else batch
        return total_loss(
            outputs, student.to(outputs.logits.device), signals, self.config, self.adapters, norm
        )


class DistillationModel(Trainee):
    """The student's model and the loss's adapters as one module whose forward is a micro-batch's
    (loss, terms): wrap it in DDP, `accelerator.prepare` or HF Trainer. What trains is what
    `alignkd-train` trains: the projector, the LLM and the adapters; the vision tower is frozen and
    stays in eval mode, also after `.train()`."""

    def __init__(self, student, loss: AlignKDLoss, dataset: CacheDataset, bf16: bool = False):
        trainable_model_parameters(student.model)
        super().__init__(student, loss.adapters, loss.config, torch.bfloat16 if bf16 else None)
        self.dataset = dataset  # not a module: its signals() runs before the student's forward

    def forward(self, batch: CacheBatch, norm: Normalisers | None = None):
        device = next(self.parameters()).device
        return super().forward(batch.micro, self.dataset.signals(batch, device), norm)

    def train(self, mode: bool = True):
        super().train(mode)
        keep_vision_tower_in_eval(self.model)
        return self


@contextmanager
def capture_layer0(batch: CacheBatch | Batch) -> Iterator[CaptureRequest]:
    """Capture layer 0's text->vision attention during a forward you run yourself: after it,
    `request.slices` holds one (H, |T|, N_v) slice per sample (None for text-only samples), with
    its graph. The model must have been loaded with attn_implementation=CAPTURE_ATTENTION for its
    LLM (`load_student` does); build `VLMOutput(logits, request.slices, visual)` for AlignKDLoss."""
    student = batch.micro.student if isinstance(batch, CacheBatch) else batch
    with layer0_capture(student.query_positions, student.visual_positions, student.attention_mask) as request:
        yield request
