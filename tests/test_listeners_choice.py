"""Rendezvous choice of a listener, the listener list's validation and the bundle field."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from decnet import pki
from decnet.errors import ValidationError
from decnet.forwarder.rendezvous import ListenerChoice, rendezvous_order

CNS = [f"worker-{i:04d}" for i in range(1000)]


def _listeners(n: int) -> list[tuple[str, int]]:
    return [(f"10.0.0.{i + 1}", 6514) for i in range(n)]


def test_every_worker_ranks_every_listener_once_and_the_same_way_each_time():
    listeners = _listeners(5)
    for cn in CNS[:50]:
        order = rendezvous_order(cn, listeners)
        assert sorted(order) == sorted(listeners)
        assert order == rendezvous_order(cn, list(reversed(listeners)))


def test_workers_spread_over_the_listeners():
    counts = Counter(rendezvous_order(cn, _listeners(4))[0] for cn in CNS)
    assert len(counts) == 4
    assert min(counts.values()) > 1000 / 4 * 0.75


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_adding_a_listener_to_n_moves_about_one_in_n_plus_one_workers_all_onto_it(n):
    before = _listeners(n)
    after = [*before, ("10.0.1.1", 6514)]
    moved = [cn for cn in CNS if rendezvous_order(cn, before)[0] != rendezvous_order(cn, after)[0]]
    # Every worker that moves goes to the new listener; nobody shuffles between old ones.
    assert all(rendezvous_order(cn, after)[0] == ("10.0.1.1", 6514) for cn in moved)
    expected = len(CNS) / (n + 1)
    assert expected * 0.7 < len(moved) < expected * 1.3


def test_removing_a_listener_moves_only_its_own_workers_to_their_second_choice():
    listeners = _listeners(4)
    gone = listeners[1]
    rest = [x for x in listeners if x != gone]
    for cn in CNS:
        order = rendezvous_order(cn, listeners)
        new_first = rendezvous_order(cn, rest)[0]
        assert new_first == (order[1] if order[0] == gone else order[0])


def test_the_order_does_not_depend_on_how_the_list_is_ordered_in_the_bundle():
    listeners = _listeners(6)
    assert rendezvous_order("w1", listeners) == rendezvous_order("w1", listeners[::-1])


def test_failover_walks_the_rendezvous_order_and_a_lost_connection_starts_over():
    choice = ListenerChoice("w1", _listeners(3), return_after=300)
    order = choice.order
    assert choice.target == order[0]
    assert choice.failed() == (order[0], order[1])
    assert choice.connected() is True  # not the preferred one: hand it back later
    assert choice.disconnected() == order[1]
    assert choice.target == order[0]
    choice.failed(), choice.failed()
    assert choice.failed() == (order[2], order[0])  # all down: wraps round
    assert choice.connected() is False


def test_a_single_listener_is_always_the_target():
    choice = ListenerChoice("w1", [("127.0.0.1", 6514)], return_after=300)
    assert not choice.several
    assert choice.failed() == (("127.0.0.1", 6514), ("127.0.0.1", 6514))
    assert choice.connected() is False


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("10.0.0.1:6514", ("10.0.0.1", 6514)),
        ("Listener-A.Example.org:1", ("listener-a.example.org", 1)),
        ("[2001:db8::1]:6514", ("2001:db8::1", 6514)),
    ],
)
def test_a_listener_is_host_colon_port(text, parsed):
    assert pki.parse_listener(text) == parsed
    assert pki.parse_listener(pki.format_listener(*parsed)) == parsed


@pytest.mark.parametrize(
    "text",
    [
        "10.0.0.1",
        "10.0.0.1:",
        ":6514",
        "10.0.0.1:0",
        "10.0.0.1:65536",
        "10.0.0.1:65a",
        "2001:db8::1:6514",
        "[10.0.0.1]:6514",
        "bad_host:6514",
        "host:6514\x1b[31m",
        "fe80::1%eth0",
        "[fe80::1%eth0]:6514",
        "",
    ],
)
def test_a_typo_in_a_listener_is_refused(text):
    with pytest.raises(ValidationError, match="invalid"):
        pki.parse_listener(text)


def test_a_hostile_listener_list_is_refused_whole():
    with pytest.raises(ValidationError, match="twice"):
        pki.validate_listeners(["a.example:6514", "A.example:6514"])
    with pytest.raises(ValidationError, match="more than"):
        pki.validate_listeners([f"10.0.{i // 250}.{i % 250 + 1}:6514" for i in range(33)])
    with pytest.raises(ValidationError):
        pki.validate_listeners([])
    with pytest.raises(ValidationError):
        pki.validate_listeners("10.0.0.1:6514")
    with pytest.raises(ValidationError):
        pki.validate_listeners([6514])


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_parse_listener_accepts_or_refuses_anything_without_crashing(text):
    try:
        host, port = pki.parse_listener(text)
    except ValidationError:
        return
    assert 1 <= port <= 65535
    assert pki.parse_listener(pki.format_listener(host, port)) == (host, port)


def _bundle(tmp_path, **extra):
    settings_doc = {"name": "w1", "master_host": "10.9.9.9", "syslog_port": 7000}
    settings_doc.update(master_fingerprint="ab" * 32, **extra)
    (tmp_path / "bundle.json").write_text(json.dumps(settings_doc))
    return pki.WorkerBundle.load(tmp_path)


def test_an_old_bundle_without_a_list_means_its_single_master_listener(tmp_path):
    assert _bundle(tmp_path).listeners == [("10.9.9.9", 7000)]


def test_a_bundle_listener_list_is_read_in_order(tmp_path):
    bundle = _bundle(tmp_path, listeners=["10.0.0.2:6514", "[::1]:6515"])
    assert bundle.listeners == [("10.0.0.2", 6514), ("::1", 6515)]


def test_a_bundle_with_a_bad_listener_list_does_not_load(tmp_path):
    with pytest.raises(pki.PKIError, match="invalid"):
        _bundle(tmp_path, listeners=["10.0.0.2:6514", "10.0.0.2:6514"])
