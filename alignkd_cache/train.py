"""The student trainer: one loop for both teacher-signal sources (cache or resident teacher).

Read top to bottom: options; which parameters train; the batch plan (a seeded permutation over
dataset order, so both sources see the same batches in the same order); the step (forward, the
shared losses normalised over the whole step, accumulation, DDP, AdamW, cosine schedule); the loop
and its log; checkpoints that resume exactly, written without pickle (safetensors + JSON); the
final output.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, load_model, save_file, save_model
from torch.nn.parallel import DistributedDataParallel

import alignkd_cache
from alignkd_cache import distributed
from alignkd_cache.distributed import World
from alignkd_cache.errors import OutputNotEmpty
from alignkd_cache.interrupt import interrupted, stop_requests
from alignkd_cache.lora import LoraOptions, add_lora, is_lora_model, lora_trainable, save_lora
from alignkd_cache.losses import (
    ADAPTER_ATTN_LOSSES,
    TERMS,
    ChannelAdapter,
    HeadAdapter,
    LossConfig,
    Normalisers,
    SampleCounts,
    total_loss,
)
from alignkd_cache.options import TrainOptions
from alignkd_cache.progress import progress_bar
from alignkd_cache.signal_spec import SignalOptions
from alignkd_cache.sources import TeacherSignalSource, TrainingSource
from alignkd_cache.store.lock import LOCK_NAME, lock_dir
from alignkd_cache.tracking import TensorBoardTracker, open_tracker, scalars

ADAPTERS_FILE = "alignkd_adapters.safetensors"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoint"
# Options that must match between a run and its --resume (the rest, like --stop-after, may change),
# and `run`: the student and the teacher signals it trains on.
RESUME_MUST_MATCH = (
    "run",
    "lr",
    "batch_size",
    "grad_accum",
    "epochs",
    "max_steps",
    "seed",
    "warmup_ratio",
    "weight_decay",
    "max_grad_norm",
    "freeze_adapters",
    "bf16",
    "loss",
    "lora",
)


# ---------------------------------------------------------------------------------------------
# What trains


def trainable_model_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The projector and the LLM; the vision tower stays frozen (as in LLaVA and MobileVLM finetuning)."""
    params = []
    lora = is_lora_model(model)  # then the LLM's own weights stay frozen too
    for name, p in model.named_parameters():
        p.requires_grad_("vision_tower" not in name and (not lora or lora_trainable(name)))
        if p.requires_grad:
            params.append(p)
    keep_vision_tower_in_eval(model)
    return params


