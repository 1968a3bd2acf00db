"""`alignkd-demo`: the paper's claim in miniature, end to end, through the project's own commands.

1. Build the digit-grid question set (alignkd_cache.demo.digits) from real scans.
2. Get the teacher: a LLaVA clearly larger than the student, fine-tuned by `alignkd-train
   finetune` (plain cross-entropy, no teacher of its own) on the whole train split. It is cached
   under the user cache directory, keyed by a hash of its recipe, so a rerun skips this stage.
3. `alignkd-cache build` over the student's (smaller) share of the train split.
4. `alignkd-train from-cache` for each student variant and seed: same data, steps and seeds.
5. `alignkd-train eval` on the held-out test split, for the teacher and every student.
6. A table (mean ± std over seeds), a plot, and one attention heatmap from `alignkd-cache show`.

Every command runs in this process through its click entry point with the arguments a user would
type, and `results.md` lists each of them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import time
from collections.abc import Callable
from contextlib import redirect_stdout
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import alignkd_cache
from alignkd_cache.demo import digits

# Student variants: each Align-KD term added to cross-entropy on its own, then all of them.
VARIANTS = {
    "CE only": "ce=1,logit=0,vis=0,attn=0",
    "+ logit KD": "ce=1,logit=1,vis=0,attn=0",
    "+ attention": "ce=1,logit=0,vis=0,attn=1",
    "+ visual tokens": "ce=1,logit=0,vis=1,attn=0",
    "Align-KD (all)": "ce=1,logit=1,vis=1,attn=1",
}


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the demo's numbers. The teacher's part keys its cache entry."""

    data_seed: int = 0
    cell: int = 16  # pixels per digit in the saved images
    train_images: int = 600  # the teacher's training set (3 questions per image)
    student_images: int = 200  # the student's share of it: the teacher's help shows on little data
    test_images: int = 200
    vision: dict = field(
        default_factory=lambda: dict(
            vision_layers=1, vision_hidden=64, vision_heads=2, image_size=32, patch_size=16
        )
    )
    teacher: dict = field(default_factory=lambda: dict(layers=4, hidden=128, heads=4))
    student: dict = field(default_factory=lambda: dict(layers=2, hidden=64, heads=2))
    tokenizer_vocab: int = 1024
    template: str = "chat"  # the tokenizer's own short chat template: no 30-token system prompt
    teacher_steps: int = 1500
    teacher_lr: float = 3e-3
    teacher_batch: int = 32
    student_epochs: int = 5
    student_lr: float = 3e-3
    student_batch: int = 16
    vis_topk: int = 1  # of the 4 visual tokens (one per digit); the paper keeps 16 of 144

    def teacher_key(self) -> str:
        """Hash of what the teacher depends on (not the student's share or steps)."""
        part = {
            k: v for k, v in asdict(self).items() if not k.startswith("student") and k not in ("test_images",)
        }
        part["tool_version"] = alignkd_cache.__version__
        return hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()[:16]


QUICK = Recipe(
    train_images=60,
    student_images=20,
    test_images=20,
    vision=dict(vision_layers=1, vision_hidden=32, vision_heads=2, image_size=32, patch_size=16),
    teacher=dict(layers=2, hidden=64, heads=4),
    student=dict(layers=1, hidden=32, heads=2),
    tokenizer_vocab=1024,
    teacher_steps=6,
    student_epochs=1,
)


def user_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "alignkd-cache"


# ---------------------------------------------------------------------------------------------
# Running the project's commands


@dataclass
class Runner:
    """Runs click commands in-process, logs their stdout, and remembers each command line."""

    log: Path
    commands: list[str] = field(default_factory=list)

    def __call__(self, console_script: str, command, args: list[str]) -> None:
        self.commands.append(" ".join([console_script, *args]))
        with open(self.log, "a") as f, redirect_stdout(f):
            print(f"$ {self.commands[-1]}", flush=True)
            command.main(args=args, prog_name=console_script, standalone_mode=False)


def cache_cli():
    from alignkd_cache.cli.cache import main

    return main


def train_cli():
    from alignkd_cache.cli.train import main

    return main


# ---------------------------------------------------------------------------------------------
# Stages


