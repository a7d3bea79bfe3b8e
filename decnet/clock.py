"""Wall-clock text from an injected clock: modules never read the time themselves.

A daemon passes ``reactor.seconds`` (``IReactorTime``), the CLI passes
``time.time``, and a test passes a ``Clock``'s ``seconds``.
"""

from __future__ import annotations

import datetime


def utc_iso(seconds: float, timespec: str = "seconds") -> str:
    """``seconds`` since the epoch as ISO 8601 in UTC, to the second (``…T03:04:05+00:00``).

    ``timespec`` as for :meth:`datetime.datetime.isoformat` (``"auto"``: microseconds too).
    """
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat(timespec=timespec)