def keep_vision_tower_in_eval(model: torch.nn.Module) -> None:
    for name, module in model.named_modules():
        if name.endswith("vision_tower"):
            module.eval()  # frozen: no dropout either


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Checkpoint the decoder layers of the outermost transformers model that is not the vision tower
    (LLaVA itself; MobileVLM's LLM), except layer 0: its attention slice is captured during the
    forward, and a recompute in backward would run outside the capture and save different tensors."""
    for name, module in model.named_modules():
        if hasattr(module, "activation_checkpointing_enable") and "vision_tower" not in name:
            module.activation_checkpointing_enable({"use_reentrant": False})
            break
    else:
        raise ValueError(
            f"{type(model).__name__} has no transformers model to enable gradient checkpointing on"
        )
    for name, module in model.named_modules():
        if name.endswith("layers.0") and "vision_tower" not in name:
            module.gradient_checkpointing = False


def build_adapters(
    cfg: LossConfig, teacher_heads: int, teacher_dim: int, student, seed: int
) -> torch.nn.ModuleDict:
    """The adapters the enabled terms use, seeded so every run (and source) starts from the same init."""
    torch.manual_seed(seed)
    adapters = torch.nn.ModuleDict()
    if cfg.on("attn") and cfg.attn_loss in ADAPTER_ATTN_LOSSES:
        adapters["attn"] = HeadAdapter(teacher_heads, student.num_heads)
    if cfg.on("vis"):
        adapters["vis"] = ChannelAdapter(teacher_dim, student.visual_dim)
    return adapters


# ---------------------------------------------------------------------------------------------
# The batch plan


def batch_plan(
    n: int, batch_size: int, grad_accum: int, world_size: int, seed: int, epochs: int
) -> list[list[list[int]]]:
    """Per optimizer step, the micro-batches (lists of dataset indices) of all ranks together.

    Each epoch is a permutation of range(n) seeded by (seed, epoch) alone, cut into optimizer steps
    of batch_size * grad_accum * world_size samples and those into micro-batches; rank r takes
    micro-batches r, r + world_size, ... The last step of an epoch may be smaller.
    """
    per_step = batch_size * grad_accum * world_size
    steps = []
    for epoch in range(epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
        for start in range(0, n, per_step):
            chunk = order[start : start + per_step]
            steps.append([chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)])
    return steps


def cosine_with_warmup(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


# ---------------------------------------------------------------------------------------------
# The loop


def step_normalisers(counts: SampleCounts, step: list[list[int]]) -> Normalisers:
    """The counts of a whole optimizer step (every micro-batch of every rank). They come from the batch
    plan and the per-sample counts, which every rank holds, so they need no all_reduce."""
    return counts.normalisers([i for micro in step for i in micro])


def run_identity(student, source) -> dict:
    """What a run trains, by content (paths may move): the student checkpoint and the teacher signals."""
    fp = student.fingerprint()
    return {
        "student": {k: fp[k] for k in ("config_sha256", "weights_sha256", "tokenizer_sha256")},
        "signals": source.identity(),
    }


class Trainee(torch.nn.Module):
    """The student's model and its loss adapters as one module whose forward is a micro-batch's
    losses, so that one DistributedDataParallel wraps everything that trains."""

    def __init__(
        self, student, adapters: torch.nn.ModuleDict, loss: LossConfig, autocast: torch.dtype | None
    ):
        super().__init__()
        self.model = student.model
        self.adapters = adapters
        self.student = student  # the Backend (not a module): its forward runs self.model
        self.loss = loss
        self.autocast = autocast

    def forward(self, micro, signals: list | None, norm: Normalisers | None):
        """(loss, terms) of one micro-batch; `micro` None (a rank with no micro-batch this step)
        gives a zero loss. Every trainable parameter is in the loss's graph, at zero weight where
        no term reached it: it gets a zero gradient (AdamW treats it the same whichever rank
        reached it), and DDP's gradient hooks fire for all of them. One element per tensor costs
        one zero-filled gradient, where find_unused_parameters=True would walk the graph each step
        and leave such gradients unset."""
        touch = 0.0 * sum(p.view(-1)[0] for p in self.parameters() if p.requires_grad)
        if micro is None:
            return touch, {}
        device = touch.device
        autocast = torch.autocast(device.type, dtype=self.autocast) if self.autocast else nullcontext()
        with autocast:
            output = self.student.forward(micro.student, capture=self.loss.on("attn"))
        loss, terms = total_loss(output, micro.student.to(device), signals, self.loss, self.adapters, norm)
        return loss + touch, terms


def train_step(
    trainee: Trainee | DistributedDataParallel,
    micros: Iterable,
    signals_of,
    norm: Normalisers | None,
    optimizer: torch.optim.Optimizer,
    scheduler=None,
    max_grad_norm: float | None = None,
    world: World | None = None,
    log_grad_norms: bool = False,
) -> dict:
    """One optimizer step over this rank's micro-batches (read one ahead): forward, the losses divided by `norm`
    (the step's global counts; None: each micro-batch's own), backward (synced over ranks on the
    last micro-batch only), clipping, AdamW, the schedule. `signals_of(micro)` gives a micro-batch's
    teacher signals (TeacherSignal per sample, or None); it runs outside the student's autocast, so a resident teacher runs exactly as
    the build ran it. Returns the step's terms summed over ranks, the lr used, and with
    `log_grad_norms` each term's gradient norm."""
    world = world or World()
    module = trainee.module if isinstance(trainee, DistributedDataParallel) else trainee
    model_params = [p for p in module.model.parameters() if p.requires_grad]
    logged = ["loss", *(t for t in TERMS if module.loss.on(t))]
    sums = dict.fromkeys(logged, 0.0)
    term_grads: dict[str, torch.Tensor] = {}
    signals_s = 0.0  # this rank's time getting teacher signals (a resident teacher or a recompute)
    for micro, last in with_last(micros):
        started = time.perf_counter()
        signals = None if micro is None else signals_of(micro)
        if world.device.type == "cuda":
            torch.cuda.synchronize(world.device)
        signals_s += time.perf_counter() - started
        with nullcontext() if last or module is trainee else trainee.no_sync():
            loss, terms = trainee(micro, signals, norm)
            if log_grad_norms:
                add_term_gradients(term_grads, terms, module.loss.weights, model_params)
            # DDP averages gradients over ranks; the terms are already divided by the step's global
            # counts, so the ranks' gradients must add up: scale by the world size.
            (loss * world.size).backward()
        for name, value in {"loss": loss, **terms}.items():
            sums[name] += float(value.detach())
    if world.size > 1:
        values = torch.tensor([sums[n] for n in logged], dtype=torch.float64, device=world.device)
        dist.all_reduce(values)
        sums = dict(zip(logged, values.tolist(), strict=True))
    result = {**sums, "lr": optimizer.param_groups[0]["lr"], "signals_s": signals_s}
    if log_grad_norms:
        result["grad_norm"] = term_gradient_norms(term_grads, logged[1:], model_params, world)
    # Clipping at inf leaves the gradients as they are and still gives the norm the trackers log.
    trainable = [p for p in module.parameters() if p.requires_grad]
    result["total_grad_norm"] = float(torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm or math.inf))
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return result


