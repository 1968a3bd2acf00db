"""Small real models and tokenizers built offline: for tests, the demo and the `--tiny` benchmarks.

Nothing here is a stand-in: the tokenizer is a trained BPE saved and reloaded through
`AutoTokenizer`, and the models are the real transformers / MobileVLM classes at toy sizes,
written with `save_pretrained` so they load through the same path a user's checkpoint takes.
"""

from __future__ import annotations

from pathlib import Path

# A LLaMA/Vicuna-style chat template, so the `chat` data template can be exercised offline.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}USER: {{ m['content'] }} {% else %}ASSISTANT: {{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

DEFAULT_CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: Which digit is top-left? ASSISTANT: 7",
    "USER: How many digits are in the picture? ASSISTANT: 4",
    "USER: Is there a 3 in the image? ASSISTANT: yes no",
    "Describe the image. A photo of handwritten digits on a grid, top right bottom left.",
    "zero one two three four five six seven eight nine 0 1 2 3 4 5 6 7 8 9",
]


def build_tokenizer(out_dir: str | Path | None = None, vocab_size: int = 384, corpus: list[str] | None = None):
    """Train a byte-level BPE offline; LLaMA conventions: <unk>=0 (also pad), <s>=1, </s>=2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator((corpus or DEFAULT_CORPUS) * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    if out_dir is None:
        return fast
    fast.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)
