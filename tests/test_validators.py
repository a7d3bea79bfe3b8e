"""Every validator refuses a trailing newline, a carriage return and a NUL.

``re.match(r"^name$")`` accepts ``"name\\n"`` (``$`` matches before a final
newline): ``validate_host_name('web-01\\n')`` passed, a stream ``syslog\\n``
became a file name under ingest/, a decky ``mail\\n`` put an LF into the SMTP
banner.  Validators now use ``fullmatch``.  Each case below is one validator
with a value it accepts; the test checks that the value is accepted (so the
case can fail) and that the value with the byte appended, prepended or inserted
is refused.

Deliberately not listed: free text that may hold line breaks or any byte by
design (the telnet ``banner``, the tcp-banner ``banner``), the RFC 5424 line
parser (a ``\\r`` inside a line is data, not a name), and ``config.env_int``
(environment files end lines with whitespace; it returns a number).
"""

import ast
import datetime
import re
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.python import usage

from decnet import config, options, pki
from decnet.agent.eventlog import Event, format_event
from decnet.agent.spec import parse_spec
from decnet.errors import DecnetError, ValidationError
from decnet.master import enrollment
from decnet.syslog import ackproto, rfc5424
from decnet.tls import Accept, PeerPolicy, RefusalKind
from decnet.updater import tap as updater_tap
from decnet.updater.engine import normalize_sha256
from decnet.updater.releases import Journal, ReleaseStore, is_release_id
from tests.test_agent_app import Agent, certs  # noqa: F401 - `certs` is a fixture

BAD = {"LF": "\n", "CR": "\r", "NUL": "\x00"}
FP = "ab" * 32
RELEASE = "0123456789abcdef"


def _spec(service: dict, decky: str = "mail") -> None:
    parse_spec({"deckies": [{"name": decky, "services": [service]}]})


def _journal_with(release: str) -> None:
    Journal.from_json(Journal(history=("0" * 16,)).to_json().replace(b"0" * 16, release.encode()))


def _event_param(name: str) -> None:
    format_event(Event(decky="d", service="s", kind="k", params=((name, "v"),)), 0.0)


def _release_dir(release: str) -> None:
    ReleaseStore("/nonexistent").release_dir(release)


def _true_or_refuse(predicate):
    def check(value):
        if not predicate(value):
            raise ValueError("refused")

    return check


# (id, validator, a value it accepts).  A refusal is any DecnetError or ValueError.
VALIDATORS = [
    ("pki.validate_host_name", pki.validate_host_name, "web-01"),
    ("pki.cn_for worker", lambda v: pki.cn_for(config.ROLE_WORKER, v), "web-01"),
    ("pki.cn_for updater", lambda v: pki.cn_for(config.ROLE_UPDATER, v), "web-01"),
    ("pki.parse_address dns", pki.parse_address, "web.example"),
    ("pki.parse_address ipv4", pki.parse_address, "10.0.0.1"),
    ("pki.parse_address ipv6", pki.parse_address, "fd00::1"),
    ("pki.normalize_fingerprint hex", pki.normalize_fingerprint, FP),
    ("pki.normalize_fingerprint colons", pki.normalize_fingerprint, pki.colon_fingerprint(FP)),
    ("ackproto.validate_stream_name", ackproto.validate_stream_name, "syslog"),
    ("ackproto.decode HELLO", lambda v: ackproto.decode(b"H 1 " + v.encode()), "syslog"),
    ("releases.is_release_id", _true_or_refuse(is_release_id), RELEASE),
    ("releases.ReleaseStore.release_dir", _release_dir, RELEASE),
    ("releases.Journal.from_json", _journal_with, RELEASE),
    ("engine.normalize_sha256", normalize_sha256, FP),
    ("spec decky name", lambda v: _spec({"type": "smtp"}, decky=v), "mail"),
    ("spec service name", lambda v: _spec({"type": "smtp", "name": v}), "smtp-in"),
    ("spec smtp hostname", lambda v: _spec({"type": "smtp", "hostname": v}), "mx.example"),
    ("spec telnet hostname", lambda v: _spec({"type": "telnet", "hostname": v}), "gw"),
    ("spec smtp banner", lambda v: _spec({"type": "smtp", "banner": v}), "ESMTP"),
    ("spec ftp banner", lambda v: _spec({"type": "ftp", "banner": v}), "(vsFTPd 3.0.3)"),
    ("spec http server", lambda v: _spec({"type": "http", "server": v}), "nginx"),
    ("spec http title", lambda v: _spec({"type": "http", "title": v}), "Sign in"),
    ("spec http realm", lambda v: _spec({"type": "http", "realm": v}), "admin"),
    ("spec ssh version", lambda v: _spec({"type": "ssh", "version": v}), "SSH-2.0-OpenSSH_9.2"),
    ("spec bind ipv4", lambda v: _spec({"type": "smtp", "bind": v}), "127.0.0.1"),
    ("spec bind ipv6 scoped", lambda v: _spec({"type": "smtp", "bind": v}), "fe80::1%eth0"),
    ("eventlog SD-PARAM name", _event_param, "user"),
    ("rfc5424 TIMESTAMP", lambda v: rfc5424.format_message(timestamp=v), "2026-01-01T00:00:00Z"),
    ("rfc5424 HOSTNAME", lambda v: rfc5424.format_message(hostname=v), "web-01"),
    ("rfc5424 APP-NAME", lambda v: rfc5424.format_message(app_name=v), "sshd"),
    ("rfc5424 MSGID", lambda v: rfc5424.format_message(msgid=v), "login"),
    ("rfc5424 SD-ID", lambda v: rfc5424.format_structured_data([(v, ())]), "decnet@1"),
    ("options.positive_int", options.positive_int, "3"),
    ("options.positive_float", options.positive_float, "0.5"),
    ("options.non_negative_int", options.non_negative_int, "0"),
    ("options.port_number", options.port_number, "8765"),
]

