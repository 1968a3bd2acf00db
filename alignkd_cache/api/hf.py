"""`AlignKDTrainer`: an HF `Trainer` that trains a `DistillationModel` on a `CacheDataset`.

It handles the pitfalls of putting a distillation loss in HF Trainer (docs/python-api.md):
- data order: `PlanSampler`, so the micro-batches are `alignkd-train`'s (same seed, same order);
- gradient accumulation: every term is divided by the whole optimizer step's counts
  (`step_counts`, passed as `num_items_in_batch`), so Trainer must not divide by the accumulation
  again (`loss_is_scaled_for_ga`), and DDP's averaging is undone (`backward_scale`);
- `remove_unused_columns`: batches are `CacheBatch` objects, not dicts, so nothing is stripped;
- label shifting: the labels stay unshifted (labels[p + 1] is what logits[p] predicts) and the loss
  shifts them once, as the trainer does.
Each step's terms go to `self.log` as `alignkd/<term>` (summed over micro-batches and ranks), so
every `report_to` tracker and `state.log_history` get them.
"""

from __future__ import annotations

from itertools import islice

import torch
import torch.distributed as dist
from transformers import Trainer

from alignkd_cache.api.dataset import PlanSampler, backward_scale, step_counts
from alignkd_cache.losses import TERMS


class AlignKDTrainer(Trainer):
    loss_is_scaled_for_ga = True  # the terms are divided by the whole step's counts already

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        args = self.args
        return PlanSampler(
            len(dataset), args.per_device_train_batch_size, args.gradient_accumulation_steps,
            args.world_size, args.seed,
        )  # fmt: skip

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches = list(islice(epoch_iterator, num_batches))
        self._step_terms: dict[str, float] = {}
        return batches, (step_counts(batches) if batches else None)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, terms = model(inputs, num_items_in_batch)
        for name, value in {"loss": loss, **terms}.items():
            self._step_terms[name] = self._step_terms.get(name, 0.0) + float(value.detach())
        if self.accelerator.sync_gradients:  # the step's last micro-batch
            self.log(self._terms_over_ranks())
        return (loss * backward_scale(), None) if return_outputs else loss * backward_scale()

    def _terms_over_ranks(self) -> dict[str, float]:
        """The step's terms summed over ranks, under the same names on every rank (a rank whose
        micro-batches had no image has no image term: it adds 0)."""
        config = self.accelerator.unwrap_model(self.model).loss
        names = ["loss", *(t for t in TERMS if config.on(t))]
        values = torch.tensor([self._step_terms.get(n, 0.0) for n in names], dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():
            values = values.to(self.args.device)
            dist.all_reduce(values)
        return {f"alignkd/{n}": float(v) for n, v in zip(names, values.tolist(), strict=True)}
