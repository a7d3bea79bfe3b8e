"""The sink's JetStream consumer process: ``python -m decnet.sink.consumer ...``.

asyncio and nats-py live only here, never in ``twistd decnet-sink`` (see
:mod:`decnet.sink.service` for the reactor side, which writes PostgreSQL).
It pulls ``decnet.events.>`` through a DURABLE pull consumer (the broker keeps
its position) and hands the messages over in batches; it fetches the next
batch only once the current one is acknowledged by the sink, i.e. committed
in PostgreSQL (backpressure: at most one batch, ``--batch`` messages of at most
the stream's largest message size, is ever in memory).

Pipes, one JSON object per line (the feed process's encoding):

* sink → consumer: ``{"ack": TOKEN}``: the batch TOKEN is committed; the
  consumer acknowledges its messages to JetStream and fetches the next;
* consumer → sink: ``{"batch": TOKEN, "messages": [{"subject", "headers",
  "data" (base64), "stream", "seq"}, ...]}``; ``{"ready": {...}}`` once the
  consumer exists; ``{"broker": "down", "error": ...}`` / ``{"broker": "up"}``
  on a change; ``{"warn": ...}``.

TOKEN starts with a random prefix per process: an ``ack`` meant for a batch
of an earlier consumer process (the sink was still writing it when this one
started) matches nothing here and is ignored.  Messages not acknowledged
(the process or the sink killed, PostgreSQL down) are delivered again after
``--ack-wait`` seconds; the sink's ``ON CONFLICT DO NOTHING`` keeps them once.
It exits 0 when its input closes.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import secrets
import signal
import sys
from typing import Any

from decnet.listener import publishing as pub
from decnet.listener.feedworker import encode_message
from decnet.listener.publisher import add_connection_arguments, connect_options

DEFAULT_DURABLE = "decnet-sink"
DEFAULT_BATCH = 256
DEFAULT_ACK_WAIT = 30.0
# How long one fetch waits for messages before it asks again.
FETCH_WAIT = 1.0
# Pause after an error before the next try.
RETRY_WAIT = 1.0
SUBJECT = pub.EVENTS_PREFIX + ".>"
# Exit status for an existing consumer we must not use (the sink stops: an operator decides).
EXIT_CONFIG = 2


class Consumer:
    """One broker connection, the durable consumer and the batch waiting for its ack."""

    def __init__(self, args: argparse.Namespace, out: int = 1):
        self.args = args
        self.out = out
        self.token = secrets.token_hex(4)
        self.number = 0
        self.pending: tuple[str, list[Any]] | None = None
        self.acked = asyncio.Event()
        self.broker = "starting"
        self.last_error = ""
        self.nc: Any = None
        self.sub: Any = None

    def send(self, message: dict) -> None:
        try:
            os.write(self.out, encode_message(message))
        except BrokenPipeError:
            raise SystemExit(0) from None

    def broker_state(self, state: str, error: str = "") -> None:
        if state != self.broker:
            self.broker = state
            self.send({"broker": state, **({"error": error} if error else {})})

    async def _error_cb(self, exc: Exception) -> None:
        self.last_error = str(exc) or type(exc).__name__

    async def _disconnected(self) -> None:
        self.broker_state("down", self.last_error or "disconnected")

    async def _reconnected(self) -> None:
        self.broker_state("up")

    async def connect(self) -> None:
        """Connect, retrying for ever (the outage is reported once)."""
        import nats

        # Each server once per attempt: this loop reports the outage and tries again.
        options = connect_options(self.args, "decnet-sink", self)
        while True:
            try:
                self.nc = await nats.connect(**options)
            except Exception as exc:  # every way a first connection fails: retried
                self.broker_state("down", self.last_error or str(exc) or type(exc).__name__)
                await asyncio.sleep(RETRY_WAIT)
                continue
            # Connected once: from now on nats-py reconnects for ever by itself.
            self.nc.options["max_reconnect_attempts"] = -1
            return

    async def subscribe(self) -> None:
        """The durable pull consumer (created when absent); retried while there is no stream."""
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        config = ConsumerConfig(
            durable_name=self.args.durable,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.args.ack_wait,
            max_ack_pending=max(self.args.batch * 4, 1024),
            filter_subject=SUBJECT,
        )
        js = self.nc.jetstream(timeout=10)
        while True:
            try:
                self.sub = await js.pull_subscribe(
                    SUBJECT, durable=self.args.durable, stream=self.args.stream, config=config
                )
                break
            except Exception as exc:  # no stream yet, broker busy: said once, retried
                self.broker_state("waiting", f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(RETRY_WAIT)
        info = await js.consumer_info(self.args.stream, self.args.durable)
        refused, noted = consumer_differences(info.config.as_dict(), config.as_dict())
        for text in noted:
            self.send({"warn": f"durable consumer {self.args.durable}: {text}"})
        if refused:
            self.send(
                {
                    "fatal": f"the durable consumer {self.args.durable} exists with "
                    + "; ".join(refused)
                    + ": delete it (nats consumer rm) or choose another --durable"
                }
            )
            raise SystemExit(EXIT_CONFIG)
        self.broker_state("up")
        self.send({"ready": {"stream": self.args.stream, "durable": self.args.durable}})

    async def fetch(self) -> list[Any]:
        import nats.errors

        try:
            return list(await self.sub.fetch(self.args.batch, timeout=FETCH_WAIT))
        except nats.errors.TimeoutError:
            self.broker_state("up")
            return []
        except Exception as exc:  # connection trouble: nats-py reconnects meanwhile
            self.broker_state("down", f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(RETRY_WAIT)
            return []

    def hand_over(self, messages: list[Any]) -> None:
        self.number += 1
        token = f"{self.token}-{self.number}"
        self.pending = (token, messages)
        self.acked.clear()
        self.send({"batch": token, "messages": [_encode(m) for m in messages]})

    def ack_received(self, token: str) -> None:
        if self.pending is not None and self.pending[0] == token:
            self.acked.set()

    async def wait_for_ack(self) -> None:
        """Until the sink committed the batch; meanwhile JetStream is told we are working."""
        assert self.pending is not None
        while True:
            try:
                await asyncio.wait_for(self.acked.wait(), self.args.ack_wait / 2)
                break
            except TimeoutError:
                await self._progress(self.pending[1])
        messages = self.pending[1]
        self.pending = None
        for message in messages:
            try:
                await message.ack()
            except Exception as exc:  # lost ack: delivered again, stored once
                self.send({"warn": f"acknowledging a message: {type(exc).__name__}"})
                break
        await self.nc.flush()

    @staticmethod
    async def _progress(messages: list[Any]) -> None:
        for message in messages:
            try:
                await message.in_progress()
            except Exception:  # noqa: S112  (best effort: a redelivery is harmless)
                continue

    async def run(self) -> None:
        await self.connect()
        await self.subscribe()
        while True:
            messages = await self.fetch()
            if messages:
                self.hand_over(messages)
                await self.wait_for_ack()


def consumer_differences(have: dict, want: dict) -> tuple[list[str], list[str]]:
    """How an existing durable consumer differs from ours: ``(refused, noted)``.

    Another filter or acknowledgement policy would feed the sink other messages, or
    none to acknowledge: refused.  Another ``ack_wait`` or ``max_ack_pending`` only
    changes timing; JetStream keeps the existing values (noted, not changed).
    """
    refused, noted = [], []
    for key in ("filter_subject", "ack_policy", "deliver_policy"):
        if have.get(key) != want.get(key):
            refused.append(f"{key} {have.get(key)!r}, not {want.get(key)!r}")
    for key, unit in (("ack_wait", 1e-9), ("max_ack_pending", 1)):
        if have.get(key) != want.get(key):
            old, new = (_shown(d.get(key), unit) for d in (have, want))
            noted.append(
                f"{key} stays {old} (not {new}): JetStream keeps an existing consumer's settings"
            )
    return refused, noted


def _shown(value: object, unit: float) -> str:
    """A consumer setting for a person (``ack_wait`` is in nanoseconds: shown in seconds)."""
    if isinstance(value, int | float) and unit != 1:
        return f"{value * unit:g}s"
    return repr(value)


def _encode(message: Any) -> dict:
    meta = message.metadata
    return {
        "subject": message.subject,
        "headers": dict(message.headers or {}),
        "data": base64.b64encode(message.data or b"").decode("ascii"),
        "stream": meta.stream,
        "seq": int(meta.sequence.stream),
    }


async def _read_input(consumer: Consumer, stdin: int) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 16)
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(stdin, "rb", 0)
    )
    while line := await reader.readline():
        try:
            consumer.ack_received(str(json.loads(line)["ack"]))
        except (ValueError, KeyError, TypeError):
            consumer.send({"warn": "ignored a malformed message from the sink"})


async def serve(args: argparse.Namespace) -> int:
    consumer = Consumer(args)
    work = asyncio.ensure_future(consumer.run())
    try:
        await _read_input(consumer, args.stdin)
    finally:
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        if consumer.nc is not None:
            await consumer.nc.close()
    if work.done() and not work.cancelled() and work.exception() is not None:
        raise work.exception()  # type: ignore[misc]
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m decnet.sink.consumer",
        description="Pull decnet.events.> from JetStream for twistd decnet-sink "
        "(started by it; see docs/Events.md).",
    )
    add_connection_arguments(parser)
    # (The publisher's connection arguments are passed as one list, NatsOptions.argv();
    # these three are the publisher's own and mean nothing to a consumer.)
    parser.add_argument("--replicas", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--max-msg", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--no-events", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--durable", default=DEFAULT_DURABLE)
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH)
    parser.add_argument("--ack-wait", type=float, default=DEFAULT_ACK_WAIT)
    parser.add_argument("--stdin", type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # its life is the sink's (stdin)
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
