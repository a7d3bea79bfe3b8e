"""How long does a token join take, and how many joins per second does one decnet-enroll serve?

Starts the enrollment service in process on 127.0.0.1 (real TLS, real registry) and
runs ``decnet.worker.join.join`` against it: first one at a time (median and p90 ms
per join: key generation, TLS, CSR signing, the registry transaction, the bundle
written with fsyncs), then in batches of 10 at once (joins per second).  Also the
issue side: ``issue_token`` (a registry insert under the lock).

    .venv/bin/python bench/enroll_token.py [--rounds N]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, task

from decnet import config
from decnet.master import enroll_tokens, enrollment
from decnet.master.enroll_limits import AttemptLimiter
from decnet.master.enroll_service import EnrollService
from decnet.tls import TLSIdentity
from decnet.worker.join import join, parse_master_url


def summary(label: str, timings: list[float]) -> str:
    timings = sorted(timings)
    p90 = timings[max(0, int(len(timings) * 0.9) - 1)]
    return f"{label:<34} median {statistics.median(timings):7.2f} ms   p90 {p90:7.2f} ms"


async def run(reactor: Any, tmp: Path, rounds: int) -> None:
    paths = config.MasterPaths.resolve(tmp / "home")
    enrollment.init_master(paths)
    master = enrollment.load_master(paths)
    service = EnrollService(
        reactor,
        master=master,
        identity=TLSIdentity.master(paths),
        listen="tcp:0:interface=127.0.0.1",
        limiter=AttemptLimiter(burst=100_000, period=1.0),
    )
    service.startService()
    port = (await service.api.ready).getHost().port
    url = parse_master_url(f"https://127.0.0.1:{port}")
    issue, one = [], []
    try:
        for i in range(rounds):
            start = time.perf_counter()
            secret = enroll_tokens.issue_token(master, f"seq-{i}", "10.0.0.1", updater=True).token
            issue.append((time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            await join(reactor, url, secret, master.ca.fingerprint, tmp / "b" / f"seq-{i}")
            one.append((time.perf_counter() - start) * 1000)
        print(f"token joins against decnet-enroll on 127.0.0.1, {rounds} rounds (CA: RSA-4096)")
        print(summary("issue_token (registry insert)", issue))
        print(summary("join, one at a time (+ updater)", one))
        batches = max(1, rounds // 10)
        start = time.perf_counter()
        for b in range(batches):
            secrets = [
                enroll_tokens.issue_token(master, f"par-{b}-{i}", "10.0.0.1").token
                for i in range(10)
            ]
            await defer.gatherResults(
                [
                    defer.ensureDeferred(
                        join(reactor, url, s, master.ca.fingerprint, tmp / "b" / f"par-{b}-{i}")
                    )
                    for i, s in enumerate(secrets)
                ],
                consumeErrors=True,
            )
        elapsed = time.perf_counter() - start
        print(f"{'joins, 10 at a time':<34} {batches * 10 / elapsed:7.1f} joins/s")
    finally:
        await service.stopService()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="decnet-bench-token-"))
    try:
        task.react(lambda reactor: defer.ensureDeferred(run(reactor, tmp, args.rounds)))
    except SystemExit:
        pass
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
