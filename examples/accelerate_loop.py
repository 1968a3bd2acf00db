"""Distil a student from a cache in an Accelerate loop of your own.

    accelerate launch examples/accelerate_loop.py --student S --cache C --image-root IMGS --out OUT

Writes OUT/terms.jsonl (each optimizer step's loss terms, as metrics.jsonl names them) and the
student in OUT/student. Needs the `hf` extra (accelerate).
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from common import arguments, write_terms

from alignkd_cache import api
from alignkd_cache.losses import TERMS


def main(argv=None) -> None:
    a = arguments(__doc__.splitlines()[0], argv)
    # No gradient_accumulation_steps here: accelerator.backward would divide the loss by it, and the
    # terms are already divided by the whole step's counts (api.step_counts).
    accelerator = Accelerator(cpu=a.cpu)
    student = api.load_student(a.student)
    dataset = api.CacheDataset(a.cache, student, a.image_root, device=accelerator.device)
    loss = api.AlignKDLoss.for_dataset(dataset, student, seed=a.seed)
    model = api.DistillationModel(student, loss, dataset)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr)
    sampler = api.PlanSampler(len(dataset), a.batch_size, a.grad_accum, accelerator.num_processes, a.seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=a.batch_size, sampler=sampler, collate_fn=dataset.collate
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()
    batches = iter(loader)
    names = ["loss", *(t for t in TERMS if loss.config.on(t))]
    log = []
    for _ in range(a.max_steps):
        micro = [next(batches) for _micro in range(a.grad_accum)]
        norm = api.step_counts(micro)
        sums = torch.zeros(len(names), dtype=torch.float64, device=accelerator.device)
        for i, batch in enumerate(micro):
            last = i == len(micro) - 1
            with nullcontext() if last else accelerator.no_sync(model):
                total, terms = model(batch, norm)
                accelerator.backward(total * api.backward_scale())
            values = {"loss": total, **terms}
            sums += torch.tensor(
                [float(values[n].detach()) if n in values else 0.0 for n in names], device=sums.device
            )
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        log.append(dict(zip(names, accelerator.reduce(sums, "sum").tolist(), strict=True)))
    if accelerator.is_main_process:
        write_terms(a.out, log)
        student.save_pretrained(Path(a.out) / "student")


if __name__ == "__main__":
    main()
