"""Expiry shown before it bites: the listener warns about a worker certificate near its end."""

from __future__ import annotations

import time

from tests.logpipe_support import ListenerHarness, LogCapture
from tests.support import write_identity


def test_the_listener_warns_once_per_connection_about_a_certificate_with_under_30_days(
    ca, tmp_path
):
    master = write_identity(tmp_path / "m", ca, "master")
    soon = write_identity(tmp_path / "soon", ca, "worker", "exp-01", validity_days=10)
    fresh = write_identity(tmp_path / "fresh", ca, "worker", "exp-02")
    harness = ListenerHarness(tmp_path / "ingest", master)
    harness.clock.advance(time.time())  # the listener's clock reads now
    with LogCapture() as logs:
        harness.connect(soon, ack=False)
        harness.connect(fresh, ack=False)
    warned = [e for e in logs.events if "expires in" in e.get("log_format", "")]
    assert [(e["worker"], e["days"]) for e in warned] == [("exp-01", 9)]
    assert "decnet-admin renew exp-01" in logs.text()
