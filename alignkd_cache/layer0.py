"""The layer-0 teacher: the teacher cut to its first decoder layer, saved beside a cache.

The attention slice and the visual tokens depend only on the vision tower, the projector, the
embeddings and decoder layer 0, so a `layer0` cache stores the logit targets and this stub instead
of per-sample slices, and the slices are recomputed at training time with the build's own capture
code (backends/capture.py). The stub is the family's own checkpoint with `num_hidden_layers=1`, so
`load_backend` loads it unchanged; benchmarks/layer0.py measures what dropping v/o/MLP/lm_head
would save (docs/benchmarks.md, "Layer-0 recipe").

The stub's files, hashes and checks are storage (store/stub.py); this module is the model side.
"""

from __future__ import annotations

import atexit
import copy
import hashlib
import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file

from alignkd_cache.backends import load_backend
from alignkd_cache.backends.capture import spliced_forward
from alignkd_cache.store.provenance import file_sha256
from alignkd_cache.store.stub import FORMAT, MANIFEST, STUB_DIR, stub_sha256, verify_layer0

_DEEPER_LAYER = re.compile(r"\.layers\.([1-9]\d*)\.")


def _layer0_only(state: dict[str, torch.Tensor], tower_prefix: str) -> dict[str, torch.Tensor]:
    """Drop decoder layers >= 1 (the vision tower's own layers stay); own storage for safetensors."""
    return {
        name: t.detach().contiguous().clone()
        for name, t in state.items()
        if name.startswith(tower_prefix) or not _DEEPER_LAYER.search(name)
    }


def _one_layer(config) -> None:
    config.num_hidden_layers = 1
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:1]


def save_layer0(teacher, out_dir: str | Path) -> str:
    """Write the teacher's layer-0 stub to out_dir (a new directory); returns its sha256."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=False)
    if teacher.family == "llava":
        config = copy.deepcopy(teacher.model.config)
        _one_layer(config.text_config)
        config.save_pretrained(out)
        state = _layer0_only(teacher.model.state_dict(), "model.vision_tower.")
    elif teacher.family == "mobilevlm":
        # The tower always goes inside: the stub must not depend on a directory outside the cache.
        config = dict(teacher.config, num_hidden_layers=1)
        config.pop("mm_vision_tower", None)
        config["mm_vision_config"] = teacher.model.vision_tower.config.to_diff_dict()
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        state = _layer0_only(teacher.model.original_state_dict(include_tower=True), "model.vision_tower.")
    else:
        raise ValueError(f"model family {teacher.family!r} has no layer-0 stub; use llava or mobilevlm")
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    teacher.tokenizer.save_pretrained(out)
    teacher.image_processor.save_pretrained(out)
    files = {p.relative_to(out).as_posix(): file_sha256(p) for p in sorted(out.rglob("*")) if p.is_file()}
    sha = stub_sha256(files)
    manifest = {"format": FORMAT, "family": teacher.family, "teacher": teacher.fingerprint(), "files": files}
    (out / MANIFEST).write_text(json.dumps(dict(manifest, sha256=sha), indent=2, sort_keys=True) + "\n")
    return sha


def load_layer0(stub_dir: str | Path, *, dtype=torch.float32, device="cpu"):
    """Verify, then load the stub through the family's own loader. A stub is self-contained: one
    that names a vision tower elsewhere (a path or hub id) is refused, since a cache from someone
    else must not make the trainer load files from outside it."""
    manifest = verify_layer0(stub_dir)
    outside = json.loads((Path(stub_dir) / "config.json").read_text()).get("mm_vision_tower")
    if outside is not None:
        raise ValueError(
            f"layer-0 teacher {stub_dir}: its config names a vision tower outside the stub ({outside!r}); "
            "a stub carries its own tower: rebuild the cache with this version of alignkd-cache"
        )
    return load_backend(stub_dir, dtype=dtype, device=device, family=manifest["family"])


def vision_tower(backend) -> torch.nn.Module:
    return _tower_and_selection(backend)[0]


def _tower_and_selection(backend) -> tuple[torch.nn.Module, int, bool]:
    """(vision tower, hidden-state index fed to the projector, whether CLS is dropped)."""
    if backend.family == "llava":
        return backend.model.model.vision_tower, backend.feature_layer, backend.select_strategy == "default"
    return backend.model.vision_tower, backend.model.select_layer, True  # MobileVLM's "patch"


def tower_sha256(backend) -> str:
    """Hash of the vision tower's weights and feature selection: equal hashes mean equal features."""
    tower, layer, drop_cls = _tower_and_selection(backend)
    digest = hashlib.sha256(f"{type(tower).__name__} layer={layer} drop_cls={drop_cls}\n".encode())
    for name, t in sorted(tower.state_dict().items()):
        t = t.detach().cpu().contiguous()
        digest.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tower_features(backend, pixel_values: torch.Tensor, run_tower=None) -> torch.Tensor:
    """(n, 3, H, W) -> the tower features the projector takes (n, patches, mm_hidden).
    `run_tower` replaces the call of the backend's tower (TowerOnce keeps its output)."""
    tower, layer, drop_cls = _tower_and_selection(backend)
    pixels = pixel_values.to(tower.device, tower.dtype)
    features = (run_tower or tower)(pixels, output_hidden_states=True).hidden_states[layer]
    return features[:, 1:] if drop_cls else features


