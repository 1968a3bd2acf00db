"""LoRA students (PEFT): what trains, resume, PEFT's adapter format and --merge."""

import json

import peft  # the test extra installs it: a missing one must fail, not skip
import pytest
import torch
from run_logs import metrics, untimed
from safetensors.torch import load_file
from test_train import torchrun_from_cache

from alignkd_cache.backends import load_backend
from alignkd_cache.lora import LORA_DIR, lora_record, parse_lora
from alignkd_cache.losses import LossConfig, parse_weights
from alignkd_cache.train import TrainOptions, from_cache, online

LORA = "r=4,alpha=8,targets=q_proj+v_proj"


def options(out, **kw):
    fields = {"lr": 1e-2, "batch_size": 2, "max_steps": 3, "progress": False, "lora": lora_record(LORA), **kw}
    return TrainOptions(out=str(out), loss=LossConfig(parse_weights("")), **fields)


def test_parse_lora_names_a_bad_item():
    assert parse_lora("r=4,targets=q_proj+v_proj").targets == ("q_proj", "v_proj")
    with pytest.raises(ValueError, match="bad --lora item 'rank=4'"):
        parse_lora("rank=4")


@pytest.mark.slow
def test_lora_from_cache_resumes_bit_identically_and_merges_to_a_plain_student(
    tmp_path, llava_student_dir, llava_cache, digits_dataset
):
    root = digits_dataset[1]
    from_cache(str(llava_student_dir), str(llava_cache), root, options(tmp_path / "straight", merge=True))
    from_cache(
        str(llava_student_dir),
        str(llava_cache),
        root,
        options(tmp_path / "resumed", stop_after=2, merge=True),
    )
    from_cache(
        str(llava_student_dir),
        str(llava_cache),
        root,
        options(tmp_path / "resumed", resume=True, merge=True),
    )
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert [untimed(r) for r in metrics(straight)] == [untimed(r) for r in metrics(resumed)]
    adapter = straight / LORA_DIR / "adapter_model.safetensors"
    assert adapter.read_bytes() == (resumed / LORA_DIR / "adapter_model.safetensors").read_bytes()

    # The merged student is a plain checkpoint the student's loader reads; only the LoRA targets
    # and the projector moved, and PEFT's own loader on the saved adapter gives the same weights.
    merged, before = load_backend(straight), load_backend(llava_student_dir)
    changed = {
        n for n, p in merged.model.named_parameters() if not torch.equal(p, before.model.get_parameter(n))
    }
    assert changed and all(("q_proj" in n or "v_proj" in n or "multi_modal_projector" in n) for n in changed)
    assert any("q_proj" in n for n in changed) and any("multi_modal_projector" in n for n in changed)
    config = json.loads((straight / LORA_DIR / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    via_peft = peft.PeftModel.from_pretrained(before.model, str(straight / LORA_DIR)).merge_and_unload()
    for name, p in merged.model.named_parameters():
        torch.testing.assert_close(via_peft.get_parameter(name), p, rtol=1e-5, atol=1e-6)


def test_merge_without_lora_is_a_usage_error(tmp_path, llava_student_dir, llava_cache):
    from click.testing import CliRunner

    from alignkd_cache.cli.train import main

    args = ["from-cache", "--student", str(llava_student_dir), "--cache", str(llava_cache)]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "run"), "--merge"])
    assert result.exit_code == 2 and "--merge merges a LoRA adapter: add --lora" in result.output


@pytest.mark.slow
def test_lora_online_writes_the_adapter_and_no_full_student_without_merge(
    tmp_path, llava_teacher_dir, llava_student_dir, digits_dataset
):
    data, root = digits_dataset
    out = tmp_path / "online"
    online(str(llava_teacher_dir), str(llava_student_dir), data, root, options(out, max_steps=1))
    assert (out / LORA_DIR / "adapter_model.safetensors").is_file() and not (out / "config.json").exists()
    assert metrics(out)[0]["signals_route"] == "online" and metrics(out)[0]["attn"] > 0


@pytest.mark.slow
def test_lora_under_ddp_equals_one_process_accumulating(
    tmp_path, llava_student_dir, llava_cache, digits_dataset
):
    """Two gloo ranks (torchrun, the CLI's --lora) give one process's --grad-accum 2 step: the same
    losses and the same LoRA adapter."""
    root = digits_dataset[1]
    one, ranks = tmp_path / "one", tmp_path / "ranks"
    from_cache(str(llava_student_dir), str(llava_cache), root, options(one, grad_accum=2, max_steps=2))
    torchrun_from_cache(
        llava_student_dir, llava_cache, root, ranks, "--lora", LORA, "--lr", "1e-2", "--max-steps", "2"
    )
    for x, y in zip(metrics(one), metrics(ranks), strict=True):
        for key in ("loss", "ce", "logit", "vis", "attn", "lr"):
            assert x[key] == pytest.approx(y[key], rel=1e-5), key
    mine = load_file(str(one / LORA_DIR / "adapter_model.safetensors"))
    theirs = load_file(str(ranks / LORA_DIR / "adapter_model.safetensors"))
    assert set(mine) == set(theirs)
    for name, value in mine.items():
        torch.testing.assert_close(theirs[name], value, rtol=0, atol=1e-5, msg=name)
