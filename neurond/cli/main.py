"""neuronctl: the command-line client of neurond (a pure D-Bus client). Placeholder entry."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("neuronctl: not implemented yet; use busctl (see README.md)", file=sys.stderr)
    return 2
