"""Scrape cost benchmark: prints figures, asserts nothing about time.

    .venv/bin/python bench/metrics.py [--workers 10,1000,10000] [--repeat 20]

A listener's registry with N workers (each with ingested lines and bytes, an
open connection, a feed position): how long one scrape holds the reactor
(copying the counts: ``DaemonMetrics.sample()``) and how long building the
families and the text encoding take (``encode``, run in the thread pool by
decnet.metrics), and how large the answer is.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from twisted.internet.task import Clock  # noqa: E402

from decnet.listener.feedproc import InlineFeeds  # noqa: E402
from decnet.listener.ingest import Committed, Ingest  # noqa: E402
from decnet.listener.metrics import ListenerMetrics  # noqa: E402
from decnet.listener.protocol import ListenerFactory  # noqa: E402
from decnet.metrics import daemon_registry, encode  # noqa: E402
from decnet.threads import inline_runner  # noqa: E402


def registry_with(workers: int, directory: Path):
    clock = Clock()
    ingest = Ingest(directory, clock, inline_runner, feeds=InlineFeeds(directory))
    factory = ListenerFactory(ingest, clock)
    metrics = ListenerMetrics(factory, ingest, clock)
    for i in range(workers):
        name = f"worker-{i:05d}"
        metrics.committed(Committed(name, "decnet", 1000 + i, 250_000 + i, 0.004))
        factory.by_worker[name] = {object()}  # type: ignore[arg-type]
    registry = daemon_registry("listener", None)
    registry.registry.register(metrics.commit_seconds)
    registry.add(metrics)
    return registry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="10,1000,10000")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    header = ("workers", "sample p50 (reactor)", "build+encode p50 (thread)", "bytes")
    print(f"{header[0]:>8} {header[1]:>22} {header[2]:>26} {header[3]:>10}")
    for workers in (int(n) for n in args.workers.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            registry = registry_with(workers, Path(tmp))
            sampling, encoding = [], []
            size = 0
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                build = registry.sample()  # on the reactor
                t1 = time.perf_counter()
                body = encode(build)  # in the thread pool
                t2 = time.perf_counter()
                sampling.append(t1 - t0)
                encoding.append(t2 - t1)
                size = len(body)
            print(
                f"{workers:>8} {statistics.median(sampling) * 1000:>19.2f} ms "
                f"{statistics.median(encoding) * 1000:>23.2f} ms {size:>10}"
            )


if __name__ == "__main__":
    main()
