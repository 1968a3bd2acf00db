"""Layer-0 text->vision attention capture, and the spliced forward both model families share.

transformers routes every decoder layer's attention through a registered function. We register one
that always returns sdpa's output (so the model computes exactly what it computes without us), and,
in layer 0 only and only while a capture request is active, additionally scores the text queries T
of each sample against the keys of their causal row. Each row is normalised with a logsumexp over
all keys the query may see, as the model's own softmax does, and only the visual columns V are kept:
a (H, |T|, N_v) slice per sample instead of L x H x S x S probabilities for `output_attentions`.

The request travels in a ContextVar set around one forward, so nothing leaks between calls or
threads, and the slice keeps its autograd graph for a student.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from alignkd_cache.backends import VLMOutput

CAPTURE_ATTENTION = "alignkd_layer0_capture"


@dataclass
class CaptureRequest:
    query_positions: list[torch.Tensor]
    visual_positions: list[torch.Tensor]
    key_mask: torch.Tensor  # (B, S) bool: keys that are real tokens
    slices: list[torch.Tensor | None] | None = field(default=None)


_REQUEST: ContextVar[CaptureRequest | None] = ContextVar("alignkd_layer0_request", default=None)


@contextmanager
def layer0_capture(
    query_positions, visual_positions, attention_mask: torch.Tensor
) -> Iterator[CaptureRequest]:
    """While active, layer 0 of a model using CAPTURE_ATTENTION fills `request.slices`."""
    request = CaptureRequest(list(query_positions), list(visual_positions), attention_mask.bool())
    token = _REQUEST.set(request)
    try:
        yield request
    finally:
        _REQUEST.reset(token)


SLICE_BLOCK_ELEMENTS = 2**24  # 64 MiB of float32 scores per block of query rows


def text_to_vision_slice(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    key_mask: torch.Tensor,
    query_positions: torch.Tensor,
    visual_positions: torch.Tensor,
) -> torch.Tensor:
    """Attention probabilities of queries T over keys V for one sample, in float32.

    query (H, S, d) and key (H_kv, S, d) arrive after RoPE; H_kv may divide H (grouped-query).
    A query at position t may see keys j <= t that are real tokens (key_mask), whatever the padding.
    """
    heads, kv_heads = query.shape[0], key.shape[0]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads cannot share {kv_heads} key heads")
    if len(query_positions) == 0:
        return query.new_zeros((heads, 0, len(visual_positions)), dtype=torch.float32)
    # Keys past the last query (and past the last visual column kept) are never needed.
    width = int(torch.cat([query_positions, visual_positions]).max()) + 1
    k = key[:, :width].float()
    keys = torch.arange(width, device=query.device)
    # Query rows in blocks of at most SLICE_BLOCK_ELEMENTS scores, and the scores edited in place: the
    # slice's memory stays about two blocks whatever the sequence length (rows are independent).
    rows = max(1, SLICE_BLOCK_ELEMENTS // (heads * width))
    blocks = []
    for positions in query_positions.split(rows):
        # Group query heads onto their shared key head instead of copying keys per head.
        q = query[:, positions].float().reshape(kv_heads, heads // kv_heads, len(positions), -1)
        scores = torch.einsum("gqtd,gsd->gqts", q, k).reshape(heads, len(positions), width).mul_(scaling)
        allowed = (keys[None, :] <= positions[:, None]) & key_mask[:width][None, :]
        scores.masked_fill_(~allowed, float("-inf"))
        # A query before a later image sees none of it: those columns are 0, as in the model's softmax.
        blocks.append((scores[:, :, visual_positions] - scores.logsumexp(-1, keepdim=True)).exp_())
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)


def capture_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The registered attention function: sdpa output everywhere, plus the slice in layer 0."""
    request = _REQUEST.get()
    if request is not None and getattr(module, "layer_idx", None) == 0:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        request.slices = [
            None
            if len(visual) == 0
            else text_to_vision_slice(query[b], key[b], scale, request.key_mask[b], text, visual)
            for b, (text, visual) in enumerate(
                zip(request.query_positions, request.visual_positions, strict=True)
            )
        ]
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )


