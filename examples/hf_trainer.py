"""Distil a student from a cache with HF `Trainer` (alignkd_cache.api.hf.AlignKDTrainer).

    python examples/hf_trainer.py --student S --cache C --image-root IMGS --out OUT --max-steps 2

Writes OUT/terms.jsonl (each optimizer step's loss terms, as metrics.jsonl names them) and the
student in OUT/student. Needs the `hf` extra (accelerate).
"""

from __future__ import annotations

from pathlib import Path

from common import arguments, write_terms
from transformers import TrainingArguments

from alignkd_cache import api
from alignkd_cache.api.hf import AlignKDTrainer


def main(argv=None) -> None:
    a = arguments(__doc__.splitlines()[0], argv, **{"--report-to": {"default": "none"}})
    student = api.load_student(a.student)
    dataset = api.CacheDataset(a.cache, student, a.image_root)
    loss = api.AlignKDLoss.for_dataset(dataset, student, seed=a.seed)
    model = api.DistillationModel(student, loss, dataset)
    args = TrainingArguments(
        output_dir=a.out,
        per_device_train_batch_size=a.batch_size,
        gradient_accumulation_steps=a.grad_accum,
        max_steps=a.max_steps,
        learning_rate=a.lr,
        lr_scheduler_type="constant",
        seed=a.seed,
        use_cpu=a.cpu,
        logging_steps=1,
        save_strategy="no",
        report_to=a.report_to,
    )
    trainer = AlignKDTrainer(model=model, args=args, train_dataset=dataset, data_collator=dataset.collate)
    trainer.train()
    logged = [log for log in trainer.state.log_history if "alignkd/loss" in log]
    write_terms(
        a.out,
        [
            {k.removeprefix("alignkd/"): v for k, v in log.items() if k.startswith("alignkd/")}
            for log in logged
        ],
    )
    student.save_pretrained(Path(a.out) / "student")


if __name__ == "__main__":
    main()
