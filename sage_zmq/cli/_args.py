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
