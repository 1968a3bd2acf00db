"""Backends against independent references: eager attention, the model's own forward, a reload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaForCausalLM, LlavaForConditionalGeneration

from alignkd_cache.backends import Backend, capture, load_backend
from alignkd_cache.backends.capture import _REQUEST
from alignkd_cache.backends.mobilevlm import MobileVLMBackend, llama_config
from alignkd_cache.data import SampleDataset, Tokenization, collate, read_records, tokenize_all
from alignkd_cache.tiny import build_tiny_mobilevlm

TOL = 1e-5


def dataset_batch(backend, digits_dataset, template="v1", ids=None):
    """The digit set tokenized for `backend`, collated (right-padded) as one batch or a subset."""
    json_path, image_root = digits_dataset
    tok = Tokenization(backend.tokenizer, template, backend.image_token_id, backend.num_visual_tokens)
    samples, skips = tokenize_all(read_records(json_path), tok)
    # `plain` is pretraining's one question, one answer (preprocess_plain): the multi-turn sample is skipped.
    assert [s.id for s in skips] == (["digit-3"] if template == "plain" else [])
    dataset = SampleDataset(
        samples, image_root, backend.preprocess, backend.tokenizer.pad_token_id, backend.pad_color
    )
    items = [dataset[i] for i in range(len(dataset)) if ids is None or samples[i].id in ids]
    return dataset.collate(items)


@pytest.fixture(scope="module")
def mobilevlm_gqa_dir(models_root, tokenizer_dir):
    return build_tiny_mobilevlm(
        models_root / "mobilevlm_gqa", tokenizer_dir, layers=2, hidden=64, heads=4, kv_heads=2, seed=5
    )


@pytest.fixture(scope="module", params=["llava_teacher_dir", "mobilevlm_teacher_dir", "mobilevlm_gqa_dir"])
def teacher(request):
    return load_backend(request.getfixturevalue(request.param))


def eager_layer0(backend, batch) -> torch.Tensor:
    """Layer-0 probabilities (B, H, S, S) from a separately loaded eager model with output_attentions."""
    if backend.family == "llava":
        model = LlavaForConditionalGeneration.from_pretrained(backend.source, attn_implementation="eager")
        out = model(
            input_ids=batch.input_ids,
            pixel_values=batch.pixel_values,
            attention_mask=batch.attention_mask,
            output_attentions=True,
        )
        return out.attentions[0]
    config = llama_config(backend.config)
    config._attn_implementation = "eager"
    llm = LlamaForCausalLM.from_pretrained(backend.source, config=config)
    embeds = llm.get_input_embeddings()(batch.input_ids.clamp(min=0))
    visual = backend.encode_images(batch.pixel_values)
    for b, rows in enumerate(batch.image_index):
        if rows:
            embeds[b, batch.visual_positions[b]] = torch.cat([visual[r] for r in rows])
    return llm(inputs_embeds=embeds, attention_mask=batch.attention_mask, output_attentions=True).attentions[
        0
    ]


def assert_own_llava_logits(teacher, batch, logits: torch.Tensor) -> None:
    """Our spliced forward's logits equal LlavaForConditionalGeneration's own splicing and forward."""
    with torch.no_grad():
        own = teacher.model(
            input_ids=batch.input_ids, pixel_values=batch.pixel_values, attention_mask=batch.attention_mask
        ).logits
    valid = batch.attention_mask.bool()
    torch.testing.assert_close(logits[valid], own[valid], atol=TOL, rtol=0)


@pytest.mark.parametrize("template", ["plain", "v1"])
def test_layer0_slice_equals_eager_reference(teacher, digits_dataset, template):
    batch = dataset_batch(teacher, digits_dataset, template)
    assert batch.attention_mask.min() == 0, "the batch should be right-padded"
    assert any(not rows for rows in batch.image_index), "the batch should hold text-only samples"
    starts = {s.visual_positions[0] for s in batch.samples if s.images}
    # plain puts the image right after BOS; v1 puts the system prompt first.
    assert starts == {1} if template == "plain" else min(starts) > 1
    with torch.no_grad():
        signals = teacher.forward(batch)
        reference = eager_layer0(teacher, batch)
    assert reference.shape[1] == teacher.num_heads
    for b, sample in enumerate(batch.samples):
        if not sample.images:
            assert signals.attention[b] is None
            continue
        t, v = batch.query_positions[b], batch.visual_positions[b]
        expected = reference[b][:, t][:, :, v]
        got = signals.attention[b]
        assert got.shape == (teacher.num_heads, len(t), teacher.num_visual_tokens)
        torch.testing.assert_close(got, expected, atol=TOL, rtol=0)
        # Rows are normalised over the whole causal row, so the visual part sums to less than 1.
        assert float(got.sum(-1).max()) < 1.0


def test_mobilevlm_gqa_fixture_is_grouped(mobilevlm_gqa_dir, llava_teacher_dir):
    assert json.loads((mobilevlm_gqa_dir / "config.json").read_text())["num_key_value_heads"] == 2
    assert (
        json.loads((llava_teacher_dir / "config.json").read_text())["text_config"]["num_key_value_heads"] == 2
    )


def test_capture_logits_equal_plain_and_own_forward(teacher, digits_dataset):
    batch = dataset_batch(teacher, digits_dataset)
    with torch.no_grad():
        captured = teacher.forward(batch, capture=True)
        plain = teacher.forward(batch, capture=False)
    assert plain.attention == [None] * len(batch.ids)
    valid = batch.attention_mask.bool()
    torch.testing.assert_close(captured.logits[valid], plain.logits[valid], atol=0, rtol=0)
    if teacher.family == "llava":
        assert_own_llava_logits(teacher, batch, captured.logits)
    assert _REQUEST.get() is None, "the capture request leaked out of the forward"


def test_batch_equals_samples_one_at_a_time(teacher, digits_dataset):
    batch = dataset_batch(teacher, digits_dataset)
    with torch.no_grad():
        together = teacher.forward(batch)
        for b, sample in enumerate(batch.samples):
            images = [
                (batch.pixel_values[r], key)
                for r, key in zip(batch.image_index[b], batch.image_keys[b], strict=True)
            ]
            alone = teacher.forward(collate([sample], [images], teacher.tokenizer.pad_token_id))
            n = len(sample.input_ids)
            torch.testing.assert_close(together.logits[b, :n], alone.logits[0], atol=TOL, rtol=0)
            if not sample.images:
                assert together.attention[b] is None and alone.attention[0] is None
                continue
            torch.testing.assert_close(together.attention[b], alone.attention[0], atol=TOL, rtol=0)
            torch.testing.assert_close(
                together.visual[batch.image_index[b][0]], alone.visual[0], atol=TOL, rtol=0
            )


def test_visual_tokens_are_the_projector_output(teacher, digits_dataset):
    batch = dataset_batch(teacher, digits_dataset)
    with torch.no_grad():
        signals = teacher.forward(batch)
        if teacher.family == "llava":
            features = teacher.model.model.vision_tower(
                batch.pixel_values, output_hidden_states=True
            ).hidden_states[-2][:, 1:]
            expected = teacher.model.model.multi_modal_projector(features)
        else:
            features = teacher.model.vision_tower(
                batch.pixel_values, output_hidden_states=True
            ).hidden_states[-2][:, 1:]
            expected = teacher.model.mm_projector(features)
    assert signals.visual.shape == (
        batch.pixel_values.shape[0],
        teacher.num_visual_tokens,
        teacher.visual_dim,
    )
    torch.testing.assert_close(signals.visual, expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("student_dir", ["llava_student_dir", "mobilevlm_student_dir"])
def test_student_gradients_reach_projector_and_layer0_qk(request, student_dir, digits_dataset):
    student = load_backend(request.getfixturevalue(student_dir))
    assert isinstance(student, Backend)
    student.model.train()
    batch = dataset_batch(student, digits_dataset, ids={"digit-0", "digit-1", "text-0"})
    if student.family == "llava":
        projector = student.model.model.multi_modal_projector.linear_1.weight
        attn = student.model.model.language_model.layers[0].self_attn
    else:
        projector = student.model.mm_projector.mlp.mlp[0].weight
        attn = student.model.llm.model.layers[0].self_attn
    for signal in ("attention", "visual"):
        student.model.zero_grad()
        signals = student.forward(batch)
        loss = (
            sum(a.square().sum() for a in signals.attention if a is not None)
            if signal == "attention"
            else signals.visual.square().sum()
        )
        loss.backward()
        assert projector.grad is not None and projector.grad.abs().sum() > 0, signal
        if signal == "attention":
            assert attn.q_proj.weight.grad.abs().sum() > 0
            assert attn.k_proj.weight.grad.abs().sum() > 0


def test_mobilevlm_checkpoint_uses_original_layout(mobilevlm_teacher_dir, mobilevlm_student_dir):
    config = json.loads((mobilevlm_student_dir / "config.json").read_text())
    assert config["model_type"] == "mobilevlm" and config["mm_projector_type"] == "ldpnetv2"
    hidden, mm_hidden = config["hidden_size"], config["mm_hidden_size"]
    with safe_open(str(mobilevlm_student_dir / "model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    assert shapes["model.mm_projector.mlp.mlp.0.weight"] == (hidden, mm_hidden)
    assert shapes["model.mm_projector.mlp.mlp.2.weight"] == (hidden, hidden)
    assert shapes["model.mm_projector.peg.peg.0.weight"] == (hidden, 1, 3, 3)
    assert (
        "model.embed_tokens.weight" in shapes
        and "lm_head.weight" in shapes
        and "model.layers.0.self_attn.q_proj.weight" in shapes
    )
    assert any(k.startswith("model.vision_tower.vision_tower.vision_model.") for k in shapes)
    with safe_open(str(mobilevlm_teacher_dir / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("model.vision_tower.") for k in f.keys())  # noqa: SIM118
    teacher_config = json.loads((mobilevlm_teacher_dir / "config.json").read_text())
    assert Path(teacher_config["mm_vision_tower"]).is_dir()


@pytest.mark.parametrize("inside", [True, False])
def test_mobilevlm_round_trip(mobilevlm_teacher_dir, digits_dataset, tmp_path, inside):
    original = load_backend(mobilevlm_teacher_dir)
    original.save_pretrained(tmp_path / "copy", include_vision_tower=inside)
    with safe_open(str(tmp_path / "copy" / "model.safetensors"), "pt") as f:
        assert any(k.startswith("model.vision_tower.") for k in f.keys()) == inside  # noqa: SIM118
    copy = load_backend(tmp_path / "copy")
    assert copy.fingerprint()["weights_sha256"] == original.fingerprint()["weights_sha256"]
    assert copy.fingerprint()["tokenizer_sha256"] == original.fingerprint()["tokenizer_sha256"]
    batch = dataset_batch(original, digits_dataset, ids={"digit-0", "text-0"})
    with torch.no_grad():
        a, b = original.forward(batch), copy.forward(batch)
    torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)
    torch.testing.assert_close(a.attention[0], b.attention[0], atol=0, rtol=0)


def test_mobilevlm_vision_tower_override(mobilevlm_student_dir, mobilevlm_teacher_dir):
    tower_dir = mobilevlm_teacher_dir.parent / "mobilevlm_teacher-clip"
    own = load_backend(mobilevlm_student_dir)
    overridden = load_backend(mobilevlm_student_dir, vision_tower=str(tower_dir))
    teacher = load_backend(mobilevlm_teacher_dir)

    def tower_weights(backend):
        return backend.model.vision_tower.state_dict()["embeddings.patch_embedding.weight"]

    assert torch.equal(tower_weights(overridden), tower_weights(teacher))
    assert not torch.equal(tower_weights(overridden), tower_weights(own))


def test_llava_round_trip(llava_student_dir, tmp_path):
    original = load_backend(llava_student_dir)
    original.save_pretrained(tmp_path / "copy")
    copy = load_backend(tmp_path / "copy")
    for key in ("config_sha256", "weights_sha256", "tokenizer_sha256"):
        assert copy.fingerprint()[key] == original.fingerprint()[key], key


def headers(checkpoint: Path) -> dict[str, dict[str, tuple[str, tuple]]]:
    """file -> {key: (dtype, shape)} of a checkpoint's safetensors files."""
    out = {}
    for path in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
            out[path.name] = {k: (v.get_dtype(), tuple(v.get_shape())) for k, v in slices.items()}
    return out


