"""The data layer: templates, positions V/T/P on a real (offline-trained) tokenizer, batching, bad input."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from alignkd_cache.data import (
    IGNORE_INDEX,
    V1_SYSTEM,
    DataError,
    SampleDataset,
    Tokenization,
    collate,
    read_records,
    resolve_image,
    tokenize,
    tokenize_all,
)
from alignkd_cache.images import ImageError, image_key, load_image, pad_to_square
from alignkd_cache.tiny import build_tokenizer

IMAGE_TOKEN = 999
N_V = 6


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def write_json(path, items):
    path.write_text(json.dumps(items))
    return path


def record_file(tmp_path, *items):
    return read_records(write_json(tmp_path / "data.json", list(items)))


def vqa(sid="s1", image="a.png", q="<image>\nWhich digit is top-left?", a="7"):
    item = {"id": sid, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
    if image is not None:
        item["image"] = image
    return item


def tok_for(tokenizer, template, max_length=2048):
    return Tokenization(tokenizer, template, IMAGE_TOKEN, N_V, max_length=max_length)


def decode(tokenizer, ids):
    return tokenizer.decode([i for i in ids if i != IMAGE_TOKEN], skip_special_tokens=False)


@pytest.mark.parametrize("template", ["plain", "v1", "chat"])
def test_positions_follow_the_spliced_image(tmp_path, tokenizer, template):
    (record,) = record_file(tmp_path, vqa())
    s = tokenize(record, tok_for(tokenizer, template))
    ids = s.input_ids
    V, T, P = s.visual_positions, s.query_positions, s.supervised_positions
    assert [ids[v] for v in V] == [IMAGE_TOKEN] * N_V
    assert IMAGE_TOKEN not in [ids[i] for i in range(len(ids)) if i not in V]
    assert list(range(V[-1] + 1, len(ids))) == T
    # Supervised targets decode to the answer (plus the template's terminator), nothing else.
    answer = decode(tokenizer, [ids[p + 1] for p in P])
    assert answer.strip().startswith("7")
    assert all(s.labels[p + 1] == ids[p + 1] for p in P)
    assert sum(label != IGNORE_INDEX for label in s.labels) == len(P)
    assert ids[0] == tokenizer.bos_token_id


def test_plain_puts_the_image_right_after_bos_and_supervises_the_caption(tmp_path, tokenizer):
    (record,) = record_file(tmp_path, vqa(q="<image>", a="a grid of digits"))
    s = tokenize(record, tok_for(tokenizer, "plain"))
    assert s.visual_positions[0] == 1
    assert decode(tokenizer, [s.input_ids[p + 1] for p in s.supervised_positions]) == "a grid of digits\n"


def test_v1_puts_the_system_prompt_before_the_image(tmp_path, tokenizer):
    (record,) = record_file(tmp_path, vqa(q="Which digit is top-left?\n<image>"))
    s = tokenize(record, tok_for(tokenizer, "v1"))
    prefix = decode(tokenizer, s.input_ids[1 : s.visual_positions[0]])
    assert prefix == V1_SYSTEM + " USER: "
    assert s.visual_positions[0] > 20  # the image is far from index 1 under v1
    text = decode(tokenizer, s.input_ids[s.visual_positions[0] + N_V :])
    assert text == "\nWhich digit is top-left? ASSISTANT: 7</s>"
    assert decode(tokenizer, [s.input_ids[p + 1] for p in s.supervised_positions]) == " 7</s>"


def test_multi_turn_v1_supervises_every_answer_and_no_question(tmp_path, tokenizer):
    item = vqa()
    item["conversations"] += [{"from": "human", "value": "And top-right?"}, {"from": "gpt", "value": "3"}]
    (record,) = record_file(tmp_path, item)
    s = tokenize(record, tok_for(tokenizer, "v1"))
    assert decode(tokenizer, [s.input_ids[p + 1] for p in s.supervised_positions]) == " 7</s> 3</s>"


def test_text_only_sample_has_no_visual_or_text_query_positions(tmp_path, tokenizer):
    (record,) = record_file(tmp_path, vqa(image=None, q="What is two plus two?", a="4"))
    s = tokenize(record, tok_for(tokenizer, "v1"))
    assert s.visual_positions == [] and s.query_positions == [] and s.num_visual == ()
    assert IMAGE_TOKEN not in s.input_ids
    assert s.supervised_positions


def test_too_long_samples_are_skipped_with_a_reason_or_refused(tmp_path, tokenizer):
    records = record_file(tmp_path, vqa("short"), vqa("long", a="seven " * 200))
    samples, skips = tokenize_all(records, tok_for(tokenizer, "v1", max_length=120))
    assert [s.id for s in samples] == ["short"]
    assert [k.id for k in skips] == ["long"] and "max length 120" in skips[0].reason
    with pytest.raises(DataError, match="'long'.*max length"):
        tokenize_all(records, tok_for(tokenizer, "v1", max_length=120), on_too_long="error")


def digit_png(path, value=7, size=(24, 16)):
    from sklearn.datasets import load_digits

    digits = load_digits()
    scan = digits.images[list(digits.target).index(value)]
    pixels = (scan / 16 * 255).astype(np.uint8)
    Image.fromarray(pixels).resize(size).save(path)
    return path


CLIP_PAD = (122, 116, 104)  # int(255 * x) for CLIP's image_mean (0.4815, 0.4578, 0.4082)


def test_images_are_padded_to_a_centred_square_with_the_given_colour(tmp_path):
    image, key = load_image(digit_png(tmp_path / "d.png"), "s1", CLIP_PAD)
    assert image.size == (24, 24) and image.mode == "RGB"
    arr = np.asarray(image)
    assert (arr[:4] == CLIP_PAD).all() and (arr[20:] == CLIP_PAD).all()  # not the image's own mean
    original = np.asarray(Image.open(tmp_path / "d.png").convert("RGB"))
    assert np.array_equal(arr[4:20], original)
    assert key == image_key(pad_to_square(Image.open(tmp_path / "d.png").convert("RGB"), CLIP_PAD))
    _, other_key = load_image(digit_png(tmp_path / "e.png", value=3), "s2", CLIP_PAD)
    assert other_key != key
    # The key is defined on the padded pixels, so it names the padding colour too.
    assert load_image(tmp_path / "d.png", "s1", (0, 0, 0))[1] != key


def test_batches_equal_samples_one_at_a_time(tmp_path, tokenizer):
    digit_png(tmp_path / "a.png")
    records = record_file(
        tmp_path, vqa("s1"), vqa("s2", image=None, q="Say hi", a="hi there friend"), vqa("s3", a="3")
    )
    samples, _ = tokenize_all(records, tok_for(tokenizer, "v1"))
    preprocess = lambda im: torch.from_numpy(np.asarray(im.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1)  # noqa: E731
    ds = SampleDataset(samples, tmp_path, preprocess, tokenizer.pad_token_id, CLIP_PAD)
    batch = ds.collate([ds[i] for i in range(3)])
    assert batch.image_index == [[0], [], [1]]
    for i in range(3):
        one = ds.collate([ds[i]])
        n = len(samples[i].input_ids)
        assert torch.equal(batch.input_ids[i, :n], one.input_ids[0])
        assert torch.equal(batch.labels[i, :n], one.labels[0])
        assert (batch.labels[i, n:] == IGNORE_INDEX).all() and (batch.attention_mask[i, n:] == 0).all()
        assert (batch.input_ids[i, n:] == tokenizer.pad_token_id).all()
        for field in ("visual_positions", "query_positions", "supervised_positions"):
            assert torch.equal(getattr(batch, field)[i], getattr(one, field)[0])
        if one.pixel_values is not None:
            assert torch.equal(batch.pixel_values[batch.image_index[i][0]], one.pixel_values[0])
            assert batch.image_keys[i] == one.image_keys[0]


def test_collate_pads_to_the_longest_sample(tokenizer, tmp_path):
    records = record_file(
        tmp_path, vqa("a", image=None, q="hi", a="yes"), vqa("b", image=None, q="hi", a="seven eight nine")
    )
    samples, _ = tokenize_all(records, tok_for(tokenizer, "v1"))
    batch = collate(samples, [None, None], tokenizer.pad_token_id)
    assert batch.input_ids.shape == (2, max(len(s.input_ids) for s in samples))
    assert batch.pixel_values is None


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([vqa(q="Which digit?")], r"has 1 image\(s\) but 0 <image> marker\(s\)"),
        ([vqa(image=None)], r"has 0 image\(s\) but 1 <image> marker\(s\)"),
        ([vqa(q="<image> and <image>")], r"has 1 image\(s\) but 2 <image> marker\(s\)"),
        ([vqa(image=[])], "give a path or a list of paths"),
        ([{**vqa(), "video": "v.mp4"}], "videos are not supported"),
        ([{"id": "e", "conversations": []}], "'e' has an empty or missing conversation"),
        ([{"id": "r", "conversations": [{"from": "robot", "value": "hi"}]}], "'r' has a turn .*robot"),
        ([vqa("d"), vqa("d")], r"duplicate id 'd' \(first at"),
        ([{"conversations": [{"from": "human", "value": "hi"}]}], "sample has no 'id'"),
        ([{"id": "q", "conversations": [{"from": "human", "value": "hi"}]}], "'q' has no 'gpt' answer"),
    ],
)
def test_bad_records_are_refused_naming_the_sample(tmp_path, items, message):
    with pytest.raises(DataError, match=message):
        record_file(tmp_path, *items)


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(vqa("a")) + "\n" + json.dumps(vqa("b")) + "\n{not json\n")
    with pytest.raises(DataError, match=r"data.jsonl:3: malformed JSON"):
        read_records(path)


def test_malformed_json_list_names_the_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n{"id": "a",\n "conversations": [}\n]')
    with pytest.raises(DataError, match=r"data.json:3: malformed JSON"):
        read_records(path)


def test_missing_image_is_refused_before_any_compute(tmp_path):
    with pytest.raises(DataError, match="sample 's1': image file .*a.png is missing"):
        resolve_image(tmp_path, "a.png", "s1")


@pytest.mark.parametrize("rel", ["../outside.png", "/etc/passwd", "sub/../../x.png"])
def test_paths_escaping_the_image_root_are_refused(tmp_path, rel):
    with pytest.raises(DataError, match="escapes the image root"):
        resolve_image(tmp_path / "root", rel, "s1")


def test_symlink_out_of_the_root_is_refused(tmp_path):
    (tmp_path / "root").mkdir()
    digit_png(tmp_path / "secret.png")
    (tmp_path / "root" / "link.png").symlink_to(tmp_path / "secret.png")
    with pytest.raises(DataError, match="escapes the image root"):
        resolve_image(tmp_path / "root", "link.png", "s1")


def test_corrupt_image_is_refused_naming_the_sample(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ImageError, match="sample 's9': image .*bad.png is unreadable or corrupt"):
        load_image(tmp_path / "bad.png", "s9", CLIP_PAD)


def test_chat_template_needs_a_tokenizer_template(tmp_path, tokenizer):
    (record,) = record_file(tmp_path, vqa())
    bare = build_tokenizer()
    bare.chat_template = None
    with pytest.raises(DataError, match="needs a tokenizer with a chat_template"):
        tokenize(record, Tokenization(bare, "chat", IMAGE_TOKEN, N_V))
