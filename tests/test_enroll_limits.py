"""The enrollment service's attempts per source address (sans-IO, time given by the test)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from decnet.master.enroll_limits import AttemptLimiter


def test_a_source_gets_its_burst_then_is_refused_until_the_bucket_refills():
    limiter = AttemptLimiter(burst=3, period=30.0)
    assert [limiter.allow("203.0.113.1", 100.0) for _ in range(4)] == [True, True, True, False]
    assert limiter.retry_after("203.0.113.1") == 10.0
    assert not limiter.allow("203.0.113.1", 109.9)
    assert limiter.allow("203.0.113.1", 110.0)  # one attempt per 10 s comes back
    assert not limiter.allow("203.0.113.1", 110.0)


def test_one_source_being_refused_does_not_touch_another():
    limiter = AttemptLimiter(burst=2, period=60.0)
    for _ in range(10):
        limiter.allow("203.0.113.1", 0.0)
    assert limiter.allow("198.51.100.7", 0.0) and limiter.allow("198.51.100.7", 0.0)


def test_the_bucket_never_holds_more_than_the_burst_after_a_long_idle():
    limiter = AttemptLimiter(burst=2, period=10.0)
    limiter.allow("a", 0.0)
    results = [limiter.allow("a", 10_000.0) for _ in range(3)]
    assert results == [True, True, False]


def test_a_clock_stepped_back_refills_nothing():
    limiter = AttemptLimiter(burst=1, period=10.0)
    assert limiter.allow("a", 1000.0)
    assert not limiter.allow("a", 0.0)  # not a refill of 1000 s
    assert not limiter.allow("a", 1005.0)
    assert limiter.allow("a", 1010.0)


def test_a_scanner_with_many_addresses_keeps_memory_bounded_forgetting_the_oldest():
    limiter = AttemptLimiter(burst=1, period=60.0, max_sources=100)
    for i in range(10_000):
        limiter.allow(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", 0.0)
    assert len(limiter) == 100
    # The most recent addresses are still remembered (and refused); the first is forgotten.
    assert not limiter.allow("10.0.39.15", 0.0)  # address 9999
    assert limiter.allow("10.0.0.0", 0.0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c", "d"]), st.floats(0, 1000)), max_size=200))
def test_no_source_ever_gets_more_than_burst_plus_refill(events):
    """Over any sequence, attempts allowed to a source <= burst + elapsed * rate."""
    burst, period = 3, 30.0
    limiter = AttemptLimiter(burst=burst, period=period, max_sources=10)
    allowed: dict[str, int] = {}
    latest = 0.0
    for source, at in sorted(events, key=lambda e: e[1]):
        latest = at
        if limiter.allow(source, at):
            allowed[source] = allowed.get(source, 0) + 1
    for count in allowed.values():
        assert count <= burst + latest * burst / period + 1e-9
