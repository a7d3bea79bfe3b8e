"""The forwarder's metrics, read from a real tailer, journal, core and protocol (the core's rig)."""

import os
import types

from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from decnet.forwarder.metrics import ForwarderMetrics
from decnet.metrics import DaemonMetrics
from tests.metrics_support import render
from tests.test_forwarder_core import STREAM, Rig


def metrics_of(rig: Rig) -> DaemonMetrics:
    from prometheus_client import CollectorRegistry

    # The parts of a ForwarderService the collector reads, all of them real.
    service = types.SimpleNamespace(
        stream=STREAM, tailer=rig.tailer, shipper=rig.shipper, factory=rig.factory
    )
    metrics = DaemonMetrics(CollectorRegistry(auto_describe=False))
    metrics.add(ForwarderMetrics(service))  # type: ignore[arg-type]
    return metrics


def value(metrics, name: str) -> float:
    return render(metrics).value(name, stream=STREAM)


def test_lines_are_shipped_then_unacknowledged_until_the_ack_and_the_lag_follows(tmp_path):
    rig = Rig(tmp_path)
    metrics = metrics_of(rig)
    rig.write(b"one\ntwo\n")
    assert value(metrics, "decnet_forwarder_file_lag_bytes") == 8  # not connected yet
    rig.connect()
    rig.say(b"R 0")
    rig.write(b"three\nunfinished")
    assert value(metrics, "decnet_forwarder_shipped_lines_total") == 3
    assert value(metrics, "decnet_forwarder_shipped_bytes_total") == 14
    assert value(metrics, "decnet_forwarder_unacknowledged_bytes") == 14
    assert value(metrics, "decnet_forwarder_file_lag_bytes") == 24  # the partial line too
    rig.say(b"A 14")
    assert value(metrics, "decnet_forwarder_unacknowledged_bytes") == 0
    assert value(metrics, "decnet_forwarder_acknowledged_offset_bytes") == 14
    assert value(metrics, "decnet_forwarder_file_lag_bytes") == 10


def test_reconnects_rotations_and_the_connection_state_are_counted(tmp_path):
    rig = Rig(tmp_path)
    metrics = metrics_of(rig)
    rig.connect()
    rig.say(b"R 0")
    rig.write(b"g1 line a\n")
    os.rename(rig.path, tmp_path / "decnet.log.1")
    rig.write(b"g2\n")
    rig.proto.connectionLost(Failure(ConnectionDone()))
    scrape = render(metrics)
    assert scrape.value("decnet_forwarder_connection_state", state="disconnected") == 1
    rig.connect()
    rig.say(b"R 10")
    scrape = render(metrics)
    assert scrape.value("decnet_forwarder_connects_total", stream=STREAM) == 2
    assert scrape.value("decnet_forwarder_connection_state", state="connected") == 1
    assert scrape.value("decnet_forwarder_rotations_total", stream=STREAM) == 1
    assert scrape.value("decnet_forwarder_gaps_total", stream=STREAM) == 0
    # "g2" was sent before the drop and again after RESUME 10: sends, re-sends included.
    assert scrape.value("decnet_forwarder_shipped_lines_total", stream=STREAM) == 3
