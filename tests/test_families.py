"""Transformers-native VLM families: our forward equals an independent eager transformers forward.

For every family, a tiny random checkpoint is written by tiny_families and loaded back the way a
user's checkpoint is (TransformersVLM.load). The reference side of each comparison is computed by
the test itself: transformers' own processor (from_pretrained, without video) and
AutoModelForImageTextToText with eager attention and output_attentions=True, one sample at a time.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from alignkd_cache.backends.transformers_vlm import (
    SUPPORTED_MODEL_TYPES,
    TransformersVLM,
    UnsupportedFamily,
    without_video,
)
from alignkd_cache.data import TokenizedSample, collate
from alignkd_cache.demo.digits import compose, load_scans
from alignkd_cache.tiny_families import tiny_checkpoint

FAMILIES = ("qwen2_5_vl", "qwen3_vl", "internvl", "smolvlm", "llava_onevision")
TOL = 1e-5


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    """Two real digit-scan grids upscaled to different non-square sizes (width x height)."""
    scans, _ = load_scans()
    grid = compose(scans[:4], cell=16)
    return [grid.resize((40, 28)), compose(scans[4:8], cell=16).resize((28, 56))]


def samples(images):
    a, b = images
    return [
        (
            "multi_turn",
            [
                ("user", "<image>\nЧто это? 数字"),
                ("assistant", "Это 7."),
                ("user", "А тут?"),
                ("assistant", "数字 3"),
            ],
            [a],
        ),
        ("two_images", [("user", "<image> and <image> differ?"), ("assistant", "yes")], [a, b]),
        ("text_only", [("user", "Hello world"), ("assistant", "the answer follows")], []),
    ]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory, images):
    root = tmp_path_factory.mktemp(request.param)
    teacher = tiny_checkpoint(request.param, root / "teacher", role="teacher", seed=1)
    vlm = TransformersVLM.load(teacher)
    encoded = [vlm.encode(turns, imgs, sid) for sid, turns, imgs in samples(images)]
    return request.param, teacher, vlm, encoded


def _reference_processor(path, model_type):
    """The family's own processor class, composed by hand from the checkpoint's files, without video."""
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    settings = json.loads((path / "processor_config.json").read_text())
    settings = {k: v for k, v in settings.items() if k not in ("image_processor", "processor_class")}
    return without_video(getattr(transformers, PROCESSOR_MAPPING_NAMES[model_type]))(
        transformers.AutoImageProcessor.from_pretrained(path, backend="pil"),
        transformers.AutoTokenizer.from_pretrained(path),
        chat_template=(path / "chat_template.jinja").read_text(),
        **settings,
    )


def _hf_messages(turns):
    messages = []
    for role, text in turns:
        pieces = text.split("<image>")
        content = []
        for i, piece in enumerate(pieces):
            if i:
                content.append({"type": "image"})
            if piece.strip():
                content.append({"type": "text", "text": piece})
        messages.append({"role": role, "content": content})
    return messages


def _flat(pooled, dim: int) -> torch.Tensor:
    """get_image_features' pooler_output (a tensor, or a list of per-image tensors) as (N, D) rows."""
    pieces = pooled if isinstance(pooled, (list, tuple)) else [pooled]
    return torch.cat([p.reshape(-1, dim) for p in pieces])


def run_batch(vlm, encoded, images) -> tuple:
    """The samples through the pipeline's path (data.collate with the backend's collate_pixels, then
    the Backend protocol's forward): (logits, attention per sample, visual per sample per image)."""
    per_sample = [imgs for _, _, imgs in samples(images)][: len(encoded)]
    tokenized = [
        TokenizedSample(e.sample_id, tuple(f"{k}.png" for k in range(len(imgs))), e.input_ids, e.labels,
                        tuple(e.num_visual), vlm.image_token_id)
        for e, imgs in zip(encoded, per_sample, strict=True)
    ]  # fmt: skip
    pictures = [[(vlm.preprocess(im), f"key{k}") for k, im in enumerate(imgs)] for imgs in per_sample]
    batch = collate(tokenized, pictures, vlm.tokenizer.pad_token_id, vlm.collate_pixels)
    out = vlm.forward(batch)
    return out.logits, out.attention, [[out.visual[r] for r in rows] for rows in batch.image_index]


