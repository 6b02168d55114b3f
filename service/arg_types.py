"""Number types for command-line flags, shared by `staticmoe serve`, `staticmoe bench serve` and the benchmarks."""

from __future__ import annotations

import argparse


class ArgumentValueError(argparse.ArgumentTypeError, ValueError):
    """Out of range. argparse prints an ArgumentTypeError's own message ("must be >= 1, got 0") where it would
    print only "invalid positive_int value" for a ValueError; the ValueError base lets callers that parse values
    outside argparse (the serve CLI's STATICMOE_* variables) catch it as any bad conversion."""


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ArgumentValueError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ArgumentValueError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ArgumentValueError(f"must be > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise ArgumentValueError(f"must be >= 0, got {text}")
    return value
