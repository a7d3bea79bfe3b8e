"""Log pipeline benchmark: prints figures, asserts nothing about time.

    .venv/bin/python bench/logpipe.py [--lines 1000000] [--runs cabde] [--repeat N] [--skip-rss]

Runs, on this machine, with real processes on loopback:
  (a) our forwarder -> our listener, acknowledged mode (file append -> durable mirror)
  (b) the same in plain RFC 5425 mode
  (c) rsyslog -> rsyslog over TLS (gtls, octet-counted): the reference
  (d) rsyslog sender -> our listener
  (e) our forwarder -> rsyslog receiver
For (a), (b) and (d) it also times the JSON feed (end to end, and how far it
trails the durable mirror); for every run, the CPU time of each process per
line (the figure that other load on a shared machine disturbs least).  Then
p50/p99 append-to-durable latency at 10,000 lines/s (ack mode) and the
listener's RSS with 1,000 idle acknowledged-mode connections.  Every run is
checked for loss and duplicates (output bytes == input bytes; the feed: one
entry per line).
"""

from __future__ import annotations

import argparse
import json
import os
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

from decnet import config  # noqa: E402
from decnet.listener import storage  # noqa: E402
from decnet.master import enrollment  # noqa: E402
from tests import rsyslog_support as rs  # noqa: E402
from tests.logpipe_support import start_forwarder, start_listener  # noqa: E402
from tests.support import free_port, wait_for  # noqa: E402

LINE_LEN = 200


def make_lines(n: int, tag: str) -> bytes:
    head = (
        b"<134>1 2024-05-01T12:00:00.000001Z decoy-7 sshd 22 login "
        b'[decnet@55555 run="%s" n="%%09d"] ' % tag.encode()
    )
    sample = head % 0
    pad = b"p" * (LINE_LEN - len(sample) - 1)
    return b"".join(head % i + pad + b"\n" for i in range(n))


