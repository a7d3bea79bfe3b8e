"""decnet.process: the child environment, the output tail, exits, terminate-then-kill, and the
supervisor, on a fake clock with fake process transports; the launcher's ties on real processes."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import error
from twisted.internet.interfaces import IProcessTransport, IReactorProcess
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from decnet import process
from decnet.process import (
    CLOSE_STDIN,
    ChildProtocol,
    Exit,
    Exited,
    GaveUp,
    OutputTail,
    ProcessSpec,
    Restarting,
    RestartPolicy,
    Started,
    State,
    Supervisor,
    child_env,
    run_process,
    spawn,
    terminate,
)
from tests.support import wait_for

# -- a fake process reactor -------------------------------------------------------------


@implementer(IProcessTransport)
class FakeProcess:
    """A child that exists only as this transport: it ends when told to, on the clock."""

    def __init__(self, reactor, proto, argv, env, path, child_fds, pid):
        self.reactor = reactor
        self.proto = proto
        self.argv = argv
        self.env = env
        self.path = path
        self.child_fds = child_fds
        self.pid = pid
        self.signals: list = []
        self.written = bytearray()
        self.stdin_closed = False
        self.ended = False
        # What it does when asked to stop: "exit" (at once), or "ignore".
        self.on_term = reactor.on_term
        self.on_eof = reactor.on_eof

    def signalProcess(self, sig):
        if self.ended:
            raise error.ProcessExitedAlready()
        self.signals.append(sig)
        if sig in ("KILL", signal.SIGKILL):
            self.reactor.callLater(0, self.end, signal=signal.SIGKILL)
        elif self.on_term == "exit":
            number = sig if isinstance(sig, int) else getattr(signal, "SIG" + sig)
            self.reactor.callLater(0, self.end, signal=number)

    def closeStdin(self):
        self.stdin_closed = True
        if self.on_eof == "exit":
            self.reactor.callLater(0, self.end, code=0)

    def write(self, data):
        assert not self.stdin_closed
        self.written += data

    def end(self, code=None, signal=None):
        if self.ended:
            return
        self.ended = True
        if code == 0:
            reason = Failure(error.ProcessDone(0))
        else:
            reason = Failure(error.ProcessTerminated(exitCode=code, signal=signal))
        self.proto.processEnded(reason)


@implementer(IReactorProcess)
class FakeProcessReactor(Clock):
    """A ``Clock`` whose ``spawnProcess`` makes :class:`FakeProcess` transports."""

    def __init__(self, on_term="exit", on_eof="exit"):
        super().__init__()
        self.on_term = on_term
        self.on_eof = on_eof
        self.spawned: list[FakeProcess] = []
        self.fail_next: list[OSError] = []

    def spawnProcess(
        self,
        processProtocol,
        executable,
        args=(),
        env=None,
        path=None,
        uid=None,
        gid=None,
        usePTY=False,
        childFDs=None,
    ):
        assert executable == args[0]
        if self.fail_next:
            raise self.fail_next.pop(0)
        transport = FakeProcess(
            self, processProtocol, list(args), env, path, childFDs, 1000 + len(self.spawned)
        )
        self.spawned.append(transport)
        processProtocol.makeConnection(transport)
        return transport

    def live(self) -> list[FakeProcess]:
        return [p for p in self.spawned if not p.ended]


@pytest.fixture
def logged():
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def spec(**kw):
    return ProcessSpec("The thing", ["/bin/thing", "--flag"], env={}, **kw)


# -- the environment, the tail, the exit -----------------------------------------------


def test_no_child_inherits_systemds_hand_over_or_our_release_id():
    ours = {
        "PATH": "/usr/bin",
        "NOTIFY_SOCKET": "/run/systemd/notify",
        "WATCHDOG_USEC": "30000000",
        "WATCHDOG_PID": "1",
        "LISTEN_FDS": "1",
        "LISTEN_PID": "1",
        "LISTEN_FDNAMES": "x",
        "DECNET_RELEASE_ID": "r-updater",
        "PYTHONPATH": "/src",
        "VIRTUAL_ENV": "/venv",
    }
    same = child_env({"EXTRA": "1"}, same_python=True, environ=ours)
    assert same == {"PATH": "/usr/bin", "PYTHONPATH": "/src", "VIRTUAL_ENV": "/venv", "EXTRA": "1"}
    other = child_env(environ=ours)
    assert other == {"PATH": "/usr/bin"}  # another interpreter: our venv does not leak in


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 64), st.lists(st.binary(max_size=100), max_size=30))
def test_the_output_tail_is_exactly_the_last_bytes_and_counts_what_it_dropped(limit, chunks):
    tail = OutputTail(limit)
    for chunk in chunks:
        tail.write(chunk)
    everything = b"".join(chunks)
    kept = everything[-limit:] if everything else b""
    assert tail.dropped == len(everything) - len(kept)
    body = kept.decode("utf-8", "replace")
    assert (
        tail.text() == (f"[... {tail.dropped} bytes dropped ...]\n" if tail.dropped else "") + body
    )
    tail.clear()
    assert tail.text() == "" and tail.dropped == 0


def test_an_exit_is_described_the_same_way_everywhere():
    done = Exit.from_reason(Failure(error.ProcessDone(0)))
    code = Exit.from_reason(Failure(error.ProcessTerminated(exitCode=3)))
    killed = Exit.from_reason(Failure(error.ProcessTerminated(signal=9)))
    unknown = Exit.from_reason(Failure(error.ProcessTerminated()))
    failed = Exit.not_started(OSError(11, "Resource temporarily unavailable"))
    assert [e.describe() for e in (done, code, killed, unknown)] == [
        "exited with code 0",
        "exited with code 3",
        "was killed by signal 9",
        "exited with code ?",
    ]
    assert [e.brief() for e in (done, code, killed)] == [
        "exit code 0",
        "exit code 3",
        "killed by signal 9",
    ]
    assert failed.describe() == "could not be started: [Errno 11] Resource temporarily unavailable"
    assert [e.ok for e in (done, code, killed, failed)] == [True, False, False, False]


# -- spawn and terminate ----------------------------------------------------------------


def test_a_spec_without_ties_spawns_its_argv_as_is_with_its_environment_and_pipes():
    reactor = FakeProcessReactor()
    child = ChildProtocol()
    spawn(reactor, child, spec(cwd="/srv", child_fds={0: "w", 1: "r"}))
    (p,) = reactor.spawned
    assert p.argv == ["/bin/thing", "--flag"] and p.env == {} and p.path == "/srv"
    assert p.child_fds == {0: "w", 1: "r"}
    assert child.running and child.pid == p.pid


def test_a_tied_spec_goes_through_the_launcher_with_our_pid_its_signal_and_its_group():
    reactor = FakeProcessReactor()
    spawn(reactor, ChildProtocol(), spec(die_with_parent=signal.SIGTERM, own_group=True))
    argv = reactor.spawned[0].argv
    assert argv[:5] == [sys.executable, "-I", "-S", "-c", process.LAUNCHER]
    assert argv[5:] == [str(os.getpid()), str(int(signal.SIGTERM)), "1", "/bin/thing", "--flag"]


def test_a_spec_without_an_environment_gets_the_child_environment(monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("PYTHONPATH", "/src")
    reactor = FakeProcessReactor()
    spawn(reactor, ChildProtocol(), ProcessSpec("x", ["/bin/x"]))
    env = reactor.spawned[0].env
    assert "NOTIFY_SOCKET" not in env and "PYTHONPATH" not in env and env["PATH"]


def test_terminate_asks_then_kills_after_the_grace_and_every_waiter_hears_the_end(logged):
    reactor = FakeProcessReactor(on_term="ignore")
    child = ChildProtocol()
    spawn(reactor, child, spec())
    other = child.when_ended()
    stopped = terminate(reactor, child, name="The thing", grace=5)
    (p,) = reactor.spawned
    assert p.signals == ["TERM"]
    reactor.advance(4.9)
    assert not stopped.called
    reactor.advance(0.1)
    reactor.advance(0)
    assert p.signals == ["TERM", "KILL"]
    assert stopped.result == other.result == Exit(signal=signal.SIGKILL)
    assert reactor.getDelayedCalls() == []
    warned = [e for e in logged if e.get("log_level") == LogLevel.warn]
    assert [e["log_format"] for e in warned] == [
        "{name} did not stop within {grace:g}s; killing it"
    ]


def test_terminate_can_close_stdin_instead_and_cancels_the_kill_when_the_child_obeys():
    reactor = FakeProcessReactor()
    child = ChildProtocol()
    spawn(reactor, child, spec())
    stopped = terminate(reactor, child, name="The thing", stop_by=CLOSE_STDIN, grace=5)
    reactor.advance(0)
    (p,) = reactor.spawned
    assert p.stdin_closed and p.signals == []
    assert stopped.result == Exit(code=0) and reactor.getDelayedCalls() == []
    # A child that already ended: nothing is sent, its end is the answer.
    again = terminate(reactor, child, name="The thing")
    assert again.result == Exit(code=0) and p.signals == []


def test_run_process_kills_a_command_that_runs_over_its_deadline():
    reactor = FakeProcessReactor()
    d = run_process_deferred(reactor, ["/bin/slow"], timeout=30)
    (p,) = reactor.spawned
    p.proto.outReceived(b"working\n")
    reactor.advance(30)
    reactor.advance(0)
    result = d.result
    assert p.signals == ["KILL"] and result.timed_out and not result.ok
    assert result.describe() == "timed out" and result.output == "working\n"


def test_run_process_reports_the_exit_of_a_command_that_ends_in_time():
    reactor = FakeProcessReactor()
    d = run_process_deferred(reactor, ["/bin/tool"], timeout=30)
    reactor.spawned[0].end(code=5)
    result = d.result
    assert not result.ok and result.describe() == "exit code 5"
    assert reactor.getDelayedCalls() == []


def run_process_deferred(reactor, argv, **kw):
    from twisted.internet import defer

    return defer.ensureDeferred(run_process(reactor, argv, env={}, **kw))


# -- the restart policy -------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    st.floats(0.01, 10),
    st.floats(0, 1000),
    st.integers(1, 2000),
)
def test_restart_delays_start_at_first_double_and_never_pass_the_maximum(first, extra, failures):
    policy = RestartPolicy(first=first, maximum=first + extra)
    assert policy.delay(1) == first
    assert first <= policy.delay(failures) <= policy.maximum
    assert policy.delay(failures) <= policy.delay(failures + 1)
    assert policy.delay(failures + 1) in (policy.maximum, 2 * policy.delay(failures))


def test_a_restart_policy_refuses_a_maximum_below_its_first_delay():
    with pytest.raises(ValueError):
        RestartPolicy(first=5, maximum=1)


# -- the supervisor -------------------------------------------------------------------------


def supervised(policy=None, **reactor_kw):
    reactor = FakeProcessReactor(**reactor_kw)
    events = []
    sup = Supervisor(reactor, spec(), policy=policy or RestartPolicy(), observer=events.append)
    return reactor, sup, events


def test_a_crashed_child_is_restarted_with_a_doubling_delay_and_told_as_events(logged):
    reactor, sup, events = supervised(RestartPolicy(first=0.5, maximum=1.5))
    sup.start()
    assert events == [Started("The thing", 1000, restart=False)] and sup.running
    for pid, delay in ((1000, 0.5), (1001, 1.0), (1002, 1.5)):
        events.clear()
        reactor.spawned[-1].end(code=3)
        assert events == [
            Exited("The thing", Exit(code=3), expected=False),
            Restarting("The thing", delay, failures=pid - 999),
        ]
        assert sup.state is State.WAITING and sup.pid is None
        reactor.advance(delay - 0.01)
        assert len(reactor.spawned) == pid - 999
        reactor.advance(0.02)
        assert events[-1] == Started("The thing", pid + 1, restart=True)
    assert sup.starts == 4 and sup.restarts == 3 and sup.last_exit == Exit(code=3)
    assert any(
        e.get("log_format") == "{name} exited unexpectedly ({status}); restarting it in {delay:g}s"
        and e["status"] == "exit code 3"
        for e in logged
    )


def test_a_child_that_proved_healthy_or_lived_long_enough_restarts_after_the_first_delay():
    reactor, sup, events = supervised(RestartPolicy(first=1, maximum=60, healthy_after=30))
    sup.start()
    reactor.spawned[-1].end(code=1)
    reactor.advance(1)
    reactor.spawned[-1].end(code=1)
    assert events[-1] == Restarting("The thing", 2, failures=2)
    reactor.advance(2)
    sup.healthy()  # e.g. the feed process reported progress
    reactor.spawned[-1].end(code=1)
    assert events[-1] == Restarting("The thing", 1, failures=1)
    reactor.advance(1)
    reactor.spawned[-1].end(code=1)
    reactor.advance(2)
    reactor.advance(30)  # this one lives long enough
    reactor.spawned[-1].end(signal=9)
    assert events[-1] == Restarting("The thing", 1, failures=1)


def test_a_child_that_cannot_even_be_spawned_is_retried_with_the_same_backoff():
    reactor, sup, events = supervised()
    reactor.fail_next = [OSError(11, "Resource temporarily unavailable")]
    sup.start()
    assert events[0] == Exited("The thing", Exit(error=events[0].exit.error), expected=False)
    assert "could not be started" in sup.last_exit.describe()
    assert events[1] == Restarting("The thing", 0.5, failures=1)
    reactor.advance(0.5)
    assert events[2] == Started("The thing", 1000, restart=True) and sup.running


def test_stop_terminates_the_child_expects_its_exit_and_restarts_nothing():
    reactor, sup, events = supervised()
    sup.start()
    stopped = sup.stop()
    again = sup.stop()  # a second stop waits for the same end
    assert sup.state is State.STOPPING and reactor.spawned[0].signals == ["TERM"]
    reactor.advance(0)
    assert stopped.called and again.called and sup.state is State.STOPPED
    assert events[-1] == Exited("The thing", Exit(signal=signal.SIGTERM), expected=True)
    assert sup.last_exit is None and reactor.getDelayedCalls() == []
    sup.start()  # and it can be started again
    assert sup.running and len(reactor.spawned) == 2


def test_stop_kills_a_child_that_ignores_its_stop_request_after_the_specs_grace():
    reactor = FakeProcessReactor(on_term="ignore")
    sup = Supervisor(reactor, spec(grace=3))
    sup.start()
    stopped = sup.stop()
    reactor.advance(3)
    reactor.advance(0)
    assert reactor.spawned[0].signals == ["TERM", "KILL"] and stopped.called
    assert sup.state is State.STOPPED and reactor.live() == []


def test_stop_while_waiting_to_restart_cancels_the_restart():
    reactor, sup, _ = supervised()
    sup.start()
    reactor.spawned[0].end(code=1)
    assert sup.stop().called and sup.state is State.STOPPED
    reactor.advance(100)
    assert len(reactor.spawned) == 1 and reactor.getDelayedCalls() == []


def test_the_supervisor_gives_up_after_the_policys_failures_in_a_row(logged):
    reactor, sup, events = supervised(RestartPolicy(first=1, give_up_after=2))
    sup.start()
    reactor.spawned[-1].end(code=2)
    reactor.advance(1)
    reactor.spawned[-1].end(code=2)
    assert events[-1] == GaveUp("The thing", 2, Exit(code=2)) and sup.state is State.GIVEN_UP
    reactor.advance(1000)
    assert len(reactor.spawned) == 2
    assert any(e.get("log_level") == LogLevel.error and e["failures"] == 2 for e in logged)
    sup.start()  # an operator's start begins again from scratch
    assert sup.running and sup.failures == 0 and sup.last_exit is None


def test_an_observer_that_raises_is_logged_and_supervision_goes_on(logged):
    reactor = FakeProcessReactor()

    def broken(event):
        raise RuntimeError("observer bug")

    sup = Supervisor(reactor, spec(), observer=broken)
    sup.start()
    reactor.spawned[0].end(code=1)
    reactor.advance(0.5)
    assert sup.running and len(reactor.spawned) == 2
    assert any("log_failure" in e for e in logged)


def test_the_current_child_protocol_comes_from_the_given_factory():
    reactor = FakeProcessReactor()
    made = []

    def factory():
        made.append(ChildProtocol())
        return made[-1]

    sup = Supervisor(reactor, spec(), protocol=factory)
    sup.start()
    reactor.spawned[0].proto.outReceived(b"hello")
    assert sup.child is made[0] and made[0].output.text() == "hello"


OPS = st.lists(
    st.one_of(
        st.just(("start",)),
        st.just(("stop",)),
        st.just(("healthy",)),
        st.just(("fork fails",)),
        st.tuples(st.just("exit"), st.integers(0, 3)),
        st.tuples(st.just("advance"), st.floats(0, 50)),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(OPS, st.sampled_from(["exit", "ignore"]))
def test_whatever_happens_one_child_at_most_and_stop_leaves_nothing_behind(ops, on_term):
    policy = RestartPolicy(first=0.5, maximum=8, healthy_after=20, give_up_after=6)
    reactor, sup, events = supervised(policy, on_term=on_term)
    stops = []
    for op in ops:
        if op[0] == "start":
            sup.start()
        elif op[0] == "stop":
            stops.append(sup.stop())
        elif op[0] == "healthy":
            sup.healthy()
        elif op[0] == "fork fails":
            reactor.fail_next.append(OSError(12, "Cannot allocate memory"))
        elif op[0] == "exit" and reactor.live():
            reactor.live()[0].end(code=op[1])
        elif op[0] == "advance":
            reactor.advance(op[1])
        assert len(reactor.live()) <= 1
        assert (sup.child is not None) == (sup.state in (State.RUNNING, State.STOPPING))
        assert sup.running == (sup.state is State.RUNNING)
        if sup.child is not None:
            assert reactor.live() and sup.child is reactor.live()[0].proto
    for event in events:
        if isinstance(event, Restarting):
            assert policy.first <= event.delay <= policy.maximum
    for before, after in itertools.pairwise(events):
        if isinstance(before, Exited) and not before.expected:
            assert isinstance(after, Restarting | GaveUp)
    assert sum(isinstance(e, Started) for e in events) == len(reactor.spawned)
    final = sup.stop()
    reactor.advance(10)  # the grace, and the kill
    reactor.advance(0)
    assert final.called and all(d.called for d in stops)
    assert sup.state is State.STOPPED and reactor.live() == [] and reactor.getDelayedCalls() == []


# -- the launcher, on real processes ---------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


# A parent that starts one tied child through the launcher, says its PID and waits.
PARENT = """
import os, signal, subprocess, sys
from decnet.process import ProcessSpec
spec = ProcessSpec("c", [sys.executable, "-c", "import signal; signal.pause()"],
                   die_with_parent=signal.SIGTERM, own_group=True)
child = subprocess.Popen(spec.command())
print(child.pid, flush=True)
signal.pause()
"""


def test_a_child_tied_by_the_launcher_dies_with_a_kill_9ed_parent_and_leads_its_group():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE)
    child = None
    try:
        child = int(parent.stdout.readline())
        wait_for(lambda: os.getpgid(child) == child, 10, what="setpgrp")
        assert _alive(child)
        parent.kill()
        parent.wait(10)
        wait_for(lambda: not _alive(child), 10, what="the child to die with its parent")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if child is not None and _alive(child):
            os.kill(child, signal.SIGKILL)


def test_the_launcher_refuses_to_start_a_child_whose_parent_is_already_gone():
    argv = ProcessSpec("c", ["/bin/true"], die_with_parent=signal.SIGTERM).command(parent=1)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "parent process exited before this child started" in result.stderr
