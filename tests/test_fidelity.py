"""Exactly what the real models see, checked against the official code on a real SentencePiece model.

The tokenizer is mistral-common's tokenizer.model.v1 (Mistral 7B v0.1: a LLaMA-family SentencePiece
BPE, 32000 pieces, byte fallback), laid out as MobileVLM V2 ships it: tokenizer.model +
tokenizer_config.json. The official data path is re-implemented in tests/official_mobilevlm.py;
tests/official_goldens.json pins what it gives with transformers 4.33.1's slow LlamaTokenizer
(the official `use_fast=False`), for `legacy` absent, true and false.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mistral_common
import numpy as np
import pytest
import sentencepiece as spm
import torch
from fidelity_cases import CASES, PLAIN_CASES, STRESS, tokenizer_config
from official_mobilevlm import IMAGE_TOKEN_INDEX, expand2square, preprocess_multimodal, preprocess_v1
from PIL import Image

from alignkd_cache.backends import load_backend
from alignkd_cache.backends.checkpoint import tokenizer_sha256
from alignkd_cache.backends.tokenizer import TokenizerLoadError, load_tokenizer
from alignkd_cache.build import preprocessing
from alignkd_cache.data import IGNORE_INDEX, SampleDataset, Tokenization, read_records, tokenize
from alignkd_cache.images import image_key, load_image
from alignkd_cache.sources import CompatibilityError, check_cache_matches
from alignkd_cache.store.provenance import (
    IncompatibleCache,
    check_mergeable,
    check_readable,
    check_resume,
)
from alignkd_cache.tiny import build_tiny_mobilevlm

SP_MODEL = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
GOLDENS = json.loads((Path(__file__).parent / "official_goldens.json").read_text())["legacy"]
LEGACY = ["absent", True, False]


@pytest.fixture(scope="module")
def sp_dirs(tmp_path_factory) -> dict:
    dirs = {}
    for legacy in LEGACY:
        d = tmp_path_factory.mktemp(f"sp-{legacy}")
        (d / "tokenizer.model").write_bytes(SP_MODEL.read_bytes())
        (d / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(legacy)))
        dirs[legacy] = d
    return dirs


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """A wide and a tall real digit scan."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("fidelity-images")
    digits = load_digits()
    for name, size, i in (("wide.png", (40, 24), 7), ("tall.png", (20, 36), 3)):
        pixels = (digits.images[i] * (255.0 / 16.0)).astype(np.uint8)
        Image.fromarray(pixels, mode="L").resize(size, Image.BILINEAR).convert("RGB").save(root / name)
    return root


def records(tmp_path, cases: dict):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"id": name, **case} for name, case in cases.items()], ensure_ascii=False))
    return {r.id: r for r in read_records(path)}


# --------------------------------------------------------------------------- the tokenizer


@pytest.mark.parametrize("legacy", LEGACY)
def test_sentencepiece_checkpoint_ids_equal_the_official_slow_tokenizer(sp_dirs, legacy):
    tok = load_tokenizer(sp_dirs[legacy])
    assert [tok(text)["input_ids"] for text in STRESS] == GOLDENS[str(legacy)]["stress"]


def test_legacy_differs_only_after_special_tokens(sp_dirs):
    legacy, new = load_tokenizer(sp_dirs[True]), load_tokenizer(sp_dirs[False])
    sp = spm.SentencePieceProcessor(model_file=str(SP_MODEL))
    after_eos = "7</s>USER: hi"
    assert sp.id_to_piece(legacy(after_eos)["input_ids"][4:6]) == ["▁US", "ER"]
    assert sp.id_to_piece(new(after_eos)["input_ids"][4]) == "USER"
    # Without special tokens both are SentencePiece itself (double spaces, newlines, bytes, digits).
    for text in ["a  b", "tab\there\n\nnew", "é ü 日本 ☃ 🦙 \u2028", "12345 3.14 -0", "  lead"]:
        assert legacy(text, add_special_tokens=False)["input_ids"] == sp.encode(text)
        assert new(text, add_special_tokens=False)["input_ids"] == sp.encode(text)
    assert legacy("a  b", add_special_tokens=False)["input_ids"] == [264, 28705, 287]  # ▁a ▁ ▁b