# Registering the mask function too matters: for an unknown name create_causal_mask returns None,
# which would silently drop both the causal and the padding mask.
AttentionInterface.register(CAPTURE_ATTENTION, capture_attention)
AttentionMaskInterface.register(CAPTURE_ATTENTION, sdpa_mask)


def spliced_forward(
    batch,
    *,
    embed_tokens: torch.nn.Module,
    decoder: torch.nn.Module,
    lm_head: torch.nn.Module,
    visual: torch.Tensor | None,
    image_token_id: int,
    capture: bool,
) -> VLMOutput:
    """Embed tokens, put each image's projected tokens at its V positions, run the LLM, lm_head.

    `visual` holds one (N_v, D) tensor per row of batch.pixel_values; `decoder` is a LLaMA-style
    model taking inputs_embeds and a 2-D attention mask and using CAPTURE_ATTENTION in its layers.
    """
    # MobileVLM marks image positions with -200, which has no embedding row; they are overwritten.
    embeds = embed_tokens(batch.input_ids.clamp(min=0))
    rows, cols, feats = _visual_slots(batch, visual, image_token_id)
    if feats:
        embeds = embeds.index_put((torch.cat(rows), torch.cat(cols)), torch.cat(feats).to(embeds.dtype))
    request = None
    if capture:
        with layer0_capture(batch.query_positions, batch.visual_positions, batch.attention_mask) as request:
            hidden = decoder(
                inputs_embeds=embeds, attention_mask=batch.attention_mask, use_cache=False
            ).last_hidden_state
        if request.slices is None:
            raise RuntimeError(
                f"layer 0 never ran through {CAPTURE_ATTENTION!r}; load the model with that attention implementation"
            )
    else:
        hidden = decoder(
            inputs_embeds=embeds, attention_mask=batch.attention_mask, use_cache=False
        ).last_hidden_state
    attention = request.slices if request is not None else [None] * len(batch.ids)
    return VLMOutput(logits=lm_head(hidden), attention=attention, visual=visual)


def _visual_slots(batch, visual, image_token_id: int):
    """(batch rows, positions, visual tokens) to splice, after checking that every sample's image
    ids and visual positions agree with its images and the model's visual-token counts."""
    input_ids = batch.input_ids
    image_ids_per_row = (input_ids == image_token_id).sum(1).tolist()
    rows, cols, feats = [], [], []
    for b, image_rows in enumerate(batch.image_index):
        positions = batch.visual_positions[b]
        if not image_rows:
            if len(positions) or image_ids_per_row[b]:
                raise ValueError(f"sample {batch.ids[b]!r} has visual positions or image ids but no image")
            continue
        tokens = torch.cat([visual[r] for r in image_rows]) if visual is not None else None
        if tokens is None or len(positions) != tokens.shape[0]:
            have = None if tokens is None else tokens.shape[0]
            raise ValueError(
                f"sample {batch.ids[b]!r} has {len(positions)} visual positions but the model makes {have} "
                "visual tokens for its images; tokenize with this backend's num_visual_tokens"
            )
        if not bool((input_ids[b, positions] == image_token_id).all()):
            raise ValueError(
                f"sample {batch.ids[b]!r}: the ids at its visual positions are not the image token "
                f"{image_token_id}; tokenize with this backend's image_token_id"
            )
        if image_ids_per_row[b] != len(positions):
            # An image id outside V would reach the LLM as an embedding row (or <unk>), silently.
            raise ValueError(
                f"sample {batch.ids[b]!r} holds {image_ids_per_row[b]} image-token ids but {len(positions)} "
                "visual positions; every image id must be replaced by a visual token"
            )
        rows.append(torch.full_like(positions, b))
        cols.append(positions)
        feats.append(tokens)
    return rows, cols, feats
