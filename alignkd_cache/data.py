"""LLaVA-format datasets -> the exact token sequences and positions teacher and student both see.

A record is `{id, image?, conversations: [{from: human|gpt, value}]}` (JSON list or JSONL). A
template renders the whole conversation to ONE string, as the official code does
(`conv.get_prompt()`), plus the character spans of the answers; `<image>` marks where the model
family splices its visual tokens. The string is tokenized once per `<image>` chunk and a token is
supervised when its first character lies in an answer span, so no piece is tokenized on its own.

Positions, per sample (all later stages key on them):
- V: the visual-token positions, every position holding the image token id, image after image in
  order (`num_visual[k]` of them belong to image k; empty for text-only samples);
- T: the query positions, the text positions after the first visual token (the layer-0 attention
  signal's queries: the ones that can see an image; not `--logit-positions text`);
- P: the logit positions whose next token is supervised (logits[p] predicts input_ids[p + 1]).

Image layouts: how the processor laid each image's visual tokens out (`TokenizedSample.image_layouts`):
per image a list of segments `{"role", "rows", "cols"}` in the order the tokens are stored, each a
row-major rows x cols block of consecutive visual tokens, summing to that image's `num_visual`
(roles and each family's meaning: docs/cache-format.md, "Image layouts"). The backend derives it
from what its processor returned (`Backend.image_layouts`), where the counts are computed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignkd_cache.errors import DataError
from alignkd_cache.images import load_image
from alignkd_cache.signal_spec import TEMPLATES

IGNORE_INDEX = -100
IMAGE_MARKER = "<image>"

V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass(frozen=True)
class Record:
    id: str
    images: tuple[str, ...]  # in the order of their <image> markers; () for text-only
    conversations: list[dict]
    where: str  # "file:line" for messages


@dataclass(frozen=True)
class Skip:
    id: str
    reason: str


@dataclass
class TokenizedSample:
    id: str
    images: tuple[str, ...]
    input_ids: list[int]
    labels: list[int]
    num_visual: tuple[int, ...]  # per image: its visual positions (image-token ids), in order
    image_token_id: int
    # per image: its layout (segments, see `segment`); None where not known (a schema 4.0 cache's
    # row, a student's respliced sequence)
    image_layouts: tuple[list[dict], ...] | None = None

    @property
    def visual_positions(self) -> list[int]:
        return [i for i, t in enumerate(self.input_ids) if t == self.image_token_id]

    @property
    def query_positions(self) -> list[int]:
        visual = self.visual_positions
        if not visual:
            return []
        seen = set(visual)
        return [p for p in range(visual[0], len(self.input_ids)) if p not in seen]

    def image_spans(self) -> list[list[int]]:
        """Each image's visual positions."""
        visual, spans, start = self.visual_positions, [], 0
        for n in self.num_visual:
            spans.append(visual[start : start + n])
            start += n
        return spans

    @property
    def supervised_positions(self) -> list[int]:
        return [i for i in range(len(self.labels) - 1) if self.labels[i + 1] != IGNORE_INDEX]


def segment(role: str, rows: int, cols: int) -> dict:
    """One block of an image's layout: rows x cols consecutive visual tokens, row-major."""
    return {"role": role, "rows": int(rows), "cols": int(cols)}


def layout_tokens(layout: list[dict]) -> int:
    """How many visual tokens a layout covers."""
    return sum(s["rows"] * s["cols"] for s in layout)


def describe_layout(layout: list[dict] | None) -> str:
    """'tile_0_0 2x2 + tile_0_1 2x2 + thumbnail 2x2' (for messages and figure titles)."""
    if layout is None:
        return "not recorded"
    return " + ".join(f"{s['role']} {s['rows']}x{s['cols']}" for s in layout) or "empty"


def check_layouts(layouts: list[list[dict]], num_visual: list[int], who: str) -> None:
    """Each image's layout covers exactly the visual tokens the processor wrote for it."""
    if len(layouts) != len(num_visual) or any(
        layout_tokens(layout) != n or any(s["rows"] < 1 or s["cols"] < 1 for s in layout)
        for layout, n in zip(layouts, num_visual, strict=False)
    ):
        laid = [describe_layout(layout) for layout in layouts]
        raise RuntimeError(
            f"{who}: the image layouts {laid} do not cover the per-image visual tokens {num_visual}"
        )


# ---------------------------------------------------------------------------------------------
# Reading records


