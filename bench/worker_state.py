"""What the listener's per-worker state file costs, per write, for a fleet of N workers.

    python bench/worker_state.py [N ...]

For each N (default 100 1000 5000): N workers with 8 streams each, all known;
then a write after 10 and after 100 workers changed.  "reactor" is the copy
taken on the reactor thread (decnet.listener.workers.WorkerStates.snapshot),
"pool" the JSON made in the thread pool (StateWriter.encode, without the fsync).
The file is written at most once a second whatever the load.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from decnet.listener.workers import StateWriter, WorkerStates

STREAMS = 8


def fleet(n: int) -> WorkerStates:
    states = WorkerStates()
    for w in range(n):
        name = f"worker-{w:05d}"
        states.connected(name, 1.0)
        for k in range(STREAMS):
            states.stream(name, f"stream{k}", "ack", 1000)
            states.committed(name, f"stream{k}", 2000, 10, 1000, 2.0)
            states.status(name, f"stream{k}", 5000, 2000, 3.0)
        states.error(name, "x" * 300, 4.0)
    return states


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, (time.perf_counter() - start) * 1000


def main(sizes: list[int]) -> None:
    for n in sizes:
        states, writer = fleet(n), StateWriter(Path("/dev/null"))
        snap, first_reactor = timed(states.snapshot)
        data, first_pool = timed(writer.encode, snap, 5.0)
        print(
            f"{n:>6} workers x {STREAMS} streams: first write reactor {first_reactor:7.2f} ms, "
            f"pool {first_pool:7.1f} ms, file {len(data) // 1024} KiB"
        )
        for changed in (10, 100):
            for w in range(changed):
                states.committed(f"worker-{w:05d}", "stream0", 3000, 1, 1, 6.0)
            snap, reactor_ms = timed(states.snapshot)
            _, pool_ms = timed(writer.encode, snap, 6.0)
            print(
                f"{'':>6}   {changed:>3} changed: reactor {reactor_ms:7.2f} ms, "
                f"pool {pool_ms:7.1f} ms"
            )


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [100, 1000, 5000])
