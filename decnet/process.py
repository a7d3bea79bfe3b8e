"""Child processes: one way to start, watch, stop and restart them.

Every child process of a DECNET daemon goes through this module, never through
``subprocess`` on the reactor thread and never found again by name or by a scan
of ``/proc``: a child is known by the transport ``reactor.spawnProcess``
returned for it.

The pieces, from the bottom up:

* :func:`child_env`: our environment minus what must never be inherited
  (systemd's hand-over variables, which would make a child look like the
  service, and ``$DECNET_RELEASE_ID``, which would make it report our release
  instead of its own), and for a child running another interpreter also the
  variables that would leak our virtualenv into it.
* :class:`ProcessSpec`: what to run (argv, environment, directory, pipes), how
  it is tied to us (``die_with_parent``: ``PR_SET_PDEATHSIG``, so that a
  ``kill -9`` of the daemon does not leave the child holding its port;
  ``own_group``: a process group of its own, so a Ctrl-C reaches only us) and
  how it is asked to stop (a signal, or the end of its input) and for how long
  before it is killed.
* :func:`spawn`: ``reactor.spawnProcess`` for a spec.  When the spec asks for
  either tie, the program is started through :data:`LAUNCHER`, a few lines of
  standard-library Python that set it up and then ``execv`` the program: same
  PID, and the settings survive the exec.
* :class:`ChildProtocol`: a ``ProcessProtocol`` that keeps the tail of the
  child's output (:class:`OutputTail`, bounded) and tells any number of
  waiters how it ended (:meth:`ChildProtocol.when_ended`, an :class:`Exit`).
  Subclass it for a child that speaks over its pipes.
* :func:`terminate`: ask a child to stop, ``SIGKILL`` it after the grace
  period on the injected clock, wait for its end.
* :class:`Exit`: how a process ended, described in one place (``exited with
  code 3``, ``was killed by signal 9``).
* :func:`run_process`: run a command to completion with a deadline
  (installs, ``systemctl``): a :class:`ProcessResult`.

And the supervisor, modelled on ``twisted.runner.procmon.ProcessMonitor`` but
for one child, with the clock injected and its life reported as events:

    supervisor = Supervisor(reactor, spec, policy=RestartPolicy(first=0.5,
                            maximum=30.0), observer=on_event)
    supervisor.start()          # spawns now; returns at once
    ...
    supervisor.healthy()        # optional: the child proved itself, reset the backoff
    await supervisor.stop()     # stop_by, grace, SIGKILL; no restart after this

``reactor`` provides ``IReactorProcess`` and ``IReactorTime`` (in tests, a
``Clock`` with a fake ``spawnProcess``).  ``protocol`` (default
:class:`ChildProtocol`) makes the protocol of each new child; the current one
is ``supervisor.child``.  The observer is called with one event per
transition, in order:

* :class:`Started` ``(name, pid, restart)``: a child was spawned (``restart``:
  by the supervisor after a failure, not by :meth:`Supervisor.start`);
* :class:`Exited` ``(name, exit, expected)``: it ended; ``expected`` when
  :meth:`Supervisor.stop` asked for it.  A child that could not even be
  spawned (``fork`` failed) is an unexpected exit too (``exit.error``);
* :class:`Restarting` ``(name, delay, failures)``: it will be spawned again in
  ``delay`` seconds, after ``failures`` failed runs in a row;
* :class:`GaveUp` ``(name, failures, exit)``: the policy's
  ``give_up_after`` was reached; nothing runs until the next ``start()``.

The delay doubles from ``first`` to ``maximum`` with each failed run in a
row, and starts again from ``first`` once a child has lived ``healthy_after``
seconds or :meth:`Supervisor.healthy` was called.  The supervisor logs these
transitions itself (``<name> exited unexpectedly (exit code 3); restarting it
in 0.5s``); an observer only keeps what its owner needs (the agent's "how did
it die since the last restart", the feed's "tell the new child its targets").
"""

from __future__ import annotations

import collections
import enum
import os
import sys
from collections.abc import Callable, Mapping, Sequence

