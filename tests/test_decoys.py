"""Each decoy service driven by a real client over loopback; the event lines checked exactly."""

import base64
import re

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater

from decnet.agent.decoys import ssh as ssh_decoy
from decnet.agent.engine import BuiltinEngine
from decnet.agent.eventlog import SEVERITY_INFO, SEVERITY_NOTICE, Event, EventLog, format_event
from decnet.agent.spec import parse_spec
from tests.support import FrozenClock, counter_ids, raw_connect

DECKY = "web-01"


class Harness:
    def __init__(self, tmp_path, **engine_kw):
        self.clock = FrozenClock(reactor)
        self.log = EventLog(tmp_path / "decnet.log", reactor, now=self.clock.seconds)
        self.log.startService()
        self.engine = BuiltinEngine(
            reactor,
            self.log.emit,
            tmp_path / "state",
            clock=self.clock,
            new_session_id=counter_ids(),
            **engine_kw,
        )

    async def deploy(self, *services, decky=DECKY) -> dict:
        spec = parse_spec({"deckies": [{"name": decky, "services": list(services)}]})
        return await self.engine.apply(spec)

    def port(self, name: str, decky=DECKY) -> int:
        address = self.engine.status()[decky][name]["address"]
        return int(address.rsplit(":", 1)[1])

    def runtime(self, name: str, decky=DECKY):
        return self.engine.services[(decky, name)].runtime

    async def settle(self, name: str, decky=DECKY, timeout=10.0):
        """Wait (polling, with a deadline) until the service has no live connection."""
        runtime = self.runtime(name, decky)
        for _ in range(int(timeout / 0.01)):
            if not runtime.active:
                break
            await deferLater(reactor, 0.01, lambda: None)
        else:
            raise AssertionError(f"{name} still has connections after {timeout}s")
        await self.log.flush()

    def lines(self) -> list[bytes]:
        return self.log.path.read_bytes().splitlines(keepends=True)

    def expect(self, service, kind, session, client_port, server_port, *params, sev=None):
        base = (
            ("session", session),
            ("src_ip", "127.0.0.1"),
            ("src_port", client_port),
            ("dst_ip", "127.0.0.1"),
            ("dst_port", server_port),
        )
        if kind == "login":
            params = (*params, ("result", "refused"))
            sev = SEVERITY_NOTICE
        event = Event(DECKY, service, kind, base + params, sev or SEVERITY_INFO)
        return format_event(event, self.clock.now)

    async def close(self):
        await self.engine.stop()
        await self.log.stopService()


@pytest_twisted.async_yield_fixture
async def h(tmp_path):
    harness = Harness(tmp_path)
    yield harness
    await harness.close()


def bind(**service):
    return {"bind": "127.0.0.1", "port": 0, **service}


# -- telnet ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_telnet_captures_each_login_attempt_and_hangs_up_after_max_attempts(h):
    await h.deploy(bind(type="telnet", max_attempts=2))
    port = h.port("telnet")
    c = await raw_connect(port)
    await c.expect(b"web-01 login: ")
    assert b"Debian GNU/Linux 12" in c.received
    c.send(b"root\r\n")
    await c.expect(b"Password: ")
    c.send(b"toor\r\n")
    await c.expect(b"Login incorrect")
    # Telnet clients may end a line with CR NUL; IAC sequences are not data.
    c.send(b"ad\xff\xf1min\r\x00hunter2\r\n")
    await c.closed
    await h.settle("telnet")
    cp = c.local_port()
    assert h.lines() == [
        h.expect("telnet", "connect", "s1", cp, port),
        h.expect("telnet", "login", "s1", cp, port, ("user", "root"), ("password", "toor")),
        h.expect("telnet", "login", "s1", cp, port, ("user", "admin"), ("password", "hunter2")),
        h.expect(
            "telnet",
            "disconnect",
            "s1",
            cp,
            port,
            ("reason", "too-many-failures"),
            ("duration", "0.000"),
            ("bytes_in", c.sent),
        ),
    ]
    assert h.engine.status()[DECKY]["telnet"]["events"] == 4


