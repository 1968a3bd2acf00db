"""One writer at a time: a build's --out, a training run's --out.

Local directories: an OS lock (flock) on LOCK_NAME inside the directory, which names its holder
(host and pid). The kernel drops the lock when its process dies, so a lock left by a killed run
is stale by construction and the next writer takes it over. Object stores (s3://...): a lock
object created with a conditional write (create only if absent); a second writer is refused,
naming the holder. A lock object whose holder is a dead process on this host is taken over; one
from another host cannot be checked from here, so it is reported with the key to delete once
that run is known to be gone. Stores that cannot create an object conditionally are refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path

import fsspec

from alignkd_cache.store.location import Location
from alignkd_cache.store.provenance import IncompatibleCache

LOCK_NAME = ".alignkd-writer.lock"


class WriterLocked(IncompatibleCache):
    """Another process is writing the same output."""


def _holder() -> str:
    return f"host {socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}"


class WriterLock:
    """Held until release() (or until the object is dropped, or the process ends)."""

    def __init__(self, release):
        self._release = release

    def release(self) -> None:
        if self._release is not None:
            self._release()
            self._release = None

    def __del__(self):
        self.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def lock_dir(directory: str | Path, what: str) -> WriterLock:
    """Lock a local directory (created if missing) for one writer."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 256).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise WriterLocked(
                f"{directory} is locked by {holder} writing {what}; wait for it to end or choose another --out"
            ) from None
        try:  # a releasing holder may have unlinked the file we opened: lock the current one
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, _holder().encode())

    def release():
        # Unlink before closing: nobody can lock this file once it is gone. It may be gone already
        # (the directory deleted while a failed run's lock waited for garbage collection).
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)

    return WriterLock(release)


def lock_store(loc: Location, what: str) -> WriterLock:
    """Lock a cache location (local directory or object store) for one writer."""
    if loc.local_root is not None:
        return lock_dir(loc.local_root, what)
    fs, root = fsspec.core.url_to_fs(loc.url, **(loc.storage_options or {}))
    path = f"{root.rstrip('/')}/{LOCK_NAME}"
    for _ in range(2):
        try:
            with fs.open(path, "xb") as f:
                f.write(_holder().encode())
            return WriterLock(lambda: fs.rm(path))
        except FileExistsError:
            holder = fs.cat(path).decode(errors="replace")
            if not _dead_here(holder):
                raise WriterLocked(
                    f"{loc.url} is locked by {holder} writing {what}; wait for it to end, or delete "
                    f"{path} if that run is gone"
                ) from None
            fs.rm(path)  # its holder died on this host: take over
        except (ValueError, NotImplementedError) as e:
            raise WriterLocked(
                f"{loc.url}: this store cannot create a lock object conditionally ({e}); "
                "write to a local directory or s3 and copy the cache there"
            ) from None
    raise WriterLocked(f"{loc.url}: could not take over the stale lock {path}; delete it and retry")


def _dead_here(holder: str) -> bool:
    words = holder.split()
    if len(words) < 4 or words[0] != "host" or words[1] != socket.gethostname():
        return False
    try:
        os.kill(int(words[3]), 0)
    except ProcessLookupError:
        return True
    except (ValueError, PermissionError):
        return False
    return False
