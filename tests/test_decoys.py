"""Each decoy service: its protocol driven in memory through the real engine, the event
lines checked exactly, and one real client over loopback per decoy (a smoke test).

In memory (:mod:`tests.decoy_support`): the engine listens on a memory reactor, each
connection is a ``StringTransport``, time is the reactor's clock.  Over loopback: the
real reactor, real sockets, the real event log file.
"""

import base64
import re

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor

from decnet import config
from decnet.agent.decoys import ssh as ssh_decoy
from decnet.agent.decoys.base import MAX_COMMANDS
from decnet.agent.decoys.budget import ConnectionBudget
from decnet.agent.engine import BuiltinEngine
from decnet.agent.eventlog import SEVERITY_INFO, SEVERITY_NOTICE, Event, EventLog, format_event
from decnet.agent.spec import parse_spec
from tests.decoy_support import MemoryDecoys
from tests.support import FrozenClock, counter_ids, eventually, raw_connect
from tests.test_agent_eventlog import SYSLOG_RE

DECKY = "web-01"


def kinds_of(lines: list[bytes]) -> list[bytes]:
    return [re.search(rb" - (\S+) \[", ln).group(1) for ln in lines]


# == in memory ==================================================================


@pytest.fixture
def m(tmp_path):
    decoys = MemoryDecoys(tmp_path / "state")
    yield decoys
    decoys.stop()


def service(**options):
    """A service on 127.0.0.1 at its type's usual port (nothing binds: the reactor is memory)."""
    return {"bind": "127.0.0.1", **options}


# -- telnet ------------------------------------------------------------------


def test_telnet_captures_each_login_attempt_and_hangs_up_after_max_attempts(m):
    m.deploy(service(type="telnet", max_attempts=2))
    c = m.connect("telnet")
    assert c.received().endswith(b"web-01 login: ")
    assert b"Debian GNU/Linux 12" in c.received()
    c.feed(b"root\r\n")
    assert c.received().endswith(b"Password: ")
    c.feed(b"toor\r\n")
    assert b"Login incorrect" in c.received()
    # Telnet clients may end a line with CR NUL; IAC sequences are not data.
    c.feed(b"ad\xff\xf1min\r\x00hunter2\r\n")
    assert c.closed
    c.lose()
    assert m.lines() == [
        m.expect("telnet", "connect", "s1", c),
        m.expect("telnet", "login", "s1", c, ("user", "root"), ("password", "toor")),
        m.expect("telnet", "login", "s1", c, ("user", "admin"), ("password", "hunter2")),
        m.expect(
            "telnet",
            "disconnect",
            "s1",
            c,
            ("reason", "too-many-failures"),
            ("duration", "0.000"),
            ("bytes_in", c.sent),
        ),
    ]
    assert m.engine.status()[DECKY]["telnet"]["events"] == 4


def test_telnet_closes_an_idle_connection(m):
    m.deploy(service(type="telnet", idle_timeout=0.25))
    c = m.connect("telnet")
    m.reactor.advance(0.125)
    assert not c.closed
    m.reactor.advance(0.125)
    assert c.closed
    c.lose()
    assert b'reason="idle-timeout"' in m.lines()[-1]
    assert b'duration="0.250"' in m.lines()[-1]


# -- ftp ---------------------------------------------------------------------


def test_ftp_captures_user_pass_and_commands_with_hostile_bytes_escaped(m):
    m.deploy(service(type="ftp"))
    c = m.connect("ftp")
    assert c.received() == b"220 (vsFTPd 3.0.3)\r\n"
    c.feed(b'USER a"dmin]\\\r\n')
    assert c.received().endswith(b"\r\n") and b"331 " in c.received()
    c.feed(b"PASS p\x1b[0m\xff\r\n")
    assert b"530 Login incorrect." in c.received()
    c.feed(b"SYST\r\nQUIT\r\n")
    c.hang_up_if_closed()
    assert c.lost
    assert m.lines() == [
        m.expect("ftp", "connect", "s1", c),
        m.expect("ftp", "login", "s1", c, ("user", b'a"dmin]\\'), ("password", b"p\x1b[0m\xff")),
        m.expect("ftp", "command", "s1", c, ("command", "SYST"), ("args", b"")),
        m.expect("ftp", "command", "s1", c, ("command", "QUIT"), ("args", b"")),
        m.expect(
            "ftp",
            "disconnect",
            "s1",
            c,
            ("reason", "quit"),
            ("duration", "0.000"),
            ("bytes_in", c.sent),
        ),
    ]
    # The hostile user name is on the wire with RFC 5424 escapes.
    assert b'user="a\\"dmin\\]\\\\\\\\"' in m.lines()[1]


