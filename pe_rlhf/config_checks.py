"""Checks of the option dataclasses' values, run when an option object is built.

Every option dataclass checks each of its fields in `__post_init__`:

    def __post_init__(self):
        check_fields(self, num_steps=integer(ge=1), padding=choice("right", "left"), seed=integer(ge=0), ...)

so a wrong value fails where it was given, before a run writes anything, with the gin key, the value and
what was expected: `LoopConfig.batch_size='four': expected an integer >= 1`. Integers must be ints (not bool,
not float); numbers must be finite ints or floats (not bool). No JAX here: this module is imported by the
lowest layers.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Check:
    """What one field must hold: `ok(value)` tests it; `expected` completes "expected ..." in the error."""

    expected: str
    ok: Callable[[Any], bool]


def _bounds(gt, ge, lt, le) -> tuple[str, Callable[[Any], bool]]:
    """(" >= 1", " in [0, 1)", ...: the words; the test) of the given bounds."""
    low = (gt, "(", ">") if gt is not None else (ge, "[", ">=") if ge is not None else None
    high = (lt, ")", "<") if lt is not None else (le, "]", "<=") if le is not None else None

    def within(v) -> bool:
        return ((low is None or (v > low[0] if low[1] == "(" else v >= low[0]))
                and (high is None or (v < high[0] if high[1] == ")" else v <= high[0])))

    if low and high:
        return f" in {low[1]}{low[0]}, {high[0]}{high[1]}", within
    if low or high:
        bound, _, sign = low or high
        return f" {sign} {bound}", within
    return "", within


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def integer(*, gt=None, ge=None, lt=None, le=None, multiple_of: int = 1) -> Check:
    """An int (not a bool, not a float such as 5.5 or 5.0) within the bounds, a multiple of `multiple_of`."""
    where, within = _bounds(gt, ge, lt, le)
    if multiple_of != 1:
        where += f" that is a multiple of {multiple_of}"
    return Check(f"an integer{where}", lambda v: _is_int(v) and within(v) and v % multiple_of == 0)


def number(*, gt=None, ge=None, lt=None, le=None) -> Check:
    """A finite int or float (not a bool, not inf or nan) within the bounds."""
    where, within = _bounds(gt, ge, lt, le)
    return Check(f"a finite number{where}", lambda v: _is_number(v) and within(v))


def boolean() -> Check:
    return Check("True or False", lambda v: isinstance(v, bool))


def choice(*options) -> Check:
    """One of `options` (strings are compared exactly, so 'LoRA' is not 'lora')."""
    words = repr(options[0]) if len(options) == 1 else f"one of {', '.join(map(repr, options))}"
    return Check(words, lambda v: isinstance(v, type(options[0])) and not isinstance(v, bool) and v in options)


def text() -> Check:
    return Check("a non-empty string", lambda v: isinstance(v, str) and bool(v))


def instance(cls: type) -> Check:
    """An object of `cls` (in gin: `@Name()`)."""
    return Check(f"a {cls.__name__} (in gin: @{cls.__name__}())", lambda v: isinstance(v, cls))


def optional(check: Check) -> Check:
    """None, or what `check` accepts."""
    return Check(f"None or {check.expected}", lambda v: v is None or check.ok(v))


def either(*checks: Check) -> Check:
    """What any of `checks` accepts."""
    return Check(" or ".join(c.expected for c in checks), lambda v: any(c.ok(v) for c in checks))


def check_fields(obj, error: type[Exception] = ValueError, **checks: Check) -> None:
    """Raise `error` naming `Class.field=value` and what was expected for the first field that fails its check.

    Every field of the dataclass needs a check, so a field added later cannot go unchecked.
    """
    cls = type(obj).__name__
    unchecked = [f.name for f in dataclasses.fields(obj) if f.name not in checks]
    if unchecked:
        raise TypeError(f"{cls}: fields {', '.join(unchecked)} have no check; add them to its __post_init__ "
                        "(pe_rlhf/config_checks.py)")
    for name, check in checks.items():
        value = getattr(obj, name)
        if not check.ok(value):
            raise error(f"{cls}.{name}={value!r}: expected {check.expected}")
