"""How long does a remote update take?

Starts real ``twistd decnet-updater`` processes on loopback (each supervising its
agent with ``--agent-control spawn``), builds releases of this repository with an
offline wheelhouse, and times ``decnet-admin update`` end to end (build, push,
install into a fresh venv, restart, health confirmation):

1. one release on 1 updater (a fresh one, then a second release on it);
2. the same release on 10 local updaters with ``--all`` (goal, issue #5: under
   2x the single-host time);
3. a bad release (its agent crashes at start) on 1 updater: seconds from the
   push to the answer "rolled back, previous release healthy";
   and a bad release whose agent never reports the new release (rollback after
   ``--health-timeout``).

All ten updaters share this machine's cores, so (2) measures how pip installs
contend for CPU here, not what a fleet of separate machines would see.

    .venv/bin/python bench/update.py [--hosts 10] [--no-compile] [--health-timeout 10]
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from decnet import config  # noqa: E402
from decnet.master import enrollment  # noqa: E402
from tests.support import (  # noqa: E402
    LocalUpdater,
    admin,
    copy_release_tree,
    ensure_wheelhouse,
    wait_for,
)


def timed_update(paths, *args, root, wheelhouse) -> tuple[float, str]:
    start = time.monotonic()
    result = admin(
        paths, "update", *args, "--root", str(root), "--wheelhouse", str(wheelhouse), timeout=900
    )
    return time.monotonic() - start, result.stdout + result.stderr


def results(out: str) -> list[str]:
    return re.findall(r"^\S+ {2,}(updated|rolled_back|failed|skipped) {2,}", out, re.MULTILINE)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true", help="updaters skip byte-compiling")
    parser.add_argument("--health-timeout", type=float, default=10.0)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()

    print("building the wheelhouse (cached) ...", flush=True)
    wheelhouse = ensure_wheelhouse()
    work = Path(tempfile.mkdtemp(prefix="decnet-bench-update-"))
    trees = {
        name: copy_release_tree(work / "trees" / name) for name in ("one", "two", "crash", "wrong")
    }
    with open(trees["two"] / "decnet" / "__init__.py", "a") as fh:
        fh.write("# bench release two\n")
    with open(trees["crash"] / "decnet" / "agent" / "tap.py", "a") as fh:
        fh.write('\nraise SystemExit("broken on purpose")\n')
    with open(trees["wrong"] / "decnet" / "release.py", "a") as fh:
        fh.write('\n\ndef release_id():\n    return "not-this-release"\n')

    def master(name):
        paths = config.MasterPaths.resolve(work / name)
        enrollment.init_master(paths)
        return paths

    kw = {"health_timeout": args.health_timeout, "compile": not args.no_compile}
    figures = {}
    started = []
    try:
        # 1. One updater.
        single = master("single")
        u = LocalUpdater(work / "single-hosts", single, "solo", **kw).start()
        started.append(u)
        seconds, out = timed_update(single, "--all", root=trees["one"], wheelhouse=wheelhouse)
        assert results(out) == ["updated"], out + u.tail()
        figures["1 updater, first release"] = seconds
        seconds, out = timed_update(single, "--all", root=trees["two"], wheelhouse=wheelhouse)
        assert results(out) == ["updated"], out
        figures["1 updater, next release"] = seconds

        # 3. Bad pushes on the same updater.
        seconds, out = timed_update(single, "--all", root=trees["crash"], wheelhouse=wheelhouse)
        assert results(out) == ["rolled_back"], out
        wait_for(lambda: u.agent_release() == u.current(), 30, what="healthy previous release")
        figures["bad push (agent crashes) -> healthy rollback"] = seconds
        seconds, out = timed_update(single, "--all", root=trees["wrong"], wheelhouse=wheelhouse)
        assert results(out) == ["rolled_back"], out
        figures[
            f"bad push (never healthy, --health-timeout {args.health_timeout:g}) -> rollback"
        ] = seconds
        # Re-activating an installed release: upload, verify, switch, restart, probe; no pip.
        seconds, out = timed_update(single, "--all", root=trees["one"], wheelhouse=wheelhouse)
        assert results(out) == ["updated"], out
        figures["1 updater, re-activate an installed release (no pip)"] = seconds

        u.stop()  # its CPU must not count in the fleet's
        started.remove(u)

        # 2. N updaters with --all.
        fleet_home = master("fleet")
        fleet = [
            LocalUpdater(work / "fleet-hosts", fleet_home, f"node-{i:02d}", **kw)
            for i in range(args.hosts)
        ]
        for node in fleet:
            started.append(node.start(wait=False))
        for node in fleet:
            wait_for(node.ready, 60, what=f"{node.name} ready")
        fan_out = ("--all", "--concurrency", str(args.hosts))
        cpu_before = children_cpu()
        for tree, label in (("one", "first release"), ("two", "next release")):
            seconds, out = timed_update(
                fleet_home, *fan_out, root=trees[tree], wheelhouse=wheelhouse
            )
            assert results(out) == ["updated"] * args.hosts, out
            figures[f"{args.hosts} updaters, --all, {label}"] = seconds
        seconds, out = timed_update(fleet_home, *fan_out, root=trees["one"], wheelhouse=wheelhouse)
        assert results(out) == ["updated"] * args.hosts, out
        figures[f"{args.hosts} updaters, --all, re-activate (no pip)"] = seconds
    finally:
        for node in started:
            node.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    # Every updater has exited and been waited for: their CPU (and their pip's) is ours now.
    fleet_cpu = children_cpu() - cpu_before

    print()
    print(f"decnet-admin update, end to end (compile={not args.no_compile}):")
    width = max(len(k) for k in figures)
    for name, seconds in figures.items():
        print(f"  {name.ljust(width)}  {seconds:6.1f} s")
    one = figures["1 updater, first release"]
    many = figures[f"{args.hosts} updaters, --all, first release"]
    verdict = "meets" if many < 2 * one else "misses"
    print(f"  {args.hosts} hosts / 1 host = {many / one:.2f}x ({verdict} the < 2x goal)")
    again_one = figures["1 updater, re-activate an installed release (no pip)"]
    again_many = figures[f"{args.hosts} updaters, --all, re-activate (no pip)"]
    print(f"  without pip (re-activation): {again_many / again_one:.2f}x")
    cores = os.cpu_count() or 1
    print(
        f"  the fleet phase used {fleet_cpu:.0f} CPU-seconds on {cores} cores "
        f"(>= {fleet_cpu / cores:.0f} s of wall time however the work is scheduled): "
        "ten local updaters compete for the same cores, unlike ten machines"
    )
    return 0


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    sys.exit(main())