def test_a_broken_tokenizer_model_fails_with_the_real_reason(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(TokenizerLoadError, match=r"tokenizer\.model: SentencePiece could not load it \("):
        load_tokenizer(tmp_path)


# --------------------------------------------------------------------------- v1 and plain


@pytest.mark.parametrize("legacy", LEGACY)
def test_v1_ids_and_labels_equal_the_official_code(sp_dirs, tmp_path, legacy):
    tok = load_tokenizer(sp_dirs[legacy])
    # One placeholder per image, as the official input_ids hold before the model expands them.
    tokenization = Tokenization(tok, "v1", IMAGE_TOKEN_INDEX, 1)
    for name, record in records(tmp_path, CASES).items():
        official = GOLDENS[str(legacy)]["v1"][name]
        ours = tokenize(record, tokenization)
        assert ours.input_ids == official["input_ids"], name
        if not official["voided"]:
            assert ours.labels == official["labels"], name
            continue
        # legacy: false and a second round: the official length arithmetic counts "▁US ER" for the
        # "USER" that follows "</s>", and voids the sample. We supervise its answers instead.
        assert legacy is False and name in ("multi_turn", "image_in_turn_2")
        supervised = [t for t in ours.labels if t != IGNORE_INDEX]
        answers = [t["value"] for t in CASES[name]["conversations"][1::2]]
        pieces = tok.decode(supervised).split("</s>")
        assert [p.strip() for p in pieces[:-1]] == answers and pieces[-1] == ""


def test_v1_digit_first_and_single_character_answers_keep_the_official_lone_space(sp_dirs, tmp_path):
    tok = load_tokenizer(sp_dirs["absent"])
    sp = spm.SentencePieceProcessor(model_file=str(SP_MODEL))
    rec = records(tmp_path, CASES)
    s = tokenize(rec["multi_turn"], Tokenization(tok, "v1", IMAGE_TOKEN_INDEX, 1))
    first = [t for t in s.labels if t != IGNORE_INDEX][:3]
    assert sp.id_to_piece(first) == ["▁", "7", "▁is"]  # ':' '▁' '7', never ':' '▁' '▁' '7'
    s = tokenize(rec["single_char"], Tokenization(tok, "v1", IMAGE_TOKEN_INDEX, 1))
    assert sp.id_to_piece([t for t in s.labels if t != IGNORE_INDEX]) == ["▁y", "</s>"]


def test_image_in_a_later_turn_moves_to_the_front_of_that_turn_once(sp_dirs, tmp_path):
    tok = load_tokenizer(sp_dirs["absent"])
    record = records(tmp_path, CASES)["image_in_turn_2"]
    s = tokenize(record, Tokenization(tok, "v1", IMAGE_TOKEN_INDEX, 5))
    start = s.visual_positions[0]
    assert s.input_ids.count(IMAGE_TOKEN_INDEX) == 5 and s.visual_positions == list(range(start, start + 5))
    before = tok.decode([t for t in s.input_ids[:start] if t >= 0])
    assert before.endswith("A tall scan.</s>USER: ") and "Describe" in before
    assert tok.decode(s.input_ids[s.query_positions[0] :]).startswith("\nWhat digit? ASSISTANT: 3</s>")


@pytest.mark.parametrize("legacy", LEGACY)
def test_plain_equals_the_official_code(sp_dirs, tmp_path, legacy):
    tok = load_tokenizer(sp_dirs[legacy])
    for name, record in records(tmp_path, PLAIN_CASES).items():
        official = GOLDENS[str(legacy)]["plain"][name]
        ours = tokenize(record, Tokenization(tok, "plain", IMAGE_TOKEN_INDEX, 1))
        assert (ours.input_ids, ours.labels) == (official["input_ids"], official["labels"]), name


def test_the_official_reimplementation_runs_live_on_our_tokenizer(sp_dirs, tmp_path):
    """The goldens came from 4.33.1; the same reimplementation on our tokenizer gives them too."""
    tok = load_tokenizer(sp_dirs[False])
    case = CASES["multi_turn"]
    ids, _, voided = preprocess_v1(preprocess_multimodal(case["conversations"]), tok, has_image=True)
    assert voided and ids == GOLDENS["False"]["v1"]["multi_turn"]["input_ids"]


# --------------------------------------------------------------------------- chat and LLaVA


def test_chat_equals_the_llava_processor_and_apply_chat_template(llava_teacher_dir, images, tmp_path):
    from transformers import LlavaImageProcessorPil, LlavaProcessor

    backend = load_backend(llava_teacher_dir)
    tok = backend.tokenizer
    tokenization = Tokenization(tok, "chat", backend.image_token_id, backend.num_visual_tokens)
    rec = records(tmp_path, CASES)
    text_only = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                 for t in CASES["text_only"]["conversations"]]  # fmt: skip
    expected = tok.apply_chat_template(text_only, tokenize=True, return_dict=True)["input_ids"]
    assert tokenize(rec["text_only"], tokenization).input_ids == list(expected)

    vision = backend.model.config.vision_config
    processor = LlavaProcessor(
        image_processor=LlavaImageProcessorPil(
            do_pad=True,
            size={"shortest_edge": vision.image_size},
            crop_size={"height": vision.image_size, "width": vision.image_size},
        ),
        tokenizer=tok,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=backend.select_strategy,
        num_additional_image_tokens=1,
    )
    for name in ("multi_turn", "image_in_turn_2"):
        record = rec[name]
        messages = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                    for t in record.conversations]  # fmt: skip
        messages = [{**m, "content": m["content"].replace("<image>", "").strip()} for m in messages]
        turn = next(i for i, t in enumerate(record.conversations) if "<image>" in t["value"])
        messages[turn]["content"] = "<image>\n" + messages[turn]["content"]
        prompt = tok.apply_chat_template(messages, tokenize=False)
        picture = Image.open(images / record.images[0]).convert("RGB")
        out = processor(images=picture, text=prompt, return_tensors="pt")
        assert tokenize(record, tokenization).input_ids == out["input_ids"][0].tolist(), name
        torch.testing.assert_close(backend.preprocess(picture), out["pixel_values"][0], atol=0, rtol=0)


