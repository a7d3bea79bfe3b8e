"""Child processes through ``reactor.spawnProcess``: bounded output, a deadline on the clock.

Installs (``python -m venv``, ``pip``) and ``systemctl`` run here, never through
``subprocess`` on the reactor thread.  Only the tail of the output is kept
(:class:`OutputTail`), so a chatty pip cannot grow the updater's memory.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping, Sequence

import attrs
from twisted.internet import defer, error, protocol
from twisted.logger import Logger

from decnet import config


class OutputTail:
    """The last ``limit`` bytes written to it (stdout and stderr interleaved)."""

    def __init__(self, limit: int = config.OUTPUT_TAIL_BYTES):
        self.limit = limit
        self._chunks: list[bytes] = []
        self._size = 0
        self.dropped = 0

    def write(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        while self._size > self.limit and len(self._chunks) > 1:
            first = self._chunks.pop(0)
            self._size -= len(first)
            self.dropped += len(first)
        if self._size > self.limit:
            (only,) = self._chunks
            cut = len(only) - self.limit
            self._chunks = [only[cut:]]
            self._size = self.limit
            self.dropped += cut

    def clear(self) -> None:
        self._chunks = []
        self._size = 0
        self.dropped = 0

    def text(self) -> str:
        body = b"".join(self._chunks).decode("utf-8", "replace")
        return f"[... {self.dropped} bytes dropped ...]\n{body}" if self.dropped else body


@attrs.frozen
class ProcessResult:
    argv: tuple[str, ...]
    exit_code: int | None
    signal: int | None
    output: str
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    def describe(self) -> str:
        if self.timed_out:
            return "timed out"
        if self.signal is not None:
            return f"killed by signal {self.signal}"
        return f"exit code {self.exit_code}"


class _Collect(protocol.ProcessProtocol):
    def __init__(self, tail: OutputTail, done: defer.Deferred):
        self.tail = tail
        self.done = done

    def outReceived(self, data: bytes) -> None:
        self.tail.write(data)

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        value = reason.value
        code = getattr(value, "exitCode", None)
        sig = getattr(value, "signal", None)
        if isinstance(value, error.ProcessDone):
            code, sig = 0, None
        self.done.callback((code, sig))


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Our environment without the variables that would leak our venv into a child's."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "__PYVENV_LAUNCHER__")
    }
    env.update(extra or {})
    return env


async def run_process(
    reactor,
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    path: str | None = None,
    timeout: float | None = None,
    tail_bytes: int = config.OUTPUT_TAIL_BYTES,
) -> ProcessResult:
    """Run ``argv`` to completion (SIGKILL after ``timeout`` seconds on the reactor's clock)."""
    argv = [os.fspath(a) for a in argv]
    tail = OutputTail(tail_bytes)
    done: defer.Deferred = defer.Deferred()
    proto = _Collect(tail, done)
    transport = reactor.spawnProcess(
        proto, argv[0], argv, env=dict(env if env is not None else child_env()), path=path
    )
    timed_out = False
    timer = None
    if timeout is not None:

        def expire():
            nonlocal timed_out
            timed_out = True
            Logger(namespace="decnet.updater.process").warn(
                "{argv} ran over {timeout}s; killing it", argv=argv[0], timeout=timeout
            )
            try:
                transport.signalProcess(signal.SIGKILL)
            except error.ProcessExitedAlready:
                pass

        timer = reactor.callLater(timeout, expire)
    try:
        code, sig = await done
    finally:
        if timer is not None and timer.active():
            timer.cancel()
    return ProcessResult(tuple(argv), code, sig, tail.text(), timed_out)
