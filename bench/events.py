"""Event index benchmark: prints figures, asserts nothing about time.

    .venv/bin/python bench/events.py [--events 5000000] [--workers 50] [--feed-lines 500000]
                                     [--queries 200] [--follow 40] [--dir DIR]

With real processes (the feed process ``decnet.listener.feedworker`` and its
index process), on this machine:

1. the feed's lines/s *with* the index process running beside it and *without*
   it (``--no-index``), on two equal sets of fresh mirror lines, in this run;
2. indexing ``--events`` events spread over ``--workers`` workers and the last
   24 hours (attackers from a pool of IPv4 and IPv6 addresses), then the index
   process's rows/s and the index size;
3. p50/p99 of ``events --src-ip X --since 1h`` and ``events --worker w --limit
   100`` (and a /24 variant): the index query plus rendering the table, as the
   command does it, in this process (the command adds its interpreter start-up,
   timed once separately);
4. ``--follow`` latency: a line committed durably to a mirror (as the listener
   commits) and the feed process told (as the listener tells it), until a
   running ``decnet-admin events --follow --json`` prints it.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from decnet.cli.events import Printer  # noqa: E402
from decnet.events.index import EventIndex, index_path  # noqa: E402
from decnet.events.query import Filters, parse_network, parse_since  # noqa: E402
from decnet.listener import storage  # noqa: E402
from decnet.listener.feedworker import decode_messages, encode_message  # noqa: E402

BIN = Path(sys.executable).parent
KINDS = [("ssh", "login"), ("ssh", "connect"), ("http", "request"), ("redis", "command"),
         ("smtp", "login"), ("ssh", "disconnect")]  # fmt: skip
USERS = ["root", "admin", "ubuntu", "test", "oracle", "pi", "guest", "user"]
# One agent event line (as decnet.agent.eventlog writes them), ~260 bytes.
TEMPLATE = (
    '<133>1 %s %s %s - %s [decnet@32473 session="%08x" src_ip="%s" src_port="%d" '
    'dst_ip="10.0.0.5" dst_port="22" user="%s" password="%s"]\n'
)
PER_COMMIT = 2000  # lines per durable commit when building mirrors


def iso(us: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(us // 1_000_000)) + (
        f".{us % 1_000_000:06d}Z"
    )


def attackers(rng: random.Random, n: int = 20_000) -> list[str]:
    v4 = [
        f"{rng.randrange(1, 224)}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}"
        for _ in range(n * 3 // 4)
    ]
    v6 = [f"2001:db8:{rng.randrange(65536):x}::{rng.randrange(65536):x}" for _ in range(n // 4)]
    return v4 + v6


def mirror_lines(rng: random.Random, count: int, start_us: int, span_us: int, pool) -> bytes:
    out = []
    for i in range(count):
        service, kind = KINDS[i % len(KINDS)]
        out.append(
            TEMPLATE
            % (
                iso(start_us + span_us * i // count),
                f"decky-{i % 7}",
                service,
                kind,
                rng.getrandbits(32),
                pool[rng.randrange(len(pool))],
                1024 + i % 60000,
                USERS[i % len(USERS)],
                f"pw{i % 999_983:06d}",
            )
        )
    return "".join(out).encode()


def write_mirror(ingest: Path, worker: str, data: bytes, at_us: int) -> int:
    """Commit ``data`` (whole lines) to ``worker``'s mirror in PER_COMMIT-line commits."""
    files = storage.StreamFiles(ingest / worker, "decnet")
    end = files.open().mirror_end
    pos = 0
    while pos < len(data):
        cut = pos
        for _ in range(PER_COMMIT):
            nl = data.find(b"\n", cut)
            if nl < 0:
                break
            cut = nl + 1
        end += cut - pos
        files.commit(data[pos:cut], [storage.IndexRecord(end, end, at_us)])
        pos = cut
    files.close()
    return end