@dataclass(frozen=True)
class Problem:
    """A record the data cannot be used as: kept in dataset order, in place of its Record."""

    reason: str  # the kind, as reports count it ("bad id", "missing image", ...)
    where: str  # file:line (JSONL) or file[index] (JSON list)
    id: str | None  # None when the record has no usable, unique id
    message: str  # the one-line error, naming the sample and what to fix
    image: str | None = None  # its (first) image path, if it names one


def _decode(path: Path) -> str:
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in data[:4096]:
        raise DataError(
            f"{path}: the file is UTF-16 (a UTF-16 byte-order mark or NUL bytes); "
            "save it as UTF-8, e.g. `iconv -f UTF-16 -t UTF-8`",
            "encoding",
        )
    try:
        return data.decode("utf-8-sig")  # a UTF-8 byte-order mark, as some editors write, is fine
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: not valid UTF-8 (byte {data[e.start]:#04x} at offset {e.start}); save the file as UTF-8",
            "encoding",
        ) from e


def read_entries(path: str | Path) -> list[Record | Problem]:
    """Every record of a JSON list or JSONL file, in file order: a Record, or a Problem in its place.

    The file as a whole (its encoding, a malformed JSON list) either reads or raises DataError."""
    path = Path(path)
    text = _decode(path)
    raw: list[tuple[object, str]] = []
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg}); fix the file at that line") from e
        raw = [(item, f"{path}[{i}]") for i, item in enumerate(items)]
    else:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    raw.append((json.loads(line), f"{path}:{lineno}"))
                except json.JSONDecodeError as e:
                    message = f"{path}:{lineno}: malformed JSON ({e.msg}); each JSONL line must be one object"
                    raw.append((DataError(message, "malformed JSON"), f"{path}:{lineno}"))
    entries: list[Record | Problem] = []
    seen: dict[str, str] = {}
    for index, (item, where) in enumerate(raw):
        try:
            if isinstance(item, DataError):
                raise item
            record = _parse_record(item, where, index)
            if record.id in seen:
                raise DataError(
                    f"{where}: duplicate id {record.id!r} (first at {seen[record.id]}); ids must be unique",
                    "duplicate id",
                )
        except DataError as e:
            sid, image = (item.get("id"), item.get("image")) if isinstance(item, dict) else (None, None)
            usable = isinstance(sid, str) and e.reason != "duplicate id"
            image = image[0] if isinstance(image, list) and image else image
            image = image if isinstance(image, str) else None
            entries.append(Problem(e.reason, where, sid if usable else None, str(e), image))
            continue
        seen[record.id] = where
        entries.append(record)
    return entries


def read_records(path: str | Path) -> list[Record]:
    """Read a JSON list or JSONL file, validating structure and ids up front (the first problem raises)."""
    entries = read_entries(path)
    for entry in entries:
        if isinstance(entry, Problem):
            raise DataError(entry.message, entry.reason)
    return entries


def _parse_record(item: object, where: str, index: int) -> Record:
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected an object with id and conversations, got {type(item).__name__}")
    if "id" not in item:
        raise DataError(f"{where}: sample has no 'id'; give every sample a unique id", "bad id")
    sid = item["id"]
    if not isinstance(sid, str):
        raise DataError(
            f"{where}: sample #{index} has id {json.dumps(sid)} ({type(sid).__name__}); ids must be strings, "
            'e.g. "id": "' + str(sid) + '"',
            "bad id",
        )
    convs = item.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise DataError(f"{where}: sample {sid!r} has an empty or missing conversation")
    for turn in convs:
        if (
            not isinstance(turn, dict)
            or turn.get("from") not in ROLES
            or not isinstance(turn.get("value"), str)
        ):
            raise DataError(
                f"{where}: sample {sid!r} has a turn {turn!r}; each turn needs 'from' in "
                f"{sorted(ROLES)} and a string 'value'"
            )
    if "video" in item:
        raise DataError(
            f"{where}: sample {sid!r} has a 'video'; videos are not supported: give frames as a list of images",
            "video",
        )
    images = _images(item.get("image"), where, sid)
    markers = sum(t["value"].count(IMAGE_MARKER) for t in convs)
    answer_markers = [
        i for i, t in enumerate(convs) if ROLES[t["from"]] == "assistant" and IMAGE_MARKER in t["value"]
    ]
    if answer_markers:
        raise DataError(
            f"{where}: sample {sid!r} has {IMAGE_MARKER} in an answer (turn {answer_markers[0]}); "
            f"the image belongs in a human turn: move or remove the marker",
            "image marker in answer",
        )
    if markers != len(images):
        raise DataError(
            f"{where}: sample {sid!r} has {len(images)} image(s) but {markers} {IMAGE_MARKER} marker(s) in its "
            f"text; put one {IMAGE_MARKER} per image, in the order of 'image'"
        )
    if ROLES[convs[0]["from"]] != "user":
        raise DataError(
            f"{where}: sample {sid!r} starts with an assistant turn; conversations start with 'human'"
        )
    if not any(ROLES[t["from"]] == "assistant" for t in convs):
        raise DataError(f"{where}: sample {sid!r} has no 'gpt' answer, so nothing would be supervised")
    return Record(id=sid, images=images, conversations=convs, where=where)