@pytest_twisted.ensureDeferred
async def test_telnet_closes_an_idle_connection(h):
    await h.deploy(bind(type="telnet", idle_timeout=0.2))
    c = await raw_connect(h.port("telnet"))
    await c.closed
    await h.settle("telnet")
    assert b'reason="idle-timeout"' in h.lines()[-1]


# -- ftp ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_ftp_captures_user_pass_and_commands_with_hostile_bytes_escaped(h):
    await h.deploy(bind(type="ftp"))
    port = h.port("ftp")
    c = await raw_connect(port)
    await c.expect(b"220 (vsFTPd 3.0.3)\r\n")
    c.send(b'USER a"dmin]\\\r\n')
    await c.expect(b"331 ")
    c.send(b"PASS p\x1b[0m\xff\r\n")
    await c.expect(b"530 Login incorrect.")
    c.send(b"SYST\r\nQUIT\r\n")
    await c.closed
    await h.settle("ftp")
    cp = c.local_port()
    assert h.lines() == [
        h.expect("ftp", "connect", "s1", cp, port),
        h.expect(
            "ftp", "login", "s1", cp, port, ("user", b'a"dmin]\\'), ("password", b"p\x1b[0m\xff")
        ),
        h.expect("ftp", "command", "s1", cp, port, ("command", "SYST"), ("args", b"")),
        h.expect("ftp", "command", "s1", cp, port, ("command", "QUIT"), ("args", b"")),
        h.expect(
            "ftp",
            "disconnect",
            "s1",
            cp,
            port,
            ("reason", "quit"),
            ("duration", "0.000"),
            ("bytes_in", c.sent),
        ),
    ]
    # The hostile user name is on the wire with RFC 5424 escapes.
    assert b'user="a\\"dmin\\]\\\\\\\\"' in h.lines()[1]


@pytest_twisted.ensureDeferred
async def test_one_megabyte_of_garbage_closes_the_connection_with_one_bounded_line(h):
    await h.deploy(bind(type="ftp"))
    c = await raw_connect(h.port("ftp"))
    await c.expect(b"220 ")
    c.send(bytes(range(256)).replace(b"\n", b"") * 4100)
    await c.closed
    await h.settle("ftp")
    lines = h.lines()
    assert [re.search(rb" - (\S+) \[", ln).group(1) for ln in lines] == [b"connect", b"disconnect"]
    assert b'reason="line-too-long"' in lines[-1]


# -- smtp --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_smtp_captures_auth_plain_and_login_and_relays_nothing(h):
    await h.deploy(bind(type="smtp", hostname="mail.example.test"))
    port = h.port("smtp")
    c = await raw_connect(port)
    await c.expect(b"220 mail.example.test ESMTP Postfix (Debian/GNU)\r\n")
    c.send(b"EHLO scanner\r\n")
    await c.expect(b"250 SMTPUTF8\r\n")
    plain = base64.b64encode(b"\x00root\r\nX-Injected: 1]\x00s3cret")
    c.send(b"AUTH PLAIN " + plain + b"\r\n")
    await c.expect(b"535 ")
    c.send(b"AUTH LOGIN\r\n")
    await c.expect(b"334 VXNlcm5hbWU6")
    c.send(base64.b64encode(b"bob") + b"\r\n")
    await c.expect(b"334 UGFzc3dvcmQ6")
    c.send(base64.b64encode(b"pw") + b"\r\n")
    await c.expect(b"UGFzc3dvcmQ6\r\n535 ")
    c.send(b"RCPT TO:<x@example.org>\r\nQUIT\r\n")
    await c.closed
    await h.settle("smtp")
    cp = c.local_port()
    lines = h.lines()
    assert lines[1] == h.expect(
        "smtp", "command", "s1", cp, port, ("command", "EHLO"), ("args", b"scanner")
    )
    assert lines[2] == h.expect(
        "smtp",
        "login",
        "s1",
        cp,
        port,
        ("mechanism", "PLAIN"),
        ("user", b"root\r\nX-Injected: 1]"),
        ("password", b"s3cret"),
    )
    assert lines[3] == h.expect(
        "smtp",
        "login",
        "s1",
        cp,
        port,
        ("mechanism", "LOGIN"),
        ("user", b"bob"),
        ("password", b"pw"),
    )
    assert lines[4] == h.expect(
        "smtp", "command", "s1", cp, port, ("command", "RCPT"), ("args", b"TO:<x@example.org>")
    )
    assert b"554 5.7.1" in c.received
    assert len(lines) == 7 and b'reason="quit"' in lines[6]


