"""Log pipeline benchmark: prints figures, asserts nothing about time.

    .venv/bin/python bench/logpipe.py [--lines 1000000] [--skip-rss]

Runs, on this machine, with real processes on loopback:
  (a) our forwarder -> our listener, acknowledged mode (file append -> durable mirror)
  (b) the same in plain RFC 5425 mode
  (c) rsyslog -> rsyslog over TLS (gtls, octet-counted): the reference
  (d) rsyslog sender -> our listener
  (e) our forwarder -> rsyslog receiver
then p50/p99 append-to-durable latency at 10,000 lines/s (ack mode) and the
listener's RSS with 1,000 idle acknowledged-mode connections.  Every run is
checked for loss and duplicates (output bytes == input bytes).
"""

from __future__ import annotations

import argparse
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
from tests.support import wait_for  # noqa: E402

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


def wait_until(predicate, timeout=600.0, interval=0.002):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark run did not finish")
        time.sleep(interval)


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

    def run_dir(self, label: str) -> Path:
        self.n += 1
        d = self.base / f"{self.n}-{label}"
        d.mkdir()
        return d


def run_ours(env: Env, data: bytes, mode: str, label: str) -> dict:
    d = env.run_dir(label)
    listener, port = start_listener(env.paths.home, d / "ingest", d / "listener.log")
    log_file = d / "decnet.log"
    log_file.touch()
    fwd = start_forwarder(
        env.bundle, log_file, d / "f.sqlite", port, d / "forwarder.log", ["--mode", mode]
    )
    stream = "decnet" if mode == "ack" else "syslog"
    index = d / "ingest" / env.name / f"{stream}.idx"
    try:
        wait_for(lambda: _connected(d / "forwarder.log"), timeout=30)
        t0 = time.monotonic()
        append_all(log_file, data)
        wait_until(lambda: durable_mirror_end(index) >= len(data))
        elapsed = time.monotonic() - t0
        mirror = (d / "ingest" / env.name / f"{stream}.log").read_bytes()
        ok = mirror == data
        feed = d / "ingest" / env.name / f"{stream}.jsonl"
        nlines = data.count(b"\n")
        wait_until(
            lambda: feed.exists() and _count_lines(feed) >= nlines, timeout=900, interval=0.05
        )
        feed_elapsed = time.monotonic() - t0
        feed_ok = _count_lines(feed) == nlines
    finally:
        stop(fwd)
        stop(listener)
    return {"elapsed": elapsed, "ok": ok, "feed_elapsed": feed_elapsed, "feed_ok": feed_ok}


def _connected(log: Path) -> bool:
    return log.exists() and "Connected" in log.read_text()


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def rsyslog_receiver(env: Env, d: Path, peer: str):
    port = rs.free_port()
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
        t0 = time.monotonic()
        append_all(source, data)
        wait_until(size_at_least(out, len(data)))
        elapsed = time.monotonic() - t0
        ok = out.read_bytes() == data
    finally:
        send.stop()
        recv.stop()
    return {"elapsed": elapsed, "ok": ok}


def run_rsyslog_ours(env: Env, data: bytes) -> dict:
    d = env.run_dir("rsyslog-listener")
    listener, port = start_listener(env.paths.home, d / "ingest", d / "listener.log")
    source = d / "source.log"
    source.touch()
    send = rsyslog_sender(env, d, source, port)
    index = d / "ingest" / env.name / "syslog.idx"
    try:
        time.sleep(1.0)
        t0 = time.monotonic()
        append_all(source, data)
        wait_until(lambda: durable_mirror_end(index) >= len(data))
        elapsed = time.monotonic() - t0
        ok = (d / "ingest" / env.name / "syslog.log").read_bytes() == data
    finally:
        send.stop()
        stop(listener)
    return {"elapsed": elapsed, "ok": ok}


