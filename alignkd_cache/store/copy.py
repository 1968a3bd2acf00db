"""`alignkd-cache copy SRC DST`: move a cache between local and remote stores, verified on arrival.

Bytes are copied as they are (no re-encoding). The root zarr.json, which marks the cache complete,
is copied last, so an interrupted copy is never mistaken for a cache; then the destination is
verified end to end (every chunk's checksum, the manifest's sha256).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from alignkd_cache.store.location import Location
from alignkd_cache.store.provenance import IncompatibleCache, check_readable
from alignkd_cache.store.verify import VerifyReport, verify


def copy_cache(
    src: str, dst: str, src_options: dict | None = None, dst_options: dict | None = None, threads: int = 8
) -> VerifyReport:
    source = Location(src, src_options, read_only=True)
    check_readable(dict(source.group("r").attrs), src)
    target = Location(dst, dst_options)
    if not target.is_empty():
        raise IncompatibleCache(f"{dst} is not empty; copy into a new location")
    keys = [k for k in source.list_keys() if k != "zarr.json"]

    def move(key):
        target.write_bytes(key, source.read_bytes(key))

    with ThreadPoolExecutor(threads) as pool:  # remote stores are latency-bound
        list(pool.map(move, keys))
    move("zarr.json")
    report = verify(dst, dst_options)
    if not report.ok:
        raise IncompatibleCache(f"copy to {dst} failed verification:\n" + "\n".join(report.lines()[:20]))
    return report