def build_data(recipe: Recipe, out: Path) -> dict[str, Path]:
    """The question set, plus the student's share: the first images of the train split."""
    paths = digits.build_digits_vqa(
        out, {"train": recipe.train_images, "test": recipe.test_images}, recipe.data_seed, recipe.cell
    )
    train = json.loads(paths["train"].read_text())
    share = [r for r in train if int(r["id"].split("-")[1]) < recipe.student_images]
    paths["student"] = out / "student_train.json"
    paths["student"].write_text(json.dumps(share, indent=1))
    return paths


def get_teacher(recipe: Recipe, data: dict[str, Path], image_root: Path, run: Runner) -> Path:
    """The cached teacher for this recipe, trained on first use (written aside, then renamed)."""
    from alignkd_cache.tiny import build_tiny_llava, build_tokenizer

    final = user_cache_dir() / f"demo-teacher-{recipe.teacher_key()}"
    if (final / "alignkd_train.json").exists():
        return final
    work = final.with_name(final.name + f".tmp{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    tokenizer = build_tokenizer(work / "tokenizer", recipe.tokenizer_vocab, corpus=_tokenizer_corpus())
    init = build_tiny_llava(
        work / "init", tokenizer, **recipe.vision, **recipe.teacher, seed=recipe.data_seed
    )
    run(
        "alignkd-train",
        train_cli(),
        [
            "finetune",
            "--model", str(init),
            "--data", str(data["train"]),
            "--image-root", str(image_root),
            "--out", str(work / "model"),
            "--max-steps", str(recipe.teacher_steps),
            "--epochs", "1000",
            "--lr", str(recipe.teacher_lr),
            "--batch-size", str(recipe.teacher_batch),
            "--warmup-ratio", "0.05",
            "--seed", str(recipe.data_seed),
            "--template", recipe.template,
        ],
    )  # fmt: skip
    (work / "model" / "recipe.json").write_text(json.dumps(asdict(recipe), indent=1))
    shutil.rmtree(final, ignore_errors=True)
    (work / "model").rename(final)
    shutil.rmtree(work, ignore_errors=True)
    return final


def _tokenizer_corpus() -> list[str]:
    from alignkd_cache.data import V1_SYSTEM

    return [V1_SYSTEM, "USER: ASSISTANT:", *digits.corpus()]


def build_student_init(recipe: Recipe, teacher: Path, out: Path, seed: int) -> Path:
    """A random small LLaVA sharing the teacher's tokenizer and (frozen) vision tower, as the
    paper's MobileVLM V2 1.7B and 7B share one CLIP tower."""
    from transformers import LlavaForConditionalGeneration

    from alignkd_cache.tiny import build_tiny_llava

    path = build_tiny_llava(out, str(teacher), **recipe.vision, **recipe.student, seed=seed)
    student = LlavaForConditionalGeneration.from_pretrained(path)
    tower = LlavaForConditionalGeneration.from_pretrained(teacher).model.vision_tower
    student.model.vision_tower.load_state_dict(tower.state_dict())
    student.save_pretrained(path)
    return path


def evaluate(
    model: Path, data: Path, image_root: Path, out: Path, template: str, run: Runner
) -> dict[str, float]:
    """Exact-match accuracy overall and per question kind, from `alignkd-train eval`'s predictions."""
    predictions = out / "predictions.jsonl"
    run(
        "alignkd-train",
        train_cli(),
        [
            "eval",
            "--model", str(model),
            "--data", str(data),
            "--image-root", str(image_root),
            "--max-new-tokens", "4",
            "--batch-size", "64",
            "--predictions", str(predictions),
            "--template", template,
        ],
    )  # fmt: skip
    kinds = {r["id"]: r["kind"] for r in json.loads(data.read_text())}
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    scores = {"all": [r["correct"] for r in rows]}
    for r in rows:
        scores.setdefault(kinds[r["id"]], []).append(r["correct"])
    return {k: 100 * sum(v) / len(v) for k, v in scores.items()}


def majority_baseline(train: Path, test: Path) -> dict[str, float]:
    """Accuracy of always giving the train split's most common answer to each question text: the
    score of a model that never looks at the image."""
    counts: dict[str, dict[str, int]] = {}
    for r in json.loads(train.read_text()):
        q, a = (t["value"] for t in r["conversations"])
        counts.setdefault(q, {}).setdefault(a, 0)
        counts[q][a] += 1
    scores: dict[str, list[bool]] = {"all": []}
    for r in json.loads(test.read_text()):
        q, a = (t["value"] for t in r["conversations"])
        guess = max(counts.get(q, {"": 0}).items(), key=lambda kv: kv[1])[0]
        scores["all"].append(guess == a)
        scores.setdefault(r["kind"], []).append(guess == a)
    return {k: 100 * sum(v) / len(v) for k, v in scores.items()}


# ---------------------------------------------------------------------------------------------
# The whole run


@dataclass
class Results:
    command: str
    recipe: Recipe
    seeds: list[int]
    teacher: dict[str, float]
    baseline: dict[str, float]
    students: dict[str, list[dict[str, float]]]  # variant -> one score dict per seed
    params: dict[str, int]
    seconds: dict[str, float]
    commands: list[str]
    teacher_cached: bool
    machine: str


def run_demo(out: str | Path, seeds: int = 3, quick: bool = False, command: str = "") -> Results:
    recipe = QUICK if quick else Recipe()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run = Runner(out / "commands.log")
    seed_list = list(range(seeds))
    seconds: dict[str, float] = {}
    n_jobs = 4 + len(seed_list) * (1 + len(VARIANTS) * 2) + 1
    bar = tqdm(total=n_jobs, desc="alignkd-demo", unit="stage", position=0)

    def stage(name: str, fn: Callable, *args):
        bar.set_postfix_str(name)
        start = time.perf_counter()
        result = fn(*args)
        key = name.split(" ")[0]
        seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - start
        bar.update(1)
        return result

    start = time.perf_counter()
    data_dir = out / "data"
    data = stage("data", build_data, recipe, data_dir)
    cached = (user_cache_dir() / f"demo-teacher-{recipe.teacher_key()}" / "alignkd_train.json").exists()
    teacher = stage("teacher", get_teacher, recipe, data, data_dir, run)
    teacher_scores = stage(
        "eval teacher",
        evaluate,
        teacher,
        data["test"],
        data_dir,
        _mkdir(out / "teacher-eval"),
        recipe.template,
        run,
    )
    cache = out / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    stage(
        "build cache",
        run,
        "alignkd-cache",
        cache_cli(),
        ["build", "--teacher", str(teacher), "--data", str(data["student"]), "--image-root", str(data_dir),
         "--out", str(cache), "--batch-size", "32", "--template", recipe.template],
    )  # fmt: skip
    students: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    for seed in seed_list:
        init = stage(
            "students init", build_student_init, recipe, teacher, out / "students" / f"init-s{seed}", seed
        )
        for name, weights in VARIANTS.items():
            run_dir = out / "students" / f"{_slug(name)}-s{seed}"
            shutil.rmtree(run_dir, ignore_errors=True)
            stage(
                f"train {name} s{seed}",
                run,
                "alignkd-train",
                train_cli(),
                ["from-cache", "--student", str(init), "--cache", str(cache), "--image-root", str(data_dir),
                 "--out", str(run_dir), "--weights", weights, "--lr", str(recipe.student_lr),
                 "--batch-size", str(recipe.student_batch), "--epochs", str(recipe.student_epochs),
                 "--seed", str(seed), "--vis-topk", str(recipe.vis_topk)],
            )  # fmt: skip
            students[name].append(
                stage(
                    f"eval {name} s{seed}",
                    evaluate,
                    run_dir,
                    data["test"],
                    data_dir,
                    run_dir,
                    recipe.template,
                    run,
                )
            )
    figures = _mkdir(out / "figures")
    heat_sample = next(r["id"] for r in json.loads(data["student"].read_text()) if r["kind"] == "position")
    stage(
        "figures",
        run,
        "alignkd-cache",
        cache_cli(),
        ["show", str(cache), "--sample", heat_sample, "--image-root", str(data_dir),
         "--out", str(figures / "demo-attention.png")],
    )  # fmt: skip
    bar.close()
    seconds["total"] = time.perf_counter() - start
    results = Results(
        command=command or f"alignkd-demo --out {out} --seeds {seeds}" + (" --quick" if quick else ""),
        recipe=recipe,
        seeds=seed_list,
        teacher=teacher_scores,
        baseline=majority_baseline(data["train"], data["test"]),
        students=students,
        params={"teacher": _count_params(teacher), "student": _count_params(out / "students" / "init-s0")},
        seconds=seconds,
        commands=run.commands,
        teacher_cached=cached,
        machine=machine(),
    )
    from alignkd_cache.demo.report import write_report

    write_report(results, out)
    return results


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def _count_params(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in Path(model_dir).glob("model*.safetensors"):
        with safe_open(str(path), "pt") as f:
            total += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())  # noqa: SIM118 (safe_open is not iterable)
    return total


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads"
