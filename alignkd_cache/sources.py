"""Where the teacher's signals come from: a cache on disk, or a teacher resident in memory.

Every source is a TeacherSignalSource: the student's token sequences in dataset order, a torch
Dataset of items that `collate` makes MicroBatches of, and per micro-batch a list of TeacherSignal
in the student's geometry (`signals`). DataSource (plain fine-tuning) is only a TrainingSource. The teacher's token ids are the reference: the
student's are the same ids with the teacher's visual run replaced by the student's own (its image
token id, its visual-token count), so the text rows T and the supervised positions line up.
Teacher signals for a different visual-token count are pooled (alignkd_cache.signals) to the
student's count; nothing else about the two models may differ, and what does is refused up front.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from alignkd_cache import layer0
from alignkd_cache.backends.checkpoint import tokenizer_sha256
from alignkd_cache.backends.tokenizer import tokenizer_settings
from alignkd_cache.data import (
    IGNORE_INDEX,
    Batch,
    DataError,
    SampleDataset,
    TokenizedSample,
    check_images,
    collate,
    load_images,
    pad_id,
    read_records,
    resolve_image,
    tokenization_for,
    tokenize_all,
)
from alignkd_cache.images import load_image
from alignkd_cache.losses import SampleCounts
from alignkd_cache.signal_spec import SignalOptions, cache_kind, stored_heads
from alignkd_cache.signals import TeacherSignal, pool_visual, sample_signal
from alignkd_cache.store.provenance import attrs_pad_color, file_sha256


class CompatibilityError(ValueError):
    """Student and teacher signals disagree in a way training cannot repair."""


@dataclass
class MicroBatch:
    student: Batch
    teacher: Batch | None  # online: the teacher's own batch, run on the main process
    signals: list[TeacherSignal] | None  # cache: decoded in the loader (workers, if any)


@runtime_checkable
class TrainingSource(Protocol):
    """What the trainer iterates: items by dataset index, batched by `collate`."""

    samples: Sequence[TokenizedSample]  # the student's sequences, in dataset order
    counts: SampleCounts  # per sample, what the step's normalisers count
    route: str  # where the teacher signals come from, for the log and metrics.jsonl

    def __len__(self) -> int: ...
    def __getitem__(self, i: int): ...
    def collate(self, items) -> MicroBatch: ...
    def describe(self) -> dict:
        """Where the signals come from, for the output's provenance."""

    def identity(self) -> dict:
        """The signals by content: what a --resume must find unchanged."""


@runtime_checkable
class TeacherSignalSource(TrainingSource, Protocol):
    """A TrainingSource that also gives each micro-batch's teacher signals."""

    teacher_heads: int  # heads of the attention signals (1 for a head mean)
    teacher_dim: int  # channels of the visual tokens

    def signals(self, micro: MicroBatch, device) -> list[TeacherSignal]:
        """One TeacherSignal per sample of `micro`, on the student's sequence, on `device`."""


# ---------------------------------------------------------------------------------------------
# Mapping teacher signals onto the student's sequence


def respliced(sample: TokenizedSample, image_token_id: int, num_visual: int | None) -> TokenizedSample:
    """The teacher's token ids with each image's visual run replaced by the student's: its image
    token id and `num_visual` tokens per image (None: the teacher's own count per image, as a
    student of the same processor makes)."""
    counts = tuple(sample.num_visual if num_visual is None else [num_visual] * len(sample.images))
    if image_token_id == sample.image_token_id and counts == tuple(sample.num_visual):
        return sample
    ids, labels, at = [], [], 0
    for span, n in zip(sample.image_spans(), counts, strict=True):
        if span != list(range(span[0], span[0] + len(span))):
            raise CompatibilityError(
                f"sample {sample.id!r}: an image's visual tokens are not one run, so they cannot be "
                "replaced by another model's; distil within the family (same processor)"
            )
        ids += sample.input_ids[at : span[0]] + [image_token_id] * n
        labels += sample.labels[at : span[0]] + [IGNORE_INDEX] * n
        at = span[-1] + 1
    ids += sample.input_ids[at:]
    labels += sample.labels[at:]
    return TokenizedSample(sample.id, sample.images, ids, labels, counts, image_token_id)


