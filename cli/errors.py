"""One place where expected failures become one line, `Error: <what> <where> <what to do>`, and an exit code.

Every command group of the project is a `Commands` group: it adds `--debug` (show the traceback) and
maps the project's error classes to the exit codes below. Anything else is a bug and keeps its
traceback. README.md ("Exit codes") documents the codes.
"""

from __future__ import annotations

import errno
import os
import re

import click

from alignkd_cache.errors import OutputNotEmpty, PeerFailed
from alignkd_cache.interrupt import Interrupted
from alignkd_cache.store.provenance import IncompatibleCache
from alignkd_cache.store.trust import CacheError

EXIT_VERIFY_FAILED = 1  # `alignkd-cache verify` found damage (it prints the report itself)
EXIT_USAGE = 2  # a bad option or argument value (click's own code)
EXIT_BAD_INPUT = 3  # a dataset record, an image, a sample id or a value the command cannot use
EXIT_CACHE_REFUSED = 4  # not a cache, unfinished, incompatible, or a non-empty --out
EXIT_DAMAGED = 5  # a cache chunk fails its checksum or is missing
EXIT_NOT_FOUND = 6  # a model, file or cache that is not where the command was told to look
EXIT_SYSTEM = 7  # the system refused: disk full, permission denied, other I/O errors
EXIT_PEER_FAILED = 8  # another rank of a torchrun job failed a step all ranks share (its error says why)
# Stopped by Ctrl-C or SIGTERM, 128 + the signal's number as a shell reports it (alignkd_cache/interrupt.py).
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class CommandError(click.ClickException):
    """An expected failure, already worded for the user: click prints `Error: <message>`."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def _one_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    if lines and lines[0].startswith("Caught ") and "DataLoader worker" in lines[0]:
        # torch re-raises a worker's exception with the worker's traceback in its message: the
        # original message is the traceback's last line, after the exception's name
        return re.sub(r"^[\w.]+: ", "", lines[-1])
    return "; ".join(lines)


def _not_a_cache(e: Exception) -> str:
    # zarr: "No group found in store LocalStore('file:///x') at path ''"
    found = re.search(r"Store\('(?:file://)?([^']*)'\)", str(e))
    where = found.group(1) if found else "the given path"
    return (
        f"{where} is not an alignkd cache (no zarr group at its root); "
        "give the --out of an `alignkd-cache build`"
    )


def explain(e: Exception) -> tuple[str, int] | None:
    """(message, exit code) for an expected failure; None for a bug."""
    from zarr.errors import GroupNotFoundError, NodeNotFoundError

    if isinstance(e, PeerFailed):
        return str(e), EXIT_PEER_FAILED
    if isinstance(e, Interrupted):
        return str(e), e.exit_code
    if isinstance(e, OutputNotEmpty):
        return str(e), EXIT_CACHE_REFUSED
    if isinstance(e, RuntimeError) and isinstance(e.__cause__, OSError):  # the background writer's wrap
        return explain(e.__cause__)
    if isinstance(e, GroupNotFoundError | NodeNotFoundError):
        return _not_a_cache(e), EXIT_CACHE_REFUSED
    if isinstance(e, CacheError):
        damaged = "checksum" in str(e) or "missing" in str(e)
        return _one_line(e), EXIT_DAMAGED if damaged else EXIT_CACHE_REFUSED
    if isinstance(e, IncompatibleCache):
        return _one_line(e), EXIT_CACHE_REFUSED
    if isinstance(e, ValueError):  # DataError, ImageError, CompatibilityError and the other refusals
        return _one_line(e), EXIT_BAD_INPUT
    if isinstance(e, KeyError):  # an unknown sample id; KeyError's str() adds quotes
        return _one_line(e.args[0] if e.args else e), EXIT_BAD_INPUT
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        where = f" writing {e.filename}" if e.filename else ""
        return f"no space left on the device{where}; free space there or write somewhere else", EXIT_SYSTEM
    if isinstance(e, FileNotFoundError):  # ours are worded already; the OS's name only the file
        return (
            f"{e.filename} does not exist; check the path" if e.filename else _one_line(e)
        ), EXIT_NOT_FOUND
    if isinstance(e, PermissionError):
        return f"permission denied: {e.filename or e}; check the path's owner and mode", EXIT_SYSTEM
    if isinstance(e, OSError):
        return f"{_one_line(e)}; check the path and the device", EXIT_SYSTEM
    if type(e).__module__.split(".")[0] in ("botocore", "aiobotocore", "s3fs"):  # remote stores (fsspec)
        return (
            f"remote store: {_one_line(e)}; check the URL, your credentials and --storage-option",
            EXIT_SYSTEM,
        )
    return None


class ExistingPath(click.Path):
    """A path that must exist (click.Path's other checks apply). A missing one is "not found", exit 6
    like a missing model or cache, rather than click's usage error."""

    def convert(self, value, param, ctx):
        if not os.path.lexists(value):
            option = param.opts[0] if param is not None else "the path"
            raise CommandError(f"{option} {value} does not exist; check the path", EXIT_NOT_FOUND)
        return super().convert(value, param, ctx)


class Device(click.ParamType):
    """A torch device this machine has: `cpu`, `cuda`, `cuda:1`, `mps`; refused in the parser otherwise."""

    name = "device"

    def convert(self, value, param, ctx):
        import torch

        try:
            device = torch.device(value)
        except RuntimeError:
            self.fail(f"{value!r} is not a torch device; use cpu, cuda, cuda:N or mps", param, ctx)
        if device.type == "cpu":
            return value
        module = getattr(torch, device.type, None)  # torch.cuda, torch.mps, torch.xpu
        if not (hasattr(module, "is_available") and module.is_available()):
            self.fail(
                f"{value!r}: this machine or torch build has no {device.type} device; use --device cpu, or "
                "install the torch build for your accelerator as pytorch.org describes",
                param,
                ctx,
            )
        count = module.device_count()
        if device.index is not None and device.index >= count:
            self.fail(
                f"{value!r}: this machine has {count} {device.type} device(s), numbered from 0", param, ctx
            )
        return value


def _set_debug(ctx: click.Context, _param, value: bool) -> None:
    ctx.meta["alignkd.debug"] = value


class Commands(click.Group):
    """A click group whose commands fail with one line and a documented exit code (see module doc)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.params.append(
            click.Option(
                ["--debug"],
                is_flag=True,
                expose_value=False,
                is_eager=True,
                callback=_set_debug,
                help="Show the Python traceback of a failure.",
            )
        )

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt as e:  # Ctrl-C before a run's loop took over its signals: nothing saved
            if ctx.meta.get("alignkd.debug"):
                raise
            raise CommandError(
                "stopped by SIGINT before the run could save its state; run it again "
                "(with --resume if it wrote a checkpoint)",
                EXIT_INTERRUPTED,
            ) from e
        except Exception as e:
            explained = explain(e)
            if explained is None or ctx.meta.get("alignkd.debug"):
                raise
            raise CommandError(*explained) from e
