"""`--report-to`: each optimizer step's metrics.jsonl record sent to an experiment tracker as well.

metrics.jsonl stays the always-on record; a tracker gets the same numbers as scalars, plus what
only the tracker shows: the total gradient norm before clipping and the throughput. Only rank 0
reports. A resumed run purges the steps after its checkpoint from the tracker, as it cuts
metrics.jsonl.

trackio is not offered: installing it next to this package downgrades pillow below what the base
install chose (checked with a pip dry run of trackio).
"""

from __future__ import annotations

from pathlib import Path

from alignkd_cache.losses import TERMS

REPORT_TO = ("none", "tensorboard")
TENSORBOARD_DIR = "tensorboard"


class TensorBoardTracker:
    """Event files in OUT/tensorboard, read by TensorBoard (or its EventAccumulator)."""

    def __init__(self, out: Path, first_step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ValueError(
                f"--report-to tensorboard: the tensorboard package is missing ({e}); "
                "pip install 'alignkd-cache[tensorboard]' or use --report-to none"
            ) from None
        # purge_step: a resumed run drops what an earlier run logged after the checkpoint.
        self.writer = SummaryWriter(
            str(out / TENSORBOARD_DIR), purge_step=first_step + 1 if first_step else None
        )

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


def open_tracker(report_to: str, out: Path, first_step: int) -> TensorBoardTracker | None:
    """The tracker `--report-to` names, None for `none`; `first_step`: the step the run resumed
    from (0: a new run)."""
    if report_to not in REPORT_TO:
        raise ValueError(f"--report-to {report_to!r}: choose one of {', '.join(REPORT_TO)}")
    return TensorBoardTracker(out, first_step) if report_to == "tensorboard" else None


def scalars(record: dict, total_grad_norm: float, samples: list) -> dict[str, float]:
    """A metrics.jsonl record (train.log_step) of a step over `samples` (data.TokenizedSample) as
    tracker scalars: each term that is on, the lr, the gradient norms, the throughput (samples and
    tokens per second) and the teacher signals' share of the step."""
    tokens = sum(len(s.input_ids) for s in samples)
    out = {f"loss/{name}": record[name] for name in ("loss", *TERMS) if record.get(name) is not None}
    out |= {f"grad_norm/{name}": value for name, value in record.get("grad_norm", {}).items()}
    out["grad_norm/total"] = total_grad_norm
    out["train/lr"] = record["lr"]
    out["throughput/samples_per_s"] = len(samples) / record["seconds"]
    out["throughput/tokens_per_s"] = tokens / record["seconds"]
    out["signals/seconds"] = record["signals_s"]
    out["signals/share"] = record["signals_share"]
    return out