def run_ours_rsyslog(env: Env, data: bytes) -> dict:
    d = env.run_dir("forwarder-rsyslog")
    recv, port, out = rsyslog_receiver(env, d, env.name)
    log_file = d / "decnet.log"
    log_file.touch()
    fwd = start_forwarder(env.bundle, log_file, d / "f.sqlite", port, d / "forwarder.log")
    try:
        wait_for(lambda: _connected(d / "forwarder.log"), timeout=30)
        t0 = time.monotonic()
        append_all(log_file, data)
        wait_until(size_at_least(out, len(data)))
        elapsed = time.monotonic() - t0
        ok = out.read_bytes() == data
    finally:
        stop(fwd)
        recv.stop()
    return {"elapsed": elapsed, "ok": ok}


def run_latency(env: Env, rate: int = 10_000, seconds: float = 5.0) -> dict:
    d = env.run_dir("latency")
    listener, port = start_listener(env.paths.home, d / "ingest", d / "listener.log")
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
    """Listener RSS with ``connections`` idle acknowledged-mode connections."""
    d = env.run_dir("rss")
    listener, port = start_listener(
        env.paths.home,
        d / "ingest",
        d / "listener.log",
        extra=["--max-connections-per-worker", str(connections + 10)],
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
        clients.terminate()
        clients.wait(30)
    finally:
        stop(listener)
    return {"connected": line, "rss_before_mb": before, "rss_after_mb": after}


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
    args = parser.parse_args()
    if not rs.available():
        sys.exit("rsyslog and rsyslog-gnutls are needed (apt-get install rsyslog rsyslog-gnutls)")
    base = Path(tempfile.mkdtemp(prefix="decnet-bench-"))
    env = Env(base)
    n = args.lines
    print(f"{n:,} lines of {LINE_LEN} bytes ({n * LINE_LEN / 1e6:.0f} MB) per run; work dir {base}")
    results = {}
    runs = [
        (
            "c",
            "rsyslog -> rsyslog (TLS, reference)",
            lambda: run_rsyslog_rsyslog(env, make_lines(n, "c")),
        ),
        (
            "a",
            "forwarder -> listener, ack mode",
            lambda: run_ours(env, make_lines(n, "a"), "ack", "ack"),
        ),
        (
            "b",
            "forwarder -> listener, plain mode",
            lambda: run_ours(env, make_lines(n, "b"), "plain", "plain"),
        ),
        ("d", "rsyslog -> listener (plain)", lambda: run_rsyslog_ours(env, make_lines(n, "d"))),
        ("e", "forwarder -> rsyslog (plain)", lambda: run_ours_rsyslog(env, make_lines(n, "e"))),
    ]
    for key, label, fn in runs:
        r = fn()
        r["rate"] = n / r["elapsed"]
        results[key] = r
        ref = results["c"]["rate"]
        extra = ""
        if "feed_elapsed" in r:
            extra = (
                f"; JSON feed complete after {r['feed_elapsed']:.1f} s "
                f"({n / r['feed_elapsed']:,.0f} lines/s end to end, "
                f"{'exact' if r['feed_ok'] else 'COUNT MISMATCH'})"
            )
        print(
            f"({key}) {label:38s} {r['rate']:>10,.0f} lines/s  {r['rate'] / ref:5.2f}x (c)  "
            f"{'no loss, no duplicates' if r['ok'] else 'MISMATCH'}{extra}",
            flush=True,
        )
    lat = run_latency(env)
    print(
        f"latency at 10,000 lines/s (ack, append -> durable mirror): p50 {lat['p50']:.1f} ms, "
        f"p99 {lat['p99']:.1f} ms, max {lat['max']:.1f} ms over {lat['count']:,} lines",
        flush=True,
    )
    if not args.skip_rss:
        rss = run_rss(env)
        print(
            f"listener RSS: {rss['rss_before_mb']:.0f} MB idle, {rss['rss_after_mb']:.0f} MB with "
            f"{rss['connected']}",
            flush=True,
        )
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
