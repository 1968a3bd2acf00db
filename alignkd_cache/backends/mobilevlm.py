"""MobileVLM V2 (the paper's teacher and student), loaded from an original checkpoint directory.

Layout of an original checkpoint (model_type "mobilevlm", see docs/method.md §4):
- LLaMA weights under `model.*` and `lm_head.*`: loaded by transformers' LlamaForCausalLM as is;
- the LDPv2 projector under `model.mm_projector.` (mlp.mlp.0, GELU, mlp.mlp.2, AdaptiveAvgPool2d to
  a grid x grid, peg.peg.0 depthwise 3x3 conv with a residual);
- the CLIP tower under `model.vision_tower.vision_tower.` when it is inside the checkpoint; usually it
  is not, and `mm_vision_tower` names it (a path or hub id). A `vision_tower=` argument overrides both.

Two config keys are ours, both optional: `mm_ldp_grid` (pooled grid side, 12 in the released models)
and `mm_vision_config` (the CLIP vision config, written when the tower is saved inside, so such a
checkpoint loads without fetching `mm_vision_tower`).
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from alignkd_cache.backends import VLMOutput
from alignkd_cache.backends.capture import CAPTURE_ATTENTION, spliced_forward
from alignkd_cache.backends.checkpoint import fingerprint, resolve_checkpoint
from alignkd_cache.backends.one_layer import (
    TowerSelection,
    layer0_only,
    spliced_layer0,
    write_stub_files,
)
from alignkd_cache.backends.saving import save_like_source, source_keys
from alignkd_cache.backends.tokenizer import load_tokenizer
from alignkd_cache.data import segment, stack_pixels
from alignkd_cache.images import pad_color, pad_to_square

IMAGE_TOKEN_ID = -200  # MobileVLM's placeholder id, as in the original code
PROJECTOR_PREFIX = "model.mm_projector."
# The original wraps a transformers 4 CLIPVisionModel, whose parameters sit under `vision_model.`.
TOWER_PREFIX = "model.vision_tower.vision_tower.vision_model."
DEFAULT_GRID = 12


class _Named(nn.Module):
    """A one-child wrapper so parameter names read like the original (`mlp.mlp.0.weight`)."""

    def __init__(self, name: str, child: nn.Sequential):
        super().__init__()
        self.add_module(name, child)
        self.child_name = name

    def forward(self, x):
        return getattr(self, self.child_name)(x)


class LDPv2Projector(nn.Module):
    """CLIP patch features (n, grid_in^2, C) -> (n, grid^2, D): MLP, average pool, positional conv."""

    def __init__(self, in_dim: int, dim: int, grid: int = DEFAULT_GRID):
        super().__init__()
        self.grid = grid
        self.mlp = _Named("mlp", nn.Sequential(nn.Linear(in_dim, dim), nn.GELU(), nn.Linear(dim, dim)))
        self.dwn = _Named("dwn", nn.Sequential(nn.AdaptiveAvgPool2d((grid, grid))))
        self.peg = _Named("peg", nn.Sequential(nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.mlp(features)
        n, tokens, dim = x.shape
        side = int(round(tokens**0.5))
        if side * side != tokens:
            raise ValueError(f"LDPv2 needs a square patch grid, got {tokens} patch tokens")
        x = self.dwn(x.transpose(1, 2).reshape(n, dim, side, side))
        x = self.peg(x) + x
        return x.flatten(2).transpose(1, 2)


def llama_config(config: dict) -> LlamaConfig:
    """The LLM part of a MobileVLM config, as a LlamaConfig."""
    skip = {"model_type", "architectures", "auto_map", "transformers_version"}
    return LlamaConfig(**{k: v for k, v in config.items() if k not in skip and not k.startswith("mm_")})


class MobileVLM(nn.Module):
    def __init__(
        self,
        llm: LlamaForCausalLM,
        projector: LDPv2Projector,
        vision_tower: CLIPVisionModel,
        select_layer: int = -2,
    ):
        super().__init__()
        self.llm, self.mm_projector, self.vision_tower = llm, projector, vision_tower
        self.select_layer = select_layer

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.dtype

    @property
    def device(self) -> torch.device:
        return self.llm.device

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        tower = self.vision_tower
        pixels = pixel_values.to(tower.device, tower.dtype)
        # "patch" features: the chosen layer's tokens without CLS, a square grid for LDPv2.
        features = tower(pixels, output_hidden_states=True).hidden_states[self.select_layer][:, 1:]
        return self.mm_projector(features.to(self.dtype))

    def original_state_dict(self, include_tower: bool) -> dict[str, torch.Tensor]:
        """Parameters under the original checkpoint's names."""
        out = dict(self.llm.state_dict())
        out.update({PROJECTOR_PREFIX + k: v for k, v in self.mm_projector.state_dict().items()})
        if include_tower:
            tower = self.vision_tower.state_dict()
            out.update({TOWER_PREFIX + k.removeprefix("vision_model."): v for k, v in tower.items()})
        # safetensors refuses shared storage (tied embeddings): every tensor gets its own copy.
        return {k: v.detach().contiguous().clone() for k, v in out.items()}