def test_one_megabyte_of_garbage_closes_the_connection_with_one_bounded_line(m):
    m.deploy(service(type="ftp"))
    c = m.connect("ftp")
    c.feed(bytes(range(256)).replace(b"\n", b"") * 4100)
    c.hang_up_if_closed()
    assert c.lost
    lines = m.lines()
    assert kinds_of(lines) == [b"connect", b"disconnect"]
    assert b'reason="line-too-long"' in lines[-1]


# -- smtp --------------------------------------------------------------------


def test_smtp_captures_auth_plain_and_login_and_relays_nothing(m):
    m.deploy(service(type="smtp", hostname="mail.example.test"))
    c = m.connect("smtp")
    assert c.received() == b"220 mail.example.test ESMTP Postfix (Debian/GNU)\r\n"
    c.feed(b"EHLO scanner\r\n")
    assert c.received().endswith(b"250 SMTPUTF8\r\n")
    plain = base64.b64encode(b"\x00root\r\nX-Injected: 1]\x00s3cret")
    c.feed(b"AUTH PLAIN " + plain + b"\r\n")
    assert b"\r\n535 " in c.received()
    c.feed(b"AUTH LOGIN\r\n")
    assert c.received().endswith(b"334 VXNlcm5hbWU6\r\n")
    c.feed(base64.b64encode(b"bob") + b"\r\n")
    assert c.received().endswith(b"334 UGFzc3dvcmQ6\r\n")
    c.feed(base64.b64encode(b"pw") + b"\r\n")
    assert b"UGFzc3dvcmQ6\r\n535 " in c.received()
    c.feed(b"RCPT TO:<x@example.org>\r\nQUIT\r\n")
    c.hang_up_if_closed()
    lines = m.lines()
    assert lines[1] == m.expect(
        "smtp", "command", "s1", c, ("command", "EHLO"), ("args", b"scanner")
    )
    assert lines[2] == m.expect(
        "smtp",
        "login",
        "s1",
        c,
        ("mechanism", "PLAIN"),
        ("user", b"root\r\nX-Injected: 1]"),
        ("password", b"s3cret"),
    )
    assert lines[3] == m.expect(
        "smtp", "login", "s1", c, ("mechanism", "LOGIN"), ("user", b"bob"), ("password", b"pw")
    )
    assert lines[4] == m.expect(
        "smtp", "command", "s1", c, ("command", "RCPT"), ("args", b"TO:<x@example.org>")
    )
    assert b"554 5.7.1" in c.received()
    assert len(lines) == 7 and b'reason="quit"' in lines[6]


# -- redis -------------------------------------------------------------------


def test_redis_captures_auth_and_commands_in_resp_and_inline_form(m):
    m.deploy(service(type="redis"))
    c = m.connect("redis")
    user = b"adm\r\nin]"
    c.feed(b'*3\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n$3\r\npw"\r\n' % (len(user), user))
    assert c.received().startswith(b"-WRONGPASS")
    c.feed(b"CONFIG GET dir\r\n")
    assert c.received().endswith(b"-NOAUTH Authentication required.\r\n")
    c.feed(b"*1\r\n$4\r\nQUIT\r\n")
    c.hang_up_if_closed()
    assert c.lost
    assert m.lines()[1:4] == [
        m.expect("redis", "login", "s1", c, ("user", user), ("password", b'pw"')),
        m.expect(
            "redis", "command", "s1", c, ("command", "CONFIG"), ("argc", 2), ("args", b"GET dir")
        ),
        m.expect("redis", "command", "s1", c, ("command", "QUIT"), ("argc", 0), ("args", b"")),
    ]