def with_last(items: Iterable) -> Iterator[tuple]:
    """(item, is it the last) pairs; (None, True) when there are no items, so that a rank with no
    micro-batch in a step still joins the step's gradient sync."""
    items = iter(items)
    current = next(items, None)
    for following in items:
        yield current, False
        current = following
    yield current, True


def source_signals(source, device):
    """micro-batch -> its teacher signals on `device`, or None for a source with no teacher."""
    if isinstance(source, TeacherSignalSource):
        return lambda micro: source.signals(micro, device)
    return lambda micro: None


def shut_down_workers(batches) -> None:
    """Stop a DataLoader iterator's worker processes now. Left to the garbage collector (an error's
    traceback keeps the iterator alive, so a later collection runs it), torch's shutdown waits its
    MP_STATUS_CHECK_INTERVAL (5 s) for each worker and then kills it."""
    shutdown = getattr(batches, "_shutdown_workers", None)  # the multi-process iterator's; idempotent
    if shutdown is not None:
        shutdown()


def train(student, source: TrainingSource, opts: TrainOptions) -> dict:
    """Train `student` (a Backend) on `source` (a sources.TrainingSource). Returns a summary."""
    world = distributed.init(opts.device)
    out = Path(opts.out)
    run = run_identity(student, source)  # before any step changes the student
    claiming = partial(claim_output, out, opts.resume) if world.main else None
    lock = world.agreed(f"to lock {out}", claiming)  # noqa: F841 - held until train() returns
    trainee, optimizer = setup_trainee(student, source, opts, world)
    plan = batch_plan(len(source), opts.batch_size, opts.grad_accum, world.size, opts.seed, opts.epochs)
    total = len(plan) if opts.max_steps is None else min(opts.max_steps, len(plan))
    if total == 0:
        raise ValueError("nothing to train on: the dataset is empty or --max-steps is 0")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(total, math.ceil(opts.warmup_ratio * total))
    )
    step = world.agreed(
        "to resume", partial(start_step, out, trainee, optimizer, scheduler, opts, world, run)
    )
    if opts.resume and world.main:
        print(f"resuming from step {step} of {total}", file=sys.stderr)
    # DDP after the resume: its construction broadcasts rank 0's (resumed) state to every rank.
    wrapped = DistributedDataParallel(trainee, forward_sync_buffers=False) if world.size > 1 else trainee
    end = total if opts.stop_after is None else min(total, step + opts.stop_after)

    # One loader over this rank's micro-batches from the resume point on; workers read ahead.
    mine = [indices for s in range(step, end) for indices in plan[s][world.rank :: world.size]]
    loader = iter(
        torch.utils.data.DataLoader(
            source, batch_sampler=mine, collate_fn=source.collate, num_workers=opts.num_workers
        )
    )
    if world.main:
        print(f"teacher signals: {source.route}", file=sys.stderr)
    tracker = open_tracker(opts.report_to if world.main else "none", out, step)
    loop = Loop(wrapped, trainee, loader, plan, end, source, optimizer, scheduler, opts, world, run, tracker)
    bar = progress_bar(total, "train", initial=step, unit="step", disable=not (opts.progress and world.main))
    with stop_requests() as stop:
        try:
            while step < end and not stop.agreed(world):
                step, loss = run_step(loop, step)
                bar.set_postfix(loss=f"{loss:.4f}")
                bar.update(1)
        finally:
            shut_down_workers(loader)
    bar.close()
    if tracker is not None:
        tracker.close()

    save_checkpoint(out / CHECKPOINT_DIR, trainee, optimizer, scheduler, opts, step, world, run)
    if stop.signum and step < end:
        raise interrupted(
            stop.signum, f"at step {step} of {total}", f"checkpoint saved in {out / CHECKPOINT_DIR}"
        )
    finished = step >= total
    if finished:
        save = partial(save_output, out, student, trainee.adapters, source, opts, step, run)
        world.agreed(f"to save the student into {out}", save if world.main else None)
    return {"steps": step, "total_steps": total, "finished": finished, "out": str(out)}


