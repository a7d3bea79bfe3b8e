"""The child processes of ``sandbox up``: the real ``twistd`` daemons, by PID only.

Each child is started with :func:`decnet.process.spawn` as the leader of a
**process group of its own** (``ProcessSpec.own_group``: the launcher calls
``setpgrp`` and then execs ``twistd``, so the PID is twistd's): a Ctrl-C in the
terminal then reaches only ``up``, which stops its children in order (SIGTERM,
a grace period on the clock, SIGKILL: :func:`decnet.process.terminate`),
instead of every daemon reacting to the same SIGINT at once.  ``up`` records
each child's PID and start time (:mod:`decnet.sandbox.state`) so that
``sandbox down`` can stop them from another terminal even when ``up`` itself
was ``kill -9``-ed.  They are not restarted: ``up`` reports an unexpected exit.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

from twisted.internet import defer
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.logger import Logger

from decnet import config
from decnet.process import ChildProtocol, Exit, ProcessSpec, child_env, spawn, terminate
from decnet.sandbox.state import ProcessRecord, start_time

# "2026-01-02T03:04:05+0000 [namespace#level] " in front of each twistd log line.
LOG_PREFIX = re.compile(r"^\S+ \[[^\]]*\] ")


class Child(ChildProtocol):
    """One daemon we started: its output tail, and how it ended."""

    def __init__(self, name: str, argv: list[str], log: Path):
        super().__init__()
        self.name = name
        self.argv = argv
        self.log = log
        self.record: ProcessRecord | None = None

    @property
    def how(self) -> str | None:
        """How it ended (``exited with code 3``), or ``None`` while it runs."""
        return self.exit.describe() if self.exit is not None else None

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
        reactor: IReactorProcess,
        *,
        env: dict[str, str] | None = None,
        grace: float = config.SANDBOX_STOP_GRACE,
        on_exit: Callable[[Child], None] = lambda child: None,
    ):
        self.reactor = reactor
        self.env = dict(env if env is not None else child_env(same_python=True))
        self.grace = grace
        self.on_exit = on_exit
        self.children: dict[str, Child] = {}
        self.stopping = False

    def spawn(self, name: str, argv: list[str], log: Path, *, cwd: Path | None = None) -> Child:
        child = Child(name, argv, log)
        spec = ProcessSpec(
            name,
            argv,
            env=self.env,
            cwd=str(cwd) if cwd else None,
            own_group=True,
        )
        transport = spawn(self.reactor, child, spec)
        pid = transport.pid
        child.record = ProcessRecord(pid, start_time(pid), tuple(argv), str(log))
        self.children[name] = child
        self.log.info("Started {name} (pid {pid})", name=name, pid=pid)
        child.when_ended().addCallback(self._ended, child)
        return child

    def _ended(self, exit: Exit, child: Child) -> None:
        self.log.info("{name} {how}", name=child.name, how=exit.describe())
        if not self.stopping:
            self.on_exit(child)

    def records(self) -> dict[str, ProcessRecord]:
        return {n: c.record for n, c in self.children.items() if c.running and c.record}

    async def stop(self, names: list[str] | None = None) -> None:
        """SIGTERM the named children (default: all), SIGKILL any still alive after the grace."""
        chosen = [self.children[n] for n in (names or list(self.children)) if n in self.children]
        clock = IReactorTime(self.reactor)
        ended = [terminate(clock, c, name=c.name, grace=self.grace) for c in chosen if c.running]
        if ended:
            await defer.DeferredList(ended, consumeErrors=True)

    async def stop_all(self, order: list[list[str]]) -> None:
        """Stop in waves (e.g. forwarders and updaters, then the listener), then the rest."""
        self.stopping = True
        done: set[str] = set()
        for wave in order:
            names = [n for n in wave if n in self.children]
            await self.stop(names)
            done.update(names)
        await self.stop([n for n in self.children if n not in done])
