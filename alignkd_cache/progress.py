"""One progress display per long command.

Libraries keep their own bars and info logs (transformers prints "Loading weights" on every
`from_pretrained` and "Writing model shards" on every `save_pretrained`); inside our commands they
are noise under our own display, so `quiet_libraries` turns them off through the libraries' own
switches. `StageProgress` is the display of a command made of unequal stages: its ETA weighs each
stage by its expected cost, and it prints plain lines (no carriage returns or escape codes) when
its stream is not a terminal. `progress_bar` is the per-command counter (build, train, eval): tqdm on
a terminal, plain lines now and then when the output goes to a file, so a redirected log stays small
and readable.
"""

from __future__ import annotations

import os
import sys
import time

from tqdm import tqdm


def quiet_libraries() -> None:
    """Silence transformers' and huggingface_hub's progress bars and below-error logging. A command
    that has not imported transformers (info, verify, copy, merge) does not import it here, which
    takes a second: transformers takes both settings from these switches when it is imported."""
    import huggingface_hub.utils

    huggingface_hub.utils.disable_progress_bars()  # transformers' bars start from this switch
    if "transformers" not in sys.modules:
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"
        return
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def clock(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}:{seconds:02d}"


class StageProgress:
    """Stages with expected costs (any unit, e.g. seconds on a reference machine). The ETA is the
    remaining expected cost at the rate measured so far, so one long stage does not throw it off."""

    def __init__(self, costs: list[float], desc: str, stream=None):
        self.costs, self.desc, self.stream = costs, desc, stream or sys.stderr
        self.done = 0
        self.start = time.perf_counter()
        self.bar = None
        if self.stream.isatty():
            self.bar = tqdm(
                total=sum(costs),
                desc=desc,
                file=self.stream,
                smoothing=0,
                mininterval=0,  # one update per stage: show each
                bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed} elapsed, ~{remaining} left{postfix}",
            )

    def stage_done(self, name: str) -> None:
        cost = self.costs[self.done]
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(f"{name} done", refresh=False)
            self.bar.update(cost)
            return
        elapsed = time.perf_counter() - self.start
        done = sum(self.costs[: self.done])
        left = elapsed / done * (sum(self.costs) - done) if done else 0.0
        print(
            f"{self.desc} [{self.done}/{len(self.costs)}] {name} done; "
            f"{clock(elapsed)} elapsed, ~{clock(left)} left",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def progress_bar(
    total: int, desc: str, *, initial: int = 0, unit: str = "it", disable: bool = False, every=30.0
):
    """tqdm on a terminal; off one, a PlainProgress with the same calls (update, set_postfix[_str], close)."""
    if disable or sys.stderr.isatty():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=disable)
    return PlainProgress(total, desc, initial=initial, unit=unit, every=every)


class PlainProgress:
    """One plain line at most every `every` seconds, and one at the end: no carriage returns."""

    def __init__(self, total: int, desc: str, *, initial: int = 0, unit: str = "it", every=30.0, stream=None):
        self.total, self.desc, self.n, self.unit, self.every = total, desc, initial, unit, every
        self.stream = stream or sys.stderr
        self.postfix = ""
        self.start = self.last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            self._line()

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text

    def close(self) -> None:
        self._line()

    def _line(self) -> None:
        extra = f"; {self.postfix}" if self.postfix else ""
        print(
            f"{self.desc}: {self.n}/{self.total} {self.unit}, {clock(time.perf_counter() - self.start)} elapsed{extra}",
            file=self.stream,
            flush=True,
        )