def test_redis_protocol_errors_answer_like_redis_and_close(m):
    m.deploy(service(type="redis"))
    c = m.connect("redis")
    c.feed(b"*1\r\n$99999999\r\n")
    assert c.closed
    assert c.received() == b"-ERR Protocol error: invalid bulk length\r\n"
    c.lose()
    assert b'reason="protocol-error"' in m.lines()[-1]


@pytest.mark.parametrize("unit", [b"\n", b"*0\r\n", b"*-1\r\n"])
def test_redis_counts_blank_and_empty_commands_toward_the_command_cap(m, unit):
    m.deploy(service(type="redis", idle_timeout=3))
    c = m.connect("redis")
    c.feed(unit * (MAX_COMMANDS + 1))
    assert c.closed
    assert c.received() == b""  # Redis answers none of them
    c.lose()
    assert b'reason="command-limit"' in m.lines()[-1]


# -- tcp-banner --------------------------------------------------------------


def test_tcp_banner_sends_its_banner_and_captures_the_first_bytes(m):
    m.deploy(service(type="tcp-banner", port=3306, banner="+OK mysql ready\r\n", capture_bytes=8))
    c = m.connect("tcp-banner")
    assert c.received() == b"+OK mysql ready\r\n"
    c.feed(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    c.lose()
    assert m.lines() == [
        m.expect("tcp-banner", "connect", "s1", c),
        m.expect(
            "tcp-banner",
            "data",
            "s1",
            c,
            ("data", b"\x16\x03\x01\x02\x00\x01\x00\x01"),
            ("size", 8),
        ),
        m.expect(
            "tcp-banner",
            "disconnect",
            "s1",
            c,
            ("reason", "closed"),
            ("duration", "0.000"),
            ("bytes_in", 11),
        ),
    ]


# -- http --------------------------------------------------------------------


def test_http_with_a_realm_challenges_every_request(m):
    m.deploy(service(type="http", realm="NAS"))
    c = m.connect("http")
    c.feed(b"GET / HTTP/1.1\r\nHost: web-01\r\n\r\n")
    head = c.received().split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    assert head[0] == b"HTTP/1.1 401 Unauthorized"
    assert b'WWW-Authenticate: Basic realm="NAS"' in head


def test_http_bodies_are_captured_only_up_to_the_cap(m):
    m.deploy(service(type="http", max_body=100))
    c = m.connect("http")
    c.feed(b"POST /upload HTTP/1.1\r\nHost: web-01\r\nContent-Length: 1000000\r\n\r\n")
    c.feed(b"A" * 1_000_000, chunk=65536)
    assert c.received().startswith(b"HTTP/1.1 404 Not Found\r\n")
    request = next(ln for ln in m.lines() if b" request " in ln)
    assert b'body="' + b"A" * 100 + b'"' in request
    assert b'body_size="1000000"' in request


# -- ssh ---------------------------------------------------------------------


def test_ssh_banner_is_the_configured_version_string(m):
    m.deploy(service(type="ssh", version="SSH-2.0-OpenSSH_9.6"))
    c = m.connect("ssh")
    assert c.received().startswith(b"SSH-2.0-OpenSSH_9.6\r\n")
    c.lose()
    assert kinds_of(m.lines()) == [b"connect", b"disconnect"]


# -- engine behaviour shared by all services ----------------------------------


def test_max_connections_refuses_extra_clients_and_counts_them(m):
    m.deploy(service(type="tcp-banner", port=9, banner="hi\n", max_connections=1))
    first = m.connect("tcp-banner")
    assert first.received() == b"hi\n"
    second = m.connect("tcp-banner")
    assert second.refused
    assert m.engine.status()[DECKY]["tcp-banner"]["refused"] == 1
    first.lose()
    assert m.connect("tcp-banner").received() == b"hi\n"  # its slot is free again


def test_stopping_a_service_drops_its_live_connections(m):
    m.deploy(service(type="telnet"))
    c = m.connect("telnet")
    assert c.received().endswith(b"login: ")
    m.stop()
    assert c.transport.disconnected  # aborted, not closed politely
    c.lose()
    assert b'reason="service-stopped"' in m.lines()[-1]


GARBAGE = bytes(range(1, 256)).replace(b"\n", b"").replace(b"\r", b"") * 4200  # ~1 MB, no EOL


@pytest.mark.parametrize("kind", ["ssh", "telnet", "http", "ftp", "smtp", "redis", "tcp-banner"])
def test_a_megabyte_of_garbage_yields_only_bounded_well_formed_lines(m, kind):
    m.deploy(service(type=kind, idle_timeout=2, **({"port": 9} if kind == "tcp-banner" else {})))
    c = m.connect(kind)
    c.feed(GARBAGE, chunk=65536)
    if kind == "tcp-banner":
        c.lose()  # it keeps reading until the client goes
    m.reactor.advance(2)  # whatever is still waiting for more input is idle now
    c.hang_up_if_closed()
    assert c.lost
    lines = m.lines()
    assert kinds_of(lines)[0] == b"connect" and kinds_of(lines)[-1] == b"disconnect"
    for line in lines:
        assert len(line) <= config.EVENT_LINE_MAX
        assert SYSLOG_RE.match(line.decode("utf-8", "surrogatepass"))
    # The service still answers the next client.
    again = m.connect(kind)
    assert not again.refused and not again.closed


def test_all_decoys_share_one_socket_budget_and_refusals_are_logged_once(tmp_path):
    from twisted.logger import Logger

    from tests.decoy_support import TurnReactor

    budget = ConnectionBudget(4, TurnReactor())
    m = MemoryDecoys(tmp_path / "state", connection_budget=budget)
    budget.report.clock = m.reactor
    logged = []
    budget.report.log = Logger(observer=logged.append)
    m.deploy(
        service(type="tcp-banner", name="one", port=1001, banner="hi\n"),
        service(type="tcp-banner", name="two", port=1002, banner="hi\n"),
    )
    # Two listeners hold two of the four sockets: two connections fit.
    first, second = m.connect("one"), m.connect("two")
    assert first.received() == second.received() == b"hi\n"
    refused = [m.connect(name) for name in ("one", "two") * 5]
    assert all(c.refused for c in refused)
    assert budget.connections == 2
    status = m.engine.status()[DECKY]
    assert status["one"]["refused"] + status["two"]["refused"] == 10
    warnings = [e for e in logged if "Refusing decoy connections" in e["log_format"]]
    assert len(logged) == len(warnings) == 1  # one line for the burst, not ten
    # A slot freed is a slot for the next client, on either service.
    first.lose()
    assert m.connect("two").received() == b"hi\n"
    m.stop()


# == over loopback: one real client per decoy =====================================


class Harness:
    """The real engine on the real reactor, its events in a real event log file."""

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
        """Wait until the service has no live connection (the kernel delivers the close)."""
        runtime = self.runtime(name, decky)
        await eventually(lambda: not runtime.active, timeout, what=f"{name} to be idle")
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


# (greeting awaited, what the client sends, what it awaits, whether it hangs up itself)
SMOKE = {
    "telnet": (b"login: ", b"root\r\n", b"Password: ", True),
    "ftp": (b"220 ", b"QUIT\r\n", b"221 ", False),
    "smtp": (b"220 ", b"QUIT\r\n", b"221 ", False),
    "redis": (b"", b"PING\r\n", b"-NOAUTH", True),
    "tcp-banner": (b"hi", b"hello", b"", True),
}


@pytest.mark.parametrize("kind", sorted(SMOKE))
@pytest_twisted.ensureDeferred
async def test_a_real_client_over_loopback_is_answered_and_logged_from_connect_to_disconnect(
    h, kind
):
    greeting, send, answer, hang_up = SMOKE[kind]
    await h.deploy(bind(type=kind, **({"banner": "hi"} if kind == "tcp-banner" else {})))
    port = h.port(kind)
    c = await raw_connect(port)
    await c.expect(greeting)
    c.send(send)
    await c.expect(answer)
    if hang_up:
        c.transport.loseConnection()
    await c.closed
    await h.settle(kind)
    lines = h.lines()
    assert lines[0] == h.expect(kind, "connect", "s1", c.local_port(), port)
    assert kinds_of(lines)[-1] == b"disconnect"
    assert f'bytes_in="{len(send)}"'.encode() in lines[-1]


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
    kinds = kinds_of(lines)
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
    kinds = kinds_of(lines)
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