def project(backend, features: torch.Tensor) -> torch.Tensor:
    """Tower features -> projected visual tokens (n, N_v, D), in the LLM's dtype."""
    if backend.family == "llava":
        return backend.model.model.multi_modal_projector(features.to(backend.model.dtype))
    return backend.model.mm_projector(features.to(backend.model.dtype))


@dataclass
class Layer0Signals:
    """What the stub recomputes for a batch, as the build stores it (float32); no logits: the stub
    has no lm_head, and the logit targets come from the cache.

    attention: per sample, the layer-0 text->vision probabilities (H, or 1 for a head mean, |T|,
        N_v); None for text-only samples.
    visual: (n_images, N_v, D) projected visual tokens, one row per batch.pixel_values row; None
        when the batch has no image.
    """

    attention: list[torch.Tensor | None]
    visual: torch.Tensor | None


def recompute(stub, batch, attn_heads: str = "all", features: torch.Tensor | None = None) -> Layer0Signals:
    """A batch's layer-0 slices and visual tokens from the stub, as the build stores them (float32).

    `features`: the tower features of batch.pixel_values from a tower with the stub's tower_sha256
    (e.g. the student's frozen one), so the stub's tower does not run again.
    """
    if attn_heads not in ("all", "mean"):
        raise ValueError(f"attn_heads {attn_heads!r}: choose 'all' or 'mean'")
    # no_grad, not inference_mode: the results are loss targets, and a loss saves its inputs for backward.
    with torch.no_grad():
        batch = batch.to(stub.model.device)
        visual = None
        if batch.pixel_values is not None:
            if features is None:
                features = tower_features(stub, batch.pixel_values)
            visual = project(stub, features.to(stub.model.device))
        llm = stub.model.model.language_model if stub.family == "llava" else stub.model.llm.model
        captured = spliced_forward(
            batch,
            embed_tokens=llm.get_input_embeddings(),
            decoder=llm,
            lm_head=torch.nn.Identity(),
            visual=visual,
            image_token_id=stub.image_token_id,
            capture=True,
        )
    attention = [
        None if a is None else (a.float().mean(0, keepdim=True) if attn_heads == "mean" else a.float())
        for a in captured.attention
    ]
    return Layer0Signals(attention, None if visual is None else visual.float())


def stub_directory(loc, attrs: dict) -> Path:
    """A local directory holding a `layer0` cache's stub: the cache's own folder when it is local,
    else a download of the files its attrs list (checked by load_layer0 against their sha256)."""
    if loc.local_root is not None:
        return Path(loc.local_root) / STUB_DIR
    scratch = tempfile.mkdtemp(prefix="alignkd-layer0-")
    atexit.register(shutil.rmtree, scratch, True)  # the main process only: workers exit without atexit
    local = Path(scratch) / STUB_DIR
    for name in [*attrs["layer0"]["files"], MANIFEST]:
        data = loc.read_bytes(f"{STUB_DIR}/{name}")
        if data is None:
            raise ValueError(f"{loc.url}: {STUB_DIR}/{name} is missing; run `alignkd-cache verify {loc.url}`")
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_bytes(data)
    return local


def same_preprocessing(a, b) -> bool:
    """Whether two backends turn images into the same pixels (probed on a non-square image)."""
    probe = Image.new("RGB", (61, 37))
    probe.putdata([((7 * i) % 256, (13 * i) % 256, (29 * i) % 256) for i in range(61 * 37)])
    return tuple(a.pad_color) == tuple(b.pad_color) and torch.equal(a.preprocess(probe), b.preprocess(probe))


class TowerOnce:
    """One run of the student's frozen vision tower per micro-batch, for both the layer-0 recompute
    and the student's forward: `features` runs the tower and keeps its output; the student's next
    tower call with the same pixels returns it instead of running again. (An instance attribute
    `forward` shadows the module's method; parameters and state_dict are untouched.)"""

    def __init__(self, tower: torch.nn.Module):
        self.tower, self.run, self.kept = tower, tower.forward, None
        self.tower.forward = self._forward

    @classmethod
    def of(cls, student) -> TowerOnce:
        """The student's TowerOnce, installed on its tower once however many sources ask for it."""
        tower = vision_tower(student)
        installed = getattr(tower.forward, "__self__", None)
        return installed if isinstance(installed, cls) else cls(tower)

    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.tower.parameters())

    def _forward(self, pixel_values, *args, **kwargs):
        kept, self.kept = self.kept, None
        if kept is not None and kept[0].shape == pixel_values.shape and torch.equal(kept[0], pixel_values):
            return kept[1]
        return self.run(pixel_values, *args, **kwargs)

    def features(self, student, pixel_values: torch.Tensor) -> torch.Tensor | None:
        """The tower features of the student's pixels, or None when the tower trains (then the
        stub's own tower must run: the student's features would carry gradients and change)."""
        if not self.frozen():
            return None
        with torch.no_grad():
            return tower_features(student, pixel_values, self._run_and_keep)

    def _run_and_keep(self, pixels, **kwargs):
        output = self.run(pixels, **kwargs)
        self.kept = (pixels, output)
        return output
