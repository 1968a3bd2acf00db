"""Transformers-native VLM families (Qwen2.5-VL, Qwen3-VL, InternVL, SmolVLM, LLaVA-OneVision).

Everything here runs the model's OWN code: its processor expands the image placeholders (tiles,
grids, anyres), its forward merges the visual tokens and computes positions (M-RoPE, deepstack).
We only add, around one forward:

- the layer-0 text->vision capture (alignkd_cache.backends.capture), selected as the text model's
  attention implementation (the vision tower keeps sdpa);
- a wrapper around the instance's `get_image_features` that keeps what the model itself computed
  (after projector / merger / pixel shuffle), so the vision tower runs once and autograd is kept.

What transformers does not expose generically lives in one small module per family
(FAMILY_MODULES): how per-sample image inputs are batched, and how the processor laid each image's
visual tokens out (`image_layouts`, from the image processor's full output, which the processor
partly drops: InternVL's num_patches, SmolVLM's rows and cols; `image_processor_outputs` keeps it).
The processor is composed without its video processor, which in transformers 5 needs torchvision.
"""

from __future__ import annotations

import bisect
import copy
import importlib
import inspect
import json
from collections.abc import Callable
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import torch

from alignkd_cache.backends import VLMOutput
from alignkd_cache.backends.capture import CAPTURE_ATTENTION, layer0_capture
from alignkd_cache.backends.checkpoint import fingerprint
from alignkd_cache.backends.one_layer import one_layer
from alignkd_cache.backends.saving import save_model_like_source
from alignkd_cache.data import check_layouts, layout_tokens

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("internvl", "llava_onevision", "qwen2_5_vl", "qwen3_vl", "smolvlm")
# The other backends of this package, named in the one-line error for an unsupported checkpoint.
_OTHER_BACKENDS = ("llava", "mobilevlm")
# model_type -> module under alignkd_cache.backends with the family's `image_layouts` and its
# `collate_pixels` (if any).
FAMILY_MODULES = {
    "qwen2_5_vl": "qwen_vl",
    "qwen3_vl": "qwen_vl",
    "internvl": "internvl",
    "smolvlm": "smolvlm",
    "llava_onevision": "llava_onevision",
}
IGNORE = -100
_TEXT_KEYS = (
    "input_ids",
    "attention_mask",
    "offset_mapping",
    "text_replacement_offsets",
    "mm_token_type_ids",
)


class UnsupportedFamily(ValueError):
    """A checkpoint whose config.json model_type no backend handles."""


def check_supported(local: str | Path) -> str:
    """The checkpoint's model_type, or UnsupportedFamily with a one-line message."""
    config = json.loads((Path(local) / "config.json").read_text())
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        supported = ", ".join(sorted(_OTHER_BACKENDS + SUPPORTED_MODEL_TYPES))
        raise UnsupportedFamily(
            f"model {local}: model_type {model_type!r} is not supported; supported: {supported}"
        )
    return model_type


class _VideoAbsent:
    num_frames = None
    fps = None

    def __call__(self, *args, **kwargs):
        raise ValueError("this processor was composed without a video processor (it needs torchvision)")


_NO_VIDEO = _VideoAbsent()
# Where `image_processor_outputs` collects what the image processor returned during a processor call.
_IMAGE_OUTPUTS: ContextVar[list | None] = ContextVar("alignkd_image_outputs", default=None)


@contextmanager
def image_processor_outputs():
    """Inside: every processor call of a `without_video` class appends its image processor's whole
    output (num_patches, rows, cols, image_sizes, ... before the processor drops the ones the model
    does not take) to the yielded list."""
    kept: list = []
    token = _IMAGE_OUTPUTS.set(kept)
    try:
        yield kept
    finally:
        _IMAGE_OUTPUTS.reset(token)


