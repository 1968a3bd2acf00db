"""`alignkd-demo`: the paper's claim in miniature, end to end, through the project's own commands.

1. Build the digit-grid question set (alignkd_cache.demo.digits) from real scans.
2. Get the teacher: a LLaVA clearly larger than the student, fine-tuned by `alignkd-train
   finetune` (plain cross-entropy, no teacher of its own) on the whole train split. It is cached
   under the user cache directory, keyed by a hash of its recipe, the package's code and the
   numerical environment, so a rerun skips this stage and nothing else ever reuses it.
3. `alignkd-cache build` over the student's (smaller) share of the train split.
4. `alignkd-train from-cache` for each student variant and seed: same data, steps and seeds.
5. `alignkd-train eval` on the held-out test split, for the teacher and every student.
6. A table, the Align-KD - CE-only difference paired by seed with its confidence interval, a plot,
   and one attention heatmap from `alignkd-cache show`.

Every command runs in this process through its click entry point with the arguments a user would
type (their output goes to OUT/commands.log), and `results.md` lists each of them.
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
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import alignkd_cache
from alignkd_cache.demo import PINNED_NUMERICS, digits
from alignkd_cache.progress import StageProgress, quiet_libraries

# Student variants: CE only and full Align-KD by default; --ablation adds each term on its own.
VARIANTS = {
    "CE only": "ce=1,logit=0,vis=0,attn=0",
    "+ logit KD": "ce=1,logit=1,vis=0,attn=0",
    "+ attention": "ce=1,logit=0,vis=0,attn=1",
    "+ visual tokens": "ce=1,logit=0,vis=1,attn=0",
    "Align-KD (all)": "ce=1,logit=1,vis=1,attn=1",
}
HEADLINE = ("CE only", "Align-KD (all)")

# Seconds per unit of work on the reference machine (2 quiet cores, one torch thread): the stages'
# expected costs, for the opening estimate and the weighted ETA.
REFERENCE_SECONDS = {
    "data per image": 0.003,
    "teacher per step": 0.125,
    "eval per question": 0.003,
    "build per sample": 0.007,
    "student init": 0.4,
    "student per step": 0.064,
    "figures": 1.0,
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
        """Hash of what the teacher depends on: its part of the recipe, the package's code (a
        teacher trained by older code is never reused) and the numerical environment."""
        part = {
            k: v for k, v in asdict(self).items() if not k.startswith("student") and k not in ("test_images",)
        }
        part["code"] = code_sha256()
        part["environment"] = environment()
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


# Files that cannot change the teacher (report, plots, progress display), so editing them keeps it.
PRESENTATION_ONLY = {
    "alignkd_cache/demo/report.py",
    "alignkd_cache/progress.py",
    "alignkd_cache/show.py",
}


def user_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "alignkd-cache"


# ---------------------------------------------------------------------------------------------
# Running the project's commands


@dataclass
class Runner:
    """Runs click commands in-process, logs their output, and remembers each command line (paths
    under the home directory written with ~, as a user would type them)."""

    log: Path
    commands: list[str] = field(default_factory=list)

    def __call__(self, console_script: str, command, args: list[str]) -> None:
        home = str(Path.home())
        self.commands.append(" ".join([console_script, *args]).replace(home + "/", "~/"))
        with open(self.log, "a") as f, redirect_stdout(f), redirect_stderr(f):
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


def teacher_dir(recipe: Recipe) -> Path:
    """The teacher's cache entry: `init/` (the random start) and `model/` (the trained teacher) stay
    side by side, so the finetune command in results.md can be replayed."""
    return user_cache_dir() / f"demo-teacher-{recipe.teacher_key()}"


def get_teacher(recipe: Recipe, data: dict[str, Path], image_root: Path, run: Runner) -> Path:
    """The cached teacher for this recipe, trained on first use. `alignkd_train.json` is written
    last, so an interrupted training is redone, never used."""
    from alignkd_cache.tiny import build_tiny_llava, build_tokenizer

    entry = teacher_dir(recipe)
    if (entry / "model" / "alignkd_train.json").exists():
        return entry / "model"
    shutil.rmtree(entry, ignore_errors=True)
    tokenizer = build_tokenizer(entry / "tokenizer", recipe.tokenizer_vocab, corpus=_tokenizer_corpus())
    init = build_tiny_llava(
        entry / "init", tokenizer, **recipe.vision, **recipe.teacher, seed=recipe.data_seed
    )
    (entry / "recipe.json").write_text(json.dumps(asdict(recipe), indent=1))
    (entry / "environment.json").write_text(json.dumps(environment(), indent=1))
    run(
        "alignkd-train",
        train_cli(),
        [
            "finetune",
            "--model", str(init),
            "--data", str(data["train"]),
            "--image-root", str(image_root),
            "--out", str(entry / "model"),
            "--max-steps", str(recipe.teacher_steps),
            "--epochs", "1000",
            "--lr", str(recipe.teacher_lr),
            "--batch-size", str(recipe.teacher_batch),
            "--warmup-ratio", "0.05",
            "--seed", str(recipe.data_seed),
            "--template", recipe.template,
        ],
    )  # fmt: skip
    return entry / "model"


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
    load: float | None  # 5-minute load average at the end: above the core count, other jobs shared the CPU
    commands: list[str]
    teacher_cached: bool
    environment: dict[str, str]


def stage_costs(recipe: Recipe, teacher_cached: bool) -> dict[str, float]:
    """Expected seconds per stage kind on the reference machine."""
    ref = REFERENCE_SECONDS
    questions = 3 * recipe.test_images
    student_steps = recipe.student_epochs * math.ceil(3 * recipe.student_images / recipe.student_batch)
    return {
        "data": ref["data per image"] * (recipe.train_images + recipe.test_images),
        "teacher": 0.0 if teacher_cached else ref["teacher per step"] * recipe.teacher_steps,
        "eval": ref["eval per question"] * questions,
        "build": ref["build per sample"] * 3 * recipe.student_images,
        "init": ref["student init"],
        "train": ref["student per step"] * student_steps,
        "figures": ref["figures"],
    }


def run_demo(
    out: str | Path, seeds: int = 10, quick: bool = False, ablation: bool = False, command: str = ""
) -> Results:
    torch.set_num_threads(1)  # see PINNED_NUMERICS; the CPU-kind pins only act before torch loads
    quiet_libraries()
    recipe = QUICK if quick else Recipe()
    variants = dict(VARIANTS) if ablation else {name: VARIANTS[name] for name in HEADLINE}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "commands.log").unlink(missing_ok=True)
    run = Runner(out / "commands.log")
    cached = (teacher_dir(recipe) / "model" / "alignkd_train.json").exists()
    stage = Stages(recipe, cached, len(variants), seeds, out)
    start = time.perf_counter()
    data_dir = out / "data"
    data = stage("data", build_data, recipe, data_dir)
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
    cache = build_teacher_cache(stage, run, recipe, teacher, data, out)
    students = train_students(stage, run, recipe, variants, seeds, teacher, cache, data, out)
    draw_attention(stage, run, cache, data, out)
    stage.progress.close()
    stage.seconds["total"] = time.perf_counter() - start
    results = Results(
        command=command or f"alignkd-demo --out {out} --seeds {seeds}" + (" --quick" if quick else ""),
        recipe=recipe,
        seeds=list(range(seeds)),
        teacher=teacher_scores,
        baseline=majority_baseline(data["train"], data["test"]),
        students=students,
        params={"teacher": _count_params(teacher), "student": _count_params(out / "students" / "init-s0")},
        seconds=stage.seconds,
        load=os.getloadavg()[1] if hasattr(os, "getloadavg") else None,
        commands=run.commands,
        teacher_cached=cached,
        environment=environment(),
    )
    from alignkd_cache.demo.report import write_report

    write_report(results, out)
    return results


class Stages:
    """Runs the demo's stages, timing each kind (the first word of its name) and moving the one
    weighted progress display; announces the plan and its expected duration first."""

    def __init__(self, recipe: Recipe, cached: bool, variants: int, seeds: int, out: Path):
        cost = stage_costs(recipe, cached)
        plan = (
            ["data", "teacher", "eval", "build"]
            + (["init"] + ["train", "eval"] * variants) * seeds
            + ["figures"]
        )
        print(
            f"alignkd-demo: {'reuse the cached' if cached else 'train a'} teacher, build its cache, train "
            f"{variants} student variant(s) x {seeds} seed(s) and evaluate them; about "
            f"{math.ceil(sum(cost[k] for k in plan) / 60)} min on 2 cores. Commands' output: {out}/commands.log",
            flush=True,
        )
        self.progress = StageProgress([cost[k] for k in plan], "alignkd-demo")
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, fn: Callable, *args):
        start = time.perf_counter()
        result = fn(*args)
        key = name.split(" ")[0]
        self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start
        self.progress.stage_done(name)
        return result


def build_teacher_cache(stage: Stages, run, recipe, teacher, data, out: Path) -> Path:
    """`alignkd-cache build` with the demo's teacher over the students' training set."""
    data_dir = out / "data"
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
    return cache


def draw_attention(stage: Stages, run, cache: Path, data, out: Path) -> None:
    """`alignkd-cache show` on the first "position" question: the README's attention figure."""
    data_dir = out / "data"
    heat_sample = next(r["id"] for r in json.loads(data["student"].read_text()) if r["kind"] == "position")
    stage(
        "figures",
        run,
        "alignkd-cache",
        cache_cli(),
        ["show", str(cache), "--sample", heat_sample, "--image-root", str(data_dir),
         "--out", str(_mkdir(out / "figures") / "demo-attention.png")],
    )  # fmt: skip