import attrs
from twisted.internet import defer, error
from twisted.internet.interfaces import (
    IDelayedCall,
    IProcessTransport,
    IReactorProcess,
    IReactorTime,
)
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from decnet import config
from decnet.release import ENV_RELEASE_ID

log = Logger(namespace="decnet.process")

#: Never inherited by any child: systemd hands these to the service's main
#: process alone (``NotifyAccess=main``, socket activation), and a child reports
#: its own release, not ours.
NOT_INHERITED = (
    "NOTIFY_SOCKET",
    "WATCHDOG_PID",
    "WATCHDOG_USEC",
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    ENV_RELEASE_ID,
)
#: Also dropped for a child that runs another interpreter (a release's venv,
#: pip): they would make it import our packages instead of its own.
PYTHON_ENV = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "__PYVENV_LAUNCHER__")

#: ``stop_by`` value: close the child's stdin (it finishes its step and exits).
CLOSE_STDIN = "close-stdin"
#: Seconds a child has to stop before it is killed, unless its spec says otherwise.
STOP_GRACE = 10.0

# Standard library only, run as ``python -I -S -c``: the settings must be made
# in the child before the program starts.  PR_SET_PDEATHSIG is 1 and survives
# execve; a parent that died before prctl took effect is caught by getppid.
LAUNCHER = """\
import os, sys
parent, death, group = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
if death:
    import ctypes
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, death)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        sys.exit("the parent process exited before this child started")
if group:
    os.setpgrp()
os.execv(sys.argv[4], sys.argv[4:])
"""