def claim_output(out: Path, resume: bool):
    """Lock --out for this run. Without --resume it must be new or empty, so that a finished run is
    never replaced nor a run's metrics appended to another's. A lock file alone is what a run that
    failed before its first step leaves."""
    if not resume and out.is_dir():
        entries = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME)
        if entries:
            shown = ", ".join(entries[:4]) + (f" and {len(entries) - 4} more" if len(entries) > 4 else "")
            raise OutputNotEmpty(
                f"{out} is not empty (it holds {shown}); pass --resume to continue the run there, "
                "or choose a new --out"
            )
    return lock_dir(out, "a training run")


@dataclass
class Loop:
    """What every step of one train() call works with."""

    wrapped: torch.nn.Module  # the trainee, in DDP under torchrun
    trainee: Trainee
    loader: Iterator
    plan: list[list[list[int]]]
    end: int  # the step this invocation stops at
    source: TrainingSource
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    opts: TrainOptions
    world: World
    run: dict  # run_identity(), recorded in checkpoints
    tracker: TensorBoardTracker | None  # tracking.open_tracker's


def run_step(loop: Loop, step: int) -> tuple[int, float]:
    """One optimizer step, its metrics line and a --save-every checkpoint: (the next step, its loss)."""
    world, opts, plan, source = loop.world, loop.opts, loop.plan, loop.source
    started = time.perf_counter()
    result = train_step(
        loop.wrapped,
        (next(loop.loader) for _ in plan[step][world.rank :: world.size]),
        source_signals(source, world.device),
        step_normalisers(source.counts, plan[step]),
        loop.optimizer,
        loop.scheduler,
        opts.max_grad_norm,
        world,
        opts.log_grad_norms,
    )
    step += 1
    out = Path(opts.out)
    if world.main:
        record = log_step(out / METRICS_FILE, step, result, time.perf_counter() - started, source.route)
    if world.main and loop.tracker is not None:  # the step's samples are made only for a tracker
        chosen = [source.samples[i] for micro in plan[step - 1] for i in micro]
        loop.tracker.log(step, scalars(record, result["total_grad_norm"], chosen))
    if opts.save_every and step % opts.save_every == 0 and step < loop.end:
        checkpoint = (loop.trainee, loop.optimizer, loop.scheduler, opts, step, world, loop.run)
        save_checkpoint(out / CHECKPOINT_DIR, *checkpoint)
    return step, result["loss"]