def train_students(stage: Stages, run, recipe, variants: dict, seeds: int, teacher, cache, data, out) -> dict:
    """Every variant from each seed's student init, from the cache, then evaluated: name -> scores per seed."""
    data_dir = out / "data"
    students: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for seed in range(seeds):
        init = stage(
            f"init s{seed}", build_student_init, recipe, teacher, out / "students" / f"init-s{seed}", seed
        )
        for name, weights in variants.items():
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
            scores = stage(
                f"eval {name} s{seed}",
                evaluate,
                run_dir,
                data["test"],
                data_dir,
                run_dir,
                recipe.template,
                run,
            )
            students[name].append(scores)
    return students


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


def code_sha256() -> str:
    """Hash of the package's Python source, commands included: a change to any of it retrains the
    teacher, except in the files that only present results."""
    from alignkd_cache import cli

    digest = hashlib.sha256()
    for root in (Path(alignkd_cache.__file__).parent, Path(cli.__file__).parent):
        for path in sorted(root.rglob("*.py")):
            name = f"{root.name}/{path.relative_to(root).as_posix()}"
            if name not in PRESENTATION_ONLY:
                digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def environment() -> dict[str, str]:
    """What the numbers depend on beyond the code: library versions and how CPU math runs."""
    import importlib.metadata

    versions = {
        name: importlib.metadata.version(name)
        for name in ("transformers", "tokenizers", "numpy", "zarr", "scikit-learn")
    }
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        **versions,
        "cpu": f"{_cpu_model()} ({platform.machine()}, {os.cpu_count()} cores)",
        "torch threads": str(torch.get_num_threads()),
        "torch cpu kernels": torch.backends.cpu.get_cpu_capability(),
        **{name: os.environ.get(name, "unset") for name in PINNED_NUMERICS},
    }


def _cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"
