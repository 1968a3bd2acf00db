"""What the trust checks found so far: the store's files, attributes, manifest (its file and its
in-memory index) and block plan, and the problems. Each check step (trust_tree, trust_attrs,
trust_manifest, trust_rows, trust_plan, trust_arrays) reads what earlier steps put here; a reader
keeps it to check each block as it first reads it."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from alignkd_cache.store.layout import ArraySpec, block_specs
from alignkd_cache.store.location import Location
from alignkd_cache.store.manifest import ManifestFile
from alignkd_cache.store.manifest_index import ManifestIndex

MAX_JSON_BYTES = 1 << 20  # a zarr.json document; real ones are under 2 KB
MAX_PROBLEMS = 50  # problems collected before the checks stop (verify lists them; open names the first)


@dataclass
class BlockRows:
    """Per block (numpy arrays indexed by block): the rows each array holds, from the manifest."""

    attention: np.ndarray
    visual: np.ndarray
    logit: np.ndarray
    logit_width: np.ndarray  # the block's logit width, as its logit_ids metadata states (checked <= k)
    attention_width: np.ndarray  # the block's widest sample's visual tokens (0 without attention)


@dataclass
class Inspection:
    url: str
    loc: Location
    root: bytes | None = None  # the root zarr.json to check instead of the stored one (copy)
    max_problems: int = MAX_PROBLEMS
    problems: list[tuple[str | None, str]] = field(default_factory=list)  # (sample id or None, what)
    keys: dict[str, None] = field(default_factory=dict)  # the files checked so far (ordered set)
    block_dirs: set[str] = field(default_factory=set)  # the block directories found (bNNNNNN)
    block_keys: dict[int, list[str]] = field(default_factory=dict)  # each checked block's files
    attrs: dict = field(default_factory=dict)
    manifest: ManifestFile | None = None  # its bytes, decoded a batch or a row group at a time
    index: ManifestIndex | None = None  # what of its rows stays in memory (after the row rules)
    blocks: BlockRows | None = None

    def __post_init__(self):
        root = self.loc.local_root
        self.local_root = None if root is None else str(root)

    def add(self, what: str, sample: str | None = None) -> None:
        self.problems.append((sample, what))

    @property
    def full(self) -> bool:
        return len(self.problems) >= self.max_problems

    def block_specs(self, block: int) -> dict[str, ArraySpec]:
        """The arrays block `block` must hold (after the plan: shapes from the manifest)."""
        rows = self.blocks
        return block_specs(
            self.attrs,
            int(rows.attention[block]),
            int(rows.visual[block]),
            int(rows.logit[block]),
            int(rows.logit_width[block]),
            int(rows.attention_width[block]),
        )

    def read_json(self, key: str) -> dict | None:
        """A zarr v3 metadata document, bounded in size; None (with the problem recorded) if it is not one."""
        if key == "zarr.json" and self.root is not None:
            data = self.root
        elif key not in self.keys:
            self.add(f"{key} is missing")
            return None
        else:
            data = self._read_bounded(key)
            if data is None:
                self.add(f"{key} is larger than {MAX_JSON_BYTES} bytes")
                return None
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            self.add(f"{key}: not JSON ({e})")
            return None
        if not isinstance(doc, dict) or doc.get("zarr_format") != 3:
            self.add(
                f"{key}: zarr_format is {doc.get('zarr_format') if isinstance(doc, dict) else doc!r}, only 3 is read"
            )
            return None
        return doc

    def _read_bounded(self, key: str) -> bytes | None:
        """The file's bytes, or None when it holds more than MAX_JSON_BYTES. A local file is read
        directly (the tree walk found it a regular file under no symlink): hundreds of thousands of
        documents through the zarr store's event loop would cost a millisecond each."""
        if self.local_root is None:
            return None if self.loc.size(key) > MAX_JSON_BYTES else self.loc.read_bytes(key)
        with open(os.path.join(self.local_root, key), "rb") as f:
            data = f.read(MAX_JSON_BYTES + 1)
        return None if len(data) > MAX_JSON_BYTES else data