PLACES = {
    "appended": lambda good, bad: good + bad,
    "prepended": lambda good, bad: bad + good,
    "inside": lambda good, bad: good[:1] + bad + good[1:],
}


def _refused(validator, value) -> bool:
    try:
        validator(value)
    except (DecnetError, ValueError):
        return True
    return False


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("byte", BAD)
@pytest.mark.parametrize(
    ("validator", "good"), [v[1:] for v in VALIDATORS], ids=[v[0] for v in VALIDATORS]
)
def test_every_validator_refuses_a_newline_a_carriage_return_and_a_nul(
    validator, good, byte, place
):
    assert not _refused(validator, good), f"{good!r} should be accepted"
    bad = PLACES[place](good, BAD[byte])
    assert _refused(validator, bad), f"{bad!r} was accepted"


@pytest.mark.parametrize("byte", BAD)
def test_a_ca_signed_worker_certificate_whose_cn_ends_in_a_control_byte_has_no_role(ca, byte):
    """The CN is provenance (ingest directory, feed's source_worker): it must be a clean name."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, pki.ORGANIZATION),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, config.ROLE_WORKER),
                    x509.NameAttribute(NameOID.COMMON_NAME, "w1" + BAD[byte]),
                ]
            )
        )
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(ca.key, hashes.SHA256())
    )
    identity = pki.identity_of(cert)
    assert identity.role is None
    refusal = PeerPolicy([Accept(config.ROLE_WORKER)]).check(identity)
    assert refusal.kind is RefusalKind.NO_ROLE and "no valid DECNET role marker" in refusal.detail


@pytest.mark.parametrize("byte", BAD)
def test_the_agent_refuses_to_tear_down_a_decky_name_with_a_control_byte(certs, byte):  # noqa: F811
    agent = Agent(certs)
    code, doc = agent.call("master", "POST", "/teardown", {"decky": "web-01" + BAD[byte]})
    assert code == 400 and doc["problems"] == ["decky: must be a decky name"]
    code, _ = agent.call("master", "POST", "/teardown", {"decky": "web-01"})
    assert code == 404  # a valid name, just not deployed


def test_enrolment_refuses_a_host_name_with_a_trailing_newline(master_home, tmp_path):
    master = enrollment.load_master(master_home)
    with pytest.raises(ValidationError, match="invalid host name"):
        enrollment.enroll(master, "web-01\n", "10.0.0.1", tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_a_scoped_ipv6_address_is_not_a_san(master_home, tmp_path):
    """ipaddress accepts any text after '%' ("fe80::1%x\\ny"); a SAN cannot carry a scope anyway."""
    with pytest.raises(ValidationError, match="scoped"):
        pki.parse_address("fe80::1%eth0")


@pytest.mark.parametrize("byte", ["\n", "\r"])
def test_the_updater_refuses_an_agent_url_whose_host_holds_a_line_break(
    master_home, tmp_path, byte
):
    master = enrollment.load_master(master_home)
    name = f"val-upd-{ord(byte)}"
    enrollment.enroll(master, name, "127.0.0.1", tmp_path / "b", updater=True)
    opts = updater_tap.Options()
    with pytest.raises(usage.UsageError, match="agent-url"):
        opts.parseOptions(
            ["--bundle", str(tmp_path / "b"), "--agent-url", f"https://127.0.0.1{byte}:8765"]
        )


# ---------------------------------------------------------------------------
# A guard for the next validator: no pattern in decnet/ ends with a bare ``$``,
# except multi-line scanners (re.MULTILINE, e.g. the feed's batch parser), where
# ``$`` means "end of this line" on purpose.


def _pattern_tail(node: ast.expr) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str | bytes):
        value = node.value
        return value.decode("latin-1") if isinstance(value, bytes) else value
    if isinstance(node, ast.JoinedStr) and node.values:
        return _pattern_tail(node.values[-1])
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _pattern_tail(node.right)
    return None


def _multiline(call: ast.Call) -> bool:
    flags = [*call.args[1:], *(k.value for k in call.keywords if k.arg == "flags")]
    return any(
        isinstance(n, ast.Attribute) and n.attr in ("MULTILINE", "M")
        for flag in flags
        for n in ast.walk(flag)
    )


def _re_calls(tree: ast.AST):
    """Every ``re.<fn>(pattern, ...)`` call."""
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "re"
            and node.args
        ):
            yield node


def test_no_pattern_in_the_package_anchors_with_a_bare_dollar():
    root = Path(__file__).resolve().parent.parent
    offenders = []
    for path in sorted((root / "decnet").rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        for call in _re_calls(ast.parse(path.read_text(), rel)):
            tail = _pattern_tail(call.args[0])
            if tail is not None and re.search(r"(?<!\\)\$$", tail) and not _multiline(call):
                offenders.append(f"{rel}:{call.lineno}")
    assert offenders == [], "use fullmatch (and \\Z inside lookaheads) instead of '$'"
