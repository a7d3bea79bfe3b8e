"""How long does enrolling one worker take?

Prints the median (and p90) milliseconds of ``decnet.master.enrollment.enroll``
(load the CA and master state, issue the certificate(s), insert the registry
row, write the bundle atomically with fsyncs), with and without ``--updater``,
for the default key type and the RSA options.  Also prints the wall time of the
``decnet-admin enroll`` console script once, which adds interpreter start-up.

Goal (issue #2): under 50 ms per worker with the default key type on a 2-core box.

    .venv/bin/python bench/enroll.py [--rounds N]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from decnet import config
from decnet.master import enrollment


def measure(home: config.MasterPaths, out_root: Path, rounds: int, **kw) -> list[float]:
    timings = []
    tag = "u" if kw.get("updater") else "w"
    key = kw.get("key_type", "ec")
    for i in range(rounds):
        name = f"bench-{tag}-{key[:5].replace('-', '')}-{i}"
        start = time.perf_counter()
        master = enrollment.load_master(home)
        enrollment.enroll(master, name, "10.0.0.1", out_root / name, **kw)
        timings.append((time.perf_counter() - start) * 1000)
    return timings


def summary(label: str, timings: list[float]) -> str:
    timings = sorted(timings)
    p90 = timings[int(len(timings) * 0.9) - 1]
    return f"{label:<34} median {statistics.median(timings):7.2f} ms   p90 {p90:7.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="decnet-bench-enroll-"))
    try:
        home = config.MasterPaths.resolve(tmp / "home")
        enrollment.init_master(home)
        out = tmp / "bundles"
        print(f"enroll one worker, {args.rounds} rounds each (CA: RSA-4096)")
        for key_type in ("ec-p256", "rsa-2048", "rsa-3072"):
            rounds = args.rounds if key_type == "ec-p256" else max(5, args.rounds // 5)
            for updater in (False, True):
                timings = measure(home, out, rounds, updater=updater, key_type=key_type)
                label = f"{key_type}{' + updater' if updater else ''}"
                print(summary(label, timings))
        admin = Path(sys.executable).parent / "decnet-admin"
        start = time.perf_counter()
        command = [str(admin), "--home", str(home.home), "enroll", "cli-one"]
        subprocess.run(
            [*command, "--address", "10.0.0.2", "--updater", "--out", str(out / "cli-one")],
            check=True,
            capture_output=True,
        )
        cli_ms = (time.perf_counter() - start) * 1000
        print(
            f"{'decnet-admin enroll --updater (CLI)':<34} wall   {cli_ms:7.2f} ms (incl. start-up)"
        )
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
