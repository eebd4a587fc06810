"""Checks of the public API's arguments: each bad value raises a `VtpruneError` that names the
argument, the value and what is accepted, before any image is read or any tensor is allocated.

Numbers: a real number is an int, a float or any `numbers.Real` (numpy scalars included), never a
bool (True would silently be 1) nor a string ("0.7" is refused, not parsed). Integers are
`numbers.Integral` (a float such as 5.0 is refused: it usually means a computed value that was
meant to be rounded).
"""
from __future__ import annotations

import math
import numbers
from typing import Any

from ..errors import VtpruneError

# The sampler divides float32 logits by the temperature (sampling.py). A positive temperature
# below float32's smallest normal number (torch.finfo(torch.float32).tiny = 1.1754944e-38) is a
# float32 denormal or rounds to 0 there, so `logits / T` would be inf or 0/0: such temperatures are
# refused (use 0 for greedy decoding). Every temperature at or above it samples without NaN.
MIN_TEMPERATURE = 1.1754943508222875e-38
SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes seeds in [0, 2**64)


def _describe(value: Any) -> str:
    """How a value of the wrong type is shown: `None`, `float 8.0`, `str '0.7'`, `bool True`."""
    if value is None:
        return "None"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def check_real(value, name: str) -> float:
    """`value` as a finite float, or the error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise VtpruneError(f"{name} must be a number, got {_describe(value)}")
    f = float(value)
    if not math.isfinite(f):
        raise VtpruneError(f"{name} must be a finite number, got {f}")
    return f


def check_int(value, name: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise VtpruneError(f"{name} must be an integer, got {_describe(value)}")
    n = int(value)
    if minimum is not None and n < minimum:
        raise VtpruneError(f"{name} must be an integer >= {minimum}, got {n}")
    return n


def check_temperature(value) -> float:
    t = check_real(value, "temperature")
    if t < 0:
        raise VtpruneError(f"temperature must be >= 0 (0 = greedy), got {t}")
    if 0 < t < MIN_TEMPERATURE:
        raise VtpruneError(f"temperature {t!r} is below {MIN_TEMPERATURE:.3g}, the smallest normal float32 "
                           f"(the sampler divides float32 logits by it): use 0 for greedy decoding")
    return t


def check_top_p(value) -> float:
    p = check_real(value, "top_p")
    if not 0.0 < p <= 1.0:
        raise VtpruneError(f"top_p must be in (0, 1], got {p}")
    return p


def check_seed(value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise VtpruneError(f"seed must be None or an integer in [0, 2**64), got {_describe(value)}")
    s = int(value)
    if not 0 <= s < SEED_LIMIT:
        raise VtpruneError(f"seed must be an integer in [0, 2**64), got {s}")
    return s


def check_max_new_tokens(value, minimum: int = 1) -> int:
    return check_int(value, "max_new_tokens", minimum)


def check_flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise VtpruneError(f"{name} must be True or False, got {_describe(value)}")
    return value


def check_stops(value, name: str = "stop") -> list[str]:
    """None, one string, or a list / tuple / set of strings -> a list of non-empty strings.
    (A set is fine: generation ends at the first stop string of any of them, whatever the order.)"""
    if value is None:
        return []
    if isinstance(value, str):
        items, sub = [value], None
    elif isinstance(value, (list, tuple)):
        items, sub = list(value), "[{}]"
    elif isinstance(value, (set, frozenset)):
        if not all(isinstance(s, str) for s in value):
            bad = next(s for s in value if not isinstance(s, str))
            raise VtpruneError(f"{name}: every stop string must be a string, got {_describe(bad)}")
        items, sub = sorted(value), None
    else:
        raise VtpruneError(f"{name} must be a string or a list of strings, got {_describe(value)}")
    for i, s in enumerate(items):
        where = name + (sub.format(i) if sub else "")
        if not isinstance(s, str):
            raise VtpruneError(f"{where} must be a string, got {_describe(s)}")
        if not s:
            raise VtpruneError(f"{where} is an empty string (it would stop before the first token)")
    return items


def check_prompts(value, name: str = "prompts") -> list:
    """One prompt string or a list / tuple of them -> a list (each item is checked by check_pairs)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise VtpruneError(f"{name} must be a string or a list of strings, got {_describe(value)}")


def check_images(value) -> list:
    """One image or a list / tuple of them -> a list (each item is checked when it is loaded)."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def check_continuations(value, n_prompts: int) -> list[str]:
    conts = [value] if isinstance(value, str) else value
    if not isinstance(conts, (list, tuple)):
        raise VtpruneError(f"continuations must be a string or a list of strings, got {_describe(value)}")
    if len(conts) != n_prompts:
        raise VtpruneError(f"got {n_prompts} prompts and {len(conts)} continuations: give one continuation per prompt")
    for i, c in enumerate(conts):
        if not isinstance(c, str):
            raise VtpruneError(f"continuations[{i}] must be a string, got {_describe(c)}")
        if not c:
            raise VtpruneError(f"continuations[{i}] is an empty string (it has no tokens to score)")
    return list(conts)
