"""The alignkd-cache commands end to end on a real tiny-teacher cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from alignkd_cache.cli.cache import main


@pytest.fixture(scope="module")
def built(cli_built_cache):
    return cli_built_cache


def test_info_reports_counts_provenance_and_ratios(built):
    out, _, _ = built
    result = CliRunner().invoke(main, ["info", str(out), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["counts"]["written"] == 10
    assert info["provenance"]["teacher"]["weights_sha256"]
    assert info["encodings"]["attention"] == "sqrt_u8"
    for signal in ("attention", "visual", "logits"):
        assert info["signals"][signal]["bytes_per_sample"] > 0 and info["signals"][signal]["ratio"] > 0
    text = CliRunner().invoke(main, ["info", str(out)]).output
    assert "ratio" in text and "tokenizer_sha256" in text


def test_build_refuses_non_empty_out_without_resume(built):
    _, _, args = built
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 4 and "not empty" in result.output


def test_verify_exit_codes(built, tmp_path):
    out, _, _ = built
    assert CliRunner().invoke(main, ["verify", str(out)]).exit_code == 0
    damaged = tmp_path / "d.zarr"
    import shutil

    shutil.copytree(out, damaged)
    chunk = damaged / "blocks/b000000/logit_values/c/0/0"
    data = bytearray(chunk.read_bytes())
    data[2] ^= 0x04
    chunk.write_bytes(bytes(data))
    result = CliRunner().invoke(main, ["verify", str(damaged)])
    assert result.exit_code == 1
    assert "bad sample 'digit-0'" in result.output and "FAILED" in result.output


def test_merge_refusal_names_the_field(built, llava_teacher_dir, digits_dataset, tmp_path):
    out, root, args = built
    other = tmp_path / "o.zarr"
    args = [a if a != str(out) else str(other) for a in args]
    args[args.index("--topk") + 1] = "4"
    assert CliRunner().invoke(main, args).exit_code == 0
    result = CliRunner().invoke(main, ["merge", str(out), str(other), "--out", str(tmp_path / "m.zarr")])
    assert result.exit_code == 4 and "options.topk" in result.output


def test_show_draws_a_heatmap(built, tmp_path):
    out, root, _ = built
    png = tmp_path / "a.png"
    result = CliRunner().invoke(main, ["show", str(out), "--sample", "digit-1", "--image-root", str(root),
                                       "--head", "1", "--tokens", "0:3", "--out", str(png)])  # fmt: skip
    assert result.exit_code == 0, result.output
    with Image.open(png) as image:
        assert image.size[0] > 400
    bad = CliRunner().invoke(
        main, ["show", str(out), "--sample", "text-0", "--image-root", str(root), "--out", str(png)]
    )
    assert bad.exit_code == 3 and "no image" in bad.output
    assert Path(png).exists()
