"""Tokenizer loading: SentencePiece checkpoints are tokenized by SentencePiece itself.

MobileVLM V2 (and the original LLaVA) ship a LLaMA `tokenizer.model` and load it with
`use_fast=False`: transformers 4.33's LlamaTokenizer, which runs SentencePiece. transformers 5
converts the file to a BPE tokenizer whose merges are ordered by piece id, not score, so some
strings tokenize differently (`"a  b"`: SentencePiece `▁a ▁ ▁b`, the conversion `▁a ▁▁ b`).
`SentencePieceTokenizer` reproduces 4.33's slow tokenizer instead, including how it reads `legacy`:

- `legacy` null or true (4.33's default): the text is split at special tokens and every piece
  between them is encoded with SentencePiece's dummy prefix, so after `</s>` a word keeps its `▁`;
- `legacy: false`: one `▁` is prepended to the whole text and SentencePiece runs without the dummy
  prefix, so after `</s>` the next word has none.

Everything else (chat templates, `decode`) serves the data layer; ids come only from SentencePiece.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

SPIECE_UNDERLINE = "▁"
SPECIAL_NAMES = ("bos", "eos", "unk", "pad")


class TokenizerLoadError(ValueError):
    pass


def _content(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


class SentencePieceTokenizer:
    """A `tokenizer.model` + `tokenizer_config.json` tokenizer with transformers 4.33 slow semantics."""

    kind = "sentencepiece"

    def __init__(self, model_file: str | Path, config: dict | None = None):
        import sentencepiece as spm

        self.model_file, self.config = Path(model_file), dict(config or {})
        # 4.33 reads a missing or null `legacy` as True (it warns and keeps the old behaviour).
        self.legacy = self.config.get("legacy") is not False
        proto = self.model_file.read_bytes()
        if not self.legacy:
            from sentencepiece import sentencepiece_model_pb2

            model = sentencepiece_model_pb2.ModelProto.FromString(proto)
            model.normalizer_spec.add_dummy_prefix = False
            proto = model.SerializeToString()
        self.sp = spm.SentencePieceProcessor(model_proto=proto)
        self.add_bos_token = bool(self.config.get("add_bos_token", True))
        self.add_eos_token = bool(self.config.get("add_eos_token", False))
        defaults = {"bos": "<s>", "eos": "</s>", "unk": "<unk>", "pad": None}
        self.special_tokens = {
            name: _content(self.config.get(f"{name}_token", defaults[name])) for name in SPECIAL_NAMES
        }
        # Added tokens (llava-hf's `<image>`, `<pad>`) carry their own ids past the SentencePiece vocab.
        self.added = {_content(t): int(i) for i, t in self.config.get("added_tokens_decoder", {}).items()}
        for token in self.special_tokens.values():
            if token is not None and token not in self.added:
                self.added[token] = self.sp.piece_to_id(token)
        # MobileVLM's training sets pad = unk (`tokenizer.pad_token = tokenizer.unk_token`).
        self.pad_token_id = self.convert_tokens_to_ids(
            self.special_tokens["pad"] or self.special_tokens["unk"]
        )
        self.bos_token_id = self.convert_tokens_to_ids(self.special_tokens["bos"])
        self.eos_token_id = self.convert_tokens_to_ids(self.special_tokens["eos"])
        self.unk_token_id = self.convert_tokens_to_ids(self.special_tokens["unk"])
        self.chat_template = self.config.get("chat_template")
        longest_first = sorted(self.added, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(t) for t in longest_first) + ")")
        self._unk_length = len(self.sp.encode(self.special_tokens["unk"]))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> SentencePieceTokenizer:
        path = Path(path)
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        # Newer checkpoints keep the chat template beside the config (llava-hf: chat_template.json).
        jinja, in_json = path / "chat_template.jinja", path / "chat_template.json"
        if "chat_template" not in config and jinja.is_file():
            config["chat_template"] = jinja.read_text()
        elif "chat_template" not in config and in_json.is_file():
            config["chat_template"] = json.loads(in_json.read_text())["chat_template"]
        return cls(path / "tokenizer.model", config)

    def save_pretrained(self, out: str | Path) -> None:
        """Write the layout it was loaded from: the SentencePiece model and the config as they were."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        if self.model_file.resolve() != (out / "tokenizer.model").resolve():
            shutil.copyfile(self.model_file, out / "tokenizer.model")
        (out / "tokenizer_config.json").write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")

    def settings(self) -> dict:
        return {"kind": self.kind, "legacy": self.config.get("legacy"), "add_bos_token": self.add_bos_token}

    # -- vocabulary

    def __len__(self) -> int:
        return max(self.sp.get_piece_size(), max(self.added.values(), default=-1) + 1)

    def get_vocab(self) -> dict[str, int]:
        vocab = {self.sp.id_to_piece(i): i for i in range(self.sp.get_piece_size())}
        vocab.update(self.added)
        return vocab

    def convert_tokens_to_ids(self, token: str | None) -> int | None:
        if token is None:
            return None
        return self.added[token] if token in self.added else self.sp.piece_to_id(token)

    # -- encoding

    def _encode_piece(self, text: str) -> list[tuple[int, int]]:
        """(id, start char) for text between special tokens, as 4.33's LlamaTokenizer._tokenize."""
        skip = 0
        if not self.legacy and text.startswith((SPIECE_UNDERLINE, " ")):
            # 4.33 encodes "<unk>" + text and drops the unk pieces, so a leading "▁" stays a piece.
            text, skip = self.special_tokens["unk"] + text, len(self.special_tokens["unk"])
        proto = self.sp.encode(text, return_type="proto")
        # SentencePiece reports byte offsets; map them to characters of `text`.
        char_at = [0] * (len(text.encode()) + 1)
        position = 0
        for i, ch in enumerate(text):
            width = len(ch.encode())
            char_at[position : position + width] = [i] * width
            position += width
        char_at[position] = len(text)
        pieces = proto.pieces[self._unk_length :] if skip else proto.pieces
        return [(p.id, max(char_at[p.begin] - skip, 0)) for p in pieces]

    def __call__(
        self, text: str, add_special_tokens: bool = True, return_offsets_mapping: bool = False
    ) -> dict:
        """{'input_ids'} (and 'offset_mapping': (start, start) per token) for one string."""
        shift = 0
        if not self.legacy and text:
            text, shift = SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " "), 1
        ids, starts, position = [], [], 0
        for part in self._split.split(text):
            if part in self.added:
                ids.append(self.added[part])
                starts.append(position)
            elif part:
                for token, start in self._encode_piece(part):
                    ids.append(token)
                    starts.append(position + start)
            position += len(part)
        underline = self.sp.piece_to_id(SPIECE_UNDERLINE)
        if not self.legacy and len(ids) > 1 and ids[0] == underline and ids[1] in self.added.values():
            ids, starts = ids[1:], starts[1:]
        starts = [max(s - shift, 0) for s in starts]
        if add_special_tokens and self.add_bos_token:
            ids, starts = [self.bos_token_id, *ids], [0, *starts]
        if add_special_tokens and self.add_eos_token:
            ids, starts = [*ids, self.eos_token_id], [*starts, len(text) - shift]
        out = {"input_ids": ids}
        if return_offsets_mapping:
            out["offset_mapping"] = [(s, s) for s in starts]
        return out

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        specials = {i: t for t, i in self.added.items()}
        out, run = [], []
        for i in (int(i) for i in ids):
            if i in specials:
                out.append(self.sp.decode(run))
                run = []
                if not skip_special_tokens:
                    out.append(specials[i])
            else:
                run.append(i)
        return "".join([*out, self.sp.decode(run)])

    def apply_chat_template(
        self, messages, tokenize: bool = False, add_generation_prompt: bool = False, **kwargs
    ):
        from transformers.utils.chat_template_utils import render_jinja_template

        if tokenize:
            raise ValueError(
                "SentencePieceTokenizer renders chat templates as text only; tokenize the result"
            )
        specials = {f"{name}_token": token for name, token in self.special_tokens.items()}
        rendered, _ = render_jinja_template(
            [messages],
            chat_template=self.chat_template,
            add_generation_prompt=add_generation_prompt,
            **specials,
        )
        return rendered[0]


def load_tokenizer(path: str | Path):
    """A checkpoint's tokenizer: SentencePiece when it ships `tokenizer.model`, else transformers'.

    The load is never hidden behind a log filter: a failure names the directory and the real reason.
    """
    path = Path(path)
    if (path / "tokenizer.model").is_file():
        try:
            return SentencePieceTokenizer.from_pretrained(path)
        except Exception as e:
            raise TokenizerLoadError(
                f"{path}/tokenizer.model: SentencePiece could not load it ({type(e).__name__}: {e}); "
                "check that the file is a SentencePiece model and that sentencepiece and protobuf are installed"
            ) from e
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise TokenizerLoadError(
            f"{path}: transformers could not load its tokenizer ({type(e).__name__}: {e}); "
            "a checkpoint needs tokenizer.json or tokenizer.model with tokenizer_config.json"
        ) from e


def tokenizer_settings(tokenizer) -> dict:
    """What decides the ids besides the vocabulary, recorded in a cache and compared with a student's."""
    if isinstance(tokenizer, SentencePieceTokenizer):
        return tokenizer.settings()
    return {
        "kind": "transformers",
        "class": type(tokenizer).__name__,
        "legacy": getattr(tokenizer, "legacy", None),
    }
