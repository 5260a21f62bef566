"""argparse types shared by the subcommands: each refuses a bad value with a message naming what to give."""
from __future__ import annotations

import argparse
import math
import re
from typing import Callable, TypeVar

T = TypeVar("T")


def _parsed(text: str, cast: Callable[[str], T], not_parsed: str, valid: Callable[[T], bool], invalid: str) -> T:
    """`cast(text)` if it parses and is `valid`, else argparse's error (messages formatted with `text`)."""
    try:
        value = cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(not_parsed.format(text=text)) from None
    if not valid(value):
        raise argparse.ArgumentTypeError(invalid.format(text=text))
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    return _parsed(text, float, "{text!r} is not a number", lambda v: math.isfinite(v) and v > 0,
                   "must be a positive number, got {text}")


def positive_int(text: str) -> int:
    """A whole number >= 1."""
    return _parsed(text, int, "{text!r} is not a whole number", lambda v: v >= 1, "must be at least 1, got {text}")


def score_threshold(text: str) -> float:
    """A number in [0, 1]."""
    return _parsed(text, float, "{text!r} is not a number; give a score between 0 and 1",
                   lambda v: math.isfinite(v) and 0.0 <= v <= 1.0, "{text!r} is not a score between 0 and 1")


def video_id(text: str) -> int:
    """A non-negative integer."""
    return _parsed(text, int, "{text!r} is not an integer; give a non-negative video id", lambda v: v >= 0,
                   "{text!r} is negative; give a non-negative video id")


def positive_fps(text: str) -> float:
    """A positive frame rate."""
    message = "{text!r} is not a positive frame rate"
    return _parsed(text, float, message, lambda v: math.isfinite(v) and v > 0, message)


def device_name(text: str) -> str:
    """cpu, cuda or cuda:N (any case: "CPU" is cpu)."""
    value = text.strip().lower()
    if not re.fullmatch(r"cpu|cuda(:\d+)?", value):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: use cpu, cuda or cuda:N")
    return value
