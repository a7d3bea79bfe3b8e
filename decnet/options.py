"""Value checks shared by the daemons' twistd options and ``decnet-admin``'s arguments.

Each returns a parser that raises ``ValueError`` (which both ``usage.Options``
and ``argparse`` report against the option) and is named for what it expects,
so argparse says "invalid positive int value: '0'".
"""

from __future__ import annotations

from collections.abc import Callable


def _bounded(kind: type, check: Callable[[float], bool], wanted: str):
    def parse(value):
        # int()/float() would skip surrounding whitespace and read non-ASCII
        # digits; an option value is plain ASCII text or it is refused.
        if isinstance(value, str) and not (
            value.isascii() and value.isprintable() and value == value.strip()
        ):
            raise ValueError(f"must be {wanted}, got {value!r}")
        number = kind(value)
        if not check(number):
            raise ValueError(f"must be {wanted}, got {value}")
        return number

    parse.__name__ = f"{wanted} {kind.__name__}"
    return parse


def positive(kind: type):
    return _bounded(kind, lambda n: n > 0, "positive")


def non_negative(kind: type):
    return _bounded(kind, lambda n: n >= 0, "non-negative")


positive_int = positive(int)
positive_float = positive(float)
non_negative_int = non_negative(int)
port_number = _bounded(int, lambda n: 1 <= n <= 65535, "port (1-65535)")


def between(kind: type, low, high):
    """A parser for a ``kind`` from ``low`` to ``high`` inclusive ("must be 1 to 300, got 0")."""
    return _bounded(kind, lambda n: low <= n <= high, f"{low:g} to {high:g}")
