"""Fail when installing the test extras changed what the demo environment had chosen.

Usage: python .ci/no_downgrades.py BEFORE.txt, where BEFORE.txt is `pip freeze` of the environment
before the extras went in. A package removed or moved to a lower version is named, and the exit code
is 1: the tests would run in a different environment from the one the demo recorded.
"""

from __future__ import annotations

import sys
from importlib.metadata import distributions
from pathlib import Path

from pip._vendor.packaging.utils import canonicalize_name
from pip._vendor.packaging.version import Version


def pinned(lines: list[str]) -> dict[str, str]:
    pairs = (line.split("==", 1) for line in lines if "==" in line)
    return {canonicalize_name(name): version.strip() for name, version in pairs}


def main(before_file: str) -> int:
    before = pinned(Path(before_file).read_text().splitlines())
    now = {canonicalize_name(d.metadata["Name"]): d.version for d in distributions()}
    changed = [
        f"{name} {version} -> {now.get(name, 'removed')}"
        for name, version in sorted(before.items())
        if name not in now or Version(now[name]) < Version(version)
    ]
    for line in changed:
        print(f"downgraded by the test extras: {line}", file=sys.stderr)
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
