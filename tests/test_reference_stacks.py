"""A trained student loads in its family's reference stack, as users take it there.

Each family's stack is a virtualenv made from the package index (tests/reference_env.py, cached
between runs): MobileVLM V2 in the official code's environment (transformers 4.33.1, tokenizers
0.13.3, the official model code in tests/reference_mobilevlm.py), llava-hf in transformers 4.36.0,
the first release with LlavaForConditionalGeneration, and the transformers-native families in 4.54.1
(Qwen3-VL in 4.57.6; tests/reference_families.py). A script run there loads the student we saved
and prints its loading report, token ids and log-probs; they must match our backend's: no missing,
unexpected or resized tensor, the same ids, log-probs within 1e-4.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import mistral_common
import pytest
import torch
from fidelity_cases import tokenizer_config
from official_mobilevlm import get_prompt_v1, preprocess_multimodal
from reference_env import reference_python
from reference_report import next_token_logprobs
from safetensors.torch import load_file, save_file

from alignkd_cache.backends import load_backend
from alignkd_cache.data import SampleDataset, Tokenization, read_records, tokenize
from alignkd_cache.losses import LossConfig, parse_weights
from alignkd_cache.signal_spec import SignalOptions
from alignkd_cache.tiny import build_tiny_mobilevlm
from alignkd_cache.train import TrainOptions, finetune

pytestmark = pytest.mark.slow

TESTS = Path(__file__).parent
SP_MODEL = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
# Only the package index is needed there; the models are local.
REFERENCE_ENV = {"PATH": os.environ["PATH"], "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
CONVERSATION = [
    {"from": "human", "value": "<image>\nWhich digit is this? Answer in a word."},
    {"from": "gpt", "value": "It is a seven, über-clear."},
]


def trained(source: Path, digits_dataset, out: Path) -> Path:
    """The student after two steps of our trainer (cross-entropy on the digits), saved in `out`."""
    data, root = digits_dataset
    loss = LossConfig(weights=parse_weights("ce=1,logit=0,vis=0,attn=0"))
    opts = TrainOptions(out=str(out), loss=loss, lr=1e-2, batch_size=2, max_steps=2, progress=False)
    assert finetune(str(source), data, root, opts)["finished"]
    return out


def ours(student: Path, image_root: Path, tmp_path: Path) -> dict:
    """Our backend's ids and next-token log-probs for CONVERSATION, as the reference script gives them."""
    backend = load_backend(student)
    path = tmp_path / "one.json"
    path.write_text(json.dumps([{"id": "x", "image": "images/digit_7.png", "conversations": CONVERSATION}]))
    record = read_records(path)[0]
    sample = tokenize(
        record, Tokenization(backend.tokenizer, "v1", backend.image_token_id, backend.num_visual_tokens)
    )
    dataset = SampleDataset([sample], image_root, backend.preprocess, 0, backend.pad_color)
    batch = dataset.collate([dataset[0]])
    with torch.no_grad():
        logits = backend.forward(batch, capture=False).logits[0]
    ids = batch.input_ids[0].tolist()
    return {"input_ids": ids, **next_token_logprobs(logits, ids, backend.image_token_id)}


def in_reference_stack(family: str, script: str, *args) -> str:
    """What `script` prints, run with `args` in `family`'s reference virtualenv."""
    python = reference_python(family)
    done = subprocess.run(
        [str(python), str(TESTS / script), *map(str, args)],
        capture_output=True,
        text=True,
        env=REFERENCE_ENV,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def assert_same_model(theirs: dict, mine: dict, vocab_size: int) -> None:
    """Every tensor loaded as it is, nothing resized; the same log-probs at the same positions."""
    assert (theirs["missing"], theirs["unexpected"], theirs["mismatched"]) == ([], [], [])
    assert theirs["vocab"] == vocab_size  # nothing for the reference loader to resize
    assert theirs["positions"] == mine["positions"]
    torch.testing.assert_close(
        torch.tensor(theirs["logprobs"]), torch.tensor(mine["logprobs"]), atol=1e-4, rtol=0
    )


# --------------------------------------------------------------------------- MobileVLM V2


def released_mobilevlm(root: Path) -> Path:
    """A tiny MobileVLM V2 checkpoint laid out as the released ones: the SentencePiece tokenizer with
    the files 4.33 wrote, the CLIP tower inside and named by mm_vision_tower, vision_tower_type clip,
    the official code's fixed 12 x 12 grid."""
    tokenizer = root / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / "tokenizer.model").write_bytes(SP_MODEL.read_bytes())
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(False), indent=2))
    sizes = dict(layers=1, hidden=16, heads=2, vision_layers=1, vision_hidden=16, image_size=16, grid=12)
    built = build_tiny_mobilevlm(root / "built", tokenizer, tower="separate", seed=8, **sizes)
    source = root / "released"
    load_backend(built).save_pretrained(source, include_vision_tower=True)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "vision_tower_type": "clip"}, indent=2))
    specials = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>", "unk_token": "<unk>"}
    (source / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    generation = {
        "_from_model_config": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "transformers_version": "4.33.1",
    }
    (source / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return source


def test_a_trained_mobilevlm_loads_in_the_official_code(digits_dataset, tmp_path):
    source = released_mobilevlm(tmp_path)
    student = trained(source, digits_dataset, tmp_path / "run")
    image_root = digits_dataset[1]
    conversation = tmp_path / "conversation.json"
    conversation.write_text(json.dumps(CONVERSATION))
    image = image_root / "images" / "digit_7.png"
    theirs = json.loads(
        in_reference_stack("mobilevlm", "reference_mobilevlm.py", student, image, conversation)
    )
    mine = ours(student, image_root, tmp_path)
    assert theirs["input_ids"] == mine["input_ids"]  # the official preprocess_v1 on its slow tokenizer
    assert_same_model(theirs, mine, json.loads((student / "config.json").read_text())["vocab_size"])


# --------------------------------------------------------------------------- llava-hf


def test_a_trained_llava_loads_in_the_first_transformers_with_llava(digits_dataset, tmp_path):
    source = tmp_path / "llava-hf"
    in_reference_stack("llava", "reference_llava.py", "make", source, SP_MODEL)  # as 4.36 writes one
    student = trained(source, digits_dataset, tmp_path / "run")
    image_root = digits_dataset[1]
    mine = ours(student, image_root, tmp_path)
    texts = [get_prompt_v1(preprocess_multimodal(CONVERSATION)), "é ü 日本 ☃ 🦙 <image> x</s> y"]
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"input_ids": mine["input_ids"], "texts": texts}))
    image = image_root / "images" / "digit_7.png"
    theirs = json.loads(in_reference_stack("llava", "reference_llava.py", "check", student, image, request))
    tokenizer = load_backend(student).tokenizer
    assert theirs["text_ids"] == [tokenizer(text)["input_ids"] for text in texts]
    assert_same_model(
        theirs, mine, json.loads((student / "config.json").read_text())["text_config"]["vocab_size"]
    )


