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


def build_tokenizer(
    out_dir: str | Path | None = None, vocab_size: int = 384, corpus: list[str] | None = None
):
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
        show_progress=False,
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


def _load_tokenizer(tokenizer):
    from alignkd_cache.backends.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer) if isinstance(tokenizer, str | Path) else tokenizer


def _llama_sizes(tokenizer, layers, hidden, heads, kv_heads, init_std) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=init_std,
    )


def _clip_config(vision_layers, vision_hidden, vision_heads, image_size, patch_size, init_std):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
        initializer_range=init_std,
    )


def _clip_processor(image_size: int):
    """CLIP's image processor at a tiny resolution (resize the short side, centre crop, normalise)."""
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )


def build_tiny_llava(
    out_dir: str | Path,
    tokenizer,
    *,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int | None = None,
    vision_layers: int = 2,
    vision_hidden: int = 32,
    vision_heads: int = 2,
    image_size: int = 32,
    patch_size: int = 4,
    init_std: float = 0.1,
    seed: int = 0,
) -> Path:
    """A random LlavaForConditionalGeneration ((image_size/patch_size)^2 visual tokens), saved with
    its tokenizer (plus an `<image>` token) and a CLIP image processor. `init_std` is larger than
    the usual 0.02 so tiny models attend unevenly and position mistakes show in tests."""
    import torch
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tok = _load_tokenizer(tokenizer)
    tok.add_tokens(["<image>"], special_tokens=True)
    config = LlavaConfig(
        vision_config=_clip_config(
            vision_layers, vision_hidden, vision_heads, image_size, patch_size, init_std
        ),
        text_config=LlamaConfig(**_llama_sizes(tok, layers, hidden, heads, kv_heads, init_std)),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        initializer_range=init_std,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    out = Path(out_dir)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    _clip_processor(image_size).save_pretrained(out)
    return out


# Over 60 lines only through its 16 keyword arguments and imports; the body reads top to bottom.
def mobilevlm_config(llama: dict, vision_hidden: int, grid: int, vision_tower: str) -> dict:
    """A MobileVLM V2 config.json: the LLM's sizes in `llama` (LlamaConfig's names), the V2 vision
    settings, and `vision_tower` as mm_vision_tower (a directory, or a note that it is inside)."""
    from alignkd_cache.backends.mobilevlm import MOBILEVLM_V2_VISION

    return {
        "architectures": ["MobileLlamaForCausalLM"],
        "model_type": "mobilevlm",
        **llama,
        "hidden_act": "silu",
        **MOBILEVLM_V2_VISION,
        "mm_hidden_size": vision_hidden,
        "mm_vision_tower": vision_tower,
        "mm_ldp_grid": grid,
    }


def build_tiny_mobilevlm(
    out_dir: str | Path,
    tokenizer,
    *,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int | None = None,
    vision_layers: int = 2,
    vision_hidden: int = 32,
    vision_heads: int = 2,
    image_size: int = 32,
    patch_size: int = 4,
    grid: int = 4,
    tower: str = "inside",
    init_std: float = 0.1,
    seed: int = 0,
) -> Path:
    """A random MobileVLM V2 checkpoint in the original key layout (grid^2 visual tokens).

    tower="inside" stores the CLIP tower under model.vision_tower.vision_tower.*; tower="separate"
    writes it as a CLIPVisionModel directory `<out_dir>-clip` named by `mm_vision_tower`, as the
    released checkpoints reference openai/clip-vit-large-patch14-336.
    """
    import torch
    from transformers import CLIPVisionModel, LlamaForCausalLM

    from alignkd_cache.backends.mobilevlm import (
        LDPv2Projector,
        MobileVLM,
        MobileVLMBackend,
        llama_config,
    )

    if tower not in ("inside", "separate"):
        raise ValueError(f"tower={tower!r}; choose 'inside' or 'separate'")
    tok = _load_tokenizer(tokenizer)
    out = Path(out_dir)
    llama = _llama_sizes(tok, layers, hidden, heads, kv_heads, init_std)
    # A separate tower lives in `<out>-clip`, named by mm_vision_tower.
    tower_dir = str(out.parent / f"{out.name}-clip")
    inside = "tiny-clip (inside this checkpoint)"
    config = mobilevlm_config(llama, vision_hidden, grid, tower_dir if tower == "separate" else inside)
    torch.manual_seed(seed)
    vision = CLIPVisionModel(
        _clip_config(vision_layers, vision_hidden, vision_heads, image_size, patch_size, init_std)
    )
    model = MobileVLM(
        LlamaForCausalLM(llama_config(config)), LDPv2Projector(vision_hidden, hidden, grid), vision
    )
    # The processor settings travel with the tower, as openai/clip-vit-large-patch14-336 ships them.
    processor = _clip_processor(image_size)
    tower_ref = None
    if tower == "separate":
        vision.save_pretrained(config["mm_vision_tower"])
        processor.save_pretrained(config["mm_vision_tower"])
        tower_ref = config["mm_vision_tower"]
    MobileVLMBackend(model, config, tok, str(out), None, tower_ref, processor).save_pretrained(out)
    return out