# The vision settings every MobileVLM V2 checkpoint's config.json carries (docs/method.md §4).
MOBILEVLM_V2_VISION = {
    "mm_projector_type": "ldpnetv2",
    "mm_vision_select_layer": -2,
    "mm_vision_select_feature": "patch",
    "mm_use_im_start_end": False,
    "mm_use_im_patch_token": False,
    "image_aspect_ratio": "pad",
}


def _checkpoint_files(local: Path) -> list[Path]:
    files = sorted(local.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in local.glob("*.bin"))
        hint = (
            f" It holds {bins}: pickled weights are never loaded here; convert them once, in an environment you "
            "trust, with safetensors.torch.save_file(torch.load(f, weights_only=True), f.replace('.bin', '.safetensors'))."
            if bins
            else ""
        )
        raise FileNotFoundError(f"{local}: no *.safetensors weights.{hint}")
    return files


def _read_prefix(files: list[Path], prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if key.startswith(prefix):
                    out[key[len(prefix) :]] = f.get_tensor(key)
    return out


def _load_tower(
    config: dict, weights: dict, override, dtype
) -> tuple[CLIPVisionModel, str | None, Path | None]:
    """(tower, reference, its resolved directory): the tower from `override`, else the checkpoint,
    else `mm_vision_tower`. The reference is resolved once, here; its directory also gives the
    image processor."""
    if override is None and weights:
        vision_config = config.get("mm_vision_config")
        vision_config = (
            CLIPVisionConfig(**vision_config)
            if vision_config
            else CLIPVisionConfig.from_pretrained(str(resolve_checkpoint(config["mm_vision_tower"])))
        )
        vision_config._attn_implementation = "sdpa"
        tower = CLIPVisionModel(vision_config)
        # Recent CLIPVisionModel versions dropped the `vision_model.` level; older ones keep it.
        nested = next(iter(tower.state_dict())).startswith("vision_model.")
        tower.load_state_dict({("vision_model." if nested else "") + k: v for k, v in weights.items()})
        return tower.to(dtype), None, None
    reference = override if override is not None else config.get("mm_vision_tower")
    if not reference:
        raise ValueError(
            "the checkpoint has no vision tower weights and no mm_vision_tower; pass vision_tower="
        )
    local = resolve_checkpoint(reference)
    with _quiet_transformers():  # a full CLIPModel checkpoint also holds the unused text tower
        tower = CLIPVisionModel.from_pretrained(
            str(local), dtype=dtype, attn_implementation="sdpa", use_safetensors=True
        )
    return tower, str(reference), local


def _image_processor(directories: list[Path | None]) -> CLIPImageProcessorPil | None:
    """The CLIP processor settings the official code reads: the tower's preprocessor_config.json
    (MobileVLM loads CLIPImageProcessor from mm_vision_tower), else the checkpoint's (both resolved)."""
    for directory in directories:
        if directory is not None and (directory / "preprocessor_config.json").is_file():
            return CLIPImageProcessorPil.from_pretrained(str(directory))
    return None


@contextmanager
def _quiet_transformers():
    """Silence warnings that are expected here: LlamaForCausalLM does not use the projector and tower
    keys, the config's model type is not llama, a CLIPVisionModel skips a full CLIP's text tower."""
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class MobileVLMBackend:
    family = "mobilevlm"
    image_token_id = IMAGE_TOKEN_ID

    def __init__(
        self,
        model: MobileVLM,
        config: dict,
        tokenizer,
        model_id: str,
        source: Path | None,
        tower_ref: str | None,
        image_processor: CLIPImageProcessorPil | None = None,
    ):
        self.model, self.config, self.tokenizer = model, config, tokenizer
        self.model_id, self.source, self.tower_ref = model_id, source, tower_ref
        side = model.vision_tower.config.image_size
        # transformers' CLIP defaults (the values clip-vit-large-patch14-336 ships) only when neither
        # the tower nor the checkpoint has a preprocessor_config.json.
        self.image_processor = image_processor or CLIPImageProcessorPil(
            size={"shortest_edge": side}, crop_size={"height": side, "width": side}
        )
        # MobileVLM's expand2square fill: tuple(int(x*255) for x in image_processor.image_mean).
        self.pad_color = pad_color(self.image_processor.image_mean)
        self.num_visual_tokens = model.mm_projector.grid**2
        self.num_heads = int(config["num_attention_heads"])
        self.visual_dim = int(config["hidden_size"])

    @classmethod
    def load(
        cls,
        local: Path,
        dtype=torch.float32,
        device="cpu",
        vision_tower=None,
        model_id: str | None = None,
        **kwargs,
    ) -> MobileVLMBackend:
        """From a resolved checkpoint directory (load_backend resolves); `model_id`: what the user named."""
        if kwargs:
            raise TypeError(f"MobileVLMBackend.load got unknown options {sorted(kwargs)}")
        model_id = model_id or str(local)
        config = json.loads((local / "config.json").read_text())
        if config.get("mm_projector_type", "ldpnetv2") != "ldpnetv2":
            raise ValueError(
                f"{model_id}: mm_projector_type {config['mm_projector_type']!r}; only MobileVLM V2's ldpnetv2 is supported"
            )
        if config.get("mm_vision_select_feature", "patch") != "patch":
            raise ValueError(
                f"{model_id}: mm_vision_select_feature {config['mm_vision_select_feature']!r}; LDPv2 needs 'patch' (no CLS)"
            )
        files = _checkpoint_files(local)
        llm_config = llama_config(config)
        llm_config._attn_implementation = CAPTURE_ATTENTION
        with _quiet_transformers():
            llm = LlamaForCausalLM.from_pretrained(
                local, config=llm_config, dtype=dtype, use_safetensors=True
            )
        tokenizer = load_tokenizer(local)  # outside the log filter: a failure shows its real reason
        projector = LDPv2Projector(
            config["mm_hidden_size"], config["hidden_size"], config.get("mm_ldp_grid", DEFAULT_GRID)
        )
        projector.load_state_dict(_read_prefix(files, PROJECTOR_PREFIX))
        tower, tower_ref, tower_dir = _load_tower(
            config, _read_prefix(files, TOWER_PREFIX), vision_tower, dtype
        )
        select_layer = config.get("mm_vision_select_layer", -2)
        model = MobileVLM(llm, projector.to(dtype), tower, select_layer).to(device).eval()
        processor = _image_processor([tower_dir, local])
        return cls(model, config, tokenizer, model_id, local, tower_ref, processor)

    collate_pixels = staticmethod(stack_pixels)

    def image_layouts(self, n_images: int, processed=None, images=()) -> list[list[dict]]:
        """Backend protocol: every image is the LDPv2 projector's pooled grid (12 x 12 released)."""
        side = self.model.mm_projector.grid
        return [[segment("grid", side, side)] for _ in range(n_images)]

    @property
    def vocab_size(self) -> int:
        return self.model.llm.lm_head.out_features

    def preprocess(self, image) -> torch.Tensor:
        """expand2square with the processor's mean, then the CLIP processor (a square passes as is)."""
        image = pad_to_square(image, self.pad_color)
        return self.image_processor(image, return_tensors="pt")["pixel_values"][0]

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_images(pixel_values)

    def forward(self, batch, capture: bool = True) -> VLMOutput:
        batch = batch.to(self.model.device)
        visual = self.encode_images(batch.pixel_values) if batch.pixel_values is not None else None
        llm = self.model.llm
        return spliced_forward(
            batch,
            embed_tokens=llm.get_input_embeddings(),
            decoder=llm.model,
            lm_head=llm.lm_head,
            visual=visual,
            image_token_id=self.image_token_id,
            capture=capture,
        )

    def save_pretrained(self, out_dir, include_vision_tower: bool | None = None) -> None:
        """A model loaded from a checkpoint is written as that checkpoint was (saving.py), the tower
        inside when it was inside. A model built in memory, or one whose tower is asked to move, gets
        a new checkpoint in the original layout (the tower inside when it came from inside)."""
        if self.source is not None and include_vision_tower is None:
            inside = any(key.startswith(TOWER_PREFIX) for key in source_keys(self.source))
            save_like_source(self.source, Path(out_dir), self.model.original_state_dict(inside))
            return
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        inside = self.tower_ref is None if include_vision_tower is None else include_vision_tower
        config = dict(self.config)
        if inside:
            config["mm_vision_config"] = self.model.vision_tower.config.to_diff_dict()
        else:
            if self.tower_ref is None:
                raise ValueError(
                    "the vision tower came from inside the checkpoint; save it inside or give it a home"
                )
            config.pop("mm_vision_config", None)
            config["mm_vision_tower"] = self.tower_ref
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(
            self.model.original_state_dict(inside), str(out / "model.safetensors"), metadata={"format": "pt"}
        )
        self.tokenizer.save_pretrained(out)
        self.image_processor.save_pretrained(out)

    def fingerprint(self) -> dict:
        return fingerprint(self, self.config)

    # ---------------------------------------------------------------- the layer-0 stub (layer0.py)

    def save_layer0_stub(self, out_dir) -> None:
        """The original layout with num_hidden_layers = 1: layer 0, the embeddings, the projector,
        the lm_head and the CLIP tower, always inside (the stub must not depend on a directory
        outside the cache: mm_vision_tower is dropped, mm_vision_config written)."""
        out = Path(out_dir)
        config = dict(self.config, num_hidden_layers=1)
        config.pop("mm_vision_tower", None)
        config["mm_vision_config"] = self.model.vision_tower.config.to_diff_dict()
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        state = layer0_only(self.model.original_state_dict(include_tower=True), "model.vision_tower.")
        write_stub_files(out, state, self.tokenizer, self.image_processor)

    def layer0_tower(self) -> TowerSelection:
        return TowerSelection(self.model.vision_tower, self.model.select_layer, True)  # "patch"

    def recompute_layer0(self, batch, features: torch.Tensor | None = None) -> VLMOutput:
        """On a stub: the batch's layer-0 slices and visual tokens (logits None); `features`: the
        layer0_tower features of batch.pixel_values from an equal tower, else the stub's own runs."""
        return spliced_layer0(self, batch, features, self.model.mm_projector, self.model.llm.model)
