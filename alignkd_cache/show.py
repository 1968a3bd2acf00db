"""`alignkd-cache show`: the teacher's text->vision attention of one sample, over each of its images.

One row of panels per image. When the cache records the image's layout (schema 4.1,
docs/cache-format.md "Image layouts"): a layout that is one grid (CLIP patches for LLaVA, the pooled
12 x 12 grid for MobileVLM, Qwen's merged patch grid) covers the whole (padded) image, so the
attention mass each visual token receives is drawn as that grid stretched over the image; any other
layout (tiles, a thumbnail or global tile, a base crop and an anyres grid) gets one heatmap panel
per segment, titled by its role and shape. A 4.0 cache (no layouts) is drawn as before: a square
count as a grid over the image, any other count per token. A layer0 cache's slice is recomputed by
its stub, exactly as training recomputes it.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from alignkd_cache import layer0
from alignkd_cache.data import DataError, collate, describe_layout, pad_id, resolve_image
from alignkd_cache.images import load_image
from alignkd_cache.signal_spec import cache_kind
from alignkd_cache.sources import tokenized_from_row
from alignkd_cache.store.provenance import attrs_pad_color
from alignkd_cache.store.reader import CacheReader


def parse_span(span: str | None, n: int) -> slice:
    """'a:b' (python slice over the sample's text queries, negatives allowed) or 'i' or None (all)."""
    if span is None:
        return slice(0, n)
    try:
        if ":" in span:
            lo, hi = (int(x) if x else None for x in span.split(":", 1))
            return slice(*slice(lo, hi).indices(n)[:2])
        i = int(span) % n
        return slice(i, i + 1)
    except ValueError as e:
        raise ValueError(
            f"--tokens {span!r}: give a text-query index or a span like 0:5 (the sample has {n})"
        ) from e


def query_text(reader: CacheReader, ids) -> str:
    """The queries as text, through the teacher's tokenizer when it is on this machine; else their ids."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(reader.attrs["teacher"]["model_id"], local_files_only=True)
    except (OSError, ValueError):
        return f"token ids {ids[:6].tolist()}{'...' if len(ids) > 6 else ''}"
    return repr(tokenizer.decode(ids, skip_special_tokens=True).strip())


def show_attention(
    url,
    sample_id: str,
    image_root,
    out,
    head: int | None = None,
    tokens: str | None = None,
    storage_options=None,
) -> Path:
    reader = CacheReader(url, storage_options)
    sample = tokenized_from_row(reader.row(sample_id), int(reader.attrs["image_token_id"]))
    if not sample.images:
        raise ValueError(
            f"sample {sample_id!r} has no image, so no text->vision attention; pick an image sample"
        )
    pad = attrs_pad_color(reader.attrs)
    pictures = [load_image(resolve_image(image_root, im, sample_id), sample_id, pad) for im in sample.images]
    attention = teacher_attention(reader, sample, pictures).numpy()  # (H, |T|, N_v)
    if head is not None and not 0 <= head < attention.shape[0]:
        raise ValueError(
            f"--head {head}: the cache holds {attention.shape[0]} head(s) for this sample (0..{attention.shape[0] - 1})"
        )
    queries = parse_span(tokens, attention.shape[1])
    if queries.start >= queries.stop:
        raise ValueError(f"--tokens {tokens!r} selects no text query (the sample has {attention.shape[1]})")
    per_head = attention[:, queries].sum(1)  # attention mass each visual token receives
    mass = per_head.mean(0) if head is None else per_head[head]
    split = torch.from_numpy(mass).split(list(sample.num_visual))
    ids = torch.tensor(sample.input_ids)[sample.query_positions][queries]
    who = "mean over heads" if head is None else f"head {head}"
    title = (
        f"text->vision attention, {who}\nqueries {queries.start}:{queries.stop}: {query_text(reader, ids)}"
    )
    layouts = sample.image_layouts or [None] * len(pictures)
    panels = [
        (picture, grid.numpy(), layout)
        for (picture, _), grid, layout in zip(pictures, split, layouts, strict=True)
    ]
    return _draw(panels, f"{sample_id} ({'padded ' if pad is not None else ''}input)", title, Path(out))


def teacher_attention(reader: CacheReader, sample, pictures) -> torch.Tensor:
    """The sample's layer-0 slice: read from a stored cache, recomputed by a layer0 cache's stub.
    `pictures`: its (padded image, content key) pairs."""
    signal = reader.read(sample.id)
    for k, ((_, key), cached) in enumerate(zip(pictures, signal.image_keys, strict=True)):
        if key != cached:
            raise DataError(
                f"sample {sample.id!r}: its image {k} is not the one the cache was built from (content key {key}, "
                f"cached {cached}); restore the original file"
            )
    if cache_kind(reader.attrs) == "stored":
        return signal.attention
    stub = layer0.load_layer0(
        layer0.stub_directory(reader.loc, reader.attrs),
        dtype=getattr(torch, reader.attrs["options"]["dtype"]),
    )
    batch = collate(
        [sample],
        [[(stub.preprocess(p), key) for p, key in pictures]],
        pad_id(stub.tokenizer),
        stub.collate_pixels,
    )
    return layer0.recompute(stub, batch, reader.attrs["attn_heads"]).attention[0].float()


def _draw(panels, left_title: str, right_title: str, out: Path) -> Path:
    """One row per image: the padded image, then its tokens' attention mass: over the image (one
    grid), per segment of its layout, or per token (a 4.0 cache's count that is not a square)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 1 + max(len(layout) if _segmented(layout) else 1 for _, _, layout in panels)
    segmented = any(_segmented(layout) for _, _, layout in panels)
    width = 9 if columns == 2 else 3.2 * columns
    fig, rows = plt.subplots(
        len(panels),
        columns,
        figsize=(width, 4.5 * len(panels)),
        squeeze=False,
        layout="constrained" if segmented else None,  # colour bars shared by several panels
    )
    # Segment panels of every image share one colour scale (the same queries' mass), one colour bar.
    top = max(
        (float(mass.max()) for _, mass, layout in panels if _segmented(layout) and mass.size), default=1.0
    )
    heats, segment_axes = [], []
    for k, ((image, mass, layout), axes) in enumerate(zip(panels, rows, strict=True)):
        axes[0].imshow(image)
        axes[0].set_title(
            left_title if len(panels) == 1 else f"{left_title}, image {k}", fontsize=9 if segmented else None
        )
        axes[0].axis("off")
        for extra in axes[2:]:
            extra.axis("off")
        if _segmented(layout):
            heats.append(_segments(axes[1:], mass, layout, top))
            segment_axes += list(axes[1 : 1 + len(layout)])
            continue
        if layout is not None:  # one grid over the whole image
            shape = (layout[0]["rows"], layout[0]["cols"])
        else:
            side = math.isqrt(mass.size)
            shape = (side, side) if side * side == mass.size else None
        if shape is not None:
            axes[1].imshow(image)
            heat = axes[1].imshow(
                mass.reshape(shape),
                cmap="inferno",
                alpha=0.6,
                extent=(-0.5, image.width - 0.5, image.height - 0.5, -0.5),
                interpolation="nearest",
            )
            fig.colorbar(heat, ax=axes[1], fraction=0.046, label="attention mass (summed over queries)")
            axes[1].axis("off")
        else:  # a 4.0 cache of a processor's own layout (tiles, a dynamic grid): per token, in order
            axes[1].bar(range(mass.size), mass, width=1.0, color="tab:orange")
            axes[1].set_xlabel("visual token")
            axes[1].set_ylabel("attention mass (summed over queries)")
        axes[1].set_title(right_title, fontsize=9)
    if heats:
        fig.suptitle(right_title, fontsize=9)
        fig.colorbar(heats[-1], ax=segment_axes, fraction=0.046, label="attention mass (summed over queries)")
    else:
        fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _segmented(layout) -> bool:
    """A recorded layout other than one grid over the whole image."""
    return layout is not None and not (len(layout) == 1 and layout[0]["role"] == "grid")


def _segments(axes, mass, layout, top: float):
    """One heatmap per segment of an image's layout, its tokens in storage order; the last one."""
    start, heat = 0, None
    for ax, part in zip(axes, layout, strict=False):
        n = part["rows"] * part["cols"]
        heat = ax.imshow(
            mass[start : start + n].reshape(part["rows"], part["cols"]),
            cmap="inferno",
            vmin=0.0,
            vmax=top,
            interpolation="nearest",
        )
        start += n
        note = " (last column: newlines)" if part["role"] == "anyres_newline" else ""
        ax.set_title(f"{describe_layout([part])}{note}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.axis("on")
    return heat
