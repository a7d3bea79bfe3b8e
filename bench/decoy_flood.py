"""Decoy flood: the agent's /health latency and CPU per MiB while every decoy type is flooded.

    .venv/bin/python bench/decoy_flood.py [--seconds 4] [--connections 8] [--types redis,ftp]
        [--inputs lf,ping] [--profile FILE]

A real ``twistd decnet-agent`` (subprocess, enrolled bundle) runs one decky with
every decoy type on loopback.  For each decoy type and each of its hostile
inputs (``INPUTS`` below), a flooder child process keeps ``--connections``
connections sending that input at full speed (it reads and discards the
replies, and reconnects whenever the decoy hangs up), while this process
probes ``GET /health`` through :class:`AgentClient` (real mTLS, pinned, a
fresh TLS connection per probe).

Reported per input, and per decoy type as the worst input of each class:

* ``p50_ms`` / ``p99_ms`` / ``max_ms`` of ``/health`` during the flood
  (goal: p99 < 100 ms), and failed probes;
* ``cpu_s_per_mib``: the agent process's CPU time (user + system, all
  threads, from ``/proc``) over the phase, divided by the MiB the decoy
  *read* (the ``bytes_in`` of the phase's ``disconnect`` events); the goal,
  at most 0.05, applies to the *hostile bytes* class: garbage, floods of
  empty or degenerate commands, protocol units that mean nothing;
* *logged commands* (``ping``, ``noop``, ``pipelined-get``): every command is
  an event line by design, so their cost follows the events (at most 1000
  per connection), not the bytes: ``cpu_us_per_event`` is their figure;
* *handshakes* (``kex-storm``): an SSH key exchange costs the server an
  X25519 agreement and a signature per connection whatever the client sent:
  ``cpu_ms_per_connection``;
* connections made and why the decoy closed them, event lines written.

``--profile FILE`` runs the agent under cProfile (how the figures were
explained); ``--reactor-lag`` reports how late a 5 ms timer fired in the
agent, which separates a busy reactor from a busy machine.

Numbers, not assertions: tests never depend on timing.  The machine's other
load shows up in the latency figures: run it on a quiet machine and note the
load average it prints.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHUNK = 256 * 1024  # what a flooder hands to sendall() at a time


def _ssh_packet(payload: bytes) -> bytes:
    """An unencrypted SSH binary packet (RFC 4253 section 6), block size 8, no MAC."""
    pad = 8 - (5 + len(payload)) % 8
    pad += 8 if pad < 4 else 0
    return struct.pack("!LB", 1 + len(payload) + pad, pad) + payload + b"\x00" * pad


def _ssh_string(data: bytes) -> bytes:
    return struct.pack("!L", len(data)) + data


def _ssh_kex_start() -> bytes:
    """Version, KEXINIT (curve25519) and KEX_ECDH_INIT with a random key: the server's
    key exchange costs it an X25519 agreement and a host-key signature; this costs
    the client nothing."""
    names = [
        b"curve25519-sha256",
        b"ssh-ed25519",
        b"aes128-ctr",
        b"aes128-ctr",
        b"hmac-sha2-256",
        b"hmac-sha2-256",
        b"none",
        b"none",
        b"",
        b"",
    ]
    kexinit = b"\x14" + os.urandom(16) + b"".join(map(_ssh_string, names)) + b"\x00" + b"\0" * 4
    ecdh_init = b"\x1e" + _ssh_string(os.urandom(32))
    return b"SSH-2.0-flood\r\n" + _ssh_packet(kexinit) + _ssh_packet(ecdh_init)


# type -> {input name: (sent once per connection, then repeated forever)}; an
# empty repeated part means: send the first part, read the answer, hang up.
INPUTS: dict[str, dict[str, tuple[bytes, bytes]]] = {
    "ssh": {
        "ignore-packets": (b"SSH-2.0-flood\r\n", _ssh_packet(b"\x02")),
        "unknown-packets": (b"SSH-2.0-flood\r\n", _ssh_packet(b"\xc8")),
        "version-garbage": (b"", b"x" * 1024),
        "kex-storm": (_ssh_kex_start(), b""),
    },
    "telnet": {
        "lf": (b"", b"\n"),
        "iac-nop": (b"", b"\xff\xf1"),
        "iac-will": (b"", b"\xff\xfb\x05"),
        "iac-will-each-option": (b"", bytes(b for o in range(256) for b in (255, 251, o))),
        "garbage": (b"", bytes(range(1, 255)).replace(b"\n", b"").replace(b"\r", b"")),
    },
    "http": {
        "pipelined-get": (b"", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
        "header-lines": (b"GET / HTTP/1.1\r\n", b"a:b\r\n"),
        "lf": (b"", b"\n"),
        "tiny-chunks": (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"1\r\nz\r\n",
        ),
    },
    "ftp": {
        "lf": (b"", b"\n"),
        "noop": (b"", b"NOOP\r\n"),
        "garbage": (b"", b"x" * 1024),
    },
    "smtp": {
        "lf": (b"", b"\n"),
        "noop": (b"", b"NOOP\r\n"),
        "garbage": (b"", b"x" * 1024),
    },
    "redis": {
        "lf": (b"", b"\n"),
        "empty-multibulk": (b"", b"*0\r\n"),
        "null-multibulk": (b"", b"*-1\r\n"),
        "ping": (b"", b"PING\r\n"),
    },
    "tcp-banner": {
        "garbage": (b"", bytes(range(256))),
    },
}


# Inputs made of real commands: each one is an event line by design, so their
# cost follows the events (at most 1000 per connection), not the bytes.
LOGGED_COMMANDS = {("redis", "ping"), ("ftp", "noop"), ("smtp", "noop"), ("http", "pipelined-get")}
# Inputs whose cost is per connection: an SSH key exchange is an X25519
# agreement and a signature, whatever the client sent.
HANDSHAKES = {("ssh", "kex-storm")}


def input_class(kind: str, name: str) -> str:
    if (kind, name) in LOGGED_COMMANDS:
        return "logged commands"
    if (kind, name) in HANDSHAKES:
        return "handshakes"
    return "hostile bytes"


# -- the flooder (child process) -------------------------------------------------


def flood(port: int, kind: str, name: str, seconds: float, connections: int) -> None:
    """Child process: ``connections`` threads flood ``127.0.0.1:port``; prints JSON stats."""
    prefix, unit = INPUTS[kind][name]
    body = unit * max(1, CHUNK // len(unit)) if unit else b""
    deadline = time.monotonic() + seconds
    stats = {"connections": 0, "sent": 0, "connect_errors": 0}
    lock = threading.Lock()

    def drain(sock: socket.socket) -> None:
        try:
            while sock.recv(65536):
                pass
        except OSError:
            pass

    def worker() -> None:
        while time.monotonic() < deadline:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=2)
            except OSError:
                with lock:
                    stats["connect_errors"] += 1
                continue
            sock.settimeout(1)
            sent = 0
            if not body:  # one exchange per connection, as fast as connections go
                try:
                    sock.sendall(prefix)
                    sent = len(prefix)
                    sock.recv(65536)
                except OSError:
                    pass
                sock.close()
                with lock:
                    stats["connections"] += 1
                    stats["sent"] += sent
                continue
            reader = threading.Thread(target=drain, args=(sock,), daemon=True)
            reader.start()
            try:
                if prefix:
                    sock.sendall(prefix)
                    sent += len(prefix)
                while time.monotonic() < deadline:
                    sock.sendall(body)
                    sent += len(body)
            except OSError:
                pass  # the decoy hung up (or a send timed out): reconnect
            finally:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
                with lock:
                    stats["connections"] += 1
                    stats["sent"] += sent

    threads = [threading.Thread(target=worker) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps(stats), flush=True)


# -- the agent ------------------------------------------------------------------

PROFILED_TWISTD = """
import cProfile, sys
from twisted.internet import reactor
from twisted.scripts.twistd import run
out = sys.argv.pop(1)
profile = cProfile.Profile()
def dump():
    profile.disable()
    profile.dump_stats(out)