# -- redis -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_redis_captures_auth_and_commands_in_resp_and_inline_form(h):
    await h.deploy(bind(type="redis"))
    port = h.port("redis")
    c = await raw_connect(port)
    user = b"adm\r\nin]"
    c.send(b'*3\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n$3\r\npw"\r\n' % (len(user), user))
    await c.expect(b"-WRONGPASS")
    c.send(b"CONFIG GET dir\r\n")
    await c.expect(b"-NOAUTH Authentication required.\r\n")
    c.send(b"*1\r\n$4\r\nQUIT\r\n")
    await c.closed
    await h.settle("redis")
    cp = c.local_port()
    assert h.lines()[1:4] == [
        h.expect("redis", "login", "s1", cp, port, ("user", user), ("password", b'pw"')),
        h.expect(
            "redis",
            "command",
            "s1",
            cp,
            port,
            ("command", "CONFIG"),
            ("argc", 2),
            ("args", b"GET dir"),
        ),
        h.expect(
            "redis", "command", "s1", cp, port, ("command", "QUIT"), ("argc", 0), ("args", b"")
        ),
    ]


@pytest_twisted.ensureDeferred
async def test_redis_protocol_errors_answer_like_redis_and_close(h):
    await h.deploy(bind(type="redis"))
    c = await raw_connect(h.port("redis"))
    c.send(b"*1\r\n$99999999\r\n")
    await c.closed
    assert c.received == b"-ERR Protocol error: invalid bulk length\r\n"
    await h.settle("redis")
    assert b'reason="protocol-error"' in h.lines()[-1]


# -- tcp-banner --------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_tcp_banner_sends_its_banner_and_captures_the_first_bytes(h):
    await h.deploy(bind(type="tcp-banner", banner="+OK mysql ready\r\n", capture_bytes=8))
    port = h.port("tcp-banner")
    c = await raw_connect(port)
    await c.expect(b"+OK mysql ready\r\n")
    c.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    c.transport.loseConnection()
    await c.closed
    await h.settle("tcp-banner")
    cp = c.local_port()
    assert h.lines() == [
        h.expect("tcp-banner", "connect", "s1", cp, port),
        h.expect(
            "tcp-banner",
            "data",
            "s1",
            cp,
            port,
            ("data", b"\x16\x03\x01\x02\x00\x01\x00\x01"),
            ("size", 8),
        ),
        h.expect(
            "tcp-banner",
            "disconnect",
            "s1",
            cp,
            port,
            ("reason", "closed"),
            ("duration", "0.000"),
            ("bytes_in", 11),
        ),
    ]


# -- http --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_http_serves_a_login_page_and_captures_form_and_basic_credentials(h):
    await h.deploy(bind(type="http", server="nginx/1.22.1", title="Router"))
    port = h.port("http")
    url = f"http://127.0.0.1:{port}/login"
    response = await treq.post(
        url,
        data={"username": "admin\r\n]", "password": "p@ss"},
        auth=("basic-user", "basic:pw"),
        headers={"User-Agent": "Mozilla/5.0 (evil\x7f)"},
        persistent=False,
    )
    body = await response.text()
    assert response.code == 200
    assert response.headers.getRawHeaders("server") == ["nginx/1.22.1"]
    assert "<title>Router</title>" in body and "Invalid username or password" in body
    missing = await treq.get(f"http://127.0.0.1:{port}/.env", persistent=False)
    assert missing.code == 404
    assert "nginx/1.22.1 Server at web-01 Port" in await missing.text()
    await h.settle("http")
    lines = h.lines()
    kinds = [re.search(rb" - (\S+) \[", ln).group(1) for ln in lines]
    assert kinds[:4] == [b"connect", b"request", b"login", b"login"]
    request = lines[1].decode()
    assert 'method="POST" path="/login" version="HTTP/1.1"' in request
    assert 'user_agent="Mozilla/5.0 (evil\\\\x7f)"' in request
    assert 'body="username=admin%0D%0A%5D&password=p%40ss"' in request
    src_port = int(re.search(rb'src_port="(\d+)"', lines[2]).group(1))
    assert lines[2] == h.expect(
        "http",
        "login",
        "s1",
        src_port,
        port,
        ("method", "basic"),
        ("user", "basic-user"),
        ("password", "basic:pw"),
    )
    assert lines[3] == h.expect(
        "http",
        "login",
        "s1",
        src_port,
        port,
        ("method", "form"),
        ("user", b"admin\r\n]"),
        ("password", b"p@ss"),
    )


