"""`alignkd-cache copy SRC DST`: move a cache between local and remote stores, verified on arrival.

Bytes are copied as they are (no re-encoding). The root zarr.json, which marks the cache complete,
is written last, only after the copied files pass `verify` against it, so neither an interrupted
nor a failed copy is ever mistaken for a cache. Only files that passed the source's trust checks
are copied (never a symlink's target).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from alignkd_cache.store.location import Location
from alignkd_cache.store.provenance import IncompatibleCache
from alignkd_cache.store.trust import UntrustedCache, open_cache
from alignkd_cache.store.verify import VerifyReport, verify


def copy_cache(
    src: str, dst: str, src_options: dict | None = None, dst_options: dict | None = None, threads: int = 8
) -> VerifyReport:
    source = open_cache(src, src_options, every_block=True)
    target = Location(dst, dst_options)
    if not target.is_empty():
        raise IncompatibleCache(f"{dst} is not empty; copy into a new location")
    keys = [k for k in source.keys if k != "zarr.json"]

    def move(key):
        target.write_bytes(key, source.loc.read_bytes(key))

    with ThreadPoolExecutor(threads) as pool:  # remote stores are latency-bound
        list(pool.map(move, keys))
    root = source.loc.read_bytes("zarr.json")
    report = verify(dst, dst_options, root=root)
    if not report.ok:
        raise UntrustedCache(
            f"copy to {dst} failed verification (left incomplete): " + "; ".join(report.lines()[:5])
        )
    target.write_bytes("zarr.json", root)
    return report
