"""The demo's table, plot and `results.md`: numbers as measured, verdict computed, not written in."""

from __future__ import annotations

import statistics
from pathlib import Path

KIND_COLUMNS = ("all", "position", "presence", "count")


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float]) -> str:
    mean, std = mean_std(values)
    return f"{mean:.1f} ± {std:.1f}" if len(values) > 1 else f"{mean:.1f}"


def table(results) -> str:
    """Markdown: one row per model, accuracy (%) on the held-out test split per question kind."""
    head = "| model | seeds | " + " | ".join(KIND_COLUMNS) + " |\n|---|---|" + "---|" * len(KIND_COLUMNS)
    rows = [
        "| teacher | 1 | " + " | ".join(f"{results.teacher[k]:.1f}" for k in KIND_COLUMNS) + " |",
        "| no image (majority answer per question) | - | "
        + " | ".join(f"{results.baseline[k]:.1f}" for k in KIND_COLUMNS)
        + " |",
    ]
    for name, runs in results.students.items():
        cells = [fmt([r[k] for r in runs]) for k in KIND_COLUMNS]
        rows.append(f"| student: {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join([head, *rows])


def verdict(results) -> str:
    ce = [r["all"] for r in results.students["CE only"]]
    full = [r["all"] for r in results.students["Align-KD (all)"]]
    gain = statistics.fmean(full) - statistics.fmean(ce)
    paired = [f - c for f, c in zip(full, ce, strict=True)]
    wins = sum(d > 0 for d in paired)
    spread = mean_std(paired)[1]
    if len(paired) > 1 and gain > 0 and wins == len(paired):
        word = "beats"
    elif gain > 0:
        word = "is ahead of, but not consistently across seeds,"
    else:
        word = "does NOT beat"
    return (
        f"Full Align-KD {word} CE-only here: {gain:+.1f} points of test accuracy on average "
        f"(paired by seed: better in {wins} of {len(paired)}, std of the difference {spread:.1f}). "
        "The paper reports +2.0 points on average over its benchmarks."
    )


def plot(results, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results.students)
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for i, name in enumerate(names):
        values = [r["all"] for r in results.students[name]]
        mean, std = mean_std(values)
        ax.bar(i, mean, yerr=std, capsize=4, color="#4c72b0" if name != "Align-KD (all)" else "#dd8452")
        ax.scatter([i] * len(values), values, color="black", s=12, zorder=3)
    ax.axhline(results.teacher["all"], color="green", linestyle="--", label="teacher")
    ax.axhline(results.baseline["all"], color="grey", linestyle=":", label="no image (majority answer)")
    ax.set_xticks(range(len(names)), names, rotation=15)
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(
        f"Students distilled from the cache: mean ± std over {len(results.seeds)} seed(s), dots = seeds"
    )
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(results, out: Path) -> Path:
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    plot(results, figures / "demo-accuracy.png")
    r = results.recipe
    minutes = results.seconds["total"] / 60
    stage_times = ", ".join(f"{k} {v:.0f} s" for k, v in results.seconds.items() if k != "total")
    text = f"""# Demo results: Align-KD in miniature, on real scanned digits

Produced by

```bash
{results.command}
```

{verdict(results)}

## Held-out accuracy (%)

Test split: {r.test_images} images x 3 questions, composed from scans that no training image uses.

{table(results)}

![accuracy by variant](figures/demo-accuracy.png)

## Setup

- Data: 2x2 grids of real 8x8 scans (scikit-learn `load_digits`), {r.cell} px per digit; questions
  on position ("Which digit is top-left?"), presence ("Is there a 7 in the image?") and count
  ("How many 3s are there?"). Data seed {r.data_seed}. Template `{r.template}` (the tokenizer's
  own chat template: `<s>USER: <image>\n{{question}} ASSISTANT: {{answer}}</s>`).
- Teacher: HF LLaVA, LLM {r.teacher} ({results.params["teacher"]:,} parameters with the vision
  tower), fine-tuned with `alignkd-train finetune` (cross-entropy only) on {r.train_images} train
  images x 3 questions, {r.teacher_steps} steps of {r.teacher_batch}, lr {r.teacher_lr}.
  {"Loaded from the user cache (trained by an earlier run)." if results.teacher_cached else "Trained in this run."}
- Students: HF LLaVA, LLM {r.student} ({results.params["student"]:,} parameters with the vision
  tower), random init per seed, sharing the teacher's frozen vision tower (as MobileVLM V2 1.7B
  and 7B share one CLIP). Each variant: `alignkd-train from-cache` on the first
  {r.student_images} train images x 3 questions, {r.student_epochs} epochs of batch
  {r.student_batch}, lr {r.student_lr}, seeds {results.seeds} (the seed sets the student init,
  the batch order and the adapter init; all variants share them).
- Vision: {r.vision}.
- Time: {minutes:.1f} min in all ({stage_times}), on {results.machine}.

## Teacher attention

One cached sample's layer-0 text->vision attention (`alignkd-cache show`):

![teacher attention](figures/demo-attention.png)

## Every command this run executed

```bash
{chr(10).join(results.commands)}
```
"""
    path = out / "results.md"
    path.write_text(text)
    return path
