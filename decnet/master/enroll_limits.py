"""Attempts per source address for ``twistd decnet-enroll``: a token bucket per address.

Sans-IO: the caller passes the time (the injected clock's ``seconds()``), so
tests step through refills exactly.  Each source address has a bucket of
``burst`` attempts that refills at ``burst / period`` per second.  At most
``max_sources`` buckets are kept: a scanner with many addresses makes the least
recently seen ones forgotten (oldest first), never memory grow.  A forgotten
address starts again with a full bucket, which is no more than a new address
would get.
"""

from __future__ import annotations

from collections import OrderedDict

import attrs

DEFAULT_BURST = 10
DEFAULT_PERIOD = 60.0
DEFAULT_MAX_SOURCES = 4096


@attrs.define
class _Bucket:
    tokens: float
    updated: float


class AttemptLimiter:
    """Whether one more attempt from a source address is allowed now."""

    def __init__(
        self,
        burst: int = DEFAULT_BURST,
        period: float = DEFAULT_PERIOD,
        max_sources: int = DEFAULT_MAX_SOURCES,
    ):
        if burst < 1 or period <= 0 or max_sources < 1:
            raise ValueError("burst, period and max_sources must be positive")
        self.burst = burst
        self.rate = burst / period
        self.max_sources = max_sources
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, source: str, now: float) -> bool:
        """Take one attempt from ``source``'s bucket at time ``now``; ``False`` if it is empty."""
        bucket = self._buckets.pop(source, None)
        if bucket is None:
            bucket = _Bucket(float(self.burst), now)
            while len(self._buckets) >= self.max_sources:
                self._buckets.popitem(last=False)
        elapsed = max(0.0, now - bucket.updated)  # a clock stepped back refills nothing
        bucket.tokens = min(float(self.burst), bucket.tokens + elapsed * self.rate)
        bucket.updated = max(bucket.updated, now)
        self._buckets[source] = bucket
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True

    def retry_after(self, source: str) -> float:
        """Seconds until ``source`` has one attempt again (0 when it has one now)."""
        bucket = self._buckets.get(source)
        if bucket is None or bucket.tokens >= 1.0:
            return 0.0
        return (1.0 - bucket.tokens) / self.rate
