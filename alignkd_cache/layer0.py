"""The layer-0 teacher: the teacher cut to its first decoder layer, saved beside a cache.

The attention slice and the visual tokens depend only on the vision path (tower, projector or
merger), the embeddings and decoder layer 0, so a `layer0` cache stores the logit targets and this
stub instead of per-sample slices, and the slices are recomputed at training time with the build's
own capture code (backends/capture.py). The stub is the family's own checkpoint with
`num_hidden_layers=1`, so `load_backend` loads it unchanged; benchmarks/layer0.py measures what
dropping v/o/MLP/lm_head would save (docs/benchmarks.md, "Layer-0 recipe").

What differs per family sits behind the Backend protocol (backends/__init__.py): how the stub is
written (`save_layer0_stub`), how it recomputes a batch (`recompute_layer0`) and which vision tower,
if any, it can share with a student (`layer0_tower`). This module knows no family.

The stub's files, hashes and checks are storage (store/stub.py); this module is the model side.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from alignkd_cache.backends import load_backend
from alignkd_cache.backends.one_layer import TowerSelection
from alignkd_cache.store.provenance import file_sha256
from alignkd_cache.store.stub import FORMAT, MANIFEST, STUB_DIR, stub_sha256, verify_layer0


def save_layer0(teacher, out_dir: str | Path) -> str:
    """Write the teacher's layer-0 stub to out_dir (a new directory); returns its sha256."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=False)
    teacher.save_layer0_stub(out)
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
    return _selection(backend).tower


def _selection(backend) -> TowerSelection:
    selection = backend.layer0_tower()
    if selection is None:
        raise ValueError(f"a {backend.family} model shares no vision tower with a layer-0 stub")
    return selection


def tower_sha256(backend) -> str:
    """Hash of the vision tower's weights and feature selection: equal hashes mean equal features."""
    selection = _selection(backend)
    tower, layer, drop_cls = selection.tower, selection.layer, selection.drop_cls
    digest = hashlib.sha256(f"{type(tower).__name__} layer={layer} drop_cls={drop_cls}\n".encode())
    for name, t in sorted(tower.state_dict().items()):
        t = t.detach().cpu().contiguous()
        digest.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tower_features(backend, pixel_values: torch.Tensor, run_tower=None) -> torch.Tensor:
    """(n, 3, H, W) -> the tower features the projector takes (n, patches, mm_hidden).
    `run_tower` replaces the call of the backend's tower (TowerOnce keeps its output)."""
    return _selection(backend).features(pixel_values, run_tower)


def shares_tower(student, stub) -> bool:
    """Whether the student's tower can serve the stub (TowerOnce): both families share towers
    (`layer0_tower`), the weights and selection are equal and images become the same pixels."""
    if student.layer0_tower() is None or stub.layer0_tower() is None:
        return False
    return tower_sha256(student) == tower_sha256(stub) and same_preprocessing(student, stub)


@dataclass
class Layer0Signals:
    """What the stub recomputes for a batch, as the build stores it (float32); no logits: the
    logit targets come from the cache.

    attention: per sample, the layer-0 text->vision probabilities (H, or 1 for a head mean, |T|,
        N_v); None for text-only samples.
    visual: the projected visual tokens, one row per image of the batch (batch.image_index names a
        sample's): a (n_images, N_v, D) tensor for a fixed-count family, a list of (N_i, D) for a
        processor-driven one; None when the batch has no image.
    """

    attention: list[torch.Tensor | None]
    visual: torch.Tensor | list[torch.Tensor] | None


def recompute(stub, batch, attn_heads: str = "all", features: torch.Tensor | None = None) -> Layer0Signals:
    """A batch's layer-0 slices and visual tokens from the stub, as the build stores them (float32).

    `features`: the tower features of batch.pixel_values from a tower with the stub's tower_sha256
    (e.g. the student's frozen one), so the stub's tower does not run again.
    """
    if attn_heads not in ("all", "mean"):
        raise ValueError(f"attn_heads {attn_heads!r}: choose 'all' or 'mean'")
    # no_grad, not inference_mode: the results are loss targets, and a loss saves its inputs for backward.
    with torch.no_grad():
        captured = stub.recompute_layer0(batch.to(stub.model.device), features)
    attention = [
        None if a is None else (a.float().mean(0, keepdim=True) if attn_heads == "mean" else a.float())
        for a in captured.attention
    ]
    visual = captured.visual
    if isinstance(visual, torch.Tensor):
        visual = visual.float()
    elif visual is not None:
        visual = [v.float() for v in visual]
    return Layer0Signals(attention, visual)


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