def test_chat_on_a_sentencepiece_tokenizer_is_one_call_of_its_template(sp_dirs, tmp_path):
    from alignkd_cache.backends.tokenizer import SentencePieceTokenizer
    from alignkd_cache.tiny import CHAT_TEMPLATE

    tok = SentencePieceTokenizer(SP_MODEL, {**tokenizer_config(False), "chat_template": CHAT_TEMPLATE})
    record = records(tmp_path, CASES)["text_only"]
    s = tokenize(record, Tokenization(tok, "chat", IMAGE_TOKEN_INDEX, 1))
    messages = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                for t in record.conversations]  # fmt: skip
    text = tok.apply_chat_template(messages)
    assert text.startswith("<s>USER: Say  two words:") and text.endswith("ASSISTANT: a  b</s>")
    assert s.input_ids == tok(text, add_special_tokens=False)["input_ids"]
    assert (
        tok.decode([t for t in s.labels if t != IGNORE_INDEX]) == " a  b</s>"
    )  # from the space after "ASSISTANT:"


# --------------------------------------------------------------------------- images


@pytest.fixture(scope="module")
def sp_mobilevlms(sp_dirs, tmp_path_factory) -> dict:
    """Two MobileVLM V2 checkpoints sharing the real SentencePiece model: the paper's pair of
    tokenizer settings (7B `legacy: false`, 1.7B legacy). The teacher's tower ships a processor
    config whose mean is not CLIP's, so the padding colour must be read from it."""
    root = tmp_path_factory.mktemp("sp-mobilevlm")
    common = dict(layers=1, hidden=16, heads=2, vision_layers=1, vision_hidden=16, image_size=16, grid=2)
    teacher = build_tiny_mobilevlm(root / "teacher", sp_dirs[False], tower="separate", seed=5, **common)
    config = Path(f"{teacher}-clip") / "preprocessor_config.json"
    settings = json.loads(config.read_text())
    config.write_text(json.dumps({**settings, "image_mean": [0.5, 0.25, 0.75]}))
    student = build_tiny_mobilevlm(root / "student", sp_dirs["absent"], tower="inside", seed=6, **common)
    return {"teacher": load_backend(teacher), "student": load_backend(student)}