def _images(value: object, where: str, sid: str) -> tuple[str, ...]:
    """A record's 'image': absent, one path, or a list of paths (several images)."""
    if value is None:
        return ()
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
        raise DataError(
            f"{where}: sample {sid!r} has image {value!r}; give a path or a list of paths relative to --image-root"
        )
    return tuple(paths)


# ---------------------------------------------------------------------------------------------
# Templates: record -> one string plus the character spans that are supervised


def move_image_to_front(text: str) -> str:
    """LLaVA's / MobileVLM's `preprocess_multimodal`: the marker goes to the front of its own turn.
    That code knows one image; a turn with several markers keeps them where the text puts them."""
    if text.count(IMAGE_MARKER) != 1:
        return text
    return (IMAGE_MARKER + "\n" + text.replace(IMAGE_MARKER, "").strip()).strip()


def render(record: Record, template: str, tokenizer=None) -> tuple[str, list[tuple[int, int]]] | Skip:
    """(text, answer spans): the whole conversation as the official code renders it, and the
    [start, end) character ranges whose tokens are supervised. A Skip says why a sample cannot be."""
    if template not in TEMPLATES:
        raise DataError(f"unknown template {template!r}; choose one of {TEMPLATES}")
    turns = [(ROLES[t["from"]], move_image_to_front(t["value"])) for t in record.conversations]
    expected = ["user", "assistant"] * len(turns)
    if [role for role, _ in turns] != expected[: len(turns)]:
        return Skip(
            record.id, "turns do not alternate human, gpt, human, ... (the official templates require it)"
        )
    if any(role == "assistant" and IMAGE_MARKER in text for role, text in turns):
        return Skip(record.id, f"the {IMAGE_MARKER} marker is in an answer; put it in a human turn")
    if template == "plain":
        return _render_plain(record, turns)
    if template == "v1":
        return _render_v1(turns)
    return _render_chat(turns, tokenizer, record)


def _render_plain(record: Record, turns) -> tuple[str, list[tuple[int, int]]] | Skip:
    # MobileVLM's preprocess_plain: "<image>" + caption + "\n"; the question text is dropped.
    if len(turns) != 2:
        return Skip(
            record.id,
            f"template 'plain' takes one question and one answer, this sample has {len(turns)} turns",
        )
    if len(record.images) > 1:
        return Skip(record.id, f"template 'plain' takes one image, this sample has {len(record.images)}")
    if record.images and IMAGE_MARKER not in turns[0][1]:
        return Skip(record.id, f"template 'plain' needs the {IMAGE_MARKER} marker in the first turn")
    prefix = IMAGE_MARKER if record.images else ""
    text = prefix + turns[1][1] + "\n"
    return text, [(len(prefix), len(text))]


def _render_v1(turns) -> tuple[str, list[tuple[int, int]]]:
    # Vicuna v1 `conv.get_prompt()`: system + " ", then "USER: q " and "ASSISTANT: a</s>" per turn;
    # an empty message renders as "ROLE:" alone. Supervised: from the space after "ASSISTANT:"
    # through "</s>", which is what preprocess_v1's masking leaves when its arithmetic holds.
    text, spans = V1_SYSTEM + " ", []
    for role, message in turns:
        name = "USER" if role == "user" else "ASSISTANT"
        text += name + ":"
        if not message:
            continue
        if role == "user":
            text += " " + message + " "
        else:
            start = len(text)
            text += " " + message + "</s>"
            spans.append((start, len(text)))
    return text, spans