def setup_trainee(student, source, opts: TrainOptions, world: World) -> tuple[Trainee, torch.optim.Optimizer]:
    """The student on its device in train mode, its adapters, and AdamW over what trains."""
    student.model.to(world.device)
    torch.manual_seed(opts.seed)
    student.model.train()
    if opts.lora:
        add_lora(student.model, LoraOptions(**opts.lora))
    model_params = trainable_model_parameters(student.model)
    if opts.grad_checkpointing:
        enable_gradient_checkpointing(student.model)
    if isinstance(source, TeacherSignalSource):
        adapters = build_adapters(opts.loss, source.teacher_heads, source.teacher_dim, student, opts.seed)
    else:  # no teacher, so no distillation term and nothing to adapt
        adapters = torch.nn.ModuleDict()
    # Frozen adapters stay at their random init, as the public code's effectively do.
    adapters.to(world.device).requires_grad_(not opts.freeze_adapters)
    adapter_params = [] if opts.freeze_adapters else list(adapters.parameters())
    groups = [{"params": model_params}] + ([{"params": adapter_params}] if adapter_params else [])
    optimizer = torch.optim.AdamW(groups, lr=opts.lr, weight_decay=opts.weight_decay)
    trainee = Trainee(student, adapters, opts.loss, torch.bfloat16 if opts.bf16 else None)
    return trainee, optimizer


def start_step(
    out: Path, trainee: Trainee, optimizer, scheduler, opts: TrainOptions, world: World, run: dict
) -> int:
    """0, or with --resume the step of the checkpoint loaded; the metrics log is cut to match."""
    step = 0
    if opts.resume and latest_checkpoint(out / CHECKPOINT_DIR):
        step = load_checkpoint(out / CHECKPOINT_DIR, trainee, optimizer, scheduler, opts, world, run)
    elif opts.resume:
        print(f"--resume: no checkpoint in {out / CHECKPOINT_DIR}; starting from step 0")
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        keep_metrics_up_to(out / METRICS_FILE, step)
    return step


def log_step(path: Path, step: int, result: dict, seconds: float, route: str) -> dict:
    """One line of metrics.jsonl: the step's terms (None for terms that are off), its lr and time,
    and where the teacher signals came from with the share of the step they took (rank 0's)."""
    record = {
        "step": step,
        "loss": result["loss"],
        **{t: result.get(t) for t in TERMS},
        "lr": result["lr"],
        "seconds": seconds,  # data, teacher signals, forward/backward, update
        "signals_route": route,
        "signals_s": result["signals_s"],
        "signals_share": result["signals_s"] / seconds,
    }
    if "grad_norm" in result:
        record["grad_norm"] = result["grad_norm"]
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    return record


def add_term_gradients(
    sums: dict[str, torch.Tensor], terms: dict[str, torch.Tensor], weights: dict, params: list
) -> None:
    """Add each weighted term's gradient w.r.t. the student's parameters, flattened, to `sums`."""
    for name, value in terms.items():
        grads = torch.autograd.grad(
            weights[name] * value, params, retain_graph=True, allow_unused=True, materialize_grads=True
        )
        flat = torch.cat([g.flatten() for g in grads])
        sums[name] = sums[name] + flat if name in sums else flat


def term_gradient_norms(
    sums: dict[str, torch.Tensor], names: list[str], params: list, world: World
) -> dict[str, float]:
    """Each term's share of the step's gradient (before clipping), summed over ranks: its L2 norm
    over the student's trainable parameters (the adapters left out: they do not move the student)."""
    norms = {}
    for name in names:  # in the same order on every rank, zeros where a rank had no such term
        g = sums.get(name)
        if g is None:
            g = torch.zeros(sum(p.numel() for p in params), device=params[0].device)
        if world.size > 1:
            dist.all_reduce(g)
        norms[name] = float(g.norm())
    return norms


def keep_metrics_up_to(path: Path, step: int) -> None:
    """A resumed run continues the log from its checkpoint: later lines (from a run that went on
    past its last checkpoint) are dropped."""
    if not path.exists():
        return
    lines = [
        line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step
    ]
    path.write_text("".join(line + "\n" for line in lines))


# ---------------------------------------------------------------------------------------------
# Checkpoints: everything to resume exactly, and no pickle


def resume_mismatches(saved: dict, now: dict) -> list[str]:
    """Every RESUME_MUST_MATCH field (dotted, down into dicts) that differs: 'name (then -> now)'."""
    found: list[str] = []

    def visit(a, b, where):
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                visit(a.get(key), b.get(key), f"{where}.{key}")
        elif a != b:
            found.append(f"{where} ({_brief(a)} -> {_brief(b)})")

    for key in RESUME_MUST_MATCH:
        visit(saved.get(key), now.get(key), key)
    return found


