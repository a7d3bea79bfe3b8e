"""Scale-out benchmark: prints figures, asserts nothing about time.

    .venv/bin/python bench/scaleout.py [--workers 4] [--lines 25000] [--rate 10000] [--seconds 5]
        [--no-feed] [--max-msg BYTES]

Runs, on this machine, with real processes on loopback:
  (1) N forwarders -> one listener without NATS, acknowledged mode (the reference);
  (2) the same N forwarders' next lines -> 2 listeners with --publish (broker mode:
      a batch is acknowledged once JetStream stored it) -> a 3-node JetStream
      cluster (replicas 3, ``sync_interval: always``);
  (3) publish lag: lines appended at --rate lines/s (all workers together) for
      --seconds through (2); p50/p99 from the append to the moment the raw
      message holding the line is readable from the stream;
  (4) the cluster's own ceiling: a bare nats-py client (no listener) publishing
      (2)'s bytes in messages of (2)'s mean raw size, one subject per worker and
      one message in flight per subject, then small messages the size of an
      event, 256 in flight: the cluster's rate with the machine to itself.
For (1) and (2): lines/s (all of them durable, resp. stored in the broker),
and CPU per line of each kind of process; for (2) also the rate its CPU per line
allows on this machine's cores, which every process shares.  Every run is checked: the raw
payloads in the broker concatenate to each worker's file.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from logpipe import (  # noqa: E402
    LINE_LEN,
    append_all,
    cpu_seconds,
    durable_mirror_end,
    make_lines,
    stop,
)

from decnet import config  # noqa: E402
from decnet.listener.publishing import raw_subject  # noqa: E402
from decnet.master import enrollment  # noqa: E402
from tests.logpipe_support import start_forwarder, start_listener  # noqa: E402
from tests.nats_support import start_cluster  # noqa: E402
from tests.support import free_port, wait_for  # noqa: E402

STREAM = "decnet"
EVENT_SIZE = 400  # bytes: about one feed entry of a LINE_LEN line
# Extra options of every listener (--no-feed), and of the publishing ones (--nats-max-msg).
EXTRA: list[str] = []
PUBLISH: list[str] = []


class Fleet:
    """N enrolled workers, each with a log file and a forwarder aimed at a listener port."""

    def __init__(self, base: Path, workers: int):
        self.base = base
        self.paths = config.MasterPaths.resolve(base / "home")
        self.master = enrollment.init_master(self.paths)
        self.workers = workers
        self.names: list[str] = []
        self.enroll("bench-w")
        self.forwarders: dict[str, object] = {}

    def enroll(self, prefix: str) -> None:
        """Workers of their own for a run (the broker already holds the others' streams)."""
        self.names = [f"{prefix}{i}" for i in range(self.workers)]
        for name in self.names:
            enrollment.enroll(self.master, name, "127.0.0.1", self.base / "bundles" / name)

    def log_file(self, name: str, run: str) -> Path:
        return self.base / run / f"{name}.log"

    def start_forwarders(self, run: str, ports: dict[str, int]) -> None:
        d = self.base / run
        for name in self.names:
            log = self.log_file(name, run)
            log.touch()
            self.forwarders[name] = start_forwarder(
                self.base / "bundles" / name,
                log,
                d / f"{name}.sqlite",
                ports[name],
                d / f"{name}.forwarder.log",
            )
        for name in self.names:
            flog = d / f"{name}.forwarder.log"
            wait_for(lambda f=flog: f.exists() and "Connected" in f.read_text(), timeout=60)

    def stop_forwarders(self) -> None:
        for proc in self.forwarders.values():
            stop(proc)
        self.forwarders = {}


def cpu_of(pids: dict[str, list[int]]) -> dict[str, float]:
    return {kind: sum(cpu_seconds(p) for p in group) for kind, group in pids.items()}


def broker_ends(url: str, names: list[str], events: bool = False) -> dict[str, int]:
    """The last raw message's (``events``: the last event's) ``Decnet-End`` of each
    worker's stream in the broker."""
    import nats
    import nats.js.errors

    from decnet.listener.publishing import events_subject

    async def read() -> dict[str, int]:
        nc = await nats.connect(url)
        try:
            out = {}
            for name in names:
                try:
                    if events:
                        subject = events_subject(name, STREAM)
                        msg = await nc.jetstream().get_last_msg("DECNET", subject)
                        out[name] = int(msg.headers["Decnet-End"])
                        continue
                    msg = await nc.jetstream().get_last_msg("DECNET", raw_subject(name, STREAM))
                    out[name] = int(msg.headers["Decnet-End"])
                except nats.js.errors.NotFoundError:
                    out[name] = 0
            return out
        finally:
            await nc.close()

    return asyncio.run(read())


def raw_payloads(url: str, name: str) -> bytes:
    from tests.nats_support import stream_messages

    return b"".join(m[3] for m in stream_messages(url, subject=raw_subject(name, STREAM)))


def raw_count(url: str, name: str) -> int:
    from tests.nats_support import stream_messages

    return len(stream_messages(url, subject=raw_subject(name, STREAM)))


def run_reference(fleet: Fleet, data: dict[str, bytes]) -> dict:
    run = "1-reference"
    (fleet.base / run).mkdir()
    listener, port = start_listener(
        fleet.paths.home,
        fleet.base / run / "ingest",
        fleet.base / run / "listener.log",
        extra=EXTRA,
    )
    fleet.start_forwarders(run, {n: port for n in fleet.names})
    try:
        pids = {
            "listener+feed": [listener.pid],
            "forwarders": [p.pid for p in fleet.forwarders.values()],
        }
        before = cpu_of(pids)
        t0 = time.monotonic()
        for name in fleet.names:
            append_all(fleet.log_file(name, run), data[name])
        for name in fleet.names:
            index = fleet.base / run / "ingest" / name / f"{STREAM}.idx"
            wait_for(
                lambda i=index, n=name: durable_mirror_end(i) >= len(data[n]),
                timeout=600,
                interval=0.01,
            )
        elapsed = time.monotonic() - t0
        after = cpu_of(pids)
    finally:
        fleet.stop_forwarders()
        stop(listener)
    return {"elapsed": elapsed, "cpu": {k: after[k] - before[k] for k in pids}}


def start_scaleout(fleet: Fleet, run: str, urls: str):
    d = fleet.base / run
    d.mkdir()
    listeners = []
    for i in range(2):
        listeners.append(
            start_listener(
                fleet.paths.home,
                d / f"ingest{i}",
                d / f"listener{i}.log",
                free_port(),
                ("--publish", urls, "--nats-replicas", "3", *EXTRA, *PUBLISH),
            )
        )
    ports = {name: listeners[k % 2][1] for k, name in enumerate(fleet.names)}
    fleet.start_forwarders(run, ports)
    return [proc for proc, _ in listeners]


def run_scaleout(fleet: Fleet, data: dict[str, bytes], nodes) -> dict:
    run = "2-scaleout"
    urls = ",".join(n.url for n in nodes)
    listeners = start_scaleout(fleet, run, urls)
    try:
        pids = {
            "listeners+feed+publisher": [p.pid for p in listeners],
            "forwarders": [p.pid for p in fleet.forwarders.values()],
            "nats-servers": [n.proc.pid for n in nodes],
        }
        before = cpu_of(pids)
        t0 = time.monotonic()
        for name in fleet.names:
            append_all(fleet.log_file(name, run), data[name])
        wait_for(
            lambda: all(
                end >= len(data[n]) for n, end in broker_ends(nodes[0].url, fleet.names).items()
            ),
            timeout=900,
            interval=0.05,
        )
        elapsed = time.monotonic() - t0
        after = cpu_of(pids)
        events_elapsed = None
        if not EXTRA:  # (with the feed: every line's event in the broker too)
            wait_for(
                lambda: all(
                    end > len(data[n]) - LINE_LEN
                    for n, end in broker_ends(nodes[0].url, fleet.names, True).items()
                ),
                timeout=900,
                interval=0.05,
            )
            events_elapsed = time.monotonic() - t0
        ok = all(raw_payloads(nodes[0].url, n) == data[n] for n in fleet.names)
        messages = sum(raw_count(nodes[0].url, n) for n in fleet.names)
    finally:
        fleet.stop_forwarders()
        for proc in listeners:
            stop(proc)
    return {
        "elapsed": elapsed,
        "cpu": {k: after[k] - before[k] for k in pids},
        "ok": ok,
        "messages": messages,
        "events_elapsed": events_elapsed,
    }


def follow_broker(url: str, names: list[str], per: int, stored: dict, done) -> None:
    """Record when each line's raw message becomes readable from the stream (a thread)."""
    import nats
    import nats.errors
    from nats.js.api import DeliverPolicy

    async def follow() -> None:
        nc = await nats.connect(url)
        seen = dict.fromkeys(names, 0)
        subjects = {raw_subject(n, STREAM): n for n in names}
        sub = await nc.jetstream().subscribe(
            "decnet.raw.>", ordered_consumer=True, deliver_policy=DeliverPolicy.NEW
        )
        try:
            while not done.is_set() and any(seen[n] < per for n in names):
                try:
                    msg = await sub.next_msg(timeout=0.5)
                except nats.errors.TimeoutError:
                    continue  # (look at the stop flag again)
                now = time.monotonic()
                name = subjects.get(msg.subject)
                if name is None:
                    continue
                end = int(msg.headers["Decnet-End"]) // LINE_LEN
                for i in range(seen[name], min(end, per)):
                    stored[name][i] = now
                seen[name] = max(seen[name], end)
        finally:
            await nc.close()

    asyncio.run(follow())


def append_at_rate(files: dict[str, Path], data: dict[str, bytes], rate: int) -> dict:
    """Append every worker's lines, 10 at a time, at ``rate`` lines/s in all; when each went."""
    per = len(next(iter(data.values()))) // LINE_LEN
    appended = {name: [0.0] * per for name in files}
    fds = {name: open(path, "ab", buffering=0) for name, path in files.items()}
    start = time.monotonic()
    batch, step = 10, 0
    try:
        for i in range(0, per, batch):
            for name, fd in fds.items():
                target = start + step * batch / rate
                step += 1
                while (now := time.monotonic()) < target:
                    time.sleep(max(0.0, min(target - now, 0.0005)))
                fd.write(data[name][i * LINE_LEN : (i + batch) * LINE_LEN])
                t = time.monotonic()
                for j in range(i, min(i + batch, per)):
                    appended[name][j] = t
    finally:
        for fd in fds.values():
            fd.close()
    return appended


def run_lag(fleet: Fleet, nodes, rate: int, seconds: float) -> dict:
    """Append at ``rate`` lines/s (over all workers) and time each line into the broker."""
    run = "3-lag"
    fleet.enroll("bench-lag-w")
    listeners = start_scaleout(fleet, run, ",".join(n.url for n in nodes))
    per = int(rate * seconds) // len(fleet.names)
    data = {name: make_lines(per, f"lag-{name}") for name in fleet.names}
    stored = {name: [0.0] * per for name in fleet.names}
    done = threading.Event()
    watcher = threading.Thread(
        target=follow_broker, args=(nodes[0].url, fleet.names, per, stored, done), daemon=True
    )
    try:
        watcher.start()
        time.sleep(1.0)  # (the consumer is set up; a benchmark, not a test)
        files = {name: fleet.log_file(name, run) for name in fleet.names}
        appended = append_at_rate(files, data, rate)
        watcher.join(120)
    finally:
        done.set()
        fleet.stop_forwarders()
        for proc in listeners:
            stop(proc)
    lat = sorted(
        (stored[n][i] - appended[n][i]) * 1000
        for n in fleet.names
        for i in range(per)
        if stored[n][i]
    )
    if not lat:
        return {"count": 0}
    return {
        "count": len(lat),
        "of": per * len(fleet.names),
        "p50": statistics.median(lat),
        "p99": lat[int(len(lat) * 0.99) - 1],
        "max": lat[-1],
    }


def run_ceiling(url: str, workers: int, total: int, size: int, events: int) -> dict:
    """(4): ``total`` bytes in ``size``-byte messages on ``workers`` subjects, each one
    at a time; then ``events`` messages of ``EVENT_SIZE`` bytes, 256 in flight."""
    import nats

    async def publish(js, subject: str, payload: bytes, count: int) -> None:
        for _ in range(count):
            await js.publish(subject, payload)

    async def timed(js, jobs) -> float:
        t0 = time.monotonic()
        await asyncio.gather(*(publish(js, *job) for job in jobs))
        return time.monotonic() - t0

    async def run() -> dict:
        nc = await nats.connect(url)
        try:
            js = nc.jetstream(timeout=30)
            per = max(1, total // size // workers)
            raw = [(raw_subject(f"ceiling-{i}", STREAM), b"x" * size, per) for i in range(workers)]
            raw_s = await timed(js, raw)
            small = [
                (f"decnet.events.ceiling-{i}.{STREAM}", b"e" * EVENT_SIZE, events // 256)
                for i in range(256)
            ]
            small_s = await timed(js, small)
            return {
                "raw_bytes_s": per * workers * size / raw_s,
                "events_s": events // 256 * 256 / small_s,
            }
        finally:
            await nc.close()

    return asyncio.run(run())


def print_cpu(cpu: dict[str, float], lines: int) -> None:
    per_line = ", ".join(f"{k} {1e6 * v / lines:.2f} us" for k, v in cpu.items())
    print(f"      CPU per line: {per_line}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--lines", type=int, default=25_000, help="lines per worker and run")
    parser.add_argument("--rate", type=int, default=10_000, help="lines/s for the lag run")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument(
        "--max-msg",
        type=int,
        help="the brokers' max_payload and the listeners' --nats-max-msg (default: theirs, 1 MiB)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--no-feed", action="store_true", help="listeners without the JSON feed (so no events)"
    )
    args = parser.parse_args()
    EXTRA[:] = ["--no-feed"] if args.no_feed else []
    if args.max_msg:
        PUBLISH[:] = ["--nats-max-msg", str(args.max_msg)]
    base = Path(tempfile.mkdtemp(prefix="decnet-scaleout-"))
    fleet = Fleet(base, args.workers)
    n = args.lines * args.workers
    print(
        f"{args.workers} workers x {args.lines:,} lines of {LINE_LEN} bytes "
        f"({n * LINE_LEN / 1e6:.0f} MB) per run; work dir {base}",
        flush=True,
    )
    nodes = start_cluster(base / "cluster", max_payload=args.max_msg)
    try:
        ref_data = {name: make_lines(args.lines, f"ref-{name}") for name in fleet.names}
        ref = run_reference(fleet, ref_data)
        ref_rate = n / ref["elapsed"]
        print(
            f"(1) {args.workers} forwarders -> 1 listener, ack mode, no NATS: "
            f"{ref_rate:>10,.0f} lines/s",
            flush=True,
        )
        print_cpu(ref["cpu"], n)
        out_data = {name: make_lines(args.lines, f"out-{name}") for name in fleet.names}
        out = run_scaleout(fleet, out_data, nodes)
        out_rate = n / out["elapsed"]
        print(
            f"(2) {args.workers} forwarders -> 2 listeners -> 3-node JetStream (R3), "
            f"broker mode: {out_rate:>10,.0f} lines/s into the broker  "
            f"{out_rate / ref_rate:.2f}x (1)  "
            f"{'raw payloads == files' if out['ok'] else 'MISMATCH'}",
            flush=True,
        )
        print_cpu(out["cpu"], n)
        # Every process of (2) shares this machine's cores: its CPU per line (all of
        # them: (1)'s work plus the publishers' and the three brokers') bounds its rate.
        cores = os.cpu_count() or 1
        bound = cores / (sum(out["cpu"].values()) / n)
        print(
            f"      CPU bound of (2) on {cores} cores: {bound:>10,.0f} lines/s  "
            f"{bound / ref_rate:.2f}x (1)  (all of (2)'s CPU per line: "
            f"{1e6 * sum(out['cpu'].values()) / n:.2f} us; (1)'s: "
            f"{1e6 * sum(ref['cpu'].values()) / n:.2f} us)",
            flush=True,
        )
        if out["events_elapsed"]:
            events_rate = n / out["events_elapsed"]
            print(
                f"      events (one message per line) all in the broker: "
                f"{events_rate:>10,.0f} lines/s  {events_rate / ref_rate:.2f}x (1)",
                flush=True,
            )
        print(
            f"      raw messages: {out['messages']:,} "
            f"(mean {n * LINE_LEN / max(out['messages'], 1) / 1024:.0f} KiB)",
            flush=True,
        )
        lag = run_lag(fleet, nodes, args.rate, args.seconds)
        if lag.get("count"):
            print(
                f"(3) publish lag at {args.rate:,} lines/s for {args.seconds:g} s "
                f"({lag['count']:,} of {lag['of']:,} lines seen in the broker): "
                f"p50 {lag['p50']:.1f} ms, p99 {lag['p99']:.1f} ms, max {lag['max']:.1f} ms",
                flush=True,
            )
        else:
            print("(3) publish lag: no line reached the broker", flush=True)
        mean = n * LINE_LEN // max(out["messages"], 1)
        ceiling = run_ceiling(nodes[0].url, args.workers, n * LINE_LEN, mean, min(n, 25_600))
        ceiling_lines = ceiling["raw_bytes_s"] / LINE_LEN
        print(
            f"(4) the cluster alone (bare client, {mean / 1024:.0f} KiB messages, "
            f"{args.workers} in flight): {ceiling['raw_bytes_s'] / 2**20:.0f} MiB/s = "
            f"{ceiling_lines:,.0f} lines/s  {ceiling_lines / ref_rate:.2f}x (1); "
            f"{EVENT_SIZE}-byte messages, 256 in flight: {ceiling['events_s']:,.0f}/s",
            flush=True,
        )
    finally:
        for node in nodes:
            node.stop()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