# --------------------------------------------------------------------------- transformers-native families

EXAMPLES = TESTS.parent / "examples" / "families"


# Each family's reference stack: transformers 4.54.1, and 4.57.6 for Qwen3-VL, which came in 4.57.
FAMILY_STACKS = {"qwen2_5_vl": "families", "internvl": "families", "smolvlm": "families",
                 "llava_onevision": "families", "qwen3_vl": "qwen3_vl"}  # fmt: skip


def test_a_trained_family_student_loads_in_transformers_4(tmp_path):
    """For every family: a source as the hub has it (weights and config written by transformers 4.x),
    trained here with transformers 5, loads in 4.x with nothing missing or left over and gives the
    same log-probs on a two-image conversation. One reference process per stack and step."""
    from alignkd_cache.tiny_families import tiny_checkpoint

    for stack in sorted(set(FAMILY_STACKS.values())):
        families = [family for family, its in FAMILY_STACKS.items() if its == stack]
        made = [tiny_checkpoint(f, tmp_path / f / "made", role="student") for f in families]
        sources = [tmp_path / f / "source" for f in families]
        in_reference_stack(stack, "reference_families.py", "make", *interleaved(made, sources))
        requests = [
            ours_on_two_images(source, tmp_path / family)
            for family, source in zip(families, sources, strict=True)
        ]
        printed = in_reference_stack(
            stack, "reference_families.py", "check", *(p for r in requests for p in r[:3])
        )
        reports = [json.loads(line) for line in printed.splitlines() if line.startswith("{")]
        assert len(reports) == len(families), printed
        for family, report, (_, _, theirs, mine) in zip(families, reports, requests, strict=True):
            loading = (report["missing_keys"], report["unexpected_keys"], report["mismatched_keys"])
            assert loading == ([], [], []), f"{family}: {report}"
            theirs = load_file(str(theirs))["logits"].log_softmax(-1)
            # Tight: a tiny random model hides much (1-D positions in place of Qwen's M-RoPE move its
            # log-probs by less than 2e-4); measured 0 for every family.
            torch.testing.assert_close(theirs, mine, atol=1e-6, rtol=0, msg=lambda m, f=family: f"{f}: {m}")


def interleaved(*lists):
    return [item for group in zip(*lists, strict=True) for item in group]


def ours_on_two_images(source: Path, work: Path) -> tuple[Path, Path, Path, torch.Tensor]:
    """The student trained from `source` (two steps, saved in work/run), the processor's tensors for
    a two-image conversation with non-ASCII text (work/inputs.safetensors), where the reference
    writes its logits, and our log-probs."""
    from PIL import Image

    loss = LossConfig(weights=parse_weights("ce=1,logit=0,vis=0,attn=0"))
    opts = TrainOptions(out=str(work / "run"), loss=loss, lr=1e-2, batch_size=2, max_steps=2, progress=False)
    chat = SignalOptions(template="chat")
    assert finetune(str(source), EXAMPLES / "data.json", EXAMPLES, opts, chat)["finished"]
    student = load_backend(work / "run")
    images = [Image.open(EXAMPLES / name).convert("RGB") for name in ("wide.png", "tall.png")]
    turns = [("user", [{"type": "image"}, {"type": "text", "text": "Was ist das? 日本"}]),
             ("assistant", [{"type": "text", "text": "Eine Zahl, über-klar."}]),
             ("user", [{"type": "image"}, {"type": "text", "text": "Und das?"}])]  # fmt: skip
    messages = [{"role": role, "content": content} for role, content in turns]
    text = student.processor.apply_chat_template(messages, tokenize=False)
    inputs = dict(student.processor(text=[text], images=images, return_tensors="pt"))
    with torch.no_grad():
        mine = student.model(**inputs).logits[0].float().log_softmax(-1)
    # transformers 5's M-RoPE input (without it, its Qwen falls back to 1-D positions); 4.x derives
    # the positions from the ids and the grids.
    save_file(
        {k: v.contiguous() for k, v in inputs.items() if k != "mm_token_type_ids"},
        str(work / "inputs.safetensors"),
    )
    return work / "run", work / "inputs.safetensors", work / "theirs.safetensors", mine
