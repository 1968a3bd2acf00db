"""The public API (docs/python-api.md): every listed name imports, and a loop built on it computes
what `alignkd-train from-cache` computes, step for step."""

import importlib
import json
import re
from pathlib import Path

import pytest
import torch
from run_logs import metrics

from alignkd_cache import api
from alignkd_cache.losses import TERMS, LossConfig, parse_weights
from alignkd_cache.train import TrainOptions, batch_plan, from_cache

DOC = Path(__file__).parents[1] / "docs" / "python-api.md"
STEP = {"batch_size": 2, "grad_accum": 2, "seed": 3}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, llava_student_dir, llava_cache, digits_dataset):
    """The first two steps' metrics of `alignkd-train from-cache` (lr 1e-3, no warmup), also
    reported to TensorBoard (OUT/tensorboard)."""
    out = tmp_path_factory.mktemp("api_reference") / "run"
    opts = TrainOptions(
        out=str(out), loss=LossConfig(parse_weights("")), lr=1e-3, max_steps=2, warmup_ratio=0,
        progress=False, report_to="tensorboard", **STEP,
    )  # fmt: skip
    from_cache(str(llava_student_dir), str(llava_cache), digits_dataset[1], opts)
    return metrics(out), out


def documented_names() -> list[str]:
    """The dotted names in the doc's contract section (its tables' first column)."""
    contract = DOC.read_text().split("## The contract", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `(alignkd_cache[\w.]*)`", contract, flags=re.M)


def test_every_documented_name_imports():
    names = documented_names()
    assert len(names) >= 15
    for dotted in names:
        module, _, name = dotted.rpartition(".")
        assert hasattr(importlib.import_module(module), name), dotted
    assert {n.rpartition(".")[2] for n in names if n.startswith("alignkd_cache.api.")} >= set(api.__all__)


def test_plan_sampler_gives_the_trainers_micro_batches_epoch_by_epoch():
    plan = batch_plan(10, 2, 2, 2, 5, 2)  # two ranks: the last step of each epoch is short
    sampler = api.PlanSampler(10, batch_size=2, grad_accum=2, world_size=2, seed=5)
    for epoch, steps in enumerate((plan[:2], plan[2:])):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert [order[i : i + 2] for i in range(0, 10, 2)] == [micro for step in steps for micro in step]


def test_open_cache_gives_info_signals_and_verify(llava_cache):
    opened = api.open_cache(str(llava_cache))
    assert len(opened) == 10 and opened.ids[0] == "digit-0"
    info = opened.info()
    assert info["counts"]["written"] == 10 and info["total"]["bytes_per_sample"] > 0
    signal = opened.signals("digit-0")
    assert isinstance(signal, api.TeacherSignal) and signal.attention.shape[0] == opened.attrs["num_heads"]
    assert opened.verify().ok


def test_a_loop_on_the_api_logs_what_alignkd_train_logs(
    llava_student_dir, llava_cache, digits_dataset, reference
):
    """Two optimizer steps of a plain loop: DataLoader + PlanSampler, step_counts, DistillationModel,
    AdamW with the trainer's settings; each step's terms equal metrics.jsonl's to 1e-6."""
    student = api.load_student(llava_student_dir)
    dataset = api.CacheDataset(str(llava_cache), student, digits_dataset[1])
    model = api.DistillationModel(
        student, api.AlignKDLoss.for_dataset(dataset, student, seed=STEP["seed"]), dataset
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0)
    sampler = api.PlanSampler(len(dataset), STEP["batch_size"], STEP["grad_accum"], seed=STEP["seed"])
    loader = iter(
        torch.utils.data.DataLoader(dataset, STEP["batch_size"], sampler=sampler, collate_fn=dataset.collate)
    )
    model.train()
    for expected in reference[0]:
        batches = [next(loader) for _ in range(STEP["grad_accum"])]
        norm = api.step_counts(batches)
        sums = dict.fromkeys(["loss", *TERMS], 0.0)
        for batch in batches:
            loss, terms = model(batch, norm)
            (loss * api.backward_scale()).backward()
            for name, value in {"loss": loss, **terms}.items():
                sums[name] += float(value.detach())
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad()
        for name, value in sums.items():
            assert value == pytest.approx(expected[name], abs=1e-6), (expected["step"], name)
    tower = [m for n, m in model.named_modules() if n.endswith("vision_tower")]
    assert tower and not tower[0].training  # frozen and in eval mode after model.train()


def test_capture_layer0_from_the_users_own_hf_forward(llava_student_dir, llava_cache, digits_dataset):
    """The student's own HF forward (LlavaForConditionalGeneration.__call__), captured, gives the
    slices and logits of the trainer's spliced forward, so AlignKDLoss gets the same terms."""
    student = api.load_student(llava_student_dir)
    dataset = api.CacheDataset(str(llava_cache), student, digits_dataset[1])
    batch = dataset.collate([dataset[i] for i in range(4)])
    with torch.no_grad():
        with api.capture_layer0(batch) as request:
            logits = student.model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                pixel_values=batch.pixel_values,
            ).logits
        ours = student.forward(batch.micro.student, capture=True)
    torch.testing.assert_close(logits, ours.logits, rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(request.slices, ours.attention, strict=True):
        assert (mine is None) == (theirs is None)
        if mine is not None:
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    loss = api.AlignKDLoss.for_dataset(dataset, student)
    signals = dataset.signals(batch, "cpu")
    own = api.VLMOutput(logits, request.slices, ours.visual)
    assert float(loss(own, batch, signals)[0].detach()) == pytest.approx(
        float(loss(ours, batch, signals)[0].detach()), abs=1e-6
    )


@pytest.mark.slow
@pytest.mark.parametrize("example", ["hf_trainer", "accelerate_loop"])
def test_example_first_step_equals_alignkd_train(
    tmp_path, monkeypatch, example, llava_student_dir, llava_cache, digits_dataset, reference
):
    """examples/ as a user runs them (in this process, to save the imports): the first optimizer
    step's terms are alignkd-train's to 1e-6."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "examples"))
    args = ["--student", str(llava_student_dir), "--cache", str(llava_cache), "--image-root"]
    args += [str(digits_dataset[1]), "--out", str(tmp_path), "--max-steps=2", "--cpu"]
    importlib.import_module(example).main(args + [f"--{k.replace('_', '-')}={v}" for k, v in STEP.items()])
    steps = [json.loads(line) for line in (tmp_path / "terms.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2]
    for name in ("loss", *TERMS):
        assert steps[0][name] == pytest.approx(reference[0][0][name], abs=1e-6), name
    assert api.load_student(tmp_path / "student").model.training is False


def test_report_to_tensorboard_logs_every_step_read_back_by_its_own_reader(reference):
    """alignkd-train --report-to tensorboard: the event files, read by TensorBoard's EventAccumulator,
    hold each step's terms as metrics.jsonl has them, the lr, the gradient norm, the throughput and
    the signals' share."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows, out = reference
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/lr", "grad_norm/total", "throughput/samples_per_s", "throughput/tokens_per_s"} <= tags
    assert {"signals/share", "signals/seconds"} <= tags
    for name in ("loss", *TERMS, "lr", "signals_share"):
        tag = {"lr": "train/lr", "signals_share": "signals/share"}.get(name, f"loss/{name}")
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        assert logged == [(r["step"], pytest.approx(r[name], rel=1e-6)) for r in rows], name
    norms = [e.value for e in events.Scalars("grad_norm/total")]
    assert len(norms) == 2 and all(n > 0 for n in norms)
