"""decnet.threads: the one way to run blocking calls off the reactor."""

import ast
from pathlib import Path

import pytest
from twisted.internet import defer

from decnet import threads
from tests.decoy_support import TurnReactor

DECNET = Path(__file__).resolve().parent.parent / "decnet"


def test_the_pool_runner_runs_the_call_in_the_reactors_pool_with_its_arguments():
    reactor = TurnReactor()  # its pool runs each call at once
    pool = reactor.getThreadPool()
    used = []
    through_pool = pool.callInThreadWithCallback
    pool.callInThreadWithCallback = lambda *a, **kw: used.append(a[1]) or through_pool(*a, **kw)
    run = threads.pool_runner(reactor)
    d = run(lambda a, *, b: a + b, 1, b=2)
    assert d.result == 3 and len(used) == 1
    failed = threads.run_in_pool(reactor, lambda: 1 / 0)
    failed.addErrback(lambda f: f.trap(ZeroDivisionError))
    assert failed.called and len(used) == 2


class Gate:
    """A runner whose calls finish when the test says so."""

    def __init__(self):
        self.started: list[str] = []
        self.pending: list[defer.Deferred] = []

    def __call__(self, f, *args, **kwargs):
        self.started.append(args[0])
        d = defer.Deferred()
        d.addCallback(lambda _: f(*args, **kwargs))
        self.pending.append(d)
        return d


def test_a_serial_lane_runs_one_call_at_a_time_in_order_and_survives_a_failure():
    gate = Gate()
    lane = threads.serial_runner(run=gate)
    done: list = []

    def job(name):
        if name == "bad":
            raise ValueError(name)
        return name

    for name in ("a", "bad", "c"):
        lane(job, name).addBoth(done.append)
    assert gate.started == ["a"]  # the next waits for the first to finish
    gate.pending[0].callback(None)
    assert gate.started == ["a", "bad"] and done == ["a"]
    gate.pending[1].callback(None)
    assert gate.started == ["a", "bad", "c"]
    assert done[1].check(ValueError)
    gate.pending[2].callback(None)
    assert done[2] == "c"


def test_a_serial_lane_needs_a_reactor_or_a_runner():
    with pytest.raises(TypeError):
        threads.serial_runner()


def test_the_inline_runner_runs_now_and_wraps_failures():
    assert threads.inline_runner(lambda x, *, y: x * y, 3, y=4).result == 12
    failed = threads.inline_runner(lambda: {}["missing"])
    errors: list = []
    failed.addErrback(errors.append)
    assert errors[0].check(KeyError)


THREAD_APIS = {"deferToThread", "deferToThreadPool", "callInThread", "ThreadPool"}


def test_decnet_threads_is_the_only_module_that_hands_work_to_threads_itself():
    offenders = []
    for path in sorted(DECNET.rglob("*.py")):
        if path.name == "threads.py" and path.parent == DECNET:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = set()
            if isinstance(node, ast.ImportFrom):
                names = {alias.name for alias in node.names}
            elif isinstance(node, ast.Attribute):
                names = {node.attr}
            if names & THREAD_APIS:
                offenders.append(f"{path.relative_to(DECNET.parent)}:{node.lineno}")
    assert offenders == []
