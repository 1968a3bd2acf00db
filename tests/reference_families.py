"""Run inside a transformers-native family's reference virtualenv (tests/reference_env.py): transformers
4.54.1, the last 4.x release before its SmolVLM vision-position regression (huggingface/transformers
#41190), or 4.57.6 for Qwen3-VL, which came in 4.57.

    python reference_families.py make SOURCE OUT [SOURCE OUT ...]
        each checkpoint at SOURCE (made by transformers 5: alignkd-tiny) as transformers 4.x writes
        one, as the hub has them: its weights and config saved by this release's save_pretrained,
        the tokenizer and processor files copied;
    python reference_families.py check MODEL INPUTS OUT [MODEL INPUTS OUT ...]
        loads each MODEL with AutoModelForImageTextToText, runs it on the tensors in INPUTS
        (safetensors: the processor's output, computed by our side) and writes its logits to OUT;
        prints each loading report as one JSON line, in order.
Several models per call: the interpreter and transformers start once.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForImageTextToText


def as_4x_config(config: dict) -> dict:
    """transformers 5 writes RoPE settings as `rope_parameters`; 4.x reads rope_theta and, for
    Qwen's M-RoPE, rope_scaling (rope_type, mrope_section, Qwen3-VL's mrope_interleaved)."""
    for part in (config, config.get("text_config") or {}):
        rope = part.pop("rope_parameters", None)
        if rope:
            part["rope_theta"] = rope["rope_theta"]
            if "mrope_section" in rope:
                part["rope_scaling"] = {key: value for key, value in rope.items() if key != "rope_theta"}
    if config["model_type"] == "qwen2_5_vl":  # 4.x reads the text settings at the top level too
        config.update({k: v for k, v in config["text_config"].items() if k != "model_type"})
    return config


def make(source: Path, out: Path) -> None:
    config_dict = as_4x_config(json.loads((source / "config.json").read_text()))
    scratch = out.with_name(out.name + ".config")
    scratch.mkdir(parents=True)
    (scratch / "config.json").write_text(json.dumps(config_dict))
    config = AutoConfig.from_pretrained(scratch, trust_remote_code=False)
    shutil.rmtree(scratch)
    model = AutoModelForImageTextToText.from_pretrained(
        source, config=config, use_safetensors=True, trust_remote_code=False
    )
    model.save_pretrained(out)
    for path in source.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and not (out / path.name).exists():
            shutil.copyfile(path, out / path.name)


def check(model_dir: Path, inputs: Path, out: Path) -> None:
    model, info = AutoModelForImageTextToText.from_pretrained(
        model_dir, output_loading_info=True, use_safetensors=True, trust_remote_code=False
    )
    with torch.no_grad():  # safetensors: tensors only, nothing in the file is run
        logits = model.eval()(**load_file(str(inputs))).logits[0].float()
    save_file({"logits": logits.contiguous()}, str(out))
    report = {k: sorted(info.get(k, [])) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    print(json.dumps(report | {"class": type(model).__name__}))


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    run, arity = {"make": (make, 2), "check": (check, 3)}[command]
    paths = list(map(Path, args))
    for i in range(0, len(paths), arity):
        run(*paths[i : i + arity])