def append_all(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        step = 1 << 20
        for i in range(0, len(data), step):
            os.write(fd, data[i : i + step])
    finally:
        os.close(fd)


def durable_mirror_end(index: Path) -> int:
    """The mirror length the listener has made durable (last index record)."""
    try:
        size = index.stat().st_size
    except FileNotFoundError:
        return 0
    usable = size - size % storage.INDEX_RECORD.size
    if not usable:
        return 0
    with open(index, "rb") as f:
        f.seek(usable - storage.INDEX_RECORD.size)
        rec = storage.unpack_record(f.read(storage.INDEX_RECORD.size))
    return rec.mirror_end if rec else 0


def feed_mirror_pos(pos_file: Path) -> int:
    """How much of the mirror the JSON feed covers durably (its position file)."""
    try:
        raw = pos_file.read_bytes()
    except FileNotFoundError:
        return 0
    size = storage.FEED_SLOT.size
    slots = [storage.unpack_feed_slot(raw[i * 64 : i * 64 + size]) for i in (0, 1)]
    valid = [s for s in slots if s is not None]
    return max(valid, key=lambda s: s.sequence).mirror_pos if valid else 0


def cpu_seconds(pid: int, tree: bool = True) -> float:
    """CPU time of a process (and with ``tree`` all its descendants, live or reaped)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    if not tree:
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    own = sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return own + sum(cpu_seconds(child) for child in children(pid))


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError):
        return []


class CPU:
    """CPU seconds used by named processes between ``start`` and ``stop``.

    The machine may be shared; CPU time per line is the figure that other
    load disturbs least.
    """

    def __init__(self, **pids):
        # The listener's own time only: its feed process is counted as "feed".
        self.pids = {name: pid for name, pid in pids.items() if pid}
        self.tree = {name: name != "listener" for name in self.pids}
        self.before: dict[str, float] = {}
        self.used: dict[str, float] = {}

    def start(self):
        self.before = {name: cpu_seconds(pid, self.tree[name]) for name, pid in self.pids.items()}

    def stop(self):
        self.used = {
            name: cpu_seconds(pid, self.tree[name]) - self.before[name]
            for name, pid in self.pids.items()
        }
        return self.used


def stop(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Env:
    def __init__(self, base: Path):
        self.base = base
        self.paths = config.MasterPaths.resolve(base / "home")
        self.master = enrollment.init_master(self.paths)
        self.bundle = base / "bundle"
        enrollment.enroll(self.master, "bench-w1", "127.0.0.1", self.bundle)
        self.name = "bench-w1"
        self.n = 0
        self.listener_args: list[str] = []

    def run_dir(self, label: str) -> Path:
        self.n += 1
        d = self.base / f"{self.n}-{label}"
        d.mkdir()
        return d


def run_ours(env: Env, data: bytes, mode: str, label: str) -> dict:
    d = env.run_dir(label)
    listener, port = start_listener(
        env.paths.home, d / "ingest", d / "listener.log", extra=env.listener_args
    )
    log_file = d / "decnet.log"
    log_file.touch()
    fwd = start_forwarder(
        env.bundle, log_file, d / "f.sqlite", port, d / "forwarder.log", ["--mode", mode]
    )
    stream = "decnet" if mode == "ack" else "syslog"
    try:
        wait_for(lambda: _connected(d / "forwarder.log"), timeout=30)
        cpu = CPU(listener=listener.pid, feed=_feed_pid(listener.pid), forwarder=fwd.pid)
        cpu.start()
        t0 = time.monotonic()
        append_all(log_file, data)
        result = _ingest_and_feed(d / "ingest" / env.name, stream, data, t0)
        result["cpu"] = cpu.stop()
    finally:
        stop(fwd)
        stop(listener)
    return result


def _feed_pid(listener_pid: int) -> int | None:
    """The listener's feed process (its only child)."""
    found = wait_for(lambda: children(listener_pid), timeout=30, what="the feed process")
    return found[0]


def _ingest_and_feed(directory: Path, stream: str, data: bytes, t0: float) -> dict:
    """Wait for the durable mirror, then the JSON feed; check both; time both.

    The feed's lag behind the mirror is sampled all along (bytes of durable
    mirror not yet in the durable feed, in lines of LINE_LEN).
    """
    index = directory / f"{stream}.idx"
    pos_file = directory / f"{stream}.feed"
    total = len(data)
    mirror_done = feed_done = None
    max_lag = 0
    while feed_done is None:
        now = time.monotonic()
        if now - t0 > 900:
            raise TimeoutError("benchmark run did not finish")
        mirror = durable_mirror_end(index)
        fed = feed_mirror_pos(pos_file)
        max_lag = max(max_lag, mirror - fed)
        if mirror_done is None and mirror >= total:
            mirror_done = now - t0
        if fed >= total:
            feed_done = now - t0
        time.sleep(0.002 if mirror_done is None else 0.01)
    ok = (directory / f"{stream}.log").read_bytes() == data
    feed_ok = _feed_ok(directory / f"{stream}.jsonl", data)
    return {
        "elapsed": mirror_done,
        "ok": ok,
        "feed_elapsed": feed_done,
        "feed_ok": feed_ok,
        "feed_lag_s": feed_done - mirror_done,
        "feed_max_lag_lines": max_lag // LINE_LEN,
    }


def _feed_ok(feed: Path, data: bytes) -> bool:
    """One parsed feed entry per mirror line, in order, at the right offsets."""
    n = data.count(b"\n")
    if _count_lines(feed) != n:
        return False
    with open(feed, "rb") as f:
        first = json.loads(f.readline())
        f.seek(max(0, feed.stat().st_size - 4096))
        last = json.loads(f.read().split(b"\n")[-2])
    return (
        first["parsed"]
        and last["parsed"]
        and first["mirror_offset"] == 0
        and last["mirror_offset"] == len(data) - LINE_LEN
        and last["structured_data"][0]["params"][1][1] == f"{n - 1:09d}"
    )


def _connected(log: Path) -> bool:
    return log.exists() and "Connected" in log.read_text()


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def rsyslog_receiver(env: Env, d: Path, peer: str):
    port = free_port()
    out = d / "received.log"
    recv = rs.Rsyslogd(
        d / "receiver",
        rs.receiver_config(
            d / "receiver",
            port,
            out,
            env.paths.ca_cert,
            env.paths.master_cert,
            env.paths.master_key,
            [peer],
        ),
    )
    recv.start()
    wait_for(lambda: rs.port_open(port), timeout=30)
    return recv, port, out


def rsyslog_sender(env: Env, d: Path, source: Path, port: int):
    b = env.bundle
    send = rs.Rsyslogd(
        d / "sender",
        rs.sender_config(
            d / "sender",
            source,
            port,
            b / "ca.crt",
            b / "worker.crt",
            b / "worker.key",
            "decnet-master",
        ),
    )
    send.start()
    return send


def size_at_least(path: Path, n: int):
    return lambda: path.exists() and path.stat().st_size >= n


def run_rsyslog_rsyslog(env: Env, data: bytes) -> dict:
    d = env.run_dir("rsyslog-rsyslog")
    recv, port, out = rsyslog_receiver(env, d, env.name)
    source = d / "source.log"
    source.touch()
    send = rsyslog_sender(env, d, source, port)
    try:
        time.sleep(1.0)  # let imfile register its inotify watch (bench only, not a test)
        cpu = CPU(rsyslog_sender=send.proc.pid, rsyslog_receiver=recv.proc.pid)
        cpu.start()
        t0 = time.monotonic()
        append_all(source, data)
        wait_for(size_at_least(out, len(data)), 600, 0.002, what="the receiver to write it all")
        elapsed = time.monotonic() - t0
        used = cpu.stop()
        ok = out.read_bytes() == data
    finally:
        send.stop()
        recv.stop()
    return {"elapsed": elapsed, "ok": ok, "cpu": used}


def run_rsyslog_ours(env: Env, data: bytes) -> dict:
    d = env.run_dir("rsyslog-listener")
    listener, port = start_listener(
        env.paths.home, d / "ingest", d / "listener.log", extra=env.listener_args
    )
    source = d / "source.log"
    source.touch()
    send = rsyslog_sender(env, d, source, port)
    try:
        time.sleep(1.0)
        cpu = CPU(listener=listener.pid, feed=_feed_pid(listener.pid), rsyslog_sender=send.proc.pid)
        cpu.start()
        t0 = time.monotonic()
        append_all(source, data)
        result = _ingest_and_feed(d / "ingest" / env.name, "syslog", data, t0)
        result["cpu"] = cpu.stop()
    finally:
        send.stop()
        stop(listener)
    return result


def run_ours_rsyslog(env: Env, data: bytes) -> dict:
    d = env.run_dir("forwarder-rsyslog")
    recv, port, out = rsyslog_receiver(env, d, env.name)
    log_file = d / "decnet.log"
    log_file.touch()
    fwd = start_forwarder(env.bundle, log_file, d / "f.sqlite", port, d / "forwarder.log")
    try:
        wait_for(lambda: _connected(d / "forwarder.log"), timeout=30)
        cpu = CPU(forwarder=fwd.pid, rsyslog_receiver=recv.proc.pid)
        cpu.start()
        t0 = time.monotonic()
        append_all(log_file, data)
        wait_for(size_at_least(out, len(data)), 600, 0.002, what="the receiver to write it all")
        elapsed = time.monotonic() - t0
        used = cpu.stop()
        ok = out.read_bytes() == data
    finally:
        stop(fwd)
        recv.stop()
    return {"elapsed": elapsed, "ok": ok, "cpu": used}


def run_latency(env: Env, rate: int = 10_000, seconds: float = 5.0) -> dict:
    d = env.run_dir("latency")
    listener, port = start_listener(
        env.paths.home, d / "ingest", d / "listener.log", extra=env.listener_args
    )
    log_file = d / "decnet.log"
    log_file.touch()
    fwd = start_forwarder(env.bundle, log_file, d / "f.sqlite", port, d / "forwarder.log")
    index = d / "ingest" / env.name / "decnet.idx"
    total = int(rate * seconds)
    data = make_lines(total, "latency")
    appended = [0.0] * total
    durable = [0.0] * total
    done = threading.Event()

    def watch():
        seen = 0
        while seen < total and not done.is_set():
            end = durable_mirror_end(index) // LINE_LEN
            if end > seen:
                now = time.monotonic()
                for i in range(seen, min(end, total)):
                    durable[i] = now
                seen = end
            time.sleep(0.0005)

    try:
        wait_for(lambda: _connected(d / "forwarder.log"), timeout=30)
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        fd = os.open(log_file, os.O_WRONLY | os.O_APPEND)
        start = time.monotonic()
        batch = 10  # 10 lines per write, every 1 ms
        for i in range(0, total, batch):
            target = start + i / rate
            while (now := time.monotonic()) < target:
                time.sleep(max(0.0, min(target - now, 0.0005)))
            os.write(fd, data[i * LINE_LEN : (i + batch) * LINE_LEN])
            t = time.monotonic()
            for j in range(i, min(i + batch, total)):
                appended[j] = t
        os.close(fd)
        watcher.join(60)
        done.set()
    finally:
        stop(fwd)
        stop(listener)
    lat = sorted((durable[i] - appended[i]) * 1000 for i in range(total) if durable[i])
    return {
        "count": len(lat),
        "p50": statistics.median(lat),
        "p99": lat[int(len(lat) * 0.99) - 1],
        "max": lat[-1],
    }


def run_rss(env: Env, connections: int = 1000) -> dict:
    """Listener RSS with ``connections`` idle acknowledged-mode connections (and the feed
    process's, counted apart)."""
    d = env.run_dir("rss")
    listener, port = start_listener(
        env.paths.home,
        d / "ingest",
        d / "listener.log",
        # One worker, one stream per connection, 50 handshakes at a time from one address.
        extra=[
            "--max-connections-per-worker",
            str(connections + 10),
            "--max-streams-per-worker",
            str(connections + 10),
            "--max-unauthenticated-per-address",
            "64",
        ],
    )
    try:
        before = _rss(listener.pid)
        clients = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve().parent / "_idle_clients.py"),
                str(env.bundle),
                str(port),
                str(connections),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        line = clients.stdout.readline().strip()
        after = _rss(listener.pid)
        feed = sum(_rss(pid) for pid in children(listener.pid))
        clients.terminate()
        clients.wait(30)
    finally:
        stop(listener)
    return {"connected": line, "rss_before_mb": before, "rss_after_mb": after, "feed_mb": feed}


