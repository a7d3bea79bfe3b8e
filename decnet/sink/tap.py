"""``twistd decnet-sink``: options and service construction."""

from __future__ import annotations

from typing import ClassVar, cast

from twisted.application.service import IService, MultiService
from twisted.python import usage

from decnet.daemon import DaemonOptions
from decnet.listener.publisherproc import NatsOptions
from decnet.listener.tap import NATS_CLIENT_OPTIONS, nats_client
from decnet.metrics import attach_metrics, metrics_epilog, metrics_options
from decnet.options import between
from decnet.sink import consumer
from decnet.sink.service import SinkOptions

# JetStream consumer names: what nats-server accepts in a durable name, conservatively.
_DURABLE_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


class Options(DaemonOptions):
    synopsis = "--nats URL[,URL...] --postgres DSN [options]"
    longdesc = (
        "Store every event published by the listeners (JetStream subjects decnet.events.>) "
        "in PostgreSQL, exactly once: one row per (worker, stream, stream_offset), "
        "acknowledged to JetStream only after the COMMIT.  Query it with "
        "`decnet-admin events --postgres DSN`.  See docs/Events.md.  Examples: "
        "twistd -n decnet-sink --nats nats://10.0.0.5:4222,nats://10.0.0.6:4222 "
        "--postgres 'host=db.example dbname=decnet user=decnet_sink' "
        "--nats-tls-ca /etc/decnet-sink/nats-ca.pem --nats-creds /etc/decnet-sink/nats.creds;  "
        "twistd -n decnet-sink --nats nats://127.0.0.1:4222 "
        "--postgres postgresql:///decnet  " + metrics_epilog("sink")
    )
    optParameters: ClassVar[list] = [
        ["nats", None, None, "JetStream servers: nats://HOST:PORT[,nats://HOST:PORT...]"],
        *NATS_CLIENT_OPTIONS,
        [
            "postgres",
            None,
            None,
            "PostgreSQL connection string (libpq DSN or postgresql:// URL; a password is "
            "better in ~/.pgpass or PGPASSFILE than here)",
        ],
        [
            "durable",
            None,
            consumer.DEFAULT_DURABLE,
            "Name of the durable JetStream consumer (one per sink deployment; sinks sharing "
            "it share the work)",
        ],
        [
            "batch",
            None,
            consumer.DEFAULT_BATCH,
            "Messages per fetch and per PostgreSQL transaction (1-10000)",
            between(int, 1, 10000),
        ],
        [
            "ack-wait",
            None,
            consumer.DEFAULT_ACK_WAIT,
            "Seconds before JetStream delivers an unacknowledged message again (1-3600)",
            between(float, 1, 3600),
        ],
        *metrics_options("sink"),
    ]

    def postOptions(self) -> None:
        client = nats_client(self, "nats")
        if not client:
            raise usage.UsageError("--nats URL is required (the JetStream servers)")
        if not self["postgres"]:
            raise usage.UsageError("--postgres DSN is required (where events are stored)")
        check_dsn(self["postgres"])
        if not (set(self["durable"]) <= _DURABLE_CHARS) or len(self["durable"]) > 64:
            raise usage.UsageError("--durable: 1-64 characters of A-Z, a-z, 0-9, '_', '-'")
        self["sink-options"] = SinkOptions(
            nats=NatsOptions(**client),
            dsn=self["postgres"],
            durable=self["durable"],
            batch=self["batch"],
            ack_wait=self["ack-wait"],
        )
        check_schema(self["postgres"])


def check_dsn(dsn: str) -> None:
    """A connection string libpq cannot parse is a usage error, not an outage retried for ever."""
    from psycopg.conninfo import conninfo_to_dict
    from psycopg.errors import ProgrammingError

    try:
        conninfo_to_dict(dsn)
    except ProgrammingError as exc:
        raise usage.UsageError(
            f"--postgres: not a connection string ({str(exc).strip()}); e.g. "
            "'host=db.example dbname=decnet user=decnet_sink' or postgresql://db.example/decnet"
        ) from None


def check_schema(dsn: str) -> None:
    """A wrong existing schema stops the daemon with one line; a server that is down does not.

    Blocking: before the reactor runs only.
    """
    from decnet.sink.store import SchemaMismatch, SinkStore, StoreUnavailable

    store = SinkStore(dsn)
    try:
        store.open()
    except SchemaMismatch as exc:
        raise usage.UsageError(str(exc)) from None
    except StoreUnavailable:
        pass  # retried by the service, with the outage logged
    finally:
        store.close()


def makeService(options: Options) -> IService:
    from twisted.internet import reactor as global_reactor

    from decnet.interfaces import IDecnetReactor
    from decnet.sink.metrics import sink_registry
    from decnet.sink.service import SinkService
    from decnet.systemd import SystemdService
    from decnet.threads import serial_runner

    reactor = cast(IDecnetReactor, global_reactor)
    parent = MultiService()
    notify = SystemdService(reactor)
    notify.setServiceParent(parent)
    sink = SinkService(reactor, reactor, options["sink-options"], serial_runner(reactor))
    sink.setServiceParent(parent)
    # Ready once running: a broker or a database that is down is waited for (and logged),
    # not a failed start that systemd would restart for nothing.
    notify.ready("storing JetStream events in PostgreSQL")
    attach_metrics(parent, reactor, options, lambda: sink_registry(sink))
    return parent
