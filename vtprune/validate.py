"""Type and range checks of configuration values (config.json, pruning YAML, training settings).

Each check returns the value (an int as int, a number as float) or raises `error` (a
`VtpruneError` subclass) whose message names the key and shows the value as it was written:
`text_config.num_attention_heads must be a positive integer, got "32"`.

Rules, the same everywhere:
- integers: an `int`, never a `bool` (Python's `isinstance(True, int)` is True) and never a
  float, not even 32.0: config.json and YAML written by tools hold integers as integers, and a
  float where a count belongs is a hand edit that may as well be 32.5;
- numbers: an `int` or a `float`, never a `bool`, and finite (NaN and +-inf are refused);
- strings and bools are exactly `str` / `bool` (JSON and YAML have both: no 0/1, no "true").
"""
from __future__ import annotations

import json
import math
import re

from .errors import VtpruneError

# PyYAML (YAML 1.1) reads 1e-4 and 1.0e4 as strings: its float pattern needs a '.' and a signed
# exponent. Only such exponent forms are turned into numbers; any other string stays an error.
_YAML_EXP_FLOAT = re.compile(r"^[-+]?(\d[\d_]*\.?[\d_]*|\.\d[\d_]*)[eE][-+]?\d+$")


def show(value, limit: int = 60) -> str:
    """The value as JSON / YAML users wrote it: "32" for a string, true, null, [1, 2], NaN."""
    try:
        text = json.dumps(value, allow_nan=True, sort_keys=False)
    except (TypeError, ValueError):  # keys or values JSON cannot hold (e.g. a YAML mapping keyed by 1)
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def yaml_number(value):
    """`value` as a float when it is one of PyYAML's exponent-notation strings ("1e-4"), else unchanged."""
    if isinstance(value, str) and _YAML_EXP_FLOAT.match(value.strip()):
        return float(value.replace("_", ""))
    return value


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(value, key: str, lo: int | None = None, hi: int | None = None, *, error=VtpruneError,
              where: str = "") -> int:
    """An integer in [lo, hi] (either bound optional). A bound of 2**31 - 1 or more is a sanity cap
    and named only when the value exceeds it."""
    if is_int(value) and hi is not None and value > hi:
        raise error(f"{where}{key} must be at most {hi}, got {show(value)}")
    if not (is_int(value) and (lo is None or value >= lo)):
        if hi is not None and hi < 2**31 - 1:
            want = f"an integer in [{lo}, {hi}]" if lo is not None else f"an integer <= {hi}"
        elif lo == 1:
            want = "a positive integer"
        elif lo == 0:
            want = "an integer >= 0"
        elif lo is not None:
            want = f"an integer >= {lo}"
        else:
            want = "an integer"
        raise error(f"{where}{key} must be {want}, got {show(value)}")
    return int(value)


def check_number(value, key: str, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                 hi_open: bool = False, error=VtpruneError, where: str = "", want: str | None = None) -> float:
    """A finite number in the interval given by lo / hi (open at an end when *_open)."""
    ok = is_number(value) and math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        if want is None:
            if lo is not None and hi is not None:
                want = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
            elif lo is not None:
                want = f"a number {'>' if lo_open else '>='} {lo:g}"
            elif hi is not None:
                want = f"a number {'<' if hi_open else '<='} {hi:g}"
            else:
                want = "a finite number"
        raise error(f"{where}{key} must be {want}, got {show(value)}")
    return float(value)


def check_bool(value, key: str, *, error=VtpruneError, where: str = "") -> bool:
    if not isinstance(value, bool):
        raise error(f"{where}{key} must be true or false, got {show(value)}")
    return value


def check_choice(value, key: str, choices, *, error=VtpruneError, where: str = "") -> str:
    if not isinstance(value, str) or value not in choices:
        names = ", ".join(f"'{c}'" for c in choices)
        raise error(f"{where}{key} must be one of {names}, got {show(value)}")
    return value


def check_mapping(value, key: str, *, error=VtpruneError, where: str = "") -> dict:
    """A mapping whose keys are all strings (YAML allows `1: x` and `[a]: x`; JSON objects never)."""
    if not isinstance(value, dict):
        raise error(f"{where}{key} must be a mapping, got {type_name(value)} {show(value)}")
    for k in value:
        if not isinstance(k, str):
            raise error(f"{where}{key} has a key that is not a string: {show(k)} ({type_name(k)})")
    return value


def type_name(value) -> str:
    """JSON / YAML's name for the value's type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__
