"""argparse types shared by the commands (`python -m stream_engine`, `api`, `loadtest`):
a bad value is one line naming the option (exit 2) before anything starts."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def whole_number(least: int, most: int | None = None) -> Callable[[str], int]:
    """A whole number of at least `least` (and at most `most`)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if most is not None and not least <= value <= most:
            raise argparse.ArgumentTypeError(f"must be between {least} and {most}, got {value}")
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
        return value

    return parse