def _runs(is_image: np.ndarray) -> list[int]:
    """Lengths of the contiguous runs of True."""
    starts = np.flatnonzero(is_image & ~np.r_[False, is_image[:-1]])
    ends = np.flatnonzero(is_image & ~np.r_[is_image[1:], False])
    return (ends - starts + 1).tolist()


def test_exact_against_eager_transformers(family, images):
    model_type, path, vlm, encoded = family
    with torch.no_grad():
        logits, attention, visual = run_batch(vlm, encoded, images)
    processor = _reference_processor(path, model_type)
    ref = transformers.AutoModelForImageTextToText.from_pretrained(
        path, attn_implementation="eager", use_safetensors=True
    ).eval()
    image_id = processor.image_token_id
    for b, (sid, turns, imgs) in enumerate(samples(images)):
        text = processor.apply_chat_template(_hf_messages(turns), tokenize=False)
        inputs = processor(text=[text], images=imgs or None, return_tensors="pt")
        ids = inputs["input_ids"][0]
        assert ids.tolist() == encoded[b].input_ids, sid
        with torch.no_grad():
            out = ref(**inputs, output_attentions=True, use_cache=False)
        n = len(ids)
        torch.testing.assert_close(
            logits[b, :n].log_softmax(-1), out.logits[0].log_softmax(-1), atol=TOL, rtol=0, msg=sid
        )
        if not imgs:
            assert attention[b] is None and visual[b] == []
            continue
        v = (ids == image_id).nonzero().flatten()
        t = torch.tensor([p for p in range(int(v[0]) + 1, n) if ids[p] != image_id])
        want = out.attentions[0][0][:, t][:, :, v]
        assert attention[b].shape == want.shape, (sid, attention[b].shape, want.shape)
        assert (attention[b] - want).abs().max() < TOL, (sid, (attention[b] - want).abs().max())
        # The visual tokens, per image, from the reference model's own get_image_features.
        pixel = {
            k: val
            for k, val in inputs.items()
            if k not in ("input_ids", "attention_mask", "mm_token_type_ids")
        }
        with torch.no_grad():
            pooled = ref.get_image_features(**pixel).pooler_output
        if model_type != "smolvlm":  # one contiguous run of image tokens per image
            per_image = list(_flat(pooled, vlm.visual_dim).split(_runs(ids.numpy() == image_id)))
        else:  # tiles separated by row/column tokens: take each image alone
            per_image = []
            for img in imgs:
                alone = processor(text=[processor.image_token], images=[img], return_tensors="pt")
                pixel = {k: val for k, val in alone.items() if k not in ("input_ids", "attention_mask")}
                with torch.no_grad():
                    per_image.append(_flat(ref.get_image_features(**pixel).pooler_output, vlm.visual_dim))
        assert len(visual[b]) == len(imgs) == len(per_image)
        for got, want_v in zip(visual[b], per_image, strict=True):
            torch.testing.assert_close(got, want_v, atol=TOL, rtol=0, msg=sid)


def test_labels_are_the_answers_and_end_of_turn(family):
    model_type, _, vlm, encoded = family
    sample = encoded[0]
    runs, current = [], []
    for token, label in zip(sample.input_ids, sample.labels, strict=True):
        if label != -100:
            assert label == token
            current.append(label)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    eot = vlm.tokenizer.convert_ids_to_tokens(runs[0][-1])
    assert eot == vlm.tokenizer.convert_ids_to_tokens(runs[1][-1])
    assert [vlm.tokenizer.decode(r).lstrip() for r in runs] == ["Это 7." + eot, "数字 3" + eot]


