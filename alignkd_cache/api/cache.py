"""`open_cache`: one object for a cache's summary, its per-sample signals and its full check."""

from __future__ import annotations

from alignkd_cache.signals import TeacherSignal
from alignkd_cache.store.info import cache_info
from alignkd_cache.store.reader import CacheReader
from alignkd_cache.store.verify import VerifyReport, verify


class Cache:
    """A cache opened for reading: its metadata was checked when it opened (store/trust.py); chunks
    are checked as they are read, and all of them by `verify()`."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.reader = CacheReader(url, storage_options)
        self.url, self.storage_options = self.reader.url, storage_options

    @property
    def attrs(self) -> dict:
        """The cache's root attributes: teacher, dataset, build options, layout (docs/cache-format.md)."""
        return self.reader.attrs

    @property
    def ids(self) -> list[str]:
        """The written samples' ids, in dataset order."""
        return self.reader.ids

    @property
    def skipped(self) -> dict[str, str]:
        """Sample id -> why the build skipped it."""
        return self.reader.skipped

    def __len__(self) -> int:
        return len(self.reader)

    def info(self) -> dict:
        """What `alignkd-cache info --json` prints: counts, provenance, bytes per signal per sample."""
        return cache_info(self.url, self.storage_options)

    def signals(self, sample_id: str) -> TeacherSignal:
        """One sample's teacher signals on the teacher's sequence, float32 (a layer0 cache: logit
        targets only; `CacheDataset` recomputes the rest)."""
        return self.reader.read(sample_id)

    def verify(self) -> VerifyReport:
        """Read and check every chunk (and a layer0 cache's stub): `.ok`, `.lines()`."""
        return verify(self.url, self.storage_options)


def open_cache(url: str, storage_options: dict | None = None) -> Cache:
    """Open a cache written by `alignkd-cache build` (a path or an fsspec URL such as s3://...)."""
    return Cache(url, storage_options)