def _rss(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--runs", default="cabde", help="which runs, e.g. 'cd' [cabde]")
    parser.add_argument("--repeat", type=int, default=1, help="run each N times, report the best")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument(
        "--feed-encoders", type=int, help="the listener's --feed-encoders [its default]"
    )
    args = parser.parse_args()
    if not rs.available():
        sys.exit("rsyslog and rsyslog-gnutls are needed (apt-get install rsyslog rsyslog-gnutls)")
    base = Path(tempfile.mkdtemp(prefix="decnet-bench-"))
    env = Env(base)
    if args.feed_encoders:
        env.listener_args = ["--feed-encoders", str(args.feed_encoders)]
    n = args.lines
    print(f"{n:,} lines of {LINE_LEN} bytes ({n * LINE_LEN / 1e6:.0f} MB) per run; work dir {base}")
    results: dict[str, dict] = {}
    runs = {
        "c": (
            "rsyslog -> rsyslog (TLS, reference)",
            lambda: run_rsyslog_rsyslog(env, make_lines(n, "c")),
        ),
        "a": (
            "forwarder -> listener, ack mode",
            lambda: run_ours(env, make_lines(n, "a"), "ack", "ack"),
        ),
        "b": (
            "forwarder -> listener, plain mode",
            lambda: run_ours(env, make_lines(n, "b"), "plain", "plain"),
        ),
        "d": ("rsyslog -> listener (plain)", lambda: run_rsyslog_ours(env, make_lines(n, "d"))),
        "e": ("forwarder -> rsyslog (plain)", lambda: run_ours_rsyslog(env, make_lines(n, "e"))),
    }
    wanted = [k for k in "cabde" if k in args.runs]
    for rep in range(args.repeat):
        for key in wanted:
            label, fn = runs[key]
            r = fn()
            r["rate"] = n / r["elapsed"]
            best = results.setdefault(key, r)
            if r["rate"] > best["rate"]:
                results[key] = best = {**best, **{k: r[k] for k in ("rate", "elapsed", "ok")}}
            if "feed_elapsed" in r and r["feed_elapsed"] < best["feed_elapsed"]:
                best.update({k: v for k, v in r.items() if k.startswith("feed")})
            ref = results["c"]["rate"] if "c" in results else None
            ratio = f"{r['rate'] / ref:5.2f}x (c)" if ref else "   - x (c)"
            tag = f"[{rep + 1}/{args.repeat}] " if args.repeat > 1 else ""
            print(
                f"{tag}({key}) {label:38s} {r['rate']:>10,.0f} lines/s  {ratio}  "
                f"{'no loss, no duplicates' if r['ok'] else 'MISMATCH'}",
                flush=True,
            )
            if "feed_elapsed" in r:
                print(
                    f"      JSON feed: complete {r['feed_elapsed']:.2f} s after the first append "
                    f"({n / r['feed_elapsed']:,.0f} lines/s end to end, "
                    f"{'exact' if r['feed_ok'] else 'FEED MISMATCH'}); "
                    f"{r['feed_lag_s']:.2f} s behind the mirror at the end, "
                    f"at most {r['feed_max_lag_lines']:,} lines behind",
                    flush=True,
                )
            print(
                "      CPU per line: "
                + ", ".join(f"{name} {1e6 * sec / n:.2f} us" for name, sec in r["cpu"].items()),
                flush=True,
            )
    if args.repeat > 1 and results:
        ref = results["c"]["rate"] if "c" in results else None
        print(f"best of {args.repeat}:")
        for key in wanted:
            r = results[key]
            ratio = f"{r['rate'] / ref:5.2f}x (c)" if ref else ""
            feed = (
                f"; feed {n / r['feed_elapsed']:,.0f} lines/s, {r['feed_lag_s']:.2f} s behind"
                if "feed_elapsed" in r
                else ""
            )
            print(f"({key}) {runs[key][0]:38s} {r['rate']:>10,.0f} lines/s  {ratio}{feed}")
    if args.skip_latency:
        lat = None
    else:
        # The throughput runs leave ~1 GB of dirty pages; flushed during the
        # latency run they would make its fsyncs wait for *their* writeback.
        os.sync()
        lat = run_latency(env)
    if lat:
        print(
            f"latency at 10,000 lines/s (ack, append -> durable mirror): p50 {lat['p50']:.1f} ms, "
            f"p99 {lat['p99']:.1f} ms, max {lat['max']:.1f} ms over {lat['count']:,} lines",
            flush=True,
        )
    if not args.skip_rss:
        rss = run_rss(env)
        print(
            f"listener RSS: {rss['rss_before_mb']:.0f} MB idle, {rss['rss_after_mb']:.0f} MB with "
            f"{rss['connected']} (+ {rss['feed_mb']:.0f} MB for the feed process)",
            flush=True,
        )
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