def test_num_visual_per_image(family, images):
    model_type, path, vlm, encoded = family
    processor = _reference_processor(path, model_type)
    image_id = processor.image_token_id
    alone = [
        int(
            (
                processor(text=[processor.image_token], images=[img], return_tensors="pt")["input_ids"]
                == image_id
            ).sum()
        )
        for img in images
    ]
    assert alone[0] != alone[1]  # every family here sizes its visual tokens to the image
    assert encoded[0].num_visual == [alone[0]]
    assert encoded[2].num_visual == [] and encoded[2].pixel_inputs == {}
    two = encoded[1]
    assert sum(two.num_visual) == two.input_ids.count(image_id)
    if model_type == "smolvlm":  # tiles are separated by row/column tokens: compare with each image alone
        assert two.num_visual == alone
    else:  # one contiguous run of image tokens per image
        assert two.num_visual == _runs(np.array(two.input_ids) == image_id)
        if model_type != "llava_onevision":  # LLaVA-OV gives multi-image samples the base crop only
            assert two.num_visual == alone


def test_padded_vocabulary(family):
    model_type, path, vlm, _ = family
    rows = vlm.model.get_input_embeddings().weight.shape[0]
    assert rows == vlm.model.config.get_text_config().vocab_size > len(vlm.tokenizer) == vlm.vocab_size


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "paligemma"}))
    with pytest.raises(UnsupportedFamily) as info:
        TransformersVLM.load(tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"model {tmp_path}: model_type 'paligemma' is not supported; supported: ")
    assert all(name in message for name in ("llava", "mobilevlm", *SUPPORTED_MODEL_TYPES))


def test_student_gradients(family, tmp_path, images):
    model_type, _, teacher, teacher_encoded = family
    path = tiny_checkpoint(model_type, tmp_path / "student", role="student")
    vlm = TransformersVLM.load(path)
    assert vlm.vocab_size == vlm.model.config.get_text_config().vocab_size  # no padding for the student
    vlm.model.train()
    encoded = [vlm.encode(turns, imgs, sid) for sid, turns, imgs in samples(images)]
    # A same-family pair: the same sequences and visual-token counts as the teacher's.
    assert [(s.input_ids, s.num_visual) for s in encoded] == [
        (s.input_ids, s.num_visual) for s in teacher_encoded
    ]
    assert teacher.num_heads > vlm.num_heads and teacher.visual_dim > vlm.visual_dim
    logits, attention, visual = run_batch(vlm, encoded, images)
    llm = vlm.model.model.get_decoder()
    q_proj = llm.layers[0].self_attn.q_proj.weight
    in_llm = {id(p) for p in llm.parameters()} | {id(p) for p in vlm.model.lm_head.parameters()}
    vision = [p for p in vlm.model.parameters() if id(p) not in in_llm]
    torch.cat([v for sample in visual for v in sample]).pow(2).sum().backward(retain_graph=True)
    assert q_proj.grad is None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in vision)
    vlm.model.zero_grad(set_to_none=True)
    sum(a.sum() for a in attention if a is not None).backward()
    assert q_proj.grad is not None and q_proj.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in vision)


def test_save_pretrained_round_trip(family, images, tmp_path):
    model_type, _, vlm, encoded = family
    vlm.save_pretrained(tmp_path / "copy")
    again = TransformersVLM.load(tmp_path / "copy")
    assert again.family == model_type and again.vocab_size == vlm.vocab_size
    for (sid, turns, imgs), sample in zip(samples(images), encoded, strict=True):
        copy = again.encode(turns, imgs, sid)
        assert (copy.input_ids, copy.labels, copy.num_visual) == (
            sample.input_ids,
            sample.labels,
            sample.num_visual,
        )
    with torch.no_grad():
        torch.testing.assert_close(
            run_batch(again, encoded[:2], images)[0], run_batch(vlm, encoded[:2], images)[0], atol=0, rtol=0
        )


def test_encode_errors_name_the_sample(family, images):
    _, _, vlm, _ = family
    with pytest.raises(ValueError, match="sample 'bad'.*1 <image> markers but 2 images"):
        vlm.encode([("user", "<image> one"), ("assistant", "x")], images, "bad")


