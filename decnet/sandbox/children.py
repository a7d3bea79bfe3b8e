"""The child processes of ``sandbox up``: the real ``twistd`` daemons, by PID only.

Each child is started with ``reactor.spawnProcess`` through a two-line
launcher that puts it in a **process group of its own** before it execs
``twistd``: a Ctrl-C in the terminal then reaches only ``up``, which stops its
children in order (SIGTERM, a grace period on the clock, SIGKILL), instead of
every daemon reacting to the same SIGINT at once.  ``up`` records each child's
PID and start time (:mod:`decnet.sandbox.state`) so that ``sandbox down`` can
stop them from another terminal even when ``up`` itself was ``kill -9``-ed.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from twisted.internet import defer, error, protocol
from twisted.logger import Logger

from decnet import config
from decnet.sandbox.state import ProcessRecord, start_time
from decnet.updater.process import OutputTail

# "2026-01-02T03:04:05+0000 [namespace#level] " in front of each twistd log line.
LOG_PREFIX = re.compile(r"^\S+ \[[^\]]*\] ")

# setpgrp, then become the daemon: same PID, so the recorded PID is twistd's.
LAUNCHER = "import os, sys; os.setpgrp(); os.execv(sys.argv[1], sys.argv[1:])"


def describe_end(reason) -> str:
    value = reason.value
    if isinstance(value, error.ProcessDone):
        return "exited with code 0"
    if getattr(value, "signal", None) is not None:
        return f"was killed by signal {value.signal}"
    return f"exited with code {getattr(value, 'exitCode', '?')}"


class Child(protocol.ProcessProtocol):
    """One daemon we started: its output tail, and a Deferred that fires when it ends."""

    def __init__(self, name: str, argv: list[str], log: Path):
        self.name = name
        self.argv = argv
        self.log = log
        self.output = OutputTail()
        self.ended: defer.Deferred = defer.Deferred()
        self.how: str | None = None
        self.transport = None
        self.record: ProcessRecord | None = None

    @property
    def running(self) -> bool:
        return self.how is None

    def outReceived(self, data: bytes) -> None:
        self.output.write(data)

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        self.how = describe_end(reason)
        self.ended.callback(self.how)

    def signal(self, sig: int) -> None:
        if self.transport is None or not self.running:
            return
        try:
            self.transport.signalProcess(sig)
        except (error.ProcessExitedAlready, OSError):
            pass

    def last_words(self) -> str:
        """The last line of its log (usually the error that ended it), without the prefix."""
        for line in reversed(self.tail(4000).splitlines()):
            text = LOG_PREFIX.sub("", line).strip()
            if text:
                return text
        return "(nothing in its log)"

    def tail(self, size: int = 2000) -> str:
        """The last lines of its log file and output, to explain why it died."""
        text = ""
        try:
            with open(self.log, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - size))
                text = fh.read().decode("utf-8", "replace")
        except OSError:
            pass
        return (text + self.output.text())[-size:]


class Children:
    """Starts children in their own process groups, and stops them all on request."""

    log = Logger()

    def __init__(
        self,
        reactor,
        *,
        env: dict[str, str] | None = None,
        grace: float = config.SANDBOX_STOP_GRACE,
        on_exit: Callable[[Child], None] = lambda child: None,
    ):
        self.reactor = reactor
        self.env = dict(env if env is not None else child_env())
        self.grace = grace
        self.on_exit = on_exit
        self.children: dict[str, Child] = {}
        self.stopping = False

    def spawn(self, name: str, argv: list[str], log: Path, *, cwd: Path | None = None) -> Child:
        child = Child(name, argv, log)
        full = [sys.executable, "-c", LAUNCHER, *argv]
        transport = self.reactor.spawnProcess(
            child, full[0], full, env=self.env, path=str(cwd) if cwd else None
        )
        child.transport = transport
        pid = transport.pid
        child.record = ProcessRecord(pid, start_time(pid), tuple(argv), str(log))
        self.children[name] = child
        self.log.info("Started {name} (pid {pid})", name=name, pid=pid)
        child.ended.addCallback(self._ended, child)
        return child

    def _ended(self, how: str, child: Child) -> str:
        self.log.info("{name} {how}", name=child.name, how=how)
        if not self.stopping:
            self.on_exit(child)
        return how

    def records(self) -> dict[str, ProcessRecord]:
        return {n: c.record for n, c in self.children.items() if c.running and c.record}

    async def stop(self, names: list[str] | None = None) -> None:
        """SIGTERM the named children (default: all), SIGKILL any still alive after the grace."""
        chosen = [self.children[n] for n in (names or list(self.children)) if n in self.children]
        live = [c for c in chosen if c.running]
        if not live:
            return
        for child in live:
            child.signal(signal.SIGTERM)
        ended = defer.DeferredList([c.ended for c in live], consumeErrors=True)
        killer = self.reactor.callLater(self.grace, self._kill, live)
        try:
            await ended
        finally:
            if killer.active():
                killer.cancel()

    def _kill(self, children: list[Child]) -> None:
        for child in children:
            if child.running:
                self.log.warn(
                    "{name} ignored SIGTERM for {grace}s; killing it",
                    name=child.name,
                    grace=self.grace,
                )
                child.signal(signal.SIGKILL)

    async def stop_all(self, order: list[list[str]]) -> None:
        """Stop in waves (e.g. forwarders and updaters, then the listener), then the rest."""
        self.stopping = True
        done: set[str] = set()
        for wave in order:
            names = [n for n in wave if n in self.children]
            await self.stop(names)
            done.update(names)
        await self.stop([n for n in self.children if n not in done])


def child_env() -> dict[str, str]:
    """Our environment, minus what would make a child report the wrong release."""
    from decnet.release import ENV_RELEASE_ID

    return {k: v for k, v in os.environ.items() if k != ENV_RELEASE_ID}
