"""The build's pre-flight report, and the record and image checks it is made of."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from alignkd_cache.cli.cache import main
from alignkd_cache.data import DataError, Problem, read_entries, read_records
from alignkd_cache.images import DECODE_SIDE, ImageError, check_image, load_image

CLIP_PAD = (122, 116, 104)  # the CLIP processor's mean as a fill colour; any colour serves these tests


def turn(question="<image>\nWhich digit?", answer="It is 3"):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def png_header_only(path, width: int, height: int) -> None:
    """A PNG that declares width x height and holds no pixel data: only a header read can accept it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))


@pytest.fixture
def messy(tmp_path, digits_dataset):
    """A dataset with one of each problem among good samples, as JSONL."""
    _, root = digits_dataset
    png_header_only(root / "bomb.png", 20000, 20000)  # 400 Mpixels
    (root / "broken.png").write_bytes(b"not a png")
    good = lambda i: {"id": f"ok-{i}", "image": f"images/digit_{i}.png", "conversations": turn()}  # noqa: E731
    rows = [
        good(0),
        {"id": 7, "image": "images/digit_1.png", "conversations": turn()},
        {"id": None, "conversations": turn("Hi", "Hello")},
        {"id": "gone-1", "image": "images/missing_1.png", "conversations": turn()},
        good(2),
        {"id": "gone-2", "image": "images/missing_2.png", "conversations": turn()},
        {"id": "bomb", "image": "bomb.png", "conversations": turn()},
        {"id": "broken", "image": "broken.png", "conversations": turn()},
        {"id": "twice", "image": "images/digit_3.png", "conversations": turn(answer="<image> it is 3")},
        good(4),
    ]
    path = tmp_path / "messy.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{oops\n")
    return path, root


EXPECTED = {
    "missing image": 2,
    "bad id": 2,
    "image too large": 1,
    "unreadable image": 1,
    "image marker in answer": 1,
    "malformed JSON": 1,
}


def test_build_reports_every_problem_before_the_teacher_loads(messy, tmp_path):
    """The teacher path does not exist: reaching it would fail differently, so the report came first."""
    data, root = messy
    report = tmp_path / "report.json"
    args = ["build", "--teacher", str(tmp_path / "no-teacher"), "--data", str(data), "--image-root", str(root),
            "--out", str(tmp_path / "c.zarr"), "--report", str(report)]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 3, result.output
    assert "no-teacher" not in result.output
    assert "pre-flight: 11 records, 8 with problems" in result.output
    for reason, n in EXPECTED.items():
        assert f"  {reason}: {n}" in result.output
    assert f"{data}:2: sample #1 has id 7 (int); ids must be strings" in result.output
    assert f"{data}:4: sample 'gone-1': image file" in result.output
    assert "bomb.png is over 179 Mpixels" in result.output
    assert "<image> in an answer (turn 1)" in result.output
    assert result.output.strip().splitlines()[-1].startswith("Error: pre-flight found 8 bad sample(s)")
    listed = json.loads(report.read_text())
    assert listed["counts"] == EXPECTED
    assert [p["where"] for p in listed["problems"]] == [
        f"{data}:{line}" for line in (2, 3, 4, 6, 7, 8, 9, 11)
    ]
    assert not (tmp_path / "c.zarr").exists()