def student_positions(
    positions: torch.Tensor, teacher: TokenizedSample, student: TokenizedSample
) -> torch.Tensor:
    """Teacher logit positions -> the student's. Text positions map in order; an image's last
    visual token (it predicts the text after the image) maps to the student's last for that image."""
    inside = {p for span in teacher.image_spans() for p in span[:-1]}
    if any(p in inside for p in positions.tolist()):
        raise CompatibilityError(
            f"sample {teacher.id!r}: teacher logit targets inside the image; refusing to distil there"
        )
    if teacher.input_ids == student.input_ids:
        mapped = positions
    else:
        t_visual, s_visual = set(teacher.visual_positions), set(student.visual_positions)
        t_text = [p for p in range(len(teacher.input_ids)) if p not in t_visual]
        s_text = [p for p in range(len(student.input_ids)) if p not in s_visual]
        where = dict(zip(t_text, s_text, strict=True))
        for t_span, s_span in zip(teacher.image_spans(), student.image_spans(), strict=True):
            where[t_span[-1]] = s_span[-1]
        mapped = torch.tensor([where[p] for p in positions.tolist()], dtype=torch.long)
    # Exactly the supervised positions: logit KD is normalised by the supervised-token count.
    if sorted(mapped.tolist()) != student.supervised_positions:
        raise CompatibilityError(
            f"sample {teacher.id!r}: teacher logit targets are not exactly at the positions whose next "
            "token is supervised (they include the prompt or image, or miss answer tokens); logit KD "
            "runs over every supervised position and no other: rebuild the cache with the default "
            "logit positions"
        )
    return mapped


def on_student(signal: TeacherSignal, teacher: TokenizedSample, student: TokenizedSample) -> TeacherSignal:
    """A signal on the teacher's sequence -> the same on the student's (positions mapped, pooled)."""
    return signal.for_student(
        student_positions(signal.logits.positions, teacher, student), teacher.num_visual, student.num_visual
    )


def tokenized_from_row(row: dict, image_token_id: int) -> TokenizedSample:
    """The teacher's tokenized sample from its cache manifest row."""
    ids = row["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    for p in row["supervised_positions"]:
        labels[p + 1] = ids[p + 1]
    layouts = row.get("image_layouts")  # absent from a schema 4.0 cache
    return TokenizedSample(
        row["id"],
        tuple(row["images"]),
        list(ids),
        labels,
        tuple(row["num_visual"]),
        image_token_id,
        None if layouts is None else tuple(layouts),
    )


class CachedSamples(Sequence):
    """A cache's tokenized samples by position, each made from its manifest row when indexed: the
    teacher's, or with `student` (image token id, visual tokens per image) respliced for the student."""

    def __init__(self, reader, student: tuple[int, int | None] | None = None):
        self.reader, self.student = reader, student
        self.image_token_id = int(reader.attrs["image_token_id"])

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int) -> TokenizedSample:
        teacher = tokenized_from_row(self.reader.row_at(i), self.image_token_id)
        return teacher if self.student is None else respliced(teacher, *self.student)


def _check_pooling(n_teacher: int | None, n_student: int | None, what: str) -> None:
    """Refuse visual-token counts that no pooling maps (None: a count that follows each image)."""
    if (n_teacher is None) != (n_student is None):
        teacher, student = (
            "a count per image (dynamic resolution or tiles)" if n is None else f"{n} per image"
            for n in (n_teacher, n_student)
        )
        raise CompatibilityError(
            f"visual-token layout: {what} has {teacher}, the student {student}; "
            "no pooling maps one to the other: distil within the family"
        )
    if n_teacher != n_student:
        try:
            pool_visual(torch.zeros(n_teacher, 1), n_student)
        except ValueError as e:
            raise CompatibilityError(
                f"visual-token count: {what} has {n_teacher} visual tokens per image, the student "
                f"{n_student}, and no pooling maps one to the other ({e})"
            ) from e


# ---------------------------------------------------------------------------------------------
# A cache


def cache_counts(reader) -> SampleCounts:
    """The loss normalisers' counts of a cache's written samples, from its manifest index."""
    return SampleCounts(reader.supervised_counts().astype(np.int64), reader.image_counts() > 0)


