"""Argument types shared by the command-line parsers (``sage-zmq`` and its ``demo``)."""

from __future__ import annotations

import argparse
import math


def finite_number(text: str) -> float:
    """A finite float; argparse reports anything else as a usage error (exit 2)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def whole_number(text: str, minimum: int) -> int:
    """An int of at least ``minimum``; argparse reports anything else as a usage error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < minimum:
        floor = "0 or more" if minimum == 0 else f"at least {minimum}"
        raise argparse.ArgumentTypeError(f"must be {floor}, got {text}")
    return value
