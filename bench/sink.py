"""PostgreSQL sink: batch write rate and ``events --postgres`` query times.  Prints figures.

Starts a private PostgreSQL cluster (tests/pg_support.py: Debian's postgresql 15, as
``nobody`` when run as root), writes ``--events`` feed entries (``--workers`` workers,
20,000 attacker addresses, spread over 24 hours) through :class:`SinkStore.write` in
batches of ``--batch`` (one transaction each, as the sink does), then times the filters
``bench/events.py`` times on the SQLite index, through :class:`PgEvents`.

    .venv/bin/python bench/sink.py --events 200000
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from decnet.events.query import MICROS, Filters, parse_network  # noqa: E402
from decnet.listener import publishing  # noqa: E402
from decnet.sink.rows import Message  # noqa: E402
from decnet.sink.store import PgEvents, SinkStore  # noqa: E402
from tests.pg_support import PgCluster, pg_binaries  # noqa: E402

DAY_US = 86400 * MICROS


def iso(us: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(us // MICROS)) + f".{us % MICROS:06d}Z"


def attackers(rng: random.Random, n: int = 20_000) -> list[str]:
    out = []
    for _ in range(n):
        if rng.random() < 0.75:
            out.append(
                ".".join(
                    str(rng.randrange(lo, hi))
                    for lo, hi in ((1, 224), (0, 256), (0, 256), (1, 255))
                )
            )
        else:
            out.append(f"2001:db8:{rng.randrange(65536):x}::{rng.randrange(1, 65536):x}")
    return out


def messages(rng: random.Random, count: int, workers: int, now_us: int) -> list[Message]:
    pool = attackers(rng)
    offsets = [0] * workers
    out = []
    for seq in range(1, count + 1):
        w = rng.randrange(workers)
        worker = f"w{w:03d}"
        at = now_us - rng.randrange(DAY_US)
        entry = {
            "source_worker": worker,
            "stream": "decnet",
            "received_at": iso(at),
            "mirror_offset": offsets[w],
            "timestamp": iso(at),
            "hostname": f"decky-{rng.randrange(20)}",
            "app_name": rng.choice(["ssh", "http", "redis", "telnet"]),
            "msgid": rng.choice(["login", "connect", "command"]),
            "structured_data": [
                {
                    "id": "decnet@32473",
                    "params": [
                        ["src_ip", rng.choice(pool)],
                        ["user", rng.choice(["root", "admin", "pi"])],
                    ],
                }
            ],
            "msg": None,
        }
        line = json.dumps(entry, separators=(",", ":")).encode()
        item = publishing.EventItem(offsets[w], offsets[w] + 60, line, publishing.Cursor())
        headers = publishing.event_headers(worker, "decnet", item, 0)
        out.append(
            Message(publishing.events_subject(worker, "decnet"), headers, line, "DECNET", seq)
        )
        offsets[w] += len(line) + 60
    return out


def percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p50 = statistics.median(ordered)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--workers", type=int, default=50)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    binaries = pg_binaries()
    if binaries is None:
        print("no PostgreSQL binaries", file=sys.stderr)
        return 1
    rng = random.Random(7)
    now_us = time.time_ns() // 1000
    batch = messages(rng, args.events, args.workers, now_us)
    cluster = PgCluster(binaries)
    try:
        cluster.initdb()
        cluster.start()
        dsn = cluster.create_database()
        store = SinkStore(dsn)
        started = time.perf_counter()
        for i in range(0, len(batch), args.batch):
            store.write(batch[i : i + args.batch])
        spent = time.perf_counter() - started
        print(
            f"sink write: {args.events} events in {spent:.1f} s = "
            f"{args.events / spent:,.0f} rows/s "
            f"(batches of {args.batch}, one transaction each)"
        )
        again = time.perf_counter()
        store.write(batch[: args.batch * 10])
        rate = args.batch * 10 / (time.perf_counter() - again)
        print(f"a redelivered batch (all duplicates): {rate:,.0f} rows/s")
        store.conn.execute("ANALYZE")
        store.conn.commit()
        store.close()
        reader = PgEvents(dsn)
        pool = attackers(random.Random(7))
        hour = now_us - 3600 * MICROS
        cases = {
            "events --src-ip X --since 1h": lambda: Filters(
                src=parse_network(rng.choice(pool)), since=hour
            ),
            "events --src-ip X/24 --since 1h": lambda: Filters(
                src=parse_network(rng.choice([p for p in pool[:200] if ":" not in p]) + "/24"),
                since=hour,
            ),
            "events --worker w --limit 100": lambda: Filters(
                workers=(f"w{rng.randrange(args.workers):03d}",)
            ),
            "events --event login --since 1h --limit 100": lambda: Filters(
                event="login", since=hour
            ),
        }
        for name, make in cases.items():
            samples = []
            for _ in range(args.queries):
                filters = make()
                t0 = time.perf_counter()
                reader.query(filters, 100)
                samples.append(time.perf_counter() - t0)
            print(f"{name}: {percentiles(samples)}")
        reader.close()
    finally:
        cluster.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
