"""LoRA students through PEFT (the `lora` extra): `--lora r=8,alpha=16,dropout=0.05,targets=q_proj+v_proj`.

LoRA layers are injected into the student's LLM in place (peft.inject_adapter_in_model), so the
backend's forward, the layer-0 capture, DDP and the checkpoints work on it unchanged. What trains:
the LoRA matrices, the projector (PEFT's `modules_to_save`, so it is part of the adapter) and the
loss adapters; the LLM's own weights and the vision tower stay frozen. The adapter is written in
PEFT's own format (adapter_config.json + adapter_model.safetensors, what PeftModel.from_pretrained
loads); `--merge` folds it into the weights and writes a plain student checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

LORA_DIR = "lora"
PROJECTORS = ("multi_modal_projector", "mm_projector")  # LLaVA's, MobileVLM's


@dataclass(frozen=True)
class LoraOptions:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] | list[str] = ("q_proj", "k_proj", "v_proj", "o_proj")


def parse_lora(text: str) -> LoraOptions:
    """'r=8,alpha=16,dropout=0.05,targets=q_proj+v_proj' -> LoraOptions (fields not named keep defaults)."""
    fields: dict = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, value = item.partition("=")
        try:
            if not sep or name not in LoraOptions.__dataclass_fields__:
                raise ValueError
            fields[name] = (
                tuple(value.split("+")) if name == "targets" else (int if name == "r" else float)(value)
            )
        except ValueError:
            raise ValueError(
                f"bad --lora item {item!r}; write r=8,alpha=16,dropout=0.05,targets=q_proj+v_proj"
            ) from None
    return LoraOptions(**fields)


def _peft():
    try:
        import peft
    except ImportError as e:
        raise ValueError(f"--lora needs PEFT ({e}); pip install 'alignkd-cache[lora]'") from None
    return peft


def add_lora(model: torch.nn.Module, options: LoraOptions) -> None:
    """Inject LoRA into the LLM's `targets` (never the vision tower's layers of the same names)."""
    peft = _peft()
    names = [
        n for n, _ in model.named_modules() if n.split(".")[-1] in options.targets and "vision_tower" not in n
    ]
    projector = [n for n, _ in model.named_modules() if n.split(".")[-1] in PROJECTORS]
    if not names:
        raise ValueError(
            f"--lora targets={'+'.join(options.targets)}: no such linear layer in the student's LLM"
        )
    config = peft.LoraConfig(
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=names,
        modules_to_save=[p.split(".")[-1] for p in projector[:1]],
    )
    peft.inject_adapter_in_model(config, model)
    model.alignkd_lora = config  # how save_lora writes adapter_config.json


def is_lora_model(model: torch.nn.Module) -> bool:
    return hasattr(model, "alignkd_lora")


def lora_trainable(name: str) -> bool:
    """Whether a parameter of a LoRA student trains: the LoRA matrices and the projector's copy."""
    return "lora_" in name or ".modules_to_save." in name


def save_lora(out: Path, student, base_model_id: str, merge: bool) -> None:
    """OUT/lora in PEFT's format; with `merge`, the LoRA folded into `student.model` in place, so the
    caller's save_pretrained writes a plain checkpoint."""
    peft = _peft()
    model, target = student.model, out / LORA_DIR
    target.mkdir(parents=True, exist_ok=True)
    state = peft.get_peft_model_state_dict(model)
    # PeftModel.save_pretrained's key names: in a PeftModel the student sits at base_model.model.
    tensors = {f"base_model.model.{k}": v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(tensors, str(target / "adapter_model.safetensors"))
    config = model.alignkd_lora.to_dict() | {"base_model_name_or_path": base_model_id}
    (target / "adapter_config.json").write_text(json.dumps(config, indent=1, default=list))
    if merge:
        merge_lora(model)


def merge_lora(model: torch.nn.Module) -> None:
    """Fold every LoRA layer into its base layer and put the trained projector copy in its place."""
    peft = _peft()
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, (BaseTunerLayer, peft.utils.ModulesToSaveWrapper))
    ]
    for name, module in wrapped:
        parent_name, _, child = name.rpartition(".")
        if isinstance(module, peft.utils.ModulesToSaveWrapper):
            plain = module.modules_to_save["default"]
        else:
            module.merge()
            plain = module.get_base_layer()
        setattr(model.get_submodule(parent_name), child, plain)
    del model.alignkd_lora


def lora_record(text: str | None) -> dict | None:
    """--lora's text as TrainOptions.lora: a JSON-able dict, as checkpoints record and compare it."""
    if not text:
        return None
    options = parse_lora(text)
    return asdict(options) | {"targets": list(options.targets)}
