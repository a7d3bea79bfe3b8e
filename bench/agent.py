"""Agent figures: decoy connections per second (with event lines written) and /status latency.

    .venv/bin/python bench/agent.py [--seconds 5] [--clients 8] [--requests 300]

1. One ``tcp-banner`` decoy runs in its own process (reactor + event log
   writer thread); client threads in this process connect, read the banner
   and close, as fast as they can.  Reported: connections/s the decoy
   accepted, and a check that every connection produced its ``connect`` and
   ``disconnect`` lines in the log.
2. An in-process agent with 20 deckies (telnet + http each, 40 listeners) is
   asked ``GET /status`` through :class:`AgentClient` (mTLS, pinned); reported:
   p50/p99 latency, with a fresh TLS connection per request (the default) and
   with a persistent connection.

Numbers, not assertions: tests never depend on timing.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


# -- 1. decoy throughput --------------------------------------------------------


def serve_decoy(workdir: Path) -> None:
    """Child process: one tcp-banner decoy with its event log; stats on SIGTERM."""
    from twisted.internet import defer, reactor

    from decnet.agent.engine import BuiltinEngine
    from decnet.agent.eventlog import EventLog
    from decnet.agent.spec import parse_spec

    log = EventLog(workdir / "decnet.log", reactor)
    log.startService()
    engine = BuiltinEngine(reactor, log.emit, workdir / "state")
    spec = parse_spec(
        {
            "deckies": [
                {
                    "name": "bench",
                    "services": [
                        {
                            "type": "tcp-banner",
                            "bind": "127.0.0.1",
                            "port": 0,
                            "banner": "220 ready\r\n",
                            "max_connections": 10000,
                        }
                    ],
                }
            ]
        }
    )

    async def start():
        await engine.apply(spec)
        address = engine.status()["bench"]["tcp-banner"]["address"]
        print(address.rsplit(":", 1)[1], flush=True)

    async def stop():
        runtime = engine.services[("bench", "tcp-banner")].runtime
        connections = runtime.connections
        await engine.stop()
        await log.stopService()
        stats = {"connections": connections, "lines": log.written_lines, "dropped": log.dropped}
        print(json.dumps(stats), flush=True)

    reactor.callWhenRunning(lambda: defer.ensureDeferred(start()))
    reactor.addSystemEventTrigger("before", "shutdown", lambda: defer.ensureDeferred(stop()))
    reactor.run()


def bench_decoy(seconds: float, clients: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve-decoy", tmp],
            stdout=subprocess.PIPE,
            text=True,
        )
        port = int(server.stdout.readline())
        counts = [0] * clients
        errors = [0] * clients
        deadline = time.monotonic() + seconds

        def client(i: int) -> None:
            while time.monotonic() < deadline:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                        s.recv(64)
                    counts[i] += 1
                except OSError:
                    errors[i] += 1

        started = time.monotonic()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
        server.send_signal(signal.SIGTERM)
        stats = json.loads(server.stdout.readline())
        server.wait(timeout=30)
        log_lines = len((Path(tmp) / "decnet.log").read_bytes().splitlines())
    return {
        "seconds": round(elapsed, 2),
        "client_threads": clients,
        "connections": stats["connections"],
        "client_errors": sum(errors),
        "connections_per_s": round(stats["connections"] / elapsed),
        "log_lines": log_lines,
        "lines_expected": 2 * stats["connections"],
        "dropped": stats["dropped"],
    }


# -- 2. /status latency -------------------------------------------------------


def bench_status(requests: int) -> dict:
    import attrs
    from twisted.internet import defer
    from twisted.internet.task import react

    from decnet import config, pki
    from decnet.agent.service import AgentService
    from decnet.master import enrollment
    from decnet.master.agent_client import AgentClient
    from decnet.tls import TLSIdentity

    results = {}

    async def main(reactor):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            paths = config.MasterPaths.resolve(tmp / "home")
            enrollment.init_master(paths)
            master = enrollment.load_master(paths)
            enrolled = enrollment.enroll(master, "bench-w1", "127.0.0.1", tmp / "bundle")
            bundle = pki.WorkerBundle.load(enrolled.bundle_dir)
            service = AgentService(
                reactor,
                bundle=bundle,
                identity=TLSIdentity.from_bundle(bundle, "worker"),
                listen="tcp:0:interface=127.0.0.1",
                state_dir=tmp / "state",
                log_file=tmp / "decnet.log",
            )
            service.startService()
            port = await service.api.ready
            await service.restored
            host = attrs.evolve(enrolled.host, agent_port=port.getHost().port)
            identity = TLSIdentity.master(paths)
            spec = {
                "deckies": [
                    {
                        "name": f"decky-{i:02d}",
                        "services": [
                            {"type": "telnet", "bind": "127.0.0.1", "port": 0},
                            {"type": "http", "bind": "127.0.0.1", "port": 0},
                        ],
                    }
                    for i in range(20)
                ]
            }
            deploy_client = AgentClient(reactor, identity, host)
            t0 = time.perf_counter()
            deployed = await deploy_client.deploy(spec)
            results["deploy_20_deckies_s"] = round(time.perf_counter() - t0, 3)
            assert deployed["ok"], deployed["failed"]
            for label, persistent in (("fresh_tls_per_request", False), ("persistent", True)):
                client = AgentClient(reactor, identity, host, persistent=persistent)
                await client.status()  # warm-up
                samples = []
                for _ in range(requests):
                    t0 = time.perf_counter()
                    doc = await client.status()
                    samples.append((time.perf_counter() - t0) * 1000)
                assert doc["summary"]["listening"] == 40
                await client.close()
                samples.sort()
                results[label] = {
                    "requests": requests,
                    "p50_ms": round(statistics.median(samples), 2),
                    "p99_ms": round(samples[int(len(samples) * 0.99) - 1], 2),
                    "max_ms": round(samples[-1], 2),
                }
            results["status_body_bytes"] = len(json.dumps(doc))
            await service.stopService()

    def run(reactor):
        return defer.ensureDeferred(main(reactor))

    try:
        react(run)
    except SystemExit as exc:
        if exc.code:
            raise
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--serve-decoy", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_decoy:
        serve_decoy(Path(args.serve_decoy))
        return
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    decoy = bench_decoy(args.seconds, args.clients)
    print("decoy (tcp-banner, one service, event lines written):")
    print(json.dumps(decoy, indent=2))
    status = bench_status(args.requests)
    print("GET /status through AgentClient, 20 deckies / 40 services:")
    print(json.dumps(status, indent=2))


if __name__ == "__main__":
    main()
