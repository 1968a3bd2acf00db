"""The build's pre-flight check: every record read and every image header opened before the teacher
loads, and every problem reported at once (a 665k-sample mix that misses a folder of images should
cost one run to diagnose, not one run per record).

Opening a header reads a few bytes, not the pixels, so the check costs about a file open per image.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from alignkd_cache.data import DataError, Problem, Record, read_entries, resolve_image
from alignkd_cache.images import DEFAULT_MAX_PIXELS, ImageError, check_image

SHOWN_PER_REASON = 3


@dataclass
class Preflight:
    entries: list[Record | Problem]  # dataset order (after --limit): a Record, or the Problem in its place

    @property
    def problems(self) -> list[Problem]:
        return [e for e in self.entries if isinstance(e, Problem)]

    def counts(self) -> dict[str, int]:
        return dict(Counter(p.reason for p in self.problems).most_common())

    def lines(self) -> list[str]:
        """A count per reason and its first few cases (file, line or index, sample id, what to fix)."""
        out = [f"pre-flight: {len(self.entries)} records, {len(self.problems)} with problems"]
        for reason, n in self.counts().items():
            out.append(f"  {reason}: {n}")
            cases = [p for p in self.problems if p.reason == reason]
            out += [f"    {p.message}" for p in cases[:SHOWN_PER_REASON]]
            if n > SHOWN_PER_REASON:
                out.append(f"    ... and {n - SHOWN_PER_REASON} more")
        return out

    def write_json(self, path: str | Path) -> None:
        report = {
            "records": len(self.entries),
            "counts": self.counts(),
            "problems": [asdict(p) for p in self.problems],
        }
        Path(path).write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")


def _check_images(record: Record, image_root, max_pixels: int) -> Problem | None:
    """Every image of the record: the first that cannot be used is its Problem."""
    for image in record.images:
        try:
            if image_root is None:
                raise DataError(
                    f"sample {record.id!r} has an image but no --image-root was given", "no --image-root"
                )
            check_image(resolve_image(image_root, image, record.id), record.id, max_pixels)
        except (DataError, ImageError) as e:
            return Problem(e.reason, record.where, record.id, f"{record.where}: {e}", image)
    return None


def preflight(
    data: str | Path,
    image_root: str | Path | None,
    limit: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Preflight:
    entries = []
    for entry in read_entries(data)[:limit]:
        if isinstance(entry, Record) and entry.images:
            entry = _check_images(entry, image_root, max_pixels) or entry
        entries.append(entry)
    return Preflight(entries)


def default_report_path(out: str) -> Path:
    """Next to a local --out (`<out>.preflight.json`); in the working directory for a remote one."""
    if "://" in out and not out.startswith("file://"):
        return Path(out.rstrip("/").rsplit("/", 1)[-1] + ".preflight.json")
    local = Path(out.removeprefix("file://"))
    return local.parent / f"{local.name}.preflight.json"