def test_skip_builds_the_rest_and_records_each_skip_with_its_reason(messy, tmp_path, llava_teacher_dir):
    data, root = messy
    out = tmp_path / "c.zarr"
    args = ["build", "--teacher", str(llava_teacher_dir), "--data", str(data), "--image-root", str(root),
            "--out", str(out), "--on-bad-sample", "skip", "--topk", "4"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "3 written, 8 skipped" in result.output
    assert (tmp_path / "c.zarr.preflight.json").is_file()
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert [r["status"] for r in manifest] == ["written", *["skipped"] * 3, "written", *["skipped"] * 4, "written",
                                               "skipped"]  # fmt: skip
    by_id = {r["id"]: r["skip_reason"] for r in manifest}
    assert {r["id"]: r["images"] for r in manifest}["gone-2"] == ["images/missing_2.png"]
    assert by_id["gone-1"].startswith("missing image: ") and "missing_1.png" in by_id["gone-1"]
    assert by_id[f"{data}:2"].startswith("bad id: ")  # no usable id: named by its line
    assert by_id["bomb"].startswith("image too large: ")
    info = CliRunner().invoke(main, ["info", str(out), "--json"])
    assert json.loads(info.output)["skipped"] == EXPECTED
    assert (
        "skipped: bad id 2, missing image 2, image too large 1"
        in CliRunner().invoke(main, ["info", str(out)]).output
    )
    assert CliRunner().invoke(main, ["verify", str(out)]).exit_code == 0
    assert not (out / "parts").exists()  # finalize leaves no empty parts/ behind


def test_records_accept_a_bom_and_name_utf16_and_bad_ids(tmp_path):
    rows = [{"id": "a", "conversations": turn("Hi", "Hello")}]
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows, indent=1).encode())
    assert [r.id for r in read_records(bom)] == ["a"]
    utf16 = tmp_path / "utf16.json"
    utf16.write_text(json.dumps(rows), encoding="utf-16")
    with pytest.raises(DataError, match="utf16.json: the file is UTF-16.*save it as UTF-8"):
        read_records(utf16)
    utf16.write_bytes(json.dumps(rows).encode("utf-16-le"))  # no byte-order mark
    with pytest.raises(DataError, match="utf16.json: the file is UTF-16"):
        read_records(utf16)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps(rows[0]).encode() + b"\n" + '{"id": "é"}'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.jsonl:2: not valid UTF-8 \(byte 0xe9"):
        read_records(latin)
    numbered = tmp_path / "ids.json"
    numbered.write_text(json.dumps([rows[0], {"id": None, "conversations": turn("a", "b")}]))
    with pytest.raises(
        DataError, match=r"ids.json\[1\]: sample #1 has id null \(NoneType\); ids must be strings"
    ):
        read_records(numbered)
    assert isinstance(read_entries(numbered)[1], Problem)


def test_image_marker_in_an_answer_is_refused_naming_the_sample(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"id": "s1", "image": "a.png", "conversations": turn("Q", "<image>A")}]))
    with pytest.raises(DataError, match="sample 's1' has <image> in an answer"):
        read_records(path)


def test_a_decompression_bomb_is_refused_from_its_header(tmp_path):
    bomb = tmp_path / "bomb.png"
    png_header_only(bomb, 12000, 10000)
    with pytest.raises(
        ImageError, match="sample 'b': image .*bomb.png is 12000x10000 = 120 Mpixels, over the"
    ):
        check_image(bomb, "b", max_pixels=100_000_000)
    assert check_image(bomb, "b") == (12000, 10000)  # the header alone was read: there are no pixels
    with pytest.raises(ImageError, match="sample 'b': image .*bomb.png is unreadable"):
        load_image(bomb, "b", CLIP_PAD)  # decoding it is a per-sample error, not a PIL traceback
    png_header_only(bomb, 20000, 20000)
    with pytest.raises(ImageError, match="bomb.png is over 179 Mpixels") as e:
        check_image(bomb, "b", max_pixels=10**12)
    assert e.value.reason == "image too large"


def test_sixteen_bit_png_keeps_its_grey_levels(tmp_path):
    ramp = np.tile(np.arange(0, 65536, 257, dtype=np.uint16), (4, 1))  # 256 grey levels
    Image.fromarray(ramp).save(tmp_path / "g.png")
    with Image.open(tmp_path / "g.png") as raw:
        assert raw.mode == "I;16"
    image, _ = load_image(tmp_path / "g.png", "g", CLIP_PAD)
    pixels = np.asarray(image)[:, :, 0]
    centre = pixels[(256 - 4) // 2]  # a row of the original inside the square padding
    assert (centre == np.arange(256)).all()


def test_huge_images_are_shrunk_while_decoding(tmp_path):
    side = 2 * DECODE_SIDE + 100
    Image.new("RGB", (side, side // 2), (200, 30, 60)).save(tmp_path / "wide.png")
    Image.new("RGB", (side, side), (10, 200, 30)).save(tmp_path / "big.jpg", quality=95)
    wide, _ = load_image(tmp_path / "wide.png", "w", CLIP_PAD)
    assert wide.size == (side // 2, side // 2)  # reduced by 2, then padded to a square
    big, _ = load_image(tmp_path / "big.jpg", "j", CLIP_PAD)
    assert big.size == (side // 2, side // 2)  # JPEG: decoded at half scale (draft)
    assert np.abs(np.asarray(big).astype(int) - (10, 200, 30)).max() <= 3
