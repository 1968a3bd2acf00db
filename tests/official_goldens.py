"""Regenerate tests/official_goldens.json with the official tokenizer: transformers 4.33.1's slow
LlamaTokenizer (MobileVLM's `use_fast=False`) on mistral-common's tokenizer.model.v1, driven by
tests/official_mobilevlm.py. Needs an environment with transformers==4.33.1 (no torch needed):

    python tests/official_goldens.py DIR_WITH_TRANSFORMERS_4_33 > tests/official_goldens.json
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import types
from pathlib import Path

sys.path.insert(0, sys.argv[1])
# 4.33 checks its pinned tokenizers version at import; the slow tokenizer never uses tokenizers.
sys.modules["transformers.dependency_versions_check"] = types.ModuleType(
    "transformers.dependency_versions_check"
)
sys.path.insert(0, str(Path(__file__).parent))

import mistral_common  # noqa: E402
import transformers  # noqa: E402
from fidelity_cases import CASES, PLAIN_CASES, STRESS, tokenizer_config  # noqa: E402
from official_mobilevlm import preprocess_multimodal, preprocess_plain, preprocess_v1  # noqa: E402

assert transformers.__version__ == "4.33.1", transformers.__version__
model = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
out = {"generated_by": "tests/official_goldens.py with transformers 4.33.1", "legacy": {}}
for legacy in ("absent", True, False):
    with tempfile.TemporaryDirectory() as d:
        shutil.copy(model, Path(d) / "tokenizer.model")
        (Path(d) / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(legacy)))
        tok = transformers.AutoTokenizer.from_pretrained(d, use_fast=False)
        tok.pad_token = tok.unk_token  # MobileVLM's v1 setup
        entry = {"stress": [tok(t)["input_ids"] for t in STRESS], "v1": {}, "plain": {}}
        for name, case in CASES.items():
            convs = (
                preprocess_multimodal(case["conversations"]) if case.get("image") else case["conversations"]
            )
            ids, labels, voided = preprocess_v1(convs, tok, has_image=bool(case.get("image")))
            entry["v1"][name] = {"input_ids": ids, "labels": labels, "voided": voided}
        for name, case in PLAIN_CASES.items():
            ids, labels = preprocess_plain(preprocess_multimodal(case["conversations"]), tok)
            entry["plain"][name] = {"input_ids": ids, "labels": labels}
        out["legacy"][str(legacy)] = entry
print(json.dumps(out))
