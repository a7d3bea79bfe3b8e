"""The index process: keeps ``<ingest>/events.sqlite`` up to the durable feeds.

The feed process (:mod:`decnet.listener.feedworker`) starts
``python -m decnet.events.indexer INGEST_DIR`` and, after every durable feed
step, writes one JSON line on its stdin: ``{"worker": W, "stream": S, "feed":
N}``, the feed of ``W/S`` is durable up to byte ``N``.  On start-up the index
process also reads every stream's durable feed length from disk, so a new
index process (or a deleted index, rebuilt from byte 0) catches up without
being told.  Indexing runs beside the feed, in its own process, scheduled
``SCHED_IDLE`` (:func:`run_when_idle`): it takes only CPU time nothing else
wants, never the feed's.

End of input means "stop": the current transaction finishes and the process
exits.  Errors go to stderr, which the feed process shares with the listener
(its log).  See :mod:`decnet.events.index` for why every feed line becomes
exactly one row whatever is killed.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from decnet import process
from decnet.errors import EventIndexError
from decnet.events.index import EventIndex, durable_feeds, index_path
from decnet.listener import storage
from decnet.listener.feedworker import encode_message, lower_priority, run_pipe

# Scheduling priority below its feed process's (which is below ingest), where
# SCHED_IDLE is not available: on a saturated machine the feed wins.
INDEX_NICENESS = 5
# How long indexing pauses after the index could not be written (a full disk).
WRITE_RETRY = 5.0
# A dead index process is started again after 0.5 s, doubling up to 30 s.
RESTART = process.RestartPolicy(first=0.5, maximum=30.0)
# How long a stopping feed process waits for its index process to finish a transaction.
STOP_GRACE = 10.0


def _say(text: str) -> None:
    sys.stderr.write("index: " + text + "\n")
    sys.stderr.flush()


class Indexer:
    """The indexing loop of the index process (blocking).  Round robin over streams."""

    def __init__(
        self,
        directory: Path,
        index: EventIndex | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.directory = Path(directory)
        self.index = index or EventIndex(index_path(self.directory))
        self.clock = clock
        self.targets: dict[tuple[str, str], int] = {}
        self.done = {key: pos for key, (pos, _rows) in self.index.positions().items()}
        self.stopped: set[tuple[str, str]] = set()
        # While the index cannot be written (a full disk), nothing is tried before this.
        self.paused_until = 0.0
        self._turn = 0

    def scan(self) -> None:
        """Every stream's durable feed length, from disk."""
        for worker, stream, length in durable_feeds(self.directory):
            self.target(worker, stream, length)

    def target(self, worker: str, stream: str, feed_len: int) -> None:
        key = (worker, stream)
        if feed_len > self.targets.get(key, -1):
            self.targets[key] = feed_len

    def behind(self) -> list[tuple[str, str]]:
        if self.clock() < self.paused_until:
            return []
        return [
            key
            for key, end in self.targets.items()
            if key not in self.stopped and self.done.get(key, 0) < end
        ]

    def step(self) -> int:
        """One transaction for one stream that is behind; the rows it added (-1: none behind)."""
        behind = self.behind()
        if not behind:
            return -1
        self._turn = (self._turn + 1) % len(behind)
        worker, stream = key = behind[self._turn]
        feed = storage.StreamFiles(self.directory / worker, stream).feed_path
        try:
            rows = self.index.index_feed(worker, stream, feed, self.targets[key])
        except (EventIndexError, OSError) as exc:
            self.stopped.add(key)
            _say(f"{worker}/{stream} is no longer indexed: {exc}")
            return 0
        except sqlite3.OperationalError as exc:
            # A full disk, an index locked for too long: nothing was written
            # (the transaction rolled back); the same lines are tried again.
            self.paused_until = self.clock() + WRITE_RETRY
            _say(f"cannot write {self.index.path} ({exc}); trying again in {WRITE_RETRY:g} s")
            return 0
        position = self.index.position(worker, stream)
        if rows == 0 and position == self.done.get(key, 0):
            # The feed is shorter than the index says (being rebuilt): wait to be told.
            self.targets[key] = position
        self.done[key] = position
        return rows

    def wait(self) -> float | None:
        """How long the loop may wait for input: 0 with work, until a pause ends, or forever."""
        if self.behind():
            return 0.0
        return max(0.0, self.paused_until - self.clock()) if self.paused_until else None

    def close(self) -> None:
        self.index.close()


