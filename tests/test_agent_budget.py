"""The agent-wide decoy budgets: the socket budget's default, its option, refusal logging."""

from __future__ import annotations

import pytest
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.python import usage

from decnet.agent import tap
from decnet.agent.decoys.budget import (
    ConnectionBudget,
    RefusalReport,
    default_connection_budget,
    fd_reserve,
    nofile_limit,
)
from decnet.master import enrollment


@pytest.mark.parametrize(
    ("nofile", "budget"),
    [(64, 32), (128, 96), (256, 224), (1024, 896), (4096, 3584), (65536, 65024)],
)
def test_the_default_budget_leaves_an_eighth_of_the_descriptors_within_32_to_512(nofile, budget):
    assert default_connection_budget(nofile) == budget
    assert fd_reserve(nofile) == nofile - budget


def test_listeners_and_connections_share_the_budget():
    budget = ConnectionBudget(3, Clock())
    budget.add_listener()
    assert budget.acquire() and budget.acquire()
    assert not budget.acquire()
    budget.release()
    assert budget.acquire()
    budget.remove_listener()
    assert budget.acquire()
    assert budget.in_use == 3


def capture(report: RefusalReport) -> list[dict]:
    events: list[dict] = []
    report.log = Logger(observer=events.append)
    return events


def test_refusals_are_logged_once_per_burst_then_summarised():
    clock = Clock()
    report = RefusalReport(clock, interval=10)
    logged = capture(report)
    for _ in range(500):
        report.refused("budget full")
    assert len(logged) == 1 and logged[0]["reason"] == "budget full"
    clock.advance(10)
    assert len(logged) == 2 and logged[1]["count"] == 499
    clock.advance(10)  # a quiet interval ends the burst without a line
    assert len(logged) == 2
    report.refused("budget full")
    assert len(logged) == 3  # a new burst
    clock.advance(10)
    assert len(logged) == 3 and clock.getDelayedCalls() == []


@pytest.fixture(scope="module")
def bundle_dir(master_home, tmp_path_factory):
    master = enrollment.load_master(master_home)
    out = tmp_path_factory.mktemp("budget") / "bundle"
    return enrollment.enroll(master, "budget-w1", "127.0.0.1", out).bundle_dir


def parse(*args) -> tap.Options:
    options = tap.Options()
    options.parseOptions(list(args))
    return options


def test_the_agent_derives_its_decoy_budget_from_rlimit_nofile(bundle_dir):
    options = parse("--bundle", str(bundle_dir))
    assert options["max-decoy-connections"] == default_connection_budget(nofile_limit())
    assert (
        parse("--bundle", str(bundle_dir), "--max-decoy-connections", "10")["max-decoy-connections"]
        == 10
    )


@pytest.mark.parametrize("value", ["0", "-3", "lots", "1.5", str(10**9)])
def test_a_decoy_budget_the_descriptors_cannot_hold_is_refused(bundle_dir, value):
    with pytest.raises(usage.UsageError, match="--max-decoy-connections must be an integer"):
        parse("--bundle", str(bundle_dir), "--max-decoy-connections", value)


def test_an_rlimit_too_low_for_the_reserve_stops_the_agent_with_a_usage_error():
    with pytest.raises(usage.UsageError, match="RLIMIT_NOFILE is 32: too low"):
        tap.decoy_budget(None, 32)
    assert tap.decoy_budget(None, 33) == 1
    assert tap.decoy_budget("1", 33) == 1
    with pytest.raises(usage.UsageError, match="from 1 to 1"):
        tap.decoy_budget("2", 33)


def test_the_decoy_budget_option_explains_its_default():
    text = str(tap.Options())
    assert "--max-decoy-connections" in text and "RLIMIT_NOFILE" in text


def test_decoys_get_a_smaller_slice_of_each_turn_while_the_api_has_a_connection():
    from twisted.internet.protocol import Factory, Protocol
    from twisted.internet.testing import StringTransport
    from twisted.python.failure import Failure

    from decnet.agent.decoys.budget import APIPriority, TurnBudget

    turns = TurnBudget(Clock(), slice=0.004, api_slice=0.001)
    api = APIPriority(Factory.forProtocol(Protocol), turns)
    first, second = api.buildProtocol(None), api.buildProtocol(None)
    first.makeConnection(StringTransport())
    second.makeConnection(StringTransport())
    assert turns.slice == 0.001
    first.connectionLost(Failure(ConnectionDone()))
    assert turns.slice == 0.001
    second.connectionLost(Failure(ConnectionDone()))
    assert turns.slice == 0.004
    turns.spent = 0.002
    assert turns.allows(0)
    turns.api_opened()
    assert not turns.allows(0)