def _expected_layouts(model_type, processor, vlm, images, per_sample_images) -> list[list[dict]]:
    """Each image's layout computed here from the processor's own outputs (for the images of one
    sample), independently of the backend's family modules."""
    ip = processor.image_processor
    grid = lambda role, rows, cols: {"role": role, "rows": int(rows), "cols": int(cols)}  # noqa: E731
    if model_type in ("qwen2_5_vl", "qwen3_vl"):
        thw = ip(images=per_sample_images, return_tensors="pt")["image_grid_thw"]
        return [[grid("grid", h // ip.merge_size, w // ip.merge_size)] for _, h, w in thw.tolist()]
    if model_type == "internvl":
        side = int(processor.image_seq_length**0.5)
        out = []
        for img, n in zip(per_sample_images, ip(images=per_sample_images)["num_patches"], strict=True):
            if n == 1:
                out.append([grid("tile_0_0", side, side)])
                continue
            # the crops follow the image's aspect: more rows than columns for a tall image
            rows = next(r for r in range(1, n) if (n - 1) % r == 0 and (r > 1) == (img.height > img.width))
            cols = (n - 1) // rows
            tiles = [grid(f"tile_{r}_{c}", side, side) for r in range(rows) for c in range(cols)]
            out.append(tiles + [grid("thumbnail", side, side)])
        return out
    if model_type == "smolvlm":
        side = int(processor.image_seq_len**0.5)
        got = ip(images=[per_sample_images], return_row_col_info=True)
        return [
            [grid(f"tile_{r}_{c}", side, side) for r in range(rows) for c in range(cols)]
            + [grid("global", side, side)]
            for rows, cols in zip(got["rows"][0], got["cols"][0], strict=True)
        ]
    # llava_onevision: the processor's own counts (its unpadded-feature helper) per image
    out = []
    text = processor.image_token * len(per_sample_images)
    inputs = processor(text=[text], images=per_sample_images, return_tensors="pt")
    side = int(processor.num_image_tokens**0.5)
    single = [n == 1 for n in inputs["batch_num_images"].tolist() for _ in range(n)]
    height, width = inputs["pixel_values"].shape[-2:]
    for (h, w), anyres in zip(inputs["image_sizes"].tolist(), single, strict=True):
        if not anyres:
            out.append([grid("base", side, side), grid("newline", 1, 1)])
            continue
        best_h, best_w = transformers.image_processing_utils.select_best_resolution(
            [h, w], ip.image_grid_pinpoints
        )
        unpadded, newlines = processor._get_unpadded_features(
            h, w, side, side, best_h // height, best_w // width
        )
        out.append([grid("base", side, side), grid("anyres_newline", newlines, unpadded // newlines + 1)])
        assert side * side + unpadded + newlines == processor._get_number_of_features(h, w, height, width)
    return out


def test_image_layouts_are_the_processors(family, images):
    """Per image, the recorded layout is what the processor's own outputs say (grid_thw, num_patches,
    rows/cols, the unpadded-feature count), for each of the two non-square images alone and for the
    sample that holds both; it covers exactly the image's visual tokens."""
    model_type, path, vlm, encoded = family
    processor = _reference_processor(path, model_type)
    alone = [vlm.encode([("user", "<image> what?"), ("assistant", "yes")], [img], "alone") for img in images]
    cases = [(e, [img]) for e, img in zip(alone, images, strict=True)] + [(encoded[1], images)]
    for sample, imgs in cases:
        want = _expected_layouts(model_type, processor, vlm, images, imgs)
        assert sample.image_layouts == want, (model_type, sample.image_layouts, want)
        assert [sum(s["rows"] * s["cols"] for s in layout) for layout in want] == sample.num_visual
        assert vlm.layouts_of(imgs) == want  # the student side's path gives the same
    assert alone[0].image_layouts != alone[1].image_layouts  # the two sizes are laid out differently
    assert encoded[2].image_layouts == []