@pytest_twisted.ensureDeferred
async def test_http_with_a_realm_challenges_every_request(h):
    await h.deploy(bind(type="http", realm="NAS"))
    response = await treq.get(f"http://127.0.0.1:{h.port('http')}/", persistent=False)
    assert response.code == 401
    assert response.headers.getRawHeaders("www-authenticate") == ['Basic realm="NAS"']
    await response.text()


@pytest_twisted.ensureDeferred
async def test_http_bodies_are_captured_only_up_to_the_cap(h):
    await h.deploy(bind(type="http", max_body=100))
    response = await treq.post(
        f"http://127.0.0.1:{h.port('http')}/upload", data=b"A" * 1_000_000, persistent=False
    )
    assert response.code == 404
    await response.text()
    await h.settle("http")
    request = next(ln for ln in h.lines() if b" request " in ln)
    assert b'body="' + b"A" * 100 + b'"' in request
    assert b'body_size="1000000"' in request


# -- ssh ---------------------------------------------------------------------


class _AcceptAnyHostKey:
    def prompt(self, text):
        return defer.succeed(True)

    def warn(self, text):
        pass


@pytest_twisted.ensureDeferred
async def test_ssh_records_key_exchange_public_key_and_password_attempts(h, tmp_path, monkeypatch):
    from twisted.conch.client.knownhosts import KnownHostsFile
    from twisted.conch.endpoints import AuthenticationFailed, SSHCommandClientEndpoint
    from twisted.conch.ssh import keys
    from twisted.internet.endpoints import connectProtocol
    from twisted.internet.protocol import Protocol
    from twisted.python.filepath import FilePath

    monkeypatch.setattr(ssh_decoy.DecoyUserAuth, "passwordDelay", 0)
    await h.deploy(
        bind(type="ssh", version="SSH-2.0-OpenSSH_8.9p1 Ubuntu-3ubuntu0.6", max_auth_tries=3)
    )
    port = h.port("ssh")
    client_key = keys.Key.fromString(
        ssh_decoy.keys.Key(ssh_decoy.ed25519.Ed25519PrivateKey.generate()).toString("openssh")
    )
    user = b"root\r\n]x"
    endpoint = SSHCommandClientEndpoint.newConnection(
        reactor,
        b"id",
        user,
        "127.0.0.1",
        port,
        keys=[client_key],
        password=b'pa"ss]\\',
        knownHosts=KnownHostsFile(FilePath(str(tmp_path / "known_hosts"))),
        ui=_AcceptAnyHostKey(),
    )
    with pytest.raises(AuthenticationFailed):
        await connectProtocol(endpoint, Protocol())
    await h.settle("ssh")
    lines = h.lines()
    kinds = [re.search(rb" - (\S+) \[", ln).group(1) for ln in lines]
    # max_auth_tries=3: the key, then the password twice, then the server hangs up.
    assert kinds == [b"connect", b"kex", b"login", b"login", b"login", b"disconnect"]
    assert lines[3] == lines[4]
    assert re.search(
        rb'client_version="SSH-2.0-Twisted_[^"]+" hassh="[0-9a-f]{32}" kex="', lines[1]
    )
    src_port = int(re.search(rb'src_port="(\d+)"', lines[0]).group(1))
    fp = "SHA256:" + client_key.fingerprint(keys.FingerprintFormats.SHA256_BASE64)
    assert lines[2] == h.expect(
        "ssh",
        "login",
        "s1",
        src_port,
        port,
        ("method", "publickey"),
        ("user", user),
        ("key_type", b"ssh-ed25519"),
        ("key_fp", fp),
        ("signed", False),
    )
    assert lines[3] == h.expect(
        "ssh",
        "login",
        "s1",
        src_port,
        port,
        ("method", "password"),
        ("user", user),
        ("password", b'pa"ss]\\'),
    )
    # The server presented our configured version and a host key kept in the state dir.
    host_key = tmp_path / "state" / "ssh" / DECKY / "ssh_host_ed25519_key"
    assert host_key.stat().st_mode & 0o777 == 0o600
    assert "OpenSSH_8.9p1" in h.engine.services[(DECKY, "ssh")].runtime.spec.option("version")