class CacheSource(torch.utils.data.Dataset):
    """Items: (student sample, (pixels, key) | None, TeacherSignal), decoded from a CacheReader."""

    def __init__(self, reader, student, image_root, expect_template: str | None = None):
        self.reader, self.image_root, self.preprocess = reader, image_root, student.preprocess
        self.collate_pixels = student.collate_pixels
        self.pad_id = pad_id(student.tokenizer)
        attrs = reader.attrs
        check_cache_matches(
            attrs,
            student,
            expect_template,
            reader.url,
            lambda: layout_difference(reader, student, image_root),
        )
        # Built per index from the manifest's columns (in the DataLoader worker that reads the
        # sample): nothing per sample is held. `picture` resolves each image when it is read.
        self.teacher_samples = CachedSamples(reader)
        self.samples = CachedSamples(reader, (student.image_token_id, student.num_visual_tokens))
        self.counts = cache_counts(reader)
        if image_root is None and self.counts.images.any():
            first = int(np.flatnonzero(self.counts.images)[0])
            raise DataError(
                f"sample {reader.row_at(first)['id']!r} has an image but no --image-root was given"
            )
        self.teacher_heads = stored_heads(attrs["attn_heads"], attrs["num_heads"])
        self.teacher_dim = int(attrs["visual_dim"])
        self.template = attrs["template"]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        student, teacher, cached = self.sample(i)
        images = [
            (self.preprocess(p), key)
            for p, key in zip(self.pictures(student, cached), cached.image_keys, strict=True)
        ]
        return student, images, on_student(cached, teacher, student)

    def sample(self, i: int) -> tuple[TokenizedSample, TokenizedSample, TeacherSignal]:
        """The i-th sample as the student's sequence, the teacher's, and its cached signals: one
        manifest row read."""
        row = self.reader.row_at(i)
        teacher = tokenized_from_row(row, self.samples.image_token_id)
        return respliced(teacher, *self.samples.student), teacher, self.reader.read_row(row)

    def pictures(self, student: TokenizedSample, cached: TeacherSignal) -> list:
        """The sample's images, padded as the build padded them, checked against the cached content keys."""
        pictures = []
        for image, cached_key in zip(student.images, cached.image_keys, strict=True):
            path = resolve_image(self.image_root, image, student.id)
            picture, key = load_image(path, student.id, attrs_pad_color(self.reader.attrs))
            if key != cached_key:
                raise DataError(
                    f"sample {student.id!r}: image {path} is not the image the cache was built from "
                    f"(content key {key}, cached {cached_key}); restore the original file or rebuild the cache"
                )
            pictures.append(picture)
        return pictures

    def collate(self, items) -> MicroBatch:
        batch = collate(
            [s for s, _, _ in items], [im for _, im, _ in items], self.pad_id, self.collate_pixels
        )
        return MicroBatch(batch, None, [t for _, _, t in items])

    def signals(self, micro: MicroBatch, device) -> list[TeacherSignal]:
        return [t.to(device) for t in micro.signals]

    route = "cache"

    def describe(self) -> dict:
        return {
            "source": "cache",
            "route": self.route,
            "cache": self.reader.url,
            "teacher": self.reader.attrs["teacher"],
            "template": self.template,
        }

    def identity(self) -> dict:
        """The signals by content (a cache may move): what a --resume must find unchanged."""
        attrs = self.reader.attrs
        return {
            "source": "cache",
            "teacher": _content(attrs["teacher"]),
            "dataset_sha256": attrs["dataset"]["sha256"],
            "options": attrs["options"],
            "manifest_sha256": attrs.get("manifest_sha256"),
        }