@cache
def without_video(processor_cls: type) -> type:
    """`processor_cls` with no video_processor sub-processor (transformers 5 builds one that needs
    torchvision). Same class name, so saved files name the family's real processor class."""

    class NoVideo(processor_cls):
        def __init__(self, image_processor=None, tokenizer=None, *args, **kwargs):
            kwargs.pop("video_processor", None)
            processor_cls.__init__(self, image_processor, tokenizer, None, *args, **kwargs)

        @classmethod
        def get_attributes(cls):
            return [a for a in super().get_attributes() if a != "video_processor"]

        @property
        def video_processor(self):
            # SmolVLM's apply_chat_template reads video_processor.num_frames / .fps even for images.
            return _NO_VIDEO

        def _process_images(self, images, **kwargs):
            processed, replacements = super()._process_images(images, **kwargs)
            kept = _IMAGE_OUTPUTS.get()
            if kept is not None:
                kept.append(processed)
            return processed, replacements

    # to_dict / save_pretrained and from_pretrained name the processor's own settings
    # (image_seq_length, num_image_tokens, ...) from the __init__ signature.
    NoVideo.__init__.__signature__ = inspect.signature(processor_cls.__init__)
    NoVideo.__name__ = NoVideo.__qualname__ = processor_cls.__name__
    return NoVideo


def load_processor(local: str | Path, model_type: str):
    """The family's processor from a checkpoint directory: its tokenizer, its PIL image processor,
    its processor_config.json settings and chat template, and no video processor."""
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    local = Path(local)
    processor_cls = without_video(getattr(transformers, PROCESSOR_MAPPING_NAMES[model_type]))
    tokenizer = AutoTokenizer.from_pretrained(local)
    image_processor = AutoImageProcessor.from_pretrained(local, backend="pil")
    settings = {}
    config_file = local / "processor_config.json"
    if config_file.exists():
        settings = json.loads(config_file.read_text())
    accepted = inspect.signature(processor_cls.__mro__[1].__init__).parameters
    kwargs = {k: v for k, v in settings.items() if k in accepted and k not in _SUBPROCESSORS}
    chat_template = _chat_template(local) or tokenizer.chat_template
    return processor_cls(image_processor, tokenizer, chat_template=chat_template, **kwargs)


_SUBPROCESSORS = ("image_processor", "tokenizer", "video_processor", "chat_template")


def _chat_template(local: Path) -> str | None:
    if (local / "chat_template.jinja").exists():
        return (local / "chat_template.jinja").read_text()
    if (local / "chat_template.json").exists():
        return json.loads((local / "chat_template.json").read_text())["chat_template"]
    return None


@dataclass
class EncodedSample:
    input_ids: list[int]
    labels: list[int]
    num_visual: list[int]
    pixel_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    sample_id: str = ""
    image_layouts: list[list[dict]] = field(default_factory=list)  # per image (data.segment)


def default_collate_pixels(per_sample: list[dict]) -> dict:
    """Concatenate each image input along dim 0 over the samples that have images (the layout of
    Qwen's flattened patches and grids and InternVL's tiles)."""
    present = [p for p in per_sample if p]
    if not present:
        return {}
    return {key: torch.cat([p[key] for p in present]) for key in present[0]}


def pad_dim(tensors: list[torch.Tensor], dim: int, value=0) -> list[torch.Tensor]:
    """Pad every tensor along `dim` to the longest one."""
    longest = max(t.shape[dim] for t in tensors)
    out = []
    for t in tensors:
        shape = list(t.shape)
        shape[dim] = longest - t.shape[dim]
        out.append(torch.cat([t, t.new_full(shape, value)], dim) if shape[dim] else t)
    return out