reactor.addSystemEventTrigger("after", "shutdown", dump)
sys.argv = sys.argv[1:]
profile.enable()
run()
"""

# How late a 5 ms timer fires in the agent's reactor: how long the reactor
# was busy (or the process not scheduled) when it should have run.
LAGGED_TWISTD = """
import json, sys, time
from twisted.internet import reactor, task
from twisted.scripts.twistd import run
out = sys.argv.pop(1)
lags, last = [], [time.perf_counter()]
def tick():
    now = time.perf_counter()
    lags.append(now - last[0] - 0.005)
    last[0] = now
task.LoopingCall(tick).start(0.005, now=False)
def dump():
    s = sorted(lags)
    with open(out, "w") as f:
        json.dump({"samples": len(s), "p50_ms": round(s[len(s) // 2] * 1000, 2),
                   "p99_ms": round(s[int(len(s) * 0.99)] * 1000, 2),
                   "max_ms": round(s[-1] * 1000, 2)}, f)
reactor.addSystemEventTrigger("before", "shutdown", dump)
sys.argv = sys.argv[1:]
run()
"""


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of process ``pid``, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


_DISCONNECT = re.compile(
    rb" (\S+) - disconnect \[[^\n]*? session=\"([^\"]+)\"[^\n]*?"
    rb" reason=\"([^\"]+)\"[^\n]*? bytes_in=\"(\d+)\""
)


def disconnects(log_file: Path, kind: str) -> dict[bytes, tuple[str, int]]:
    """``{session: (reason, bytes_in)}`` of every disconnect event of ``kind`` so far."""
    out = {}
    data = log_file.read_bytes() if log_file.exists() else b""
    for m in _DISCONNECT.finditer(data):
        if m.group(1).decode() == kind:
            out[m.group(2)] = (m.group(3).decode(), int(m.group(4)))
    return out


def event_lines(log_file: Path, kind: str) -> int:
    """How many event lines of ``kind`` (its APP-NAME) the log holds so far."""
    if not log_file.exists():
        return 0
    return len(
        re.findall(
            rb"^<\d+>1 \S+ \S+ " + re.escape(kind.encode()) + rb" ", log_file.read_bytes(), re.M
        )
    )


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def run(args) -> dict:
    import attrs
    from twisted.internet import defer
    from twisted.internet.task import deferLater, react

    from decnet import config
    from decnet.master import enrollment
    from decnet.master.agent_client import AgentClient
    from decnet.tls import TLSIdentity

    results: dict = {"phases": []}

    async def main(reactor):
        tmp = Path(tempfile.mkdtemp(prefix="decoy-flood-"))
        paths = config.MasterPaths.resolve(tmp / "home")
        enrollment.init_master(paths)
        master = enrollment.load_master(paths)
        enrolled = enrollment.enroll(master, "flood-w1", "127.0.0.1", tmp / "bundle")
        log_file, port_file = tmp / "decnet.log", tmp / "agent.port"
        # twistd re-raises the signal that stopped it, so a profile is dumped
        # from a shutdown trigger rather than at exit.
        profile = [sys.executable, "-c", PROFILED_TWISTD, args.profile] if args.profile else []
        lag_file = tmp / "reactor-lag.json"
        if args.reactor_lag:
            profile = [sys.executable, "-c", LAGGED_TWISTD, str(lag_file)]
        agent = subprocess.Popen(
            [
                *profile,
                str(Path(sys.executable).parent / "twistd"),
                "--nodaemon",
                "--pidfile=",
                f"--logfile={tmp / 'twistd.log'}",
                "decnet-agent",
                "--bundle",
                str(enrolled.bundle_dir),
                "--listen",
                "tcp:0:interface=127.0.0.1",
                "--state-dir",
                str(tmp / "state"),
                "--log-file",
                str(log_file),
                "--port-file",
                str(port_file),
                *args.agent_arg,
            ],
            stdin=subprocess.DEVNULL,
        )
        try:
            for _ in range(600):
                if port_file.exists() and port_file.read_text().strip():
                    break
                if agent.poll() is not None:
                    raise SystemExit(f"the agent exited {agent.returncode}")
                await deferLater(reactor, 0.05, lambda: None)
            api_port = int(port_file.read_text())
            host = attrs.evolve(enrolled.host, agent_port=api_port)
            identity = TLSIdentity.master(paths)
            client = AgentClient(reactor, identity, host, timeout=30)
            spec = {
                "deckies": [
                    {
                        "name": "flood",
                        "services": [
                            {"type": kind, "bind": "127.0.0.1", "port": 0} for kind in args.types
                        ],
                    }
                ]
            }
            deployed = await client.deploy(spec)
            assert deployed["ok"], deployed["failed"]
            ports = {
                kind: int(s["address"].rsplit(":", 1)[1])
                for kind, s in deployed["deckies"]["flood"].items()
            }

            async def probe_until(done) -> tuple[list[float], int]:
                samples, failures = [], 0
                while not done():
                    t0 = time.perf_counter()
                    try:
                        await client.health()
                        samples.append((time.perf_counter() - t0) * 1000)
                    except Exception:  # a failed probe is a figure here
                        failures += 1
                    await deferLater(reactor, 0.01, lambda: None)
                return samples, failures

            t_end = time.monotonic() + 2
            cpu0 = cpu_seconds(agent.pid)
            idle, _ = await probe_until(lambda: time.monotonic() > t_end)
            cpu1 = cpu_seconds(agent.pid)
            results["idle_health_ms"] = {
                "p50": round(statistics.median(idle), 2),
                "p99": round(percentile(idle, 0.99), 2),
                "agent_cpu_ms_per_probe": round((sum(cpu1) - sum(cpu0)) / len(idle) * 1000, 2),
            }

            for kind in args.types:
                for name in INPUTS[kind]:
                    if args.inputs and name not in args.inputs.split(","):
                        continue
                    before = disconnects(log_file, kind)
                    lines0 = event_lines(log_file, kind)
                    cpu0 = cpu_seconds(agent.pid)
                    flooder = subprocess.Popen(
                        [
                            sys.executable,
                            __file__,
                            "--flood",
                            f"{ports[kind]}:{kind}:{name}",
                            "--seconds",
                            str(args.seconds),
                            "--connections",
                            str(args.connections),
                        ],
                        stdout=subprocess.PIPE,
                        text=True,
                    )
                    samples, failures = await probe_until(lambda f=flooder: f.poll() is not None)
                    sent = json.loads(flooder.stdout.read())
                    # Let the agent finish with every connection of the phase.
                    for _ in range(600):
                        status = await client.status()
                        if status["deckies"]["flood"]["services"][kind]["active"] == 0:
                            break
                        await deferLater(reactor, 0.05, lambda: None)
                    await deferLater(reactor, 0.3, lambda: None)  # the log writer
                    cpu1 = cpu_seconds(agent.pid)
                    user, system = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
                    cpu = user + system
                    after = disconnects(log_file, kind)
                    new = {s: v for s, v in after.items() if s not in before}
                    read = sum(b for _, b in new.values())
                    events = event_lines(log_file, kind) - lines0
                    phase = {
                        "type": kind,
                        "input": name,
                        "class": input_class(kind, name),
                        "probes": len(samples),
                        "failed_probes": failures,
                        "p50_ms": round(statistics.median(samples), 1) if samples else None,
                        "p99_ms": round(percentile(samples, 0.99), 1) if samples else None,
                        "max_ms": round(max(samples), 1) if samples else None,
                        "connections": len(new),
                        "mib_read": round(read / 2**20, 2),
                        "mib_sent": round(sent["sent"] / 2**20, 1),
                        "cpu_s": round(cpu, 2),
                        "cpu_user_s": round(user, 2),
                        "cpu_s_per_mib": round(cpu / (read / 2**20), 4) if read else None,
                        "events": events,
                        "cpu_us_per_event": round(cpu / events * 1e6) if events else None,
                        "reasons": dict(Counter(r for r, _ in new.values()).most_common(3)),
                    }
                    results["phases"].append(phase)
                    print(json.dumps(phase), flush=True)
            await client.close()
        finally:
            agent.terminate()
            agent.wait(timeout=30)
            if args.reactor_lag and lag_file.exists():
                results["agent_reactor_lag"] = json.loads(lag_file.read_text())

    def go(reactor):
        return defer.ensureDeferred(main(reactor))

    try:
        react(go)
    except SystemExit as exc:
        if exc.code:
            raise
    return results


def summary(results: dict) -> dict:
    """Per input class and decoy type: the worst p50/p99 and CPU figures over its inputs."""
    worst: dict[str, dict[str, dict]] = {}
    for p in results["phases"]:
        w = worst.setdefault(p["class"], {}).setdefault(
            p["type"], {"p50_ms": 0.0, "p99_ms": 0.0, "failed_probes": 0}
        )
        w["p50_ms"] = max(w["p50_ms"], p["p50_ms"] or 0.0)
        if (p["p99_ms"] or 0.0) >= w["p99_ms"]:
            w["p99_ms"], w["p99_input"] = p["p99_ms"] or 0.0, p["input"]
        w["failed_probes"] += p["failed_probes"]
        if p["class"] == "hostile bytes":
            if (p["cpu_s_per_mib"] or 0.0) >= w.get("cpu_s_per_mib", 0.0):
                w["cpu_s_per_mib"], w["cpu_input"] = p["cpu_s_per_mib"] or 0.0, p["input"]
        elif p["class"] == "logged commands":
            w["cpu_us_per_event"] = max(w.get("cpu_us_per_event", 0), p["cpu_us_per_event"] or 0)
            w["cpu_s_per_mib"] = max(w.get("cpu_s_per_mib", 0.0), p["cpu_s_per_mib"] or 0.0)
        else:
            per = round(p["cpu_s"] / p["connections"] * 1000, 2) if p["connections"] else None
            w["cpu_ms_per_connection"] = per
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="flood time per input")
    parser.add_argument("--connections", type=int, default=8, help="flooding connections")
    parser.add_argument("--types", default=",".join(INPUTS), help="decoy types, comma-separated")
    parser.add_argument(
        "--agent-arg", action="append", default=[], help="extra twistd decnet-agent argument"
    )
    parser.add_argument(
        "--profile", metavar="FILE", help="run the agent under cProfile, write its stats to FILE"
    )
    parser.add_argument(
        "--reactor-lag",
        action="store_true",
        help="also measure how late a 5 ms timer fires in the agent (over the whole run)",
    )
    parser.add_argument(
        "--inputs", default="", help="only these inputs (names from the table), comma-separated"
    )
    parser.add_argument("--flood", metavar="PORT:TYPE:INPUT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flood:
        port, kind, name = args.flood.split(":", 2)
        flood(int(port), kind, name, args.seconds, args.connections)
        return
    args.types = [t for t in args.types.split(",") if t]
    unknown = set(args.types) - set(INPUTS)
    if unknown:
        parser.error(f"unknown decoy types: {', '.join(sorted(unknown))}")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    results = run(args)
    print("idle /health:", json.dumps(results["idle_health_ms"]))
    if "agent_reactor_lag" in results:
        print(
            "agent reactor lag (5 ms timer, whole run):", json.dumps(results["agent_reactor_lag"])
        )
    goals = {
        "hostile bytes": "goals: p99 < 100 ms, cpu_s_per_mib <= 0.05",
        "logged commands": "every command an event line; goal: p99 < 100 ms",
        "handshakes": "cost per connection; goal: p99 < 100 ms",
    }
    for klass, per_type in summary(results).items():
        print(f"worst {klass} input per decoy type ({goals[klass]}):")
        for kind, w in per_type.items():
            print(f"  {kind:10s} {json.dumps(w)}")


if __name__ == "__main__":
    main()