def assert_saved_as_the_source(source: Path, out: Path, backend) -> None:
    """Every file of the source but its weights is copied byte for byte; the weights keep the source's
    files, keys, dtypes and shapes, and hold the backend's (trained) values."""
    for path in source.iterdir():
        if path.is_file() and path.suffix != ".safetensors":
            assert (out / path.name).read_bytes() == path.read_bytes(), path.name
    assert headers(out) == headers(source)
    reloaded = load_backend(out, dtype=backend.model.dtype)
    for (name, a), b in zip(
        backend.model.state_dict().items(), reloaded.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    "student_dir", ["llava_student_dir", "mobilevlm_student_dir", "mobilevlm_teacher_dir"]
)
def test_a_trained_model_is_saved_in_its_sources_format(request, student_dir, tmp_path):
    source = request.getfixturevalue(student_dir)
    backend = load_backend(source)
    with torch.no_grad():  # as training would: new values, same shapes, the vision tower frozen
        for name, p in backend.model.named_parameters():
            p.add_(0.0 if "vision_tower" in name else 0.01)
    backend.save_pretrained(tmp_path / "out")
    assert_saved_as_the_source(source, tmp_path / "out", backend)


def test_a_sharded_half_precision_source_stays_sharded_and_half(llava_student_dir, tmp_path):
    source = tmp_path / "sharded"
    model = LlavaForConditionalGeneration.from_pretrained(llava_student_dir, dtype=torch.bfloat16)
    model.save_pretrained(source, max_shard_size="40KB")
    for path in llava_student_dir.iterdir():
        if not path.name.endswith(".safetensors") and not (source / path.name).exists():
            (source / path.name).write_bytes(path.read_bytes())
    assert len(headers(source)) > 2 and (source / "model.safetensors.index.json").is_file()
    backend = load_backend(source, dtype=torch.float32)  # trained in fp32, saved back in bf16
    backend.save_pretrained(tmp_path / "out")
    assert_saved_as_the_source(source, tmp_path / "out", backend)  # the index among the copied files


