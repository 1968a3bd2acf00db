"""Where the teacher's signals come from: a cache on disk, or a teacher resident in memory.

Both sources give the trainer the same things: the student's token sequences in dataset order, a
torch Dataset of (student sample, student image, teacher part) items, and per micro-batch a list
of TeacherTargets in the student's geometry. The teacher's token ids are the reference: the
student's are the same ids with the teacher's visual run replaced by the student's own (its image
token id, its visual-token count), so the text rows T and the supervised positions line up.
Teacher signals for a different visual-token count are pooled (alignkd_cache.signals) to the
student's count; nothing else about the two models may differ, and what does is refused up front.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from alignkd_cache.backends.provenance import tokenizer_sha256
from alignkd_cache.backends.tokenizer import tokenizer_settings
from alignkd_cache.data import (
    IGNORE_INDEX,
    Batch,
    DataError,
    SampleDataset,
    Tokenization,
    TokenizedSample,
    check_images,
    collate,
    read_records,
    resolve_image,
    tokenize_all,
)
from alignkd_cache.images import load_image
from alignkd_cache.losses import TeacherTargets
from alignkd_cache.signals import LogitTargets, logit_targets, pool_attention, pool_visual
from alignkd_cache.store.provenance import attrs_pad_color, file_sha256


class CompatibilityError(ValueError):
    """Student and teacher signals disagree in a way training cannot repair."""


@dataclass
class MicroBatch:
    student: Batch
    teacher: Batch | None  # online: the teacher's own batch, run on the main process
    targets: list[TeacherTargets] | None  # cache: decoded in the loader (workers, if any)


# ---------------------------------------------------------------------------------------------
# Mapping teacher signals onto the student's sequence


def respliced(sample: TokenizedSample, image_token_id: int, num_visual: int) -> TokenizedSample:
    """The teacher's token ids with its visual run replaced by the student's."""
    if sample.visual_start < 0:
        return sample
    a, b = sample.visual_start, sample.visual_start + sample.num_visual
    return TokenizedSample(
        sample.id,
        sample.image,
        sample.input_ids[:a] + [image_token_id] * num_visual + sample.input_ids[b:],
        sample.labels[:a] + [IGNORE_INDEX] * num_visual + sample.labels[b:],
        a,
        num_visual,
    )


def student_positions(
    positions: torch.Tensor, teacher: TokenizedSample, student: TokenizedSample
) -> torch.Tensor:
    """Teacher logit positions -> the student's. Positions from the last visual token on shift by the
    difference in visual-token counts (the last visual token predicts the first text token)."""
    if teacher.visual_start < 0:
        mapped = positions
    else:
        last_visual = teacher.visual_start + teacher.num_visual - 1
        if bool(((positions >= teacher.visual_start) & (positions < last_visual)).any()):
            raise CompatibilityError(
                f"sample {teacher.id!r}: teacher logit targets inside the image; refusing to distil there"
            )
        shift = student.num_visual - teacher.num_visual
        mapped = torch.where(positions >= last_visual, positions + shift, positions)
    # Exactly the supervised positions: logit KD is normalised by the supervised-token count.
    if sorted(mapped.tolist()) != student.supervised_positions:
        raise CompatibilityError(
            f"sample {teacher.id!r}: teacher logit targets are not exactly at the positions whose next "
            "token is supervised (they include the prompt or image, or miss answer tokens); logit KD "
            "runs over every supervised position and no other: rebuild the cache with the default "
            "logit positions"
        )
    return mapped


def to_student(
    attention: torch.Tensor | None,
    visual: torch.Tensor | None,
    logits: LogitTargets,
    teacher: TokenizedSample,
    student: TokenizedSample,
) -> TeacherTargets:
    n = student.num_visual
    if attention is not None and attention.shape[-1] != n:
        attention = pool_attention(attention, n)
    if visual is not None and visual.shape[0] != n:
        visual = pool_visual(visual, n)
    logits = dataclasses.replace(logits, positions=student_positions(logits.positions, teacher, student))
    return TeacherTargets(attention, visual, logits)


def targets_to(targets: TeacherTargets, device) -> TeacherTargets:
    move = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
    logits = dataclasses.replace(
        targets.logits,
        **{f.name: move(getattr(targets.logits, f.name)) for f in dataclasses.fields(targets.logits)},
    )
    return TeacherTargets(move(targets.attention), move(targets.visual), logits)


def _check_pooling(n_teacher: int, n_student: int, what: str) -> None:
    if n_teacher != n_student:
        try:
            pool_visual(torch.zeros(n_teacher, 1), n_student)
        except ValueError as e:
            raise CompatibilityError(
                f"visual-token count: {what} has {n_teacher} visual tokens per image, the student "
                f"{n_student}, and no pooling maps one to the other ({e})"
            ) from e


# ---------------------------------------------------------------------------------------------
# Source 1: a cache


class CacheSource(torch.utils.data.Dataset):
    """Items: (student sample, (pixels, key) | None, TeacherTargets), decoded from a CacheReader."""

    def __init__(self, reader, student, image_root, template: str | None = None):
        self.reader, self.image_root, self.preprocess = reader, image_root, student.preprocess
        self.pad_id = _pad_id(student.tokenizer)
        attrs = reader.attrs
        check_cache_matches(attrs, student, template, reader.url)
        self.teacher_samples = reader.tokenized()
        self.samples = [
            respliced(s, student.image_token_id, student.num_visual_tokens) for s in self.teacher_samples
        ]
        check_images(self.samples, image_root)
        self.teacher_heads = 1 if attrs["attn_heads"] == "mean" else int(attrs["num_heads"])
        self.teacher_dim = int(attrs["visual_dim"])
        self.logit_kind = attrs["logit_targets"]
        self.template = attrs["template"]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        student, teacher = self.samples[i], self.teacher_samples[i]
        cached = self.reader.read(teacher.id)
        image = None
        if student.image is not None:
            path = resolve_image(self.image_root, student.image, student.id)
            picture, key = load_image(path, student.id, attrs_pad_color(self.reader.attrs))
            if key != cached.image_key:
                raise DataError(
                    f"sample {student.id!r}: image {path} is not the image the cache was built from "
                    f"(content key {key}, cached {cached.image_key}); restore the original file or rebuild the cache"
                )
            image = (self.preprocess(picture), key)
        return student, image, to_student(cached.attention, cached.visual, cached.logits, teacher, student)

    def collate(self, items) -> MicroBatch:
        batch = collate([s for s, _, _ in items], [im for _, im, _ in items], self.pad_id)
        return MicroBatch(batch, None, [t for _, _, t in items])

    def targets(self, micro: MicroBatch, device) -> list[TeacherTargets]:
        return [targets_to(t, device) for t in micro.targets]

    def describe(self) -> dict:
        return {
            "source": "cache",
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


def check_cache_matches(attrs: dict, student, template: str | None, url: str) -> list[str]:
    """Refuse, naming every mismatch, a student that cannot train on this cache; return warnings.

    The logit targets index the teacher's vocabulary, so the vocabularies (every piece and its id,
    plus the special ids: tokenizer_sha256) must be equal. Settings that change how text becomes
    ids (`legacy`) may differ, as in the paper's own pair (7B `legacy: false`, 1.7B legacy): the
    student trains on the cache's ids, i.e. the teacher's tokenization, and is warned.
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
    if tuple(student.pad_color) != attrs_pad_color(attrs):
        warnings.append(
            f"image padding: the cache's images are padded with {attrs_pad_color(attrs)}, the student's processor "
            f"mean is {tuple(student.pad_color)}; the student sees the teacher's padding"
        )
    if template is not None and template != attrs["template"]:
        problems.append(
            f"template: the cache was tokenized with template {attrs['template']!r}, not {template!r}; "
            f"drop --template or pass --template {attrs['template']}"
        )
    try:
        _check_pooling(int(attrs["num_visual_tokens"]), student.num_visual_tokens, "the cache")
    except CompatibilityError as e:
        problems.append(str(e))
    if problems:
        raise CompatibilityError(f"the student cannot train on cache {url}:\n  - " + "\n  - ".join(problems))
    for warning in warnings:
        print(f"warning: cache {url}: {warning}")
    return warnings