def serve(directory: Path, stdin: int = 0) -> None:
    """Index as feeds grow, until ``stdin`` closes.  Blocking."""
    indexer = Indexer(directory)
    indexer.scan()
    try:
        run_pipe(
            stdin,
            indexer.wait,
            lambda m: indexer.target(m["worker"], m["stream"], int(m["feed"])),
            indexer.step,
        )
    finally:
        indexer.close()


class IndexChild:
    """The index process as its feed process sees it: told feed lengths, restarted if it dies.

    Blocking (the feed process is not a reactor).  ``clock`` is monotonic seconds.
    """

    def __init__(
        self,
        directory: Path,
        *,
        executable: str = sys.executable,
        clock: Callable[[], float] = time.monotonic,
        stderr: IO[bytes] | int | None = None,
    ):
        self.argv = [executable, "-m", "decnet.events.indexer", str(directory)]
        self.clock = clock
        self.stderr = stderr
        self.proc: subprocess.Popen[bytes] | None = None
        self.lengths: dict[tuple[str, str], int] = {}
        self.unsent: set[tuple[str, str]] = set()
        self.restart_at = 0.0
        self.failures = 0

    def start(self) -> None:
        """Start it now (it catches up with every feed on disk without being told)."""
        self._running()

    def tell(self, worker: str, stream: str, feed_len: int) -> None:
        """The feed of ``worker/stream`` is durable up to ``feed_len``.

        Never blocks: the pipe is non-blocking, and what does not fit now is
        sent with a later call (only the latest length of each stream counts).
        """
        self.lengths[(worker, stream)] = feed_len
        self.unsent.add((worker, stream))
        proc = self._running()
        if proc is None or proc.stdin is None:
            return
        fd = proc.stdin.fileno()
        for key in list(self.unsent):
            message = {"worker": key[0], "stream": key[1], "feed": self.lengths[key]}
            try:
                os.write(fd, encode_message(message))  # < PIPE_BUF: all or nothing
            except BlockingIOError:
                return
            except BrokenPipeError:
                proc.wait()  # it died; the next call restarts it (it rescans the feeds)
                return
            self.unsent.discard(key)

    def _running(self) -> subprocess.Popen[bytes] | None:
        if self.proc is not None and self.proc.poll() is None:
            return self.proc
        if self.proc is not None:
            _say(f"index process exited ({self.proc.returncode}); restarting it")
            self.proc = None
            self.failures += 1
            self.restart_at = self.clock() + RESTART.delay(self.failures)
        if self.clock() < self.restart_at:
            return None
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=self.stderr,
                env=process.child_env(same_python=True),
                close_fds=True,
            )
        except OSError as exc:
            _say(f"cannot start the index process: {exc}")
            self.failures += 1
            self.restart_at = self.clock() + RESTART.delay(self.failures)
            return None
        if self.proc.stdin is not None:
            os.set_blocking(self.proc.stdin.fileno(), False)
        # A new process reads every durable length from disk: nothing is owed to it.
        self.unsent.clear()
        return self.proc

    def close(self) -> None:
        """Close its input and wait for it to finish its transaction (killed after a grace)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            try:
                proc.stdin.close()
            except BrokenPipeError:
                pass
        try:
            proc.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_when_idle() -> bool:
    """Schedule this process ``SCHED_IDLE`` (Linux): it runs only on a CPU nothing else wants.

    Indexing costs several times the CPU of building the feed (JSON parsing
    and B-tree updates per row).  Merely ``nice``d it still took a quarter of
    a CPU it shared with the feed process, and slowed the feed by a third on
    two busy CPUs; idle-scheduled it only uses what is left, so the feed (the
    durable copy) is never slowed for a derived index.  Under saturation the
    index, and ``--follow``, lag and catch up when the burst is over.  Whether
    it could (elsewhere it stays merely ``nice``d).
    """
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (OSError, AttributeError):
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m decnet.events.indexer")
    parser.add_argument("ingest_dir", type=Path)
    args = parser.parse_args(argv)
    lower_priority(INDEX_NICENESS)
    run_when_idle()
    try:
        serve(args.ingest_dir)
    except EventIndexError as exc:
        _say(str(exc))
        return 1
    except sqlite3.DatabaseError as exc:  # not a database at all (a file overwritten by hand)
        _say(f"{index_path(args.ingest_dir)} is not a usable index ({exc}): delete it to rebuild")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