class Layer0Source(CacheSource):
    """A `layer0` cache: logit targets from disk; the attention slices and visual tokens recomputed
    per micro-batch by the cache's layer-0 teacher (alignkd_cache/layer0.py) on the training device,
    with the build's capture code, without gradients, in the build's dtype.

    Items: (student sample, student image, teacher sample, teacher image, cached logit targets).
    The route: when the student's vision tower has the stub's weights (layer0.tower_sha256), is
    frozen, and preprocesses images as the stub does, the stub's tower never runs: the student's
    tower runs once per micro-batch and serves both (layer0.TowerOnce); otherwise the stub runs its own
    (always for the transformers-native families, whose backends share no tower: `layer0_tower`).
    """

    def __init__(self, reader, student, image_root, expect_template: str | None = None, device="cpu"):
        super().__init__(reader, student, image_root, expect_template)
        attrs = reader.attrs
        stub_dir = layer0.stub_directory(reader.loc, attrs)
        self.stub = layer0.load_layer0(
            stub_dir, dtype=getattr(torch, attrs["options"]["dtype"]), device=device
        )
        self.teacher_pad_id, self.attn_heads = pad_id(self.stub.tokenizer), attrs["attn_heads"]
        self.student, self.tower = student, None
        if layer0.shares_tower(student, self.stub):
            self.tower = layer0.TowerOnce.of(student)
        self.route = "layer0, student's tower shared" if self.tower else "layer0, the stub's own tower"

    def __getitem__(self, i):
        student, teacher, cached = self.sample(i)
        mine, theirs = [], []
        for picture, key in zip(self.pictures(student, cached), cached.image_keys, strict=True):
            pixels = self.preprocess(picture)
            mine.append((pixels, key))
            theirs.append((pixels if self.tower else self.stub.preprocess(picture), key))
        return student, mine, teacher, theirs, cached

    def collate(self, items) -> MicroBatch:
        student = collate([it[0] for it in items], [it[1] for it in items], self.pad_id, self.collate_pixels)
        teacher = collate(
            [it[2] for it in items], [it[3] for it in items], self.teacher_pad_id, self.stub.collate_pixels
        )
        return MicroBatch(student, teacher, [it[4] for it in items])

    def signals(self, micro: MicroBatch, device) -> list[TeacherSignal]:
        features = None
        if self.tower is not None and micro.student.pixel_values is not None:
            features = self.tower.features(self.student, micro.student.pixel_values)
            if features is None:
                self.route = "layer0, the stub's own tower (the student's tower trains)"
        recomputed = layer0.recompute(self.stub, micro.teacher, self.attn_heads, features)
        out = []
        for i, (cached, teacher, student) in enumerate(
            zip(micro.signals, micro.teacher.samples, micro.student.samples, strict=True)
        ):
            visual = [recomputed.visual[r] for r in micro.teacher.image_index[i]]
            signal = TeacherSignal(recomputed.attention[i], visual, cached.logits, cached.image_keys)
            out.append(on_student(signal, teacher, student).to(device))
        return out

    def describe(self) -> dict:
        return super().describe() | {"layer0_sha256": self.reader.attrs["layer0"]["sha256"]}

    def identity(self) -> dict:
        return super().identity() | {"layer0_sha256": self.reader.attrs["layer0"]["sha256"]}


def cache_source(
    reader, student, image_root, expect_template: str | None = None, device="cpu"
) -> CacheSource:
    """The source for a cache of either kind (attrs["signals"]: stored or layer0)."""
    if cache_kind(reader.attrs) == "layer0":
        return Layer0Source(reader, student, image_root, expect_template, device)
    return CacheSource(reader, student, image_root, expect_template)


def layout_difference(reader, student, image_root) -> str | None:
    """For a refusal: the cache's first image (of its first written sample with one) as the
    teacher's recorded layout and as the student lays it out, when they differ; None when they do
    not, when the cache records no layouts (schema 4.0) or the image cannot be read. The student's
    comes from its fixed layout or from one run of its processor on that sample's images."""
    from alignkd_cache.data import describe_layout

    with_images = np.flatnonzero(reader.image_counts() > 0)
    if not len(with_images):
        return None
    row = reader.row_at(int(with_images[0]))
    if row.get("image_layouts") is None:
        return None
    teacher = row["image_layouts"][0]
    try:
        if student.num_visual_tokens is not None:
            ours = student.image_layouts(1)[0]
        elif image_root is not None and hasattr(student, "layouts_of"):
            paths = [resolve_image(image_root, image, row["id"]) for image in row["images"]]
            ours = student.layouts_of([load_image(p, row["id"], None)[0] for p in paths])[0]
        else:
            return None
    except (DataError, OSError, ValueError, RuntimeError):
        return None  # the refusal stands without the layouts
    if ours == teacher:
        return None
    return (
        f"sample {row['id']!r} image 0: the teacher's recorded layout {describe_layout(teacher)}, "
        f"the student's {describe_layout(ours)}"
    )