def _brief(value) -> str:
    if value is None:
        return "not recorded"
    text = json.dumps(value, default=str)
    return text if len(text) <= 24 else text[:20] + "..."


def _options_record(opts: TrainOptions, run: dict) -> dict:
    """What a checkpoint and the output record of a run: its options, and `run` (run_identity,
    what --resume must find the same)."""
    return asdict(opts) | {"loss": asdict(opts.loss), "run": run}


def save_checkpoint(
    path: Path,
    trainee: Trainee,
    optimizer,
    scheduler,
    opts: TrainOptions,
    step: int,
    world: World,
    run: dict,
) -> None:
    """Rank 0 writes path.tmp fully (state.json last), then swaps it in, so a crash mid-write leaves
    the previous checkpoint; a crash between the two renames leaves both, and the newest is kept.
    Every rank returns once it is written, or raises if it could not be."""
    write = partial(
        _write_checkpoint, path, trainee, optimizer, scheduler, _options_record(opts, run), step, world.size
    )
    world.agreed(f"to save a checkpoint into {path}", write if world.main else None)


def _write_checkpoint(
    path: Path, trainee: Trainee, optimizer, scheduler, options: dict, step: int, world_size: int
):
    newest = latest_checkpoint(path)
    if newest is not None and newest != path:  # a save killed between its renames: promote its result
        shutil.rmtree(path, ignore_errors=True)
        newest.rename(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(trainee.model, str(tmp / "model.safetensors"))
    save_file(
        {k: v.contiguous() for k, v in trainee.adapters.state_dict().items()},
        str(tmp / "adapters.safetensors"),
    )
    tensors, state = _optimizer_tensors(optimizer)
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    record = {
        "step": step,
        "world_size": world_size,
        "options": options,
        "optimizer": state,
        "scheduler": scheduler.state_dict(),
    }
    (tmp / "state.json").write_text(json.dumps(record, indent=1, default=str))
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def _optimizer_tensors(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """AdamW state: per-parameter tensors to safetensors, the rest (hyper-parameters) to JSON."""
    sd = optimizer.state_dict()
    tensors = {}
    for index, state in sd["state"].items():
        for name, value in state.items():
            tensors[f"state.{index}.{name}"] = torch.as_tensor(value).contiguous()
    return tensors, {"param_groups": sd["param_groups"]}


def latest_checkpoint(path: Path) -> Path | None:
    """The newest complete checkpoint among `path` and a save's leftovers (path.tmp, path.old).
    state.json is written last, so a checkpoint whose state.json parses is complete."""
    steps = {}
    for candidate in (path, path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")):
        try:
            steps[candidate] = int(json.loads((candidate / "state.json").read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return max(steps, key=steps.get) if steps else None


def load_checkpoint(
    path: Path, trainee: Trainee, optimizer, scheduler, opts: TrainOptions, world: World, run: dict
) -> int:
    path = latest_checkpoint(path) or path
    record = json.loads((path / "state.json").read_text())
    changed = resume_mismatches(record["options"], _options_record(opts, run))
    if record["world_size"] != world.size:
        changed.append(f"world size ({record['world_size']} -> {world.size})")
    if changed:
        raise ValueError(
            f"--resume: {path} was written with different {', '.join(changed)}; resume with the same "
            "student, teacher signals and options, or start a new --out"
        )
    load_model(trainee.model, str(path / "model.safetensors"), device=str(world.device))
    trainee.adapters.load_state_dict(load_file(str(path / "adapters.safetensors"), device=str(world.device)))
    tensors = load_file(str(path / "optimizer.safetensors"))
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, index, name = key.split(".", 2)
            # Adam keeps `step` on the CPU; moments live with their parameter.
            state.setdefault(int(index), {})[name] = value if name == "step" else value.to(world.device)
    optimizer.load_state_dict({"state": state, "param_groups": record["optimizer"]["param_groups"]})
    scheduler.load_state_dict(record["scheduler"])
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return int(record["step"])


# ---------------------------------------------------------------------------------------------
# Output


def save_output(out: Path, student, adapters, source, opts: TrainOptions, step: int, run: dict) -> None:
    """The student as its backend saves it (load_backend loads it back), the adapters beside it."""
    student.model.eval()
    if opts.lora:
        save_lora(out, student, getattr(student, "model_id", None), opts.merge)
    if not opts.lora or opts.merge:
        student.save_pretrained(out)
    if len(adapters):
        metadata = {name: json.dumps(list(module.conv.weight.shape)) for name, module in adapters.items()}
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in adapters.state_dict().items()},
            str(out / ADAPTERS_FILE),
            metadata=metadata,
        )
    record = {
        "tool_version": alignkd_cache.__version__,
        "steps": step,
        "signals": source.describe(),
        "options": _options_record(opts, run),
    }
    (out / "alignkd_train.json").write_text(json.dumps(record, indent=1, default=str))


# ---------------------------------------------------------------------------------------------
# Entry points (the CLI calls these)


def open_for_job(cache: str, storage_options, world: World):
    """A CacheReader on every rank with one trust check per job: rank 0 checks, and the other ranks
    adopt its verdict (World.agreed) and only read the attributes and the manifest."""
    from alignkd_cache.store.reader import CacheReader

    check = partial(CacheReader, cache, storage_options) if world.main else None
    reader = world.agreed(f"to check the cache {cache}", check)
    return reader if world.main else CacheReader(cache, storage_options, checked=True)


def from_cache(
    student: str,
    cache,
    image_root,
    opts: TrainOptions,
    expect_template: str | None = None,
    storage_options=None,
) -> dict:
    """Distil from a cache (a path or URL, or a CacheReader from `open_for_job`, as the CLI's): the
    teacher never loads (a `layer0` cache loads its layer-0 stub). `expect_template` refuses a cache
    tokenized with another template; the cache's own template is the one used."""
    from alignkd_cache.backends import load_backend
    from alignkd_cache.sources import cache_source

    world = distributed.init(opts.device)
    reader = open_for_job(cache, storage_options, world) if isinstance(cache, str) else cache
    backend = load_backend(student, device=world.device)
    source = cache_source(reader, backend, image_root, expect_template, world.device)
    return train(backend, source, opts)


def online(
    teacher: str,
    student: str,
    data,
    image_root,
    opts: TrainOptions,
    signal_options=None,
    teacher_dtype: str = "float32",
) -> dict:
    """Distil with the teacher resident (eval mode, no grad), signals computed every step as the
    build computes them (`signal_options`: a signal_spec.SignalOptions)."""
    from alignkd_cache.backends import load_backend
    from alignkd_cache.sources import OnlineSource

    world = distributed.init(opts.device)
    teacher_backend = load_backend(teacher, dtype=getattr(torch, teacher_dtype), device=world.device)
    teacher_backend.model.eval().requires_grad_(False)
    backend = load_backend(student, device=world.device)
    source = OnlineSource(teacher_backend, backend, data, image_root, signal_options)
    for skip in source.skips:
        print(f"skipped sample {skip.id!r}: {skip.reason}")
    return train(backend, source, opts)


def finetune(
    model: str,
    data,
    image_root,
    opts: TrainOptions,
    signal_options: SignalOptions | None = None,
) -> dict:
    """Plain next-token fine-tuning, no teacher: the same loop with the cross-entropy term alone
    (`signal_options`: its template and max_length tokenize the data, as a build's would)."""
    from alignkd_cache.backends import load_backend
    from alignkd_cache.sources import DataSource

    distilled = [t for t in ("logit", "vis", "attn") if opts.loss.on(t)]
    if distilled:
        raise ValueError(
            f"finetune has no teacher, so the {', '.join(distilled)} term(s) cannot be on; "
            "use --weights ce=1,logit=0,vis=0,attn=0 (the default) or `alignkd-train from-cache`"
        )
    world = distributed.init(opts.device)
    backend = load_backend(model, device=world.device)
    source = DataSource(backend, data, image_root, signal_options)
    for skip in source.skips:
        print(f"skipped sample {skip.id!r}: {skip.reason}")
    return train(backend, source, opts)