@pytest_twisted.ensureDeferred
async def test_ssh_banner_is_the_configured_version_string(h):
    await h.deploy(bind(type="ssh", version="SSH-2.0-OpenSSH_9.6"))
    c = await raw_connect(h.port("ssh"))
    await c.expect(b"\r\n")
    assert c.received.startswith(b"SSH-2.0-OpenSSH_9.6\r\n")
    c.transport.loseConnection()
    await h.settle("ssh")


# -- engine behaviour shared by all services ----------------------------------


@pytest_twisted.ensureDeferred
async def test_max_connections_refuses_extra_clients_and_counts_them(h):
    await h.deploy(bind(type="tcp-banner", banner="hi\n", max_connections=1))
    first = await raw_connect(h.port("tcp-banner"))
    await first.expect(b"hi\n")
    second = await raw_connect(h.port("tcp-banner"))
    await second.closed
    assert second.received == b""
    assert h.engine.status()[DECKY]["tcp-banner"]["refused"] == 1
    first.transport.loseConnection()
    await h.settle("tcp-banner")


@pytest_twisted.ensureDeferred
async def test_stopping_a_service_drops_its_live_connections(h):
    await h.deploy(bind(type="telnet"))
    c = await raw_connect(h.port("telnet"))
    await c.expect(b"login: ")
    await h.engine.stop()
    await c.closed
    await h.log.flush()
    assert b'reason="service-stopped"' in h.lines()[-1]


GARBAGE = bytes(range(1, 256)).replace(b"\n", b"").replace(b"\r", b"") * 4200  # ~1 MB, no EOL


@pytest.mark.parametrize("kind", ["ssh", "telnet", "http", "ftp", "smtp", "redis", "tcp-banner"])
@pytest_twisted.ensureDeferred
async def test_a_megabyte_of_garbage_yields_only_bounded_well_formed_lines(h, kind):
    from decnet import config
    from tests.test_agent_eventlog import SYSLOG_RE

    service = bind(type=kind, idle_timeout=2)
    if kind == "tcp-banner":
        service["port"] = 0
    await h.deploy(service)
    c = await raw_connect(h.port(kind))
    c.send(GARBAGE)
    if kind == "tcp-banner":
        c.transport.loseConnection()  # it keeps reading until the client goes
    await c.closed
    await h.settle(kind)
    lines = h.lines()
    assert lines[0].split(b" ")[5] == b"connect" and lines[-1].split(b" ")[5] == b"disconnect"
    for line in lines:
        assert len(line) <= config.EVENT_LINE_MAX
        assert SYSLOG_RE.match(line.decode("utf-8", "surrogatepass"))
    # The service still answers the next client.
    again = await raw_connect(h.port(kind))
    again.transport.loseConnection()
    await again.closed


# -- the hostile internet: degenerate floods, time and socket budgets -----------


