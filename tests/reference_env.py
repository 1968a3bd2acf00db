"""Throw-away virtualenvs holding a model family's reference stack, made from the package index.

Each is keyed by its requirements and the Python version and cached under
~/.cache/alignkd-cache/refenv-<key> (ALIGNKD_REFENV_CACHE overrides the folder), so only the first
run pays for the install. It is built beside its final place and renamed in when complete, so an
interrupted install is never mistaken for a finished one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

# The official MobileVLM code's environment (its requirements.txt), the first transformers release
# with LlavaForConditionalGeneration, and a 4.x release with the transformers-native families. torch is the release this project tests with.
COMMON = ["torch==2.13.0", "sentencepiece", "protobuf", "safetensors", "numpy<2", "pillow"]
REFERENCE_STACKS = {
    "mobilevlm": ["transformers==4.33.1", "tokenizers==0.13.3", *COMMON],
    "llava": ["transformers==4.36.0", *COMMON],
    # Qwen2.5-VL, InternVL, SmolVLM and LLaVA-OneVision in the last 4.x release before SmolVLM's
    # vision-position regression (4.55.1 to 4.57, huggingface/transformers#41190).
    "families": ["transformers==4.54.1", *COMMON],
    # Qwen3-VL came in 4.57; 4.57.6 is the last 4.x release.
    "qwen3_vl": ["transformers==4.57.6", *COMMON],
}


def cache_root() -> Path:
    default = Path.home() / ".cache" / "alignkd-cache"
    return Path(os.environ.get("ALIGNKD_REFENV_CACHE", default))


def reference_python(family: str) -> Path:
    """The python of `family`'s reference virtualenv, made (minutes, once) when missing."""
    requirements = REFERENCE_STACKS[family]
    key = hashlib.sha256(json.dumps([sys.version_info[:2], requirements]).encode()).hexdigest()[:16]
    home = cache_root() / f"refenv-{family}-{key}"
    python = home / "bin" / "python"
    if python.exists():
        return python
    building = home.with_name(f"{home.name}.building-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    venv.create(building, with_pip=True)
    install = [str(building / "bin" / "python"), "-m", "pip", "install", "-q", *requirements]
    if subprocess.run(install).returncode != 0:
        raise RuntimeError(
            f"could not install {requirements} from the package index (it needs network access)"
        )
    try:
        building.rename(home)  # a venv's python finds its packages from its own location
    except OSError:  # another test process finished the same one first
        shutil.rmtree(building)
    return python


if __name__ == "__main__":  # make them ahead of the tests: python tests/reference_env.py mobilevlm llava
    for name in sys.argv[1:]:
        print(reference_python(name))