def test_padding_is_the_processor_mean_read_from_the_tower(sp_mobilevlms, images):
    from transformers import CLIPImageProcessorPil

    teacher = sp_mobilevlms["teacher"]
    assert teacher.pad_color == (127, 63, 191)
    official = CLIPImageProcessorPil.from_pretrained(teacher.tower_ref)
    for name in ("wide.png", "tall.png"):
        picture = Image.open(images / name).convert("RGB")
        square = expand2square(picture, tuple(int(x * 255) for x in official.image_mean))
        expected = official.preprocess(square, return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(teacher.preprocess(picture), expected, atol=0, rtol=0)
        padded, key = load_image(images / name, name, teacher.pad_color)
        assert np.array_equal(np.asarray(padded), np.asarray(square)) and key == image_key(square)


def test_an_image_id_outside_the_visual_span_never_reaches_the_embedding(sp_mobilevlms, images, tmp_path):
    teacher = sp_mobilevlms["teacher"]
    record = records(tmp_path, {"single_char": CASES["single_char"]})["single_char"]
    s = tokenize(
        record, Tokenization(teacher.tokenizer, "v1", teacher.image_token_id, teacher.num_visual_tokens)
    )
    s.input_ids[-3] = teacher.image_token_id  # a second, unspliced image id in the text
    dataset = SampleDataset([s], images, teacher.preprocess, 0, teacher.pad_color)
    with pytest.raises(ValueError, match="has 5 visual positions but the model makes 4 visual tokens"):
        teacher.forward(dataset.collate([dataset[0]]))


# --------------------------------------------------------------------------- caches


def test_the_papers_pair_is_accepted_with_a_plain_warning(sp_mobilevlms, llava_student_dir):
    teacher, student = sp_mobilevlms["teacher"], sp_mobilevlms["student"]
    attrs = {
        "tokenizer_sha256": tokenizer_sha256(teacher.tokenizer),
        "preprocessing": preprocessing(teacher, "v1"),
        "template": "v1",
        "num_visual_tokens": teacher.num_visual_tokens,
    }
    assert attrs["preprocessing"]["tokenizer"] == {
        "kind": "sentencepiece",
        "legacy": False,
        "add_bos_token": True,
    }
    warnings = check_cache_matches(attrs, student, None, "cache")
    assert any("legacy" in w and "the student trains on the cache's token ids" in w for w in warnings)
    assert any("padded with (127, 63, 191)" in w for w in warnings)
    with pytest.raises(CompatibilityError, match=r"vocabulary \(pieces and ids\)"):
        check_cache_matches(attrs, load_backend(llava_student_dir), None, "cache")


def test_a_legacy_false_teachers_cache_trains_a_legacy_student(sp_mobilevlms, images, tmp_path, capsys):
    """The paper's pair end to end: a cache built by the `legacy: false` teacher, read by the legacy
    student, which gets the teacher's ids and the teacher's padded pixels (keys checked)."""
    from alignkd_cache.build import BuildOptions, build_cache
    from alignkd_cache.sources import CacheSource
    from alignkd_cache.store.reader import CacheReader

    teacher, student = sp_mobilevlms["teacher"], sp_mobilevlms["student"]
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"id": n, **c} for n, c in CASES.items()], ensure_ascii=False))
    attrs = build_cache(
        str(teacher.source), data, images, str(tmp_path / "c.zarr"), BuildOptions(topk=4, progress=False)
    )
    # Schema 2.x: the preprocessing record of issue 10 (2.1 only added the optional `signals`).
    assert attrs["schema_version"].startswith("4.") and attrs["counts"]["written"] == len(CASES)
    assert attrs["preprocessing"]["tokenizer"]["legacy"] is False
    assert attrs["preprocessing"]["image"]["pad_color"] == [127, 63, 191]
    source = CacheSource(CacheReader(str(tmp_path / "c.zarr")), student, images)
    assert "the student trains on the cache's token ids" in capsys.readouterr().out
    ours = {s.id: s.input_ids for s in source.samples}
    # "USER" after "</s>" without its "▁": the teacher's (legacy: false) tokenization, not the student's.
    official = GOLDENS["False"]["v1"]["multi_turn"]["input_ids"]
    n = teacher.num_visual_tokens
    at = official.index(IMAGE_TOKEN_INDEX)
    assert ours["multi_turn"] == official[:at] + [IMAGE_TOKEN_INDEX] * n + official[at + 1 :]
    student_sample, image, _ = source[list(CASES).index("multi_turn")]
    assert image is not None and student_sample.id == "multi_turn"


def test_a_cache_from_before_the_fix_is_refused_naming_what_changed():
    with pytest.raises(
        IncompatibleCache, match="1.x caches tokenized the system prompt and each turn separately"
    ):
        check_readable({"schema_version": "1.0", "complete": True}, "old-cache")


@pytest.mark.parametrize(("version", "kind"), [("2.1", "2.x"), ("3.0", "3.x (layer0)")])
def test_one_image_caches_are_refused_naming_what_changed(version, kind):
    with pytest.raises(
        IncompatibleCache, match=rf"{re.escape(kind)} caches hold one image per sample .* rebuild the cache"
    ):
        check_readable({"schema_version": version, "complete": True}, "old-cache")


def test_resume_and_merge_refuse_a_change_of_preprocessing(sp_mobilevlms):
    teacher = sp_mobilevlms["teacher"]
    stored = {"preprocessing": preprocessing(teacher, "v1"), "options": {}}
    changed = json.loads(json.dumps(stored))
    changed["preprocessing"]["image"]["pad_color"] = [0, 0, 0]
    with pytest.raises(IncompatibleCache, match=r"preprocessing\.image\.pad_color"):
        check_resume(stored, changed, "c")
    with pytest.raises(IncompatibleCache, match=r"preprocessing\.image\.pad_color"):
        check_mergeable(stored, changed, "c")