def check_cache_matches(
    attrs: dict,
    student,
    expect_template: str | None,
    url: str,
    layouts: Callable[[], str | None] | None = None,
) -> list[str]:
    """Refuse, naming every mismatch, a student that cannot train on this cache; return warnings.

    The logit targets index the teacher's vocabulary, so the vocabularies (every piece and its id,
    plus the special ids: tokenizer_sha256) must be equal. Settings that change how text becomes
    ids (`legacy`) may differ, as in the paper's own pair (7B `legacy: false`, 1.7B legacy): the
    student trains on the cache's ids, i.e. the teacher's tokenization, and is warned.
    Where the visual tokens do not map (a count per image against a fixed one, other image-processor
    settings), `layouts()` (layout_difference) adds to the refusal how the teacher laid the cache's
    first image out and how the student does, when they differ.
    """
    problems, warnings = [], []
    theirs, ours = attrs["tokenizer_sha256"], tokenizer_sha256(student.tokenizer)
    if theirs != ours:
        problems.append(
            f"tokenizer: the cache's teacher tokenizer's vocabulary (pieces and ids) has sha256 {theirs[:16]}..., the student's "
            f"{ours[:16]}...; the logit targets are over the teacher's vocabulary: use a student with the teacher's vocabulary"
        )
    stored = attrs["preprocessing"]["tokenizer"]
    if theirs == ours and stored != tokenizer_settings(student.tokenizer):
        warnings.append(
            f"tokenizer settings differ over the same vocabulary (cache {stored}, student "
            f"{tokenizer_settings(student.tokenizer)}): the student trains on the cache's token ids, i.e. the "
            "teacher's tokenization, not the one its own tokenizer would produce"
        )
    theirs_pad, ours_pad = (
        attrs_pad_color(attrs),
        None if student.pad_color is None else tuple(student.pad_color),
    )
    if None not in (theirs_pad, ours_pad) and ours_pad != theirs_pad:
        warnings.append(
            f"image padding: the cache's images are padded with {theirs_pad}, the student's processor "
            f"mean is {ours_pad}; the student sees the teacher's padding"
        )
    if expect_template is not None and expect_template != attrs["template"]:
        problems.append(
            f"template: the cache was tokenized with template {attrs['template']!r}, not {expect_template!r}; "
            f"drop --template or pass --template {attrs['template']}"
        )

    def with_layouts(problem: str) -> str:
        difference = layouts() if layouts is not None else None
        return problem if difference is None else f"{problem}; {difference}"

    try:
        _check_pooling(attrs["num_visual_tokens"], student.num_visual_tokens, "the cache")
    except CompatibilityError as e:
        problems.append(with_layouts(str(e)))
    if attrs["num_visual_tokens"] is None and student.num_visual_tokens is None:
        from alignkd_cache.build import preprocessing

        theirs, ours = attrs["preprocessing"]["image"], preprocessing(student, attrs["template"])["image"]
        if theirs != ours:
            differ = sorted(k for k in theirs.keys() | ours.keys() if theirs.get(k) != ours.get(k))
            problems.append(
                with_layouts(
                    f"image processing: the cache's teacher and the student process images differently ({', '.join(differ)}), "
                    "so their visual tokens do not map one to one; use a student with the teacher's image processor settings"
                )
            )
    if problems:
        raise CompatibilityError(f"the student cannot train on cache {url}:\n  - " + "\n  - ".join(problems))
    for warning in warnings:
        print(f"warning: cache {url}: {warning}")
    return warnings


# ---------------------------------------------------------------------------------------------
# A resident teacher