# ---------------------------------------------------------------------------------------------
# Source 2: a resident teacher


class OnlineSource(torch.utils.data.Dataset):
    """Items: (student sample, student image, teacher sample, teacher pixels); the teacher runs per step.

    Tokenizes with the teacher's Tokenization exactly as `alignkd-cache build` does, so a cache and
    this source produce the same samples in the same order.
    """

    def __init__(
        self,
        teacher,
        student,
        data,
        image_root,
        template="v1",
        topk=64,
        logit_kind="topk",
        draws=50,
        sample_seed=0,
        max_length=2048,
    ):
        if tokenizer_sha256(teacher.tokenizer) != tokenizer_sha256(student.tokenizer):
            raise CompatibilityError(
                "tokenizer: the teacher's and the student's tokenizers differ; logit KD needs one vocabulary"
            )
        _check_pooling(teacher.num_visual_tokens, student.num_visual_tokens, "the teacher")
        if logit_kind not in ("topk", "sampled", "full"):
            raise ValueError(f"unknown --logit-targets {logit_kind!r}; choose topk, sampled or full")
        self.teacher, self.student_preprocess = teacher, student.preprocess
        tok = Tokenization(
            teacher.tokenizer, template, teacher.image_token_id, teacher.num_visual_tokens, max_length
        )
        self.teacher_samples, self.skips = tokenize_all(read_records(data), tok)
        self.data_sha256, self.max_length = file_sha256(data), max_length
        self.samples = [
            respliced(s, student.image_token_id, student.num_visual_tokens) for s in self.teacher_samples
        ]
        check_images(self.samples, image_root)
        self.image_root, self.template = image_root, template
        self.topk, self.logit_kind, self.draws, self.sample_seed = topk, logit_kind, draws, sample_seed
        self.teacher_heads, self.teacher_dim = teacher.num_heads, teacher.visual_dim
        self.pad_id, self.teacher_pad_id = _pad_id(student.tokenizer), _pad_id(teacher.tokenizer)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        student, teacher = self.samples[i], self.teacher_samples[i]
        if student.image is None:
            return student, None, teacher, None
        picture, key = load_image(
            resolve_image(self.image_root, student.image, student.id), student.id, self.teacher.pad_color
        )
        return (
            student,
            (self.student_preprocess(picture), key),
            teacher,
            (self.teacher.preprocess(picture), key),
        )

    def collate(self, items) -> MicroBatch:
        student = collate([it[0] for it in items], [it[1] for it in items], self.pad_id)
        teacher = collate([it[2] for it in items], [it[3] for it in items], self.teacher_pad_id)
        return MicroBatch(student, teacher, None)

    @torch.no_grad()
    def targets(self, micro: MicroBatch, device, capture: bool = True) -> list[TeacherTargets]:
        # The teacher runs as `alignkd-cache build` runs it: in its own dtype, never under a
        # caller's (the student's) autocast, so online and cached signals are the same numbers.
        with torch.autocast(torch.device(device).type, enabled=False):
            signals = self.teacher.forward(micro.teacher, capture=capture)
        out = []
        for i, teacher in enumerate(micro.teacher.samples):
            row = micro.teacher.image_index[i]
            positions = torch.tensor(teacher.supervised_positions, dtype=torch.long)
            logits = signals.logits[i].float()
            if self.logit_kind == "full":
                p = positions.to(logits.device)
                t = LogitTargets("full", positions, None, logits[p].log_softmax(-1), None)
            else:
                t = logit_targets(
                    logits,
                    positions,
                    kind=self.logit_kind,
                    k=self.topk,
                    draws=self.draws,
                    seed=self.sample_seed,
                    sample_id=teacher.id,
                )
            attention = signals.attention[i].float() if capture and signals.attention[i] is not None else None
            visual = signals.visual[row].float() if row is not None else None
            out.append(
                targets_to(to_student(attention, visual, t, teacher, micro.student.samples[i]), device)
            )
        return out

    def describe(self) -> dict:
        return {
            "source": "online",
            "teacher": self.teacher.fingerprint(),
            "template": self.template,
            "logit_targets": self.logit_kind,
            "topk": self.topk,
            "draws": self.draws,
            "sample_seed": self.sample_seed,
            "skipped": [dataclasses.asdict(s) for s in self.skips],
        }

    def identity(self) -> dict:
        return {
            "source": "online",
            "teacher": _content(self.teacher.fingerprint()),
            "data_sha256": self.data_sha256,
            "template": self.template,
            "logit_targets": self.logit_kind,
            "topk": self.topk,
            "draws": self.draws,
            "sample_seed": self.sample_seed,
            "max_length": self.max_length,
        }


# ---------------------------------------------------------------------------------------------
# Source 3: no teacher


class DataSource(SampleDataset):
    """Items: (sample, image) and no teacher signals, for plain cross-entropy fine-tuning
    (`alignkd-train finetune`); the demo trains its own teacher this way."""

    teacher_heads = teacher_dim = None

    def __init__(self, model, data, image_root, template="v1", max_length=2048):
        tok = Tokenization(
            model.tokenizer, template, model.image_token_id, model.num_visual_tokens, max_length
        )
        samples, self.skips = tokenize_all(read_records(data), tok)
        super().__init__(samples, image_root, model.preprocess, _pad_id(model.tokenizer), model.pad_color)
        self.data, self.template = str(data), template
        self.data_sha256, self.max_length = file_sha256(data), max_length

    def collate(self, items) -> MicroBatch:
        return MicroBatch(super().collate(items), None, None)

    def targets(self, micro: MicroBatch, device) -> list[None]:
        return [None] * len(micro.student.ids)

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


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