@pytest.mark.parametrize("unit", [b"\n", b"*0\r\n", b"*-1\r\n"])
@pytest_twisted.ensureDeferred
async def test_redis_counts_blank_and_empty_commands_toward_the_command_cap(h, unit):
    from decnet.agent.decoys.base import MAX_COMMANDS

    await h.deploy(bind(type="redis", idle_timeout=3))
    c = await raw_connect(h.port("redis"))
    c.send(unit * (MAX_COMMANDS + 1))
    await c.closed
    assert c.received == b""  # Redis answers none of them
    await h.settle("redis")
    assert b'reason="command-limit"' in h.lines()[-1]


@pytest_twisted.ensureDeferred
async def test_a_connection_that_trickles_is_closed_at_its_lifetime_limit(h):
    await h.deploy(bind(type="tcp-banner", idle_timeout=0.5, max_lifetime=1.5))
    c = await raw_connect(h.port("tcp-banner"))
    while not c.closed.called:
        c.send(b".")  # never idle for 0.5 s
        await deferLater(reactor, 0.1, lambda: None)
    await h.settle("tcp-banner")
    assert b'reason="lifetime-limit"' in h.lines()[-1]


@pytest_twisted.ensureDeferred
async def test_all_decoys_share_one_socket_budget_and_refusals_are_logged_once(tmp_path):
    from twisted.logger import Logger

    from decnet.agent.decoys.budget import ConnectionBudget

    harness = Harness(tmp_path, connection_budget=ConnectionBudget(4, reactor))
    logged = []
    harness.engine.connection_budget.report.log = Logger(observer=logged.append)
    try:
        await harness.deploy(
            bind(type="tcp-banner", name="one", banner="hi\n"),
            bind(type="tcp-banner", name="two", banner="hi\n"),
        )
        # Two listeners hold two of the four sockets: two connections fit.
        first = await raw_connect(harness.port("one"))
        second = await raw_connect(harness.port("two"))
        await first.expect(b"hi\n")
        await second.expect(b"hi\n")
        refused = [await raw_connect(harness.port(name)) for name in ("one", "two") * 5]
        for c in refused:
            await c.closed
            assert c.received == b""
        assert harness.engine.connection_budget.connections == 2
        status = harness.engine.status()[DECKY]
        assert status["one"]["refused"] + status["two"]["refused"] == 10
        warnings = [e for e in logged if "Refusing decoy connections" in e["log_format"]]
        assert len(logged) == len(warnings) == 1  # one line for the burst, not ten
        # A slot freed is a slot for the next client, on either service.
        first.transport.loseConnection()
        await harness.settle("one")
        again = await raw_connect(harness.port("two"))
        await again.expect(b"hi\n")
        again.transport.loseConnection()
        second.transport.loseConnection()
        await harness.settle("two")
    finally:
        await harness.close()


@pytest_twisted.ensureDeferred
async def test_a_flood_in_one_read_is_parsed_over_several_reactor_turns(h):
    await h.deploy(bind(type="redis"))
    c = await raw_connect(h.port("redis"))
    runtime = h.runtime("redis")
    while not runtime.active:
        await deferLater(reactor, 0.01, lambda: None)
    (proto,) = runtime.active
    before = runtime.events
    proto.dataReceived(b"PING\r\n" * 5000)  # what one 30 KB read delivers
    # A bounded batch now; the API and the other connections get the reactor
    # before the next one.
    assert 0 < runtime.events - before <= 64
    await c.closed
    await h.settle("redis")
    assert b'reason="command-limit"' in h.lines()[-1]


@pytest_twisted.ensureDeferred
async def test_decoy_connections_get_small_kernel_buffers(h):
    import socket

    from decnet.agent.engine import DECOY_SOCKET_BUFFER

    await h.deploy(bind(type="tcp-banner", banner="hi\n"))
    c = await raw_connect(h.port("tcp-banner"))
    await c.expect(b"hi\n")
    (proto,) = h.runtime("tcp-banner").active
    sock = proto.transport.socket
    # Linux reports twice what was set; autotuning would grow it to megabytes.
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 2 * DECOY_SOCKET_BUFFER
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * DECOY_SOCKET_BUFFER
    c.transport.loseConnection()
    await h.settle("tcp-banner")