def _render_chat(turns, tokenizer, record: Record) -> tuple[str, list[tuple[int, int]]]:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{record.where}: template 'chat' needs a tokenizer with a chat_template; use 'v1' or 'plain'"
        )
    messages = [{"role": role, "content": text} for role, text in turns]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, (role, _) in enumerate(turns):
        if role == "assistant":
            prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
            if not (full.startswith(prompt) and text.startswith(full)):
                raise DataError(
                    f"{record.where}: the tokenizer's chat template does not render turns as a prefix "
                    "sequence, so answers cannot be located; use template 'v1'"
                )
            spans.append((len(prompt), len(full)))
    return text, spans


# ---------------------------------------------------------------------------------------------
# Tokenizing and splicing


@dataclass
class Tokenization:
    """How one model family tokenizes: the tokenizer plus where and how its image tokens go.

    `encode`: for a family whose processor renders, expands and counts the image tokens itself
    (dynamic resolution, tiles; backends.transformers_vlm), the record -> its processed sample;
    then the template is the processor's chat template and `num_visual_tokens` is None."""

    tokenizer: object
    template: str
    image_token_id: int
    num_visual_tokens: int | None
    max_length: int = 2048
    add_bos: bool = True  # plain and v1 prepend BOS; a chat template writes its own
    encode: Callable[[Record], object] | None = None
    image_layout: list[dict] | None = None  # a fixed-count family's layout of every image

    def __post_init__(self):
        if self.template not in TEMPLATES:
            raise DataError(f"unknown template {self.template!r}; choose one of {TEMPLATES}")
        if self.template == "chat":
            self.add_bos = False