class TransformersVLM:
    """One transformers-native VLM (teacher or student) and the Align-KD signals of its forward."""

    # Backend protocol: the processor sets each image's visual-token count and takes images as
    # they are (no square padding); `encode` tokenizes (data.tokenization_for).
    num_visual_tokens = None
    pad_color = None

    def __init__(
        self, family: str, model, processor, model_id: str | None = None, source: Path | None = None
    ):
        self.family = family
        self.model = model
        self.processor = processor
        self.image_processor = processor.image_processor
        self.model_id, self.source = model_id, source
        self.tokenizer = processor.tokenizer
        self.image_token_id = int(processor.image_token_id)
        self.image_token = processor.image_token
        text_config = model.config.get_text_config()
        self.num_heads = int(text_config.num_attention_heads)
        self.visual_dim = int(text_config.hidden_size)
        module = importlib.import_module(f"alignkd_cache.backends.{FAMILY_MODULES[family]}")
        self._collate_pixels: Callable[[list[dict]], dict] = getattr(
            module, "collate_pixels", default_collate_pixels
        )
        self._image_layouts = module.image_layouts
        self._end_tokens = sorted(self.tokenizer.get_added_vocab(), key=len, reverse=True)

    @classmethod
    def load(
        cls, local: str | Path, dtype=torch.float32, device="cpu", model_id: str | None = None
    ) -> TransformersVLM:
        from transformers import AutoModelForImageTextToText

        local = Path(local)
        family = check_supported(local)
        processor = load_processor(local, family)
        model = AutoModelForImageTextToText.from_pretrained(
            local,
            dtype=dtype,
            use_safetensors=True,
            attn_implementation={"text_config": CAPTURE_ATTENTION, "vision_config": "sdpa"},
        ).to(device)
        model.eval()
        return cls(family, model, processor, model_id or str(local), local)

    # ---------------------------------------------------------------- encoding

    def messages(self, turns: list[tuple[str, str]], n_images: int, sample_id: str) -> list[dict]:
        """LLaVA-format turns ("<image>" markers in user text) -> HF structured chat messages."""
        messages, markers = [], 0
        for role, text in turns:
            if role not in ("user", "assistant", "system"):
                raise ValueError(f"sample {sample_id!r}: unknown role {role!r}")
            pieces = text.split("<image>") if role == "user" else [text]
            content = []
            for i, piece in enumerate(pieces):
                if i:
                    content.append({"type": "image"})
                    markers += 1
                if piece.strip():
                    content.append({"type": "text", "text": piece})
            messages.append({"role": role, "content": content})
        if markers != n_images:
            raise ValueError(f"sample {sample_id!r}: {markers} <image> markers but {n_images} images")
        return messages

    def encode(self, turns: list[tuple[str, str]], images: list, sample_id: str) -> EncodedSample:
        messages = self.messages(turns, len(images), sample_id)
        rendered = self.processor.apply_chat_template(messages, tokenize=False)
        answers = self._answer_spans(rendered, messages, sample_id)
        with image_processor_outputs() as processed:
            out = self.processor(
                text=[rendered],
                images=images or None,
                return_offsets_mapping=True,
                return_text_replacement_offsets=True,
                return_tensors="pt",
            )
        input_ids = out["input_ids"][0].tolist()
        offsets = [tuple(o) for o in out["offset_mapping"][0].tolist()]
        found = out.get("text_replacement_offsets")
        replacements = found[0] if isinstance(found, list) and found else []
        image_reps = [r for r in replacements if r["type"] == "image"]
        if len(image_reps) != len(images):
            raise ValueError(
                f"sample {sample_id!r}: the processor expanded {len(image_reps)} image placeholders for {len(images)} images"
            )
        ends = [r["span"][1] for r in replacements]
        gained = [0]
        for r in replacements:
            gained.append(r["new_span"][1] - r["span"][1])

        def shift(char: int) -> int:
            return char + gained[bisect.bisect_right(ends, char)]

        expanded = _expanded_text(rendered, replacements)
        labels = [IGNORE] * len(input_ids)
        for start, end, want in answers:
            lo, hi = shift(start), shift(end)
            hit = [p for p, (a, b) in enumerate(offsets) if a < hi and b > lo]
            first, last = (offsets[hit[0]][0], offsets[hit[-1]][1]) if hit else (lo, lo)
            # The tokens must cover exactly the answer and its end token, plus at most the
            # template's separating whitespace merged into the first token.
            if not hit or expanded[lo:hi] != want or last != hi or expanded[first:lo].strip():
                raise ValueError(
                    f"sample {sample_id!r}: the answer tokens {expanded[first:last]!r} do not align with {want!r}"
                )
            for p in hit:
                labels[p] = input_ids[p]
        num_visual = []
        for r in image_reps:
            lo, hi = r["new_span"]
            num_visual.append(
                sum(
                    1
                    for p, (a, b) in enumerate(offsets)
                    if a >= lo and b <= hi and input_ids[p] == self.image_token_id
                )
            )
        if sum(num_visual) != input_ids.count(self.image_token_id):
            raise ValueError(
                f"sample {sample_id!r}: {input_ids.count(self.image_token_id)} image tokens but per-image counts {num_visual}"
            )
        layouts = self._layouts(processed, images, num_visual, f"sample {sample_id!r}")
        pixels = _image_inputs(out) if images else {}
        return EncodedSample(input_ids, labels, num_visual, pixels, sample_id, layouts)

    def image_layouts(self, n_images: int, processed=None, images=()) -> list[list[dict]]:
        """Backend protocol: the family module's `image_layouts` over what the image processor
        returned for the sample's images (`processed`: its whole output, see image_processor_outputs)."""
        if not n_images:
            return []
        if processed is None:
            raise ValueError(f"{self.family}: each image's layout comes from the processor's output")
        layouts = self._image_layouts(self, processed, list(images))
        if len(layouts) != n_images:
            raise RuntimeError(f"{self.family}: {len(layouts)} image layouts for {n_images} images")
        return layouts

    def _layouts(self, processed: list, images: list, num_visual: list[int], who: str) -> list[list[dict]]:
        """Each image's layout from the one image-processor output of a processor call, checked to
        cover exactly the visual tokens the processor wrote for it."""
        if not images:
            return []
        layouts = self._processed_layouts(processed, images)
        check_layouts(layouts, num_visual, f"{who} ({self.family})")
        return layouts

    def _processed_layouts(self, processed: list, images: list) -> list[list[dict]]:
        """The layouts from what the image processor returned in one processor call."""
        if len(processed) != 1:
            raise RuntimeError(f"{self.family}: {len(processed)} image processor calls for one sample")
        return self.image_layouts(len(images), processed[0], images)

    def layouts_of(self, images: list) -> list[list[dict]]:
        """The layouts this processor gives a sample of these images (as `encode` records them),
        without its text: what a cache's teacher recorded is compared with it (sources)."""
        messages = self.messages([("user", "<image>" * len(images))], len(images), "layouts")
        text = self.processor.apply_chat_template(messages, tokenize=False)
        with image_processor_outputs() as processed:
            out = self.processor(text=[text], images=images)
        layouts = self._processed_layouts(processed, images)
        written = list(out["input_ids"][0]).count(self.image_token_id)
        if sum(layout_tokens(layout) for layout in layouts) != written:
            raise RuntimeError(f"{self.family}: the image layouts do not cover the {written} image tokens")
        return layouts

    def _answer_spans(
        self, rendered: str, messages: list[dict], sample_id: str
    ) -> list[tuple[int, int, str]]:
        """(start, end, text) in `rendered` of every assistant answer plus its end-of-turn token."""
        spans, cursor = [], 0
        for message in messages:
            for part in message["content"]:
                if part["type"] != "text":
                    continue
                text = part["text"].strip()
                at = rendered.find(text, cursor)
                if at < 0:
                    raise ValueError(
                        f"sample {sample_id!r}: the chat template's output does not contain the {message['role']} text {text!r}"
                    )
                cursor = at + len(text)
                if message["role"] == "assistant":
                    end_token = next((t for t in self._end_tokens if rendered.startswith(t, cursor)), None)
                    if end_token is None:
                        raise ValueError(
                            f"sample {sample_id!r}: no end-of-turn token right after the answer {text!r}"
                        )
                    cursor += len(end_token)
                    spans.append((at, cursor, text + end_token))
        return spans

    # ---------------------------------------------------------------- batching

    def preprocess(self, image):
        """Backend protocol: the image as it is; collate_pixels runs the processor per sample."""
        return image

    def collate_pixels(self, per_sample: list[list]) -> dict:
        """Backend protocol: each sample's images through the processor (as `encode` runs it: the
        image inputs do not depend on the text), then batched as the family's forward takes them."""
        inputs = []
        for pictures in per_sample:
            if not pictures:
                inputs.append({})
                continue
            # One user turn of the sample's images: the same image inputs, without tokenizing its text.
            messages = self.messages([("user", "<image>" * len(pictures))], len(pictures), "pixels")
            text = self.processor.apply_chat_template(messages, tokenize=False)
            inputs.append(_image_inputs(self.processor(text=[text], images=pictures, return_tensors="pt")))
        return self._collate_pixels(inputs)

    @property
    def vocab_size(self) -> int:
        """The tokenizer's ids: the logits' first rows, the only ids a logit target names. Rows past
        them pad the embedding (Qwen2.5-VL 7B has 152064, 3B 151936 over one tokenizer); their
        probability stays in the softmax, so it falls in the top-k tail (signals.logit_targets)."""
        return len(self.tokenizer)

    def forward(self, batch, capture: bool = True) -> VLMOutput:
        """Backend protocol: a data.Batch through the model's own forward (see `run`)."""
        num_visual = [list(s.num_visual) for s in batch.samples]
        logits, attention, visual = self.run(
            batch.input_ids, batch.attention_mask, batch.pixel_values or {}, num_visual, capture
        )
        flat = [v for sample in visual for v in sample]
        return VLMOutput(logits, attention, flat or None)

    def fingerprint(self) -> dict:
        return fingerprint(self, self.model.config.to_dict())

    # ---------------------------------------------------------------- forward

    @contextmanager
    def _keep_image_features(self):
        """Record what the model's own get_image_features returns during one forward."""
        owner = self.model.model if hasattr(self.model.model, "get_image_features") else self.model
        original = owner.get_image_features
        kept: list = []

        def wrapper(*args, **kwargs):
            result = original(*args, **kwargs)
            kept.append(result)
            return result

        owner.get_image_features = wrapper
        try:
            yield kept
        finally:
            del owner.get_image_features  # back to the class's method

    def run(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_inputs: dict,
        num_visual: list[list[int]],
        capture: bool = True,
        logits: bool = True,
    ):
        """(logits (B, S, V_model), attention per sample (H, |T|, sum N_v) or None,
        visual per sample: one (N_i, D) tensor per image). `num_visual`: per sample, each image's
        visual-token count (the model's output does not say where one image's tokens end for tiled
        families). logits=False runs the model without its lm_head (the base model's own forward)
        and returns None for them."""
        device = self.model.device
        model = self.model if logits else self.model.model
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in pixel_inputs.items()}
        if getattr(self.processor, "return_mm_token_type_ids", False):
            # M-RoPE (Qwen) needs the per-token modality; the processor says how it builds it.
            types = self.processor.create_mm_token_type_ids(input_ids.tolist())
            inputs["mm_token_type_ids"] = (
                torch.tensor(types, dtype=torch.long, device=device) * attention_mask
            )
        is_image = input_ids == self.image_token_id
        visual_positions, query_positions = [], []
        for b in range(input_ids.shape[0]):
            v = is_image[b].nonzero().flatten()
            visual_positions.append(v)
            if len(v):
                after = torch.arange(input_ids.shape[1], device=device) > v[0]
                query_positions.append((after & ~is_image[b] & attention_mask[b].bool()).nonzero().flatten())
            else:
                query_positions.append(v.new_zeros(0))
        with self._keep_image_features() as kept:
            if capture:
                with layer0_capture(query_positions, visual_positions, attention_mask) as request:
                    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **inputs)
                if request.slices is None:
                    raise RuntimeError(f"layer 0 of {self.family} never ran through {CAPTURE_ATTENTION!r}")
                attention = request.slices
            else:
                out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **inputs)
                attention = [None] * input_ids.shape[0]
        visual = self._split_visual(kept, is_image, num_visual)
        return (out.logits if logits else None), attention, visual

    def _split_visual(self, kept: list, is_image: torch.Tensor, num_visual) -> list[list[torch.Tensor]]:
        per_sample = is_image.sum(1).tolist()
        if not kept:
            if any(per_sample):
                raise RuntimeError(f"{self.family}: the model never called get_image_features")
            return [[] for _ in per_sample]
        pooled = kept[-1].pooler_output
        pieces = list(pooled) if isinstance(pooled, (list, tuple)) else [pooled]
        flat = torch.cat([p.reshape(-1, self.visual_dim) for p in pieces])
        if flat.shape[0] != sum(per_sample):
            raise RuntimeError(
                f"{self.family}: get_image_features gave {flat.shape[0]} visual tokens for {sum(per_sample)} image positions"
            )
        chunks = iter(flat.split([n for sample in num_visual for n in sample]))
        visual = []
        for sample, n in zip(num_visual, per_sample, strict=True):
            if sum(sample) != n:
                raise ValueError(
                    f"{self.family}: num_visual {sample} does not sum to the sample's {n} image tokens"
                )
            visual.append([next(chunks) for _ in sample])
        return visual

    # ---------------------------------------------------------------- the rest

    @torch.no_grad()
    def generate(self, turns: list[tuple[str, str]], images: list, max_new_tokens: int = 16) -> str:
        """Greedy answer to the conversation's last user turn through the model's own generate."""
        messages = self.messages(turns, len(images), "generate")
        prompt = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = self.processor(text=[prompt], images=images or None, return_tensors="pt").to(
            self.model.device
        )
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return self.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    def save_pretrained(self, out_dir: str | Path) -> None:
        """As the source checkpoint was: its weight files and keys, every other file byte for byte."""
        save_model_like_source(self.model, self.source, Path(out_dir))

    # ---------------------------------------------------------------- the layer-0 stub (layer0.py)

    def save_layer0_stub(self, out_dir: str | Path) -> None:
        """This checkpoint through the model's own save_pretrained with the text config's
        num_hidden_layers = 1: the embeddings, decoder layer 0, the final norm, the whole vision path
        (tower, projector / merger), plus the processor's files. Not the lm_head: the stub's config
        sets tie_word_embeddings, so transformers loads the embedding table as the lm_head, with no
        missing weight and no random initialisation (the stub's logits are never used)."""
        out = Path(out_dir)
        config = copy.deepcopy(self.model.config)
        one_layer(config.get_text_config())
        config.tie_word_embeddings = True
        names = {id(module): name for name, module in self.model.named_modules()}
        layers = names[id(self.model.model.get_decoder().layers)] + "."
        head = names[id(self.model.get_output_embeddings())] + "."
        state = {
            name: t
            for name, t in self.model.state_dict().items()
            if not name.startswith(head)
            and not (name.startswith(layers) and not name.startswith(layers + "0."))
        }
        kept_config = self.model.config
        self.model.config = config  # save_pretrained writes the model's config: the stub's, for this call
        try:
            self.model.save_pretrained(out, state_dict=state, safe_serialization=True)
        finally:
            self.model.config = kept_config
        self.processor.save_pretrained(out)

    def layer0_tower(self) -> None:
        """No tower is shared with a student (layer0.TowerOnce): a stub of this family always runs
        its own vision path, inside the model's own forward."""
        return None

    def recompute_layer0(self, batch, features: torch.Tensor | None = None) -> VLMOutput:
        """On a stub: the batch's layer-0 slices and visual tokens, one (N_i, D) per image (logits
        None), from the one-layer model's own forward with the capture (no lm_head)."""
        if features is not None:
            raise ValueError(f"a {self.family} stub runs its own vision path; it takes no tower features")
        num_visual = [list(s.num_visual) for s in batch.samples]
        _, attention, visual = self.run(
            batch.input_ids, batch.attention_mask, batch.pixel_values or {}, num_visual, logits=False
        )
        flat = [v for sample in visual for v in sample]
        return VLMOutput(None, attention, flat or None)


def _image_inputs(processed) -> dict[str, torch.Tensor]:
    """The image inputs of a processor's output (what the model's forward takes besides the text)."""
    return {k: v for k, v in processed.items() if k not in _TEXT_KEYS and isinstance(v, torch.Tensor)}


def _expanded_text(rendered: str, replacements: list[dict]) -> str:
    pieces, cursor = [], 0
    for r in replacements:
        start, end = r["span"]
        pieces += [rendered[cursor:start], r["replacement"]]
        cursor = end
    return "".join(pieces) + rendered[cursor:]