def child_env(
    extra: Mapping[str, str] | None = None,
    *,
    same_python: bool = False,
    environ: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Our environment (or ``environ``) as a child should get it, plus ``extra``.

    ``same_python``: the child runs our own interpreter and packages (the feed
    process, the sandbox's daemons), so ``PYTHONPATH`` and the like are kept.
    """
    dropped = NOT_INHERITED if same_python else NOT_INHERITED + PYTHON_ENV
    source = os.environ if environ is None else environ
    env = {k: v for k, v in source.items() if k not in dropped}
    env.update(extra or {})
    return env


class OutputTail:
    """The last ``limit`` bytes written to it (stdout and stderr interleaved)."""

    def __init__(self, limit: int = config.OUTPUT_TAIL_BYTES):
        self.limit = limit
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self.dropped = 0

    def write(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        excess = self._size - self.limit
        while excess > 0:
            first = self._chunks[0]
            cut = min(len(first), excess)
            if cut == len(first):
                self._chunks.popleft()
            else:
                self._chunks[0] = first[cut:]
            excess -= cut
            self._size -= cut
            self.dropped += cut

    def clear(self) -> None:
        self._chunks.clear()
        self._size = 0
        self.dropped = 0

    def text(self) -> str:
        body = b"".join(self._chunks).decode("utf-8", "replace")
        return f"[... {self.dropped} bytes dropped ...]\n{body}" if self.dropped else body


@attrs.frozen
class Exit:
    """How a process ended: an exit code, a signal, or never started (``error``)."""

    code: int | None = None
    signal: int | None = None
    error: str | None = None

    @classmethod
    def from_reason(cls, reason: Failure) -> Exit:
        """From the reason ``processEnded`` was given."""
        value = reason.value
        if isinstance(value, error.ProcessDone):
            return cls(code=0)
        sig = getattr(value, "signal", None)
        if sig is not None:
            return cls(signal=sig)
        return cls(code=getattr(value, "exitCode", None))

    @classmethod
    def not_started(cls, exc: OSError) -> Exit:
        """``spawnProcess`` itself failed (``fork``, pipes): nothing ran."""
        return cls(error=str(exc))

    @property
    def ok(self) -> bool:
        return self.code == 0 and self.signal is None and self.error is None

    def describe(self) -> str:
        """As a sentence's verb: "the agent " + ``exited with code 3``."""
        return self._phrase(
            "could not be started: {}", "was killed by signal {}", "exited with code {}"
        )

    def brief(self) -> str:
        """As a parenthesis: "failed (" + ``exit code 3`` + ")"."""
        return self._phrase("not started: {}", "killed by signal {}", "exit code {}")

    def _phrase(self, not_started: str, killed: str, exited: str) -> str:
        if self.error is not None:
            return not_started.format(self.error)
        if self.signal is not None:
            return killed.format(self.signal)
        return exited.format("?" if self.code is None else self.code)


def _argv(value: Sequence[str | os.PathLike[str]]) -> tuple[str, ...]:
    return tuple(os.fspath(a) for a in value)


@attrs.frozen
class ProcessSpec:
    """What to run, how it is tied to us, and how it is asked to stop."""

    name: str
    argv: tuple[str, ...] = attrs.field(converter=_argv)
    #: ``None``: :func:`child_env` (another interpreter's child).
    env: Mapping[str, str] | None = None
    cwd: str | None = None
    #: ``spawnProcess``'s ``childFDs`` (``None``: stdin, stdout and stderr pipes).
    child_fds: Mapping[int, str | int] | None = None
    #: Signal the kernel sends the child when we die (``PR_SET_PDEATHSIG``, Linux).
    die_with_parent: int | None = None
    #: Lead a process group of its own (a terminal's Ctrl-C then reaches only us).
    own_group: bool = False
    #: A signal name or number for ``signalProcess``, or :data:`CLOSE_STDIN`.
    stop_by: str | int = "TERM"
    grace: float = STOP_GRACE

    def command(self, parent: int | None = None) -> list[str]:
        """The argv actually spawned: through :data:`LAUNCHER` when a tie is asked for."""
        if self.die_with_parent is None and not self.own_group:
            return list(self.argv)
        return [
            sys.executable,
            "-I",
            "-S",
            "-c",
            LAUNCHER,
            str(os.getpid() if parent is None else parent),
            str(int(self.die_with_parent or 0)),
            "1" if self.own_group else "0",
            *self.argv,
        ]


def spawn(
    reactor: IReactorProcess, protocol: ProcessProtocol, spec: ProcessSpec
) -> IProcessTransport:
    """``reactor.spawnProcess`` for ``spec``; raises ``OSError`` if nothing could be started."""
    argv = spec.command()
    env = dict(spec.env) if spec.env is not None else child_env()
    return reactor.spawnProcess(
        protocol,
        argv[0],
        argv,
        env=env,
        path=spec.cwd,
        childFDs=dict(spec.child_fds) if spec.child_fds is not None else None,
    )


class ChildProtocol(ProcessProtocol):
    """One child: the tail of its output, and how it ended for whoever waits."""

    def __init__(self, output: OutputTail | None = None):
        self.output = output if output is not None else OutputTail()
        self.exit: Exit | None = None
        self._waiters: list[defer.Deferred[Exit]] = []

    @property
    def running(self) -> bool:
        return self.transport is not None and self.exit is None

    @property
    def pid(self) -> int | None:
        return getattr(self.transport, "pid", None) if self.running else None

    def outReceived(self, data: bytes) -> None:
        self.output.write(data)

    def errReceived(self, data: bytes) -> None:
        self.output.write(data)

    def processEnded(self, reason: Failure) -> None:
        self.exit = Exit.from_reason(reason)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(self.exit)

    def when_ended(self) -> defer.Deferred[Exit]:
        """A new Deferred that fires with the :class:`Exit` (at once if it has ended)."""
        if self.exit is not None:
            return defer.succeed(self.exit)
        waiter: defer.Deferred[Exit] = defer.Deferred()
        self._waiters.append(waiter)
        return waiter

    def signal(self, sig: str | int) -> None:
        """Signal the child if it still runs (a race with its exit is not an error)."""
        if self.transport is None or self.exit is not None:
            return
        try:
            self.transport.signalProcess(sig)
        except (error.ProcessExitedAlready, OSError):
            pass

    def ask_to_stop(self, stop_by: str | int) -> None:
        """The polite request: a signal, or (:data:`CLOSE_STDIN`) the end of its input."""
        if stop_by == CLOSE_STDIN:
            if self.transport is not None and self.exit is None:
                self.transport.closeStdin()
        else:
            self.signal(stop_by)


def terminate(
    clock: IReactorTime,
    child: ChildProtocol,
    *,
    name: str,
    stop_by: str | int = "TERM",
    grace: float = STOP_GRACE,
) -> defer.Deferred[Exit]:
    """Ask ``child`` to stop, ``SIGKILL`` it after ``grace`` seconds; fires with its Exit."""
    if not child.running:
        return child.when_ended() if child.exit is not None else defer.succeed(Exit())
    ended = child.when_ended()
    child.ask_to_stop(stop_by)

    def kill() -> None:
        log.warn("{name} did not stop within {grace:g}s; killing it", name=name, grace=grace)
        child.signal("KILL")

    killer = clock.callLater(grace, kill)

    def cancel_killer(result: Exit) -> Exit:
        if killer.active():
            killer.cancel()
        return result

    return ended.addBoth(cancel_killer)


@attrs.frozen
class ProcessResult:
    """A command run to completion: how it ended and the tail of its output."""

    argv: tuple[str, ...]
    exit: Exit
    output: str
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.exit.ok and not self.timed_out

    def describe(self) -> str:
        return "timed out" if self.timed_out else self.exit.brief()


async def run_process(
    reactor: IReactorProcess,
    argv: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    path: str | None = None,
    timeout: float | None = None,
    tail_bytes: int = config.OUTPUT_TAIL_BYTES,
) -> ProcessResult:
    """Run ``argv`` to completion (SIGKILL after ``timeout`` seconds on the reactor's clock)."""
    spec = ProcessSpec(str(argv[0]), argv, env=env, cwd=path)
    child = ChildProtocol(OutputTail(tail_bytes))
    spawn(reactor, child, spec)
    timed_out = False
    timer: IDelayedCall | None = None
    if timeout is not None:

        def expire() -> None:
            nonlocal timed_out
            timed_out = True
            log.warn("{argv} ran over {timeout}s; killing it", argv=spec.name, timeout=timeout)
            child.signal("KILL")

        timer = IReactorTime(reactor).callLater(timeout, expire)
    try:
        ended = await child.when_ended()
    finally:
        if timer is not None and timer.active():
            timer.cancel()
    return ProcessResult(spec.argv, ended, child.output.text(), timed_out)


# -- supervision -----------------------------------------------------------------------


@attrs.frozen
class RestartPolicy:
    """When to spawn a failed child again: a pure function of its failures in a row."""

    first: float = attrs.field(default=0.5, validator=attrs.validators.gt(0))
    maximum: float = 30.0
    #: A child that lived this long (seconds) before it died had not failed in a row.
    healthy_after: float | None = None
    #: Failed runs in a row after which the supervisor gives up (``None``: never).
    give_up_after: int | None = None

    def __attrs_post_init__(self) -> None:
        if self.maximum < self.first:
            raise ValueError(f"maximum {self.maximum} is below first {self.first}")

    def delay(self, failures: int) -> float:
        """Seconds before the next start after ``failures`` (>= 1) failed runs in a row."""
        return min(self.first * 2.0 ** min(max(failures - 1, 0), 64), self.maximum)

    def gives_up(self, failures: int) -> bool:
        return self.give_up_after is not None and failures >= self.give_up_after

    def healthy(self, lived: float) -> bool:
        return self.healthy_after is not None and lived >= self.healthy_after


@attrs.frozen
class Started:
    name: str
    pid: int | None
    restart: bool


@attrs.frozen
class Exited:
    name: str
    exit: Exit
    expected: bool


@attrs.frozen
class Restarting:
    name: str
    delay: float
    failures: int


@attrs.frozen
class GaveUp:
    name: str
    failures: int
    exit: Exit


SupervisorEvent = Started | Exited | Restarting | GaveUp


class State(enum.Enum):
    STOPPED = "stopped"
    RUNNING = "running"
    WAITING = "waiting to restart"
    STOPPING = "stopping"
    GIVEN_UP = "given up"


def _ignore(event: SupervisorEvent) -> None:
    """The default observer."""


class Supervisor:
    """Runs one child process, restarts it with a backoff, stops it on request.

    See the module docstring for the events and the policy.
    """

    log = Logger()

    def __init__(
        self,
        reactor: IReactorProcess,
        spec: ProcessSpec,
        *,
        policy: RestartPolicy | None = None,
        protocol: Callable[[], ChildProtocol] = ChildProtocol,
        observer: Callable[[SupervisorEvent], None] = _ignore,
    ):
        self.reactor = reactor
        self.clock = IReactorTime(reactor)
        self.spec = spec
        self.policy = policy if policy is not None else RestartPolicy()
        self.protocol = protocol
        self.observer = observer
        self.state = State.STOPPED
        self.child: ChildProtocol | None = None
        #: Children spawned so far, and how many of them by a restart.
        self.starts = 0
        self.restarts = 0
        #: Failed runs in a row, and the last unexpected exit since ``start()``.
        self.failures = 0
        self.last_exit: Exit | None = None
        self._started_at = 0.0
        self._restart: IDelayedCall | None = None

    @property
    def running(self) -> bool:
        return self.state is State.RUNNING

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child is not None else None

    def start(self) -> None:
        """Spawn the child now, unless one runs, waits to restart or is stopping."""
        if self.state in (State.RUNNING, State.WAITING, State.STOPPING):
            return
        self.failures = 0
        self.last_exit = None
        self._spawn(restart=False)

    def healthy(self) -> None:
        """The child proved it works: the next failure waits only ``policy.first``."""
        self.failures = 0

    def stop(self) -> defer.Deferred[None]:
        """Stop the child (``spec.stop_by``, SIGKILL after ``spec.grace``); no restart after."""
        self._cancel_restart()
        child = self.child
        if child is None:
            self.state = State.STOPPED
            return defer.succeed(None)
        if self.state is State.STOPPING:
            return child.when_ended().addCallback(lambda _: None)
        self.state = State.STOPPING
        ended = terminate(
            self.clock, child, name=self.spec.name, stop_by=self.spec.stop_by, grace=self.spec.grace
        )
        return ended.addCallback(lambda _: None)

    def _spawn(self, *, restart: bool) -> None:
        self._restart = None
        child = self.protocol()
        self.starts += 1
        self.restarts += int(restart)
        try:
            spawn(self.reactor, child, self.spec)
        except OSError as exc:
            self._failed(Exit.not_started(exc))
            return
        self.child = child
        self.state = State.RUNNING
        self._started_at = self.clock.seconds()
        child.when_ended().addCallback(self._ended, child).addErrback(
            lambda f: self.log.failure("Supervising {name} failed", f, name=self.spec.name)
        )
        self.log.info("Started {name} (pid {pid})", name=self.spec.name, pid=child.pid)
        self._emit(Started(self.spec.name, child.pid, restart))

    def _ended(self, exit: Exit, child: ChildProtocol) -> None:
        if child is not self.child:
            return
        self.child = None
        if self.state is State.STOPPING:
            self.state = State.STOPPED
            self._emit(Exited(self.spec.name, exit, expected=True))
            return
        if self.policy.healthy(self.clock.seconds() - self._started_at):
            self.failures = 0
        self._failed(exit)

    def _failed(self, exit: Exit) -> None:
        self.last_exit = exit
        self.failures += 1
        self._emit(Exited(self.spec.name, exit, expected=False))
        if self.policy.gives_up(self.failures):
            self.state = State.GIVEN_UP
            self.log.error(
                "{name} exited unexpectedly ({status}) {failures} times in a row; giving up",
                name=self.spec.name,
                status=exit.brief(),
                failures=self.failures,
            )
            self._emit(GaveUp(self.spec.name, self.failures, exit))
            return
        delay = self.policy.delay(self.failures)
        self.log.warn(
            "{name} exited unexpectedly ({status}); restarting it in {delay:g}s",
            name=self.spec.name,
            status=exit.brief(),
            delay=delay,
        )
        self.state = State.WAITING
        self._restart = self.clock.callLater(delay, self._spawn, restart=True)
        self._emit(Restarting(self.spec.name, delay, self.failures))

    def _cancel_restart(self) -> None:
        if self._restart is not None and self._restart.active():
            self._restart.cancel()
        self._restart = None

    def _emit(self, event: SupervisorEvent) -> None:
        try:
            self.observer(event)
        except Exception:
            self.log.failure(
                "The observer of {name} failed on {event}", name=self.spec.name, event=event
            )