class FeedProcess:
    """A real feed process; targets in, progress reports out."""

    def __init__(self, ingest: Path, index: bool):
        argv = [sys.executable, "-m", "decnet.listener.feedworker", str(ingest), "--encoders", "1"]
        self.proc = subprocess.Popen(
            argv + ([] if index else ["--no-index"]), stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        self.positions: dict[tuple[str, str], int] = {}
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        self._started(index)

    def _started(self, index: bool) -> None:
        """Wait until the feed process (and its index process) has started: interpreter
        start-up is not the feed's rate (it was a third of a 2.5 s run, on a busy machine)."""
        while not self._ready(self.proc.pid, lambda pid: os.getpriority(os.PRIO_PROCESS, pid)):
            time.sleep(0.02)
        while index and not any(
            self._ready(pid, lambda p: os.sched_getscheduler(p) == os.SCHED_IDLE)
            for pid in self.children()
        ):
            time.sleep(0.02)

    @staticmethod
    def _ready(pid: int, check) -> bool:
        try:
            return bool(check(pid))  # (niceness / SCHED_IDLE: set once its imports are done)
        except OSError:
            return False

    def children(self) -> list[int]:
        try:
            with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                return [int(pid) for pid in f.read().split()]
        except OSError:
            return []

    def _read(self) -> None:
        buf = bytearray()
        while chunk := os.read(self.proc.stdout.fileno(), 1 << 16):
            buf += chunk
            with self.cond:
                for m in decode_messages(buf):
                    if "pos" in m:
                        self.positions[(m["worker"], m["stream"])] = m["pos"]
                self.cond.notify_all()

    def tell(self, worker: str, end: int) -> None:
        self.proc.stdin.write(encode_message({"worker": worker, "stream": "decnet", "end": end}))
        self.proc.stdin.flush()

    def wait(self, ends: dict[str, int]) -> None:
        with self.cond:
            self.cond.wait_for(
                lambda: all(self.positions.get((w, "decnet"), 0) >= e for w, e in ends.items())
            )

    def cpu(self) -> dict[str, float]:
        """CPU seconds (user + system) so far of the feed process and of its index process."""
        out = {"feed": _cpu_seconds(self.proc.pid)}
        for pid in self.children():
            out["index"] = out.get("index", 0.0) + _cpu_seconds(pid)
        return out

    def stop(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def _cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rows(ingest: Path) -> int:
    """Rows indexed: the positions' line counts (committed with the rows), not ``count(*)``,
    whose scan of millions of rows every poll would take CPU from the idle-scheduled indexer."""
    if not index_path(ingest).exists():
        return 0
    try:
        index = EventIndex(index_path(ingest), readonly=True)
    except Exception:
        return 0
    try:
        return sum(lines for _pos, lines in index.positions().values())
    finally:
        index.close()


def wait_rows(ingest: Path, want: int, interval: float = 0.2) -> None:
    while rows(ingest) < want:
        time.sleep(interval)


def feed_all(ingest: Path, ends: dict[str, int], index: bool) -> tuple[FeedProcess, float, float]:
    """A feed process told every mirror end; it, when it started, and the seconds it took."""
    feeds = FeedProcess(ingest, index)
    t0 = time.perf_counter()
    for w, end in ends.items():
        feeds.tell(w, end)
    feeds.wait(ends)
    return feeds, t0, time.perf_counter() - t0


def feed_rate(
    ingest: Path, data: dict[str, bytes], at_us: int, index: bool
) -> tuple[float, float, dict[str, float]]:
    """Feed lines/s for fresh mirrors ``data``; with the index, also seconds until indexed;
    and the CPU µs per line of the feed process and of the index process."""
    ends = {w: write_mirror(ingest, w, d, at_us) for w, d in data.items()}
    lines = sum(d.count(b"\n") for d in data.values())
    before = rows(ingest)
    feeds, t0, fed = feed_all(ingest, ends, index)
    fed_cpu = feeds.cpu()["feed"]
    indexed = float("nan")
    if index:
        wait_rows(ingest, before + lines)
        indexed = time.perf_counter() - t0
    cpu = {k: v * 1e6 / lines for k, v in feeds.cpu().items()}
    cpu["feed"] = fed_cpu * 1e6 / lines
    feeds.stop()
    return lines / fed, indexed, cpu


def percentiles(samples: list[float]) -> str:
    samples = sorted(samples)
    p50 = statistics.median(samples)
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    return f"p50 {p50 * 1000:7.1f} ms   p99 {p99 * 1000:7.1f} ms   (n={len(samples)})"


def time_query(index: EventIndex, filters: Filters, limit: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    found = index.query(filters, limit)
    Printer(False, io.StringIO()).rows(found)
    return time.perf_counter() - t0, len(found)


def follow_latency(ingest: Path, samples: int) -> list[float]:
    feeds = FeedProcess(ingest, True)
    live = f"live-{os.getpid()}"  # (a kept --dir has earlier runs' workers)
    follow = subprocess.Popen(
        [str(BIN / "decnet-admin"), "events", "--ingest", str(ingest), "--follow", "--json",
         "--worker", live, "--limit", "1"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    out: list[tuple[float, str]] = []
    got = threading.Condition()

    def read() -> None:
        for line in follow.stdout:
            with got:
                out.append((time.perf_counter(), line.decode()))
                got.notify_all()

    threading.Thread(target=read, daemon=True).start()
    time.sleep(1.0)  # the command's start-up (not part of the figure)
    files = storage.StreamFiles(ingest / live, "decnet")
    end = files.open().mirror_end
    latencies = []
    try:
        for i in range(samples):
            token = f"live{os.getpid()}x{i}"
            line = (TEMPLATE % (iso(time.time_ns() // 1000), "decky-0", "ssh", "login", i,
                                "192.0.2.1", 1, "root", token)).encode()  # fmt: skip
            end += len(line)
            files.commit(line, [storage.IndexRecord(end, end, time.time_ns() // 1000)])
            t0 = time.perf_counter()  # durable on the "listener"
            feeds.tell(live, end)
            with got:
                if not got.wait_for(lambda k=token: any(f'{k}"' in t for _, t in out), 10):
                    print(f"  sample {i}: not printed within 10 s")
                    continue
                t1 = next(t for t, text in out if f'{token}"' in text)
            latencies.append(t1 - t0)
            time.sleep(0.1)
    finally:
        files.close()
        follow.kill()
        follow.wait()
        feeds.stop()
    return latencies


def feed_rates(root: Path, rng: random.Random, pool: list[str], now: int, lines: int) -> None:
    """Four runs of ``lines / 2`` fresh lines (two workers each), alternating with and
    without the index, so that a change of the machine's load hits both alike."""
    day = 86_400 * 1_000_000
    per = lines // 4  # lines per worker per run
    runs: dict[bool, list[tuple[float, float, dict[str, float]]]] = {True: [], False: []}
    loads: dict[bool, list[float]] = {True: [], False: []}
    for k, index in enumerate((True, False, False, True)):
        data = {f"feed-{j}": mirror_lines(rng, per, now - day, day, pool) for j in range(2)}
        alone = root / f"rate-{k}"  # its own ingest: the index process indexes all it finds
        runs[index].append(feed_rate(alone, data, now, index=index))
        loads[index].append(os.getloadavg()[0])
        shutil.rmtree(alone)
    for index, label in ((True, "index process beside it"), (False, "without the index")):
        for (rate, indexed, cpu), load in zip(runs[index], loads[index], strict=True):
            extra = f"; indexed too after {indexed:.1f} s" if index else ""
            cpus = ", ".join(f"{k} {v:.1f}" for k, v in sorted(cpu.items()))
            print(f"feed, {label:24s} {rate:10,.0f} lines/s  (CPU µs/line: {cpus}{extra}; "
                  f"load {load:.1f})")  # fmt: skip
    with_rate = max(r for r, _i, _c in runs[True])
    without_rate = max(r for r, _i, _c in runs[False])
    feed_cpu = {i: min(c["feed"] for _r, _i, c in runs[i]) for i in (True, False)}
    print(f"  the index slows the feed by {100 * (1 - with_rate / without_rate):.1f}% "
          f"(best of each, wall clock); the feed process's CPU per line: "
          f"{feed_cpu[True]:.1f} vs {feed_cpu[False]:.1f} µs "
          f"({100 * (feed_cpu[True] / feed_cpu[False] - 1):+.1f}%)")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=5_000_000)
    parser.add_argument("--workers", type=int, default=50)
    parser.add_argument("--feed-lines", type=int, default=500_000, help="per feed-rate run")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--follow", type=int, default=100)
    parser.add_argument("--dir", type=Path, default=None, help="keep the ingest here")
    parser.add_argument("--skip-rates", action="store_true", help="skip the feed-rate runs")
    args = parser.parse_args()
    rng = random.Random(5)
    pool = attackers(rng)
    root = Path(tempfile.mkdtemp(prefix="decnet-bench-events-")) if args.dir is None else args.dir
    ingest = root / "ingest"
    ingest.mkdir(parents=True, exist_ok=True)
    now = time.time_ns() // 1000
    day = 86_400 * 1_000_000
    print(f"machine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; ingest in {ingest}")

    # 1. The feed with and without the index beside it: same shape, fresh lines.
    if not args.skip_rates:
        feed_rates(root, rng, pool, now, args.feed_lines)

    # 2. Index --events in all (the feed-rate lines count).
    remaining = args.events - rows(ingest)  # (a kept --dir already has them)
    per_worker = max(0, remaining // args.workers)
    t0 = time.perf_counter()
    ends = {}
    for k in range(args.workers):
        data = mirror_lines(rng, per_worker, now - day, day, pool)
        if data:
            ends[f"w{k:02d}"] = write_mirror(ingest, f"w{k:02d}", data, now)
    print(f"mirrors written: {per_worker * args.workers:,} lines in "
          f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
    start_rows = rows(ingest)
    feeds, t0, fed = feed_all(ingest, ends, True)
    total = start_rows + per_worker * args.workers
    wait_rows(ingest, total, 1.0)
    took = time.perf_counter() - t0
    feeds.stop()
    size = sum(p.stat().st_size for p in ingest.glob("events.sqlite*"))
    print(f"feed built in {fed:.1f} s; index reached {total:,} rows after {took:.1f} s "
          f"({(total - start_rows) / took:,.0f} rows/s, load {os.getloadavg()[0]:.1f}); "
          f"index {size / 2**30:.2f} GiB")  # fmt: skip

    # 3. Queries.
    index = EventIndex(index_path(ingest), readonly=True)
    print(f"queries on {index.count():,} events (load {os.getloadavg()[0]:.1f}):")
    since = parse_since("1h", now)
    cases = {
        "events --src-ip X --since 1h": lambda: Filters(
            src=parse_network(pool[rng.randrange(len(pool))]), since=since
        ),
        "events --src-ip X/24 --since 1h": lambda: Filters(
            src=parse_network(pool[rng.randrange(len(pool) * 3 // 4)] + "/24"), since=since
        ),
        "events --worker w --limit 100": lambda: Filters(
            workers=(f"w{rng.randrange(args.workers):02d}",)
        ),
        "events --event login --since 1h --limit 100": lambda: Filters(event="login", since=since),
    }
    for name, make in cases.items():
        limit = 100
        samples, found = [], 0
        for _ in range(args.queries):
            took, n = time_query(index, make(), limit)
            samples.append(took)
            found += n
        print(f"  {name:44s} {percentiles(samples)}  {found / args.queries:.1f} rows each")
    index.close()
    t0 = time.perf_counter()
    subprocess.run(
        [str(BIN / "decnet-admin"), "events", "--ingest", str(ingest), "--src-ip", pool[0],
         "--since", "1h"], stdout=subprocess.DEVNULL, check=True,
    )  # fmt: skip
    print(f"  the whole command once (interpreter start-up included): "
          f"{(time.perf_counter() - t0) * 1000:.0f} ms")  # fmt: skip

    # 4. Follow.
    latencies = follow_latency(ingest, args.follow)
    if latencies:
        print(f"follow: durable commit -> line printed: {percentiles(latencies)}  "
              f"(load {os.getloadavg()[0]:.1f})")  # fmt: skip
    if args.dir is None:
        shutil.rmtree(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