class OnlineSource(torch.utils.data.Dataset):
    """Items: (student sample, student image, teacher sample, teacher pixels); the teacher runs per step.

    Tokenizes with the teacher's Tokenization and takes each sample's signals with the build's
    `sample_signal`, so a cache and this source produce the same signals in the same order.
    """

    def __init__(self, teacher, student, data, image_root, options: SignalOptions | None = None):
        options = options or SignalOptions()
        if tokenizer_sha256(teacher.tokenizer) != tokenizer_sha256(student.tokenizer):
            raise CompatibilityError(
                "tokenizer: the teacher's and the student's tokenizers differ; logit KD needs one vocabulary"
            )
        _check_pooling(teacher.num_visual_tokens, student.num_visual_tokens, "the teacher")
        self.teacher, self.student_preprocess, self.options = teacher, student.preprocess, options
        self.student_collate_pixels = student.collate_pixels
        tok = tokenization_for(teacher, options.template, options.max_length, image_root)
        self.teacher_samples, self.skips = tokenize_all(read_records(data), tok)
        self.data_sha256 = file_sha256(data)
        self.samples = [
            respliced(s, student.image_token_id, student.num_visual_tokens) for s in self.teacher_samples
        ]
        check_images(self.samples, image_root)
        self.counts = SampleCounts.of(self.samples)
        self.image_root = image_root
        self.teacher_heads = stored_heads(options.attn_heads, teacher.num_heads)
        self.teacher_dim = teacher.visual_dim
        self.pad_id, self.teacher_pad_id = pad_id(student.tokenizer), pad_id(teacher.tokenizer)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        student, teacher = self.samples[i], self.teacher_samples[i]
        pictures = load_images(student, self.image_root, self.teacher.pad_color)
        return (
            student,
            [(self.student_preprocess(picture), key) for picture, key in pictures],
            teacher,
            [(self.teacher.preprocess(picture), key) for picture, key in pictures],
        )

    def collate(self, items) -> MicroBatch:
        student = collate(
            [it[0] for it in items], [it[1] for it in items], self.pad_id, self.student_collate_pixels
        )
        teacher = collate(
            [it[2] for it in items], [it[3] for it in items], self.teacher_pad_id, self.teacher.collate_pixels
        )
        return MicroBatch(student, teacher, None)

    @torch.no_grad()
    def signals(self, micro: MicroBatch, device) -> list[TeacherSignal]:
        # The teacher runs as `alignkd-cache build` runs it: in its own dtype, never under a
        # caller's (the student's) autocast, so online and cached signals are the same numbers.
        with torch.autocast(torch.device(device).type, enabled=False):
            forward = self.teacher.forward(micro.teacher, capture=True)
        return [
            on_student(
                sample_signal(
                    forward, micro.teacher, i, teacher, self.options, vocab=self.teacher.vocab_size
                ),
                teacher,
                student,
            ).to(device)
            for i, (teacher, student) in enumerate(
                zip(micro.teacher.samples, micro.student.samples, strict=True)
            )
        ]

    route = "online"

    def describe(self) -> dict:
        return {
            "source": "online",
            "route": self.route,
            "teacher": self.teacher.fingerprint(),
            **self._settings(),
            "skipped": [dataclasses.asdict(s) for s in self.skips],
        }

    def identity(self) -> dict:
        return {
            "source": "online",
            "teacher": _content(self.teacher.fingerprint()),
            "data_sha256": self.data_sha256,
            **self._settings(),
            "max_length": self.options.max_length,
        }

    def _settings(self) -> dict:
        o = self.options
        return {
            "template": o.template,
            "logit_targets": o.logit_targets,
            "topk": o.topk,
            "draws": o.draws,
            "sample_seed": o.seed,
            "attn_heads": o.attn_heads,
            "logit_positions": o.logit_positions,
        }


# ---------------------------------------------------------------------------------------------
# No teacher


class DataSource(SampleDataset):
    """A TrainingSource of (sample, image) items and no teacher signals, for plain cross-entropy
    fine-tuning (`alignkd-train finetune`); the demo trains its own teacher this way."""

    route = "none (cross-entropy only)"

    def __init__(
        self,
        model,
        data,
        image_root,
        options: SignalOptions | None = None,
    ):
        options = options or SignalOptions()
        template, max_length = options.template, options.max_length
        tok = tokenization_for(model, template, max_length, image_root)
        samples, self.skips = tokenize_all(read_records(data), tok)
        super().__init__(
            samples,
            image_root,
            model.preprocess,
            pad_id(model.tokenizer),
            model.pad_color,
            model.collate_pixels,
        )
        self.counts = SampleCounts.of(samples)
        self.data, self.template = str(data), template
        self.data_sha256, self.max_length = file_sha256(data), max_length

    def collate(self, items) -> MicroBatch:
        return MicroBatch(super().collate(items), None, None)

    def describe(self) -> dict:
        return {
            "source": "data only (cross-entropy, no teacher)",
            "data": self.data,
            "template": self.template,
            "skipped": [dataclasses.asdict(s) for s in self.skips],
        }

    def identity(self) -> dict:
        return {
            "source": "data",
            "data_sha256": self.data_sha256,
            "template": self.template,
            "max_length": self.max_length,
        }


def _content(fingerprint: dict) -> dict:
    """A model fingerprint without its path or hub id: the same weights found elsewhere match."""
    return {k: v for k, v in fingerprint.items() if k != "model_id"}