def test_fingerprints_tell_models_apart(llava_teacher_dir, llava_student_dir):
    teacher, student = (
        load_backend(llava_teacher_dir).fingerprint(),
        load_backend(llava_student_dir).fingerprint(),
    )
    assert teacher["tokenizer_sha256"] == student["tokenizer_sha256"]
    assert teacher["weights_sha256"] != student["weights_sha256"]
    assert teacher["config_sha256"] != student["config_sha256"]


def test_wrong_image_token_is_refused(digits_dataset, llava_student_dir, mobilevlm_student_dir):
    llava, mobilevlm = load_backend(llava_student_dir), load_backend(mobilevlm_student_dir)
    json_path, image_root = digits_dataset
    # Tokenized for MobileVLM (-200, 16 tokens) but fed to LLaVA (its own id, 64 tokens).
    tok = Tokenization(mobilevlm.tokenizer, "v1", mobilevlm.image_token_id, llava.num_visual_tokens)
    samples, _ = tokenize_all(read_records(json_path)[:1], tok)
    dataset = SampleDataset(
        samples, image_root, llava.preprocess, llava.tokenizer.pad_token_id, llava.pad_color
    )
    with pytest.raises(ValueError, match="digit-0.*image token"):
        llava.forward(dataset.collate([dataset[0]]))


