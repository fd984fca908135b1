"""argparse types for the command line's numbers: a bad value is refused when the flags are
read, with the flag named, rather than deep in a run (a zero speed-up divides by zero, a
negative drain drops the window's last requests, a NaN cap cannot become bytes)."""

from __future__ import annotations

import argparse
import math


def _number(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return x


def positive_float(text: str) -> float:
    """A finite number > 0."""
    x = _number(text)
    if x <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return x


def nonneg_float(text: str) -> float:
    """A finite number >= 0."""
    x = _number(text)
    if x < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return x


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return n