def _encode(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """(ids, start character of each token) for one string, in one tokenizer call."""
    try:
        out = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as e:
        raise DataError(
            f"{type(tokenizer).__name__} gives no character offsets, so answers cannot be located in one "
            "tokenization; use a fast tokenizer (tokenizer.json) or a SentencePiece tokenizer.model"
        ) from e
    return list(out["input_ids"]), [start for start, _ in out["offset_mapping"]]


def _encode_with_images(text: str, tok: Tokenization) -> tuple[list[int], list[int]]:
    """(ids, starts) with N_v image ids for the marker; starts are -1 for BOS and image ids.

    A tokenizer that knows the marker as the model's image token tokenizes the whole string, as
    transformers' LLaVA processor and apply_chat_template(tokenize=True) do. Otherwise the string
    is split at the marker only and each chunk tokenized whole, as `tokenizer_image_token` does
    (its BOS comes first, the later chunks' BOS is dropped: here none is added).
    """
    tokenizer, n = tok.tokenizer, tok.num_visual_tokens
    ids, starts = [], []
    if tok.add_bos and tokenizer.bos_token_id is not None:
        ids, starts = [tokenizer.bos_token_id], [-1]
    if tok.template == "chat" and tokenizer.convert_tokens_to_ids(IMAGE_MARKER) == tok.image_token_id:
        for token, start in zip(*_encode(tokenizer, text), strict=True):
            image = token == tok.image_token_id
            ids += [token] * (n if image else 1)
            starts += [-1] * n if image else [start]
        return ids, starts
    position = 0
    for j, chunk in enumerate(text.split(IMAGE_MARKER)):
        if j > 0:
            ids += [tok.image_token_id] * n
            starts += [-1] * n
        if chunk:
            chunk_ids, chunk_starts = _encode(tokenizer, chunk)
            ids += chunk_ids
            starts += [position + s for s in chunk_starts]
        position += len(chunk) + len(IMAGE_MARKER)
    return ids, starts


def tokenize(record: Record, tok: Tokenization) -> TokenizedSample | Skip:
    if tok.encode is not None:
        return _processed(record, tok)
    rendered = render(record, tok.template, tok.tokenizer)
    if isinstance(rendered, Skip):
        return rendered
    text, spans = rendered
    ids, starts = _encode_with_images(text, tok)
    labels = [
        t if any(a <= s < b for a, b in spans) else IGNORE_INDEX for t, s in zip(ids, starts, strict=True)
    ]
    image_at = [i for i, t in enumerate(ids) if t == tok.image_token_id]
    if len(image_at) != tok.num_visual_tokens * len(record.images):
        return Skip(record.id, f"the text itself holds the image token id {tok.image_token_id}; remove it")
    if len(ids) > tok.max_length:
        return Skip(record.id, f"{len(ids)} tokens > max length {tok.max_length}")
    num_visual = (tok.num_visual_tokens,) * len(record.images)
    layouts = None if tok.image_layout is None else (tok.image_layout,) * len(record.images)
    sample = TokenizedSample(record.id, record.images, ids, labels, num_visual, tok.image_token_id, layouts)
    if not sample.supervised_positions:
        return Skip(record.id, "no supervised token (empty answers)")
    return sample


def _processed(record: Record, tok: Tokenization) -> TokenizedSample | Skip:
    """A record through its family's processor (Tokenization.encode)."""
    turns = [(ROLES[t["from"]], t["value"]) for t in record.conversations]
    if [role for role, _ in turns] != ["user", "assistant"] * (len(turns) // 2) or len(turns) % 2:
        return Skip(
            record.id, "turns do not alternate human, gpt, human, ... (the chat templates require it)"
        )
    try:
        encoded = tok.encode(record)
    except ValueError as e:  # the processor's rendering does not locate the answers
        return Skip(record.id, f"the processor's chat template: {e}")
    ids = encoded.input_ids
    if len(ids) > tok.max_length:
        return Skip(record.id, f"{len(ids)} tokens > max length {tok.max_length}")
    sample = TokenizedSample(
        record.id,
        record.images,
        ids,
        encoded.labels,
        tuple(encoded.num_visual),
        tok.image_token_id,
        tuple(encoded.image_layouts),
    )
    if not sample.supervised_positions:
        return Skip(record.id, "no supervised token (empty answers)")
    return sample


def tokenization_for(backend, template: str, max_length: int, image_root=None) -> Tokenization:
    """The Tokenization of a backend (teacher or student) with this template; a family whose
    processor renders the conversation (backend.encode) reads each record's images from image_root."""
    encode, image_layout = None, None
    if backend.num_visual_tokens is not None:
        image_layout = backend.image_layouts(1)[0]
        check_layouts([image_layout], [backend.num_visual_tokens], f"model family {backend.family!r}")
    else:
        if template != "chat":
            raise DataError(
                f"model family {backend.family!r} renders conversations with its processor's chat template; "
                "pass --template chat"
            )

        def encode(record: Record):
            if record.images and image_root is None:
                raise DataError(f"sample {record.id!r} has an image but no --image-root was given")
            pictures = [picture for picture, _ in load_images(record, image_root, None)]
            turns = [(ROLES[t["from"]], t["value"]) for t in record.conversations]
            return backend.encode(turns, pictures, record.id)

    return Tokenization(
        backend.tokenizer,
        template,
        backend.image_token_id,
        backend.num_visual_tokens,
        max_length,
        encode=encode,
        image_layout=image_layout,
    )


def tokenize_all(records: list[Record], tok: Tokenization, on_too_long: str = "skip"):
    """Tokenize every record. Returns (samples, skips); `on_too_long="error"` raises instead."""
    samples, skips = [], []
    for record in records:
        out = tokenize(record, tok)
        if isinstance(out, Skip):
            if on_too_long == "error":
                raise DataError(
                    f"{record.where}: sample {record.id!r}: {out.reason}; raise --max-length or shorten it"
                )
            skips.append(out)
        else:
            samples.append(out)
    return samples, skips


# ---------------------------------------------------------------------------------------------
# Images and batching


def resolve_image(image_root: str | Path, rel: str, sample_id: str) -> Path:
    root = Path(image_root).resolve()
    if Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise DataError(
            f"sample {sample_id!r}: image path {rel!r} escapes the image root; give a path relative to {root}",
            "image outside --image-root",
        )
    path = (root / rel).resolve()
    if root not in path.parents:
        raise DataError(
            f"sample {sample_id!r}: image path {rel!r} escapes the image root {root}",
            "image outside --image-root",
        )
    if not path.is_file():
        raise DataError(
            f"sample {sample_id!r}: image file {path} is missing; fix --image-root or the 'image' field",
            "missing image",
        )
    return path


def check_images(samples: list[TokenizedSample], image_root: str | Path | None) -> None:
    """Fail before any compute if an image is missing or outside the root."""
    for s in samples:
        if s.images and image_root is None:
            raise DataError(f"sample {s.id!r} has an image but no --image-root was given")
        for image in s.images:
            resolve_image(image_root, image, s.id)


@dataclass
class Batch:
    ids: list[str]
    input_ids: torch.Tensor  # (B, S), right-padded
    attention_mask: torch.Tensor  # (B, S)
    labels: torch.Tensor  # (B, S), IGNORE_INDEX on prompt, image and padding
    pixel_values: torch.Tensor | dict | None  # the batch's images in order: (n_images, 3, H, W), or
    # a processor-driven family's image inputs (its `collate_pixels`)
    image_index: list[list[int]]  # sample -> the rows of pixel_values of its images
    image_keys: list[list[str]]  # sample -> the content hash of each of its images
    visual_positions: list[torch.Tensor]
    query_positions: list[torch.Tensor]
    supervised_positions: list[torch.Tensor]
    samples: list[TokenizedSample] = field(repr=False, default_factory=list)

    def to(self, device) -> Batch:
        def move(t):
            if isinstance(t, dict):
                return {k: move(v) for k, v in t.items()}
            return t.to(device) if isinstance(t, torch.Tensor) else t

        return Batch(
            self.ids,
            move(self.input_ids),
            move(self.attention_mask),
            move(self.labels),
            move(self.pixel_values),
            self.image_index,
            self.image_keys,
            [move(p) for p in self.visual_positions],
            [move(p) for p in self.query_positions],
            [move(p) for p in self.supervised_positions],
            self.samples,
        )


def pad_id(tokenizer) -> int:
    """The id collate pads with. Padding is masked out of attention and loss, so any id works;
    tokenizers without a pad token (LLaMA's) pad with 0."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def stack_pixels(per_sample: list[list[torch.Tensor]]) -> torch.Tensor | None:
    """Fixed-size preprocessed images (3, H, W), sample after sample, as one (n_images, 3, H, W)."""
    flat = [pixels for sample in per_sample for pixels in sample]
    return torch.stack(flat) if flat else None


def collate(
    samples: list[TokenizedSample],
    images: list[list[tuple[object, str]]],
    pad_id: int,
    collate_pixels: Callable = stack_pixels,
) -> Batch:
    """Right-pad a list of samples; `images[i]` is sample i's [(pixels, key)], [] (or None) for
    text-only. `collate_pixels` (the backend's) makes the batch's image inputs of the samples' pixels."""
    width = max(len(s.input_ids) for s in samples)
    n = len(samples)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    pixels, image_index, keys = [], [], []  # pixels: per sample, its images
    for i, s in enumerate(samples):
        input_ids[i, : len(s.input_ids)] = torch.tensor(s.input_ids)
        labels[i, : len(s.labels)] = torch.tensor(s.labels)
        mask[i, : len(s.input_ids)] = 1
        mine = images[i] or []
        first = sum(len(p) for p in pixels)
        image_index.append(list(range(first, first + len(mine))))
        pixels.append([pixel for pixel, _ in mine])
        keys.append([key for _, key in mine])
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return Batch(
        ids=[s.id for s in samples],
        input_ids=input_ids,
        attention_mask=mask,
        labels=labels,
        pixel_values=collate_pixels(pixels) if any(pixels) else None,
        image_index=image_index,
        image_keys=keys,
        visual_positions=[as_long(s.visual_positions) for s in samples],
        query_positions=[as_long(s.query_positions) for s in samples],
        supervised_positions=[as_long(s.supervised_positions) for s in samples],
        samples=list(samples),
    )


def load_images(sample: TokenizedSample | Record, image_root, pad) -> list[tuple[object, str]]:
    """The sample's (or record's) images as (RGB image padded with `pad`, content key), in order."""
    return [
        load_image(resolve_image(image_root, image, sample.id), sample.id, pad) for image in sample.images
    ]


class SampleDataset(torch.utils.data.Dataset):
    """Tokenized samples plus their preprocessed images; a torch Dataset for DataLoader workers.

    `pad` is the square-padding colour the image keys are defined with (the model's `pad_color`;
    None: not padded); `collate_pixels` the model's (Backend.collate_pixels).
    """

    def __init__(
        self,
        samples: list[TokenizedSample],
        image_root,
        preprocess,
        pad_id: int,
        pad,
        collate_pixels: Callable = stack_pixels,
    ):
        check_images(samples, image_root)
        self.samples, self.image_root, self.preprocess, self.pad_id = samples, image_root, preprocess, pad_id
        self.pad = None if pad is None else tuple(pad)
        self.collate_pixels = collate_pixels

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        s = self.samples[i]
        pictures = load_images(s, self.image_root, self.pad)
        return s, [(self.preprocess(picture), key) for picture, key in pictures]

    def collate(self, items) -> Batch:
        return collate([s for s, _ in items], [im for _, im in items], self.pad_id, self.collate_pixels)
