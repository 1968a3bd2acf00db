"""Progress displays: a plain line now and then off a terminal, never carriage returns."""

from __future__ import annotations

import io

from alignkd_cache.progress import PlainProgress


def test_plain_progress_prints_throttled_lines_and_a_final_one():
    stream = io.StringIO()
    bar = PlainProgress(10, "build", initial=2, unit="sample", every=3600, stream=stream)
    bar.update(3)
    bar.set_postfix_str("1.5 MiB written")
    assert stream.getvalue() == ""  # under the interval: nothing yet
    bar.close()
    line = stream.getvalue()
    assert line.startswith("build: 5/10 sample, 0:00 elapsed; 1.5 MiB written") and line.count("\n") == 1
    every = PlainProgress(3, "train", unit="step", every=0, stream=io.StringIO())
    for _ in range(3):
        every.update()
        every.set_postfix(loss="0.5000")
    lines = every.stream.getvalue().splitlines()
    assert lines == [f"train: {i}/3 step, 0:00 elapsed{'; loss=0.5000' if i > 1 else ''}" for i in (1, 2, 3)]
    assert "\r" not in every.stream.getvalue()