def test_pickled_weights_are_refused(mobilevlm_student_dir, tmp_path):
    target = tmp_path / "bin_only"
    target.mkdir()
    (target / "config.json").write_text((mobilevlm_student_dir / "config.json").read_text())
    (target / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin.*never loaded"):
        MobileVLMBackend.load(target)


@pytest.mark.parametrize("one_query_row_per_block", [False, True])
def test_two_images_in_one_sample_equal_the_eager_reference(
    teacher, two_image_dataset, one_query_row_per_block, monkeypatch
):
    """Every visual position of both images is a column; the text between them is a query that sees
    the first image only, as the model's own causal softmax has it. The same whether the slice is
    computed at once or one query row at a time (the blocks that bound its memory)."""
    if one_query_row_per_block:
        monkeypatch.setattr(capture, "SLICE_BLOCK_ELEMENTS", 1)
    batch = dataset_batch(teacher, two_image_dataset)
    pair = batch.samples[0]
    assert pair.num_visual == (teacher.num_visual_tokens,) * 2 and batch.image_index == [[0, 1], [2], []]
    with torch.no_grad():
        signals = teacher.forward(batch)
        reference = eager_layer0(teacher, batch)
    for b, sample in enumerate(batch.samples):
        if not sample.images:
            assert signals.attention[b] is None
            continue
        t, v = batch.query_positions[b], batch.visual_positions[b]
        torch.testing.assert_close(signals.attention[b], reference[b][:, t][:, :, v], atol=TOL, rtol=0)
    second = torch.tensor(pair.image_spans()[1])
    between = batch.query_positions[0] < second[0]
    assert between.any(), "the text between the two images must be a query"
    assert float(signals.attention[0][:, between][:, :, teacher.num_visual_tokens :].abs().max()) == 0.0
    assert float(signals.attention[0][:, between][:, :, : teacher.num_visual_tokens].min()) > 0.0
    if teacher.family == "llava":  # the model's own splicing of two images, not ours
        assert_own_llava_logits(teacher, batch, signals.logits)
