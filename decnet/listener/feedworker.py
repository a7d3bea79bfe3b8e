"""The feed process: builds the JSON feeds outside the listener's process.

Turning mirror lines into JSON is CPU work.  In a thread of the listener it
held the GIL against the reactor, which then waited for the GIL after every
``SSL_read``; in its own process it competes only for a CPU, at a lower
priority than ingest.  The listener (:mod:`decnet.listener.feedproc`) starts
``python -m decnet.listener.feedworker INGEST_DIR`` and talks to it over
stdin/stdout, one JSON object per line:

* listener → feed process: ``{"worker": W, "stream": S, "end": N}``: the
  mirror of ``W/S`` is durable up to byte ``N``;
* feed process → listener: what :class:`~decnet.listener.feed.FeedBuilder`
  reports (``pos``/``lines`` after each durable step, ``warn``, ``error``).

On a machine with four CPUs or more it encodes each step's lines with a pool
of processes (one per two CPUs, up to four), so a feed that fell behind
during a burst catches up on idle cores; the step is still written and
recorded by this process alone.

End of input means "stop": the current step finishes (its position is
durable) and the process exits.  Exactly-once does not depend on this process
living or dying at any particular moment: each step makes the feed durable
before its position, and a builder left over from a killed listener holds the
stream's lock until it exits.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import select
import signal
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from decnet.listener.feed import DEFAULT_MAX_OPEN_FEEDS, FeedBuilder

# Scheduling priority of the feed process: ingest (the evidence, and what the
# forwarders wait for before their data is acknowledged) wins a contended CPU.
FEED_NICENESS = 5
# Parallel encoders per feed process (one step's pieces are spread over them).
MAX_ENCODERS = 4
_PR_SET_PDEATHSIG = 1


def encode_message(message: dict) -> bytes:
    """One pipe message (both directions)."""
    return json.dumps(message, separators=(",", ":")).encode("utf-8") + b"\n"


def decode_messages(buffer: bytearray) -> list[dict]:
    """Every complete message at the start of ``buffer`` (removed from it)."""
    end = buffer.rfind(b"\n") + 1
    if not end:
        return []
    lines = bytes(buffer[:end]).split(b"\n")[:-1]
    del buffer[:end]
    return [json.loads(line) for line in lines]


def run_pipe(
    stdin: int,
    wait: Callable[[], float | None],
    receive: Callable[[dict], object],
    step: Callable[[], object],
) -> None:
    """The loop of a pipe-driven worker process, until ``stdin`` closes.  Blocking.

    Each turn hands every complete message that arrived to ``receive``, then
    does one ``step``; ``wait()`` is how long to wait for input first (0 while
    there is work, ``None``: until input comes).
    """
    pending = bytearray()
    while True:
        readable, _, _ = select.select([stdin], [], [], wait())
        if readable:
            data = os.read(stdin, 1 << 16)
            if not data:
                return
            pending += data
            for message in decode_messages(pending):
                receive(message)
        step()


def _encoder_started(parent: int) -> None:
    """Make a pool process die with the feed process.

    A killed feed process would otherwise leave its encoders blocked on their
    queue forever (Linux ``PR_SET_PDEATHSIG``; elsewhere they are left to exit
    on their own).
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(0)


def default_encoders() -> int:
    """Encoder processes: one per two CPUs (the rest is ingest's), at most MAX_ENCODERS.

    Below two encoders there is no pool: handing pieces to other processes
    costs more than it gains when there is no idle core to run them.
    """
    return max(1, min(MAX_ENCODERS, (os.cpu_count() or 1) // 2))


def serve(
    directory: Path,
    stdin: int = 0,
    stdout: int = 1,
    encoders: int = 1,
    max_open: int = DEFAULT_MAX_OPEN_FEEDS,
    index: bool = True,
) -> None:
    """Build feeds as targets arrive on ``stdin`` until it closes.  Blocking.

    With ``encoders`` > 1 the lines of each step are encoded by that many
    processes in parallel (the step is still written, fsynced and recorded
    as one, in order, by this process).  At most ``max_open`` feeds keep
    their files open (least recently used closed first).  With ``index``,
    an index process (:mod:`decnet.events.indexer`) is told every durable
    feed length and keeps ``events.sqlite`` up to them.
    """
    from decnet.events.indexer import IndexChild  # (it imports this module)

    indexer = IndexChild(directory) if index else None
    if indexer is not None:
        indexer.start()

    def report(message: dict) -> None:
        os.write(stdout, encode_message(message))
        if indexer is not None and "pos" in message:
            length = builder.feed_length(message["worker"], message["stream"])
            if length is not None:
                indexer.tell(message["worker"], message["stream"], length)

    pool = (
        ProcessPoolExecutor(encoders, initializer=_encoder_started, initargs=(os.getpid(),))
        if encoders > 1
        else None
    )
    builder = FeedBuilder(directory, report, pool=pool, max_open=max_open)
    try:
        run_pipe(
            stdin,
            lambda: 0.0 if builder.has_work() else builder.retry_delay(),
            lambda m: builder.target(m["worker"], m["stream"], int(m["end"])),
            builder.step,
        )
    finally:
        builder.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        if indexer is not None:
            indexer.close()


def lower_priority(niceness: int) -> None:
    """Set up a pipe-driven worker process: ``nice`` it, and ignore Ctrl-C.

    Its life is its parent's: it stops when its stdin closes, not on a Ctrl-C
    meant for the listener's terminal (which reaches the whole process group).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        os.nice(niceness)
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m decnet.listener.feedworker")
    parser.add_argument("ingest_dir", type=Path)
    parser.add_argument("--encoders", type=int, default=default_encoders())
    parser.add_argument("--max-open", type=int, default=DEFAULT_MAX_OPEN_FEEDS)
    parser.add_argument("--no-index", action="store_true", help="do not keep events.sqlite")
    args = parser.parse_args(argv)
    lower_priority(FEED_NICENESS)
    try:
        serve(
            args.ingest_dir,
            encoders=args.encoders,
            max_open=max(1, args.max_open),
            index=not args.no_index,
        )
    except BrokenPipeError:
        pass  # the listener is gone; every finished step is durable
    return 0


if __name__ == "__main__":
    sys.exit(main())
