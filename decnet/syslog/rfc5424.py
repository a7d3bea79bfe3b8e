"""RFC 5424 messages: a pure, lenient parser and a strict formatter.

``parse(line)`` returns a :class:`SyslogMessage` or raises :class:`ParseError`
naming what was wrong; callers that must never lose a line (the listener's
JSON feed) keep the raw bytes and flag the line instead.  ``format_message``
builds a valid message from fields, escaping SD-PARAM values (``"``, ``\\``
and ``]``, RFC 5424 §6.3.3), so other code never hand-assembles syslog text:
the decoys' event log (:mod:`decnet.agent.eventlog`) writes every line with it,
after :func:`header_text` made its untrusted header fields printable and
:func:`format_timestamp` wrote the time.

The field limits and the text patterns (:data:`TIMESTAMP_PATTERN`,
:data:`SD_NAME_CHARS`) are defined once here; the listener's fast feed encoder
(:mod:`decnet.listener.feed`) builds its regex from them.

Header fields are printable US-ASCII (RFC 5424 §6); the MSG part is bytes,
UTF-8 when it starts with a BOM (§6.4).  Nothing here trusts HOSTNAME: it is
whatever the sender wrote.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterable, Sequence

import attrs

from decnet.errors import DecnetError

BOM = b"\xef\xbb\xbf"
NILVALUE = "-"

# Field limits from RFC 5424 §6 (ABNF).
MAX_HOSTNAME = 255
MAX_APP_NAME = 48
MAX_PROCID = 128
MAX_MSGID = 32
MAX_SD_NAME = 32

# TIMESTAMP (RFC 5424 §6.2.3, RFC 3339 with at most six fraction digits), as text.
TIMESTAMP_PATTERN = (
    r"[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])"
    r"T(?:[01][0-9]|2[0-3]):[0-5][0-9]:(?:[0-5][0-9]|60)(?:\.[0-9]{1,6})?"
    r"(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
)
# SD-NAME characters, for a regex class: PRINTUSASCII except '=', SP, ']' and '"'.
SD_NAME_CHARS = r"!#-<>-\\^-~"

FACILITY_NAMES = (
    "kern user mail daemon auth syslog lpr news uucp cron authpriv ftp ntp audit alert clock "
    "local0 local1 local2 local3 local4 local5 local6 local7"
).split()
SEVERITY_NAMES = "emerg alert crit err warning notice info debug".split()


class ParseError(DecnetError):
    """The line is not a valid RFC 5424 message; the message says where."""


@attrs.frozen
class SDElement:
    """One STRUCTURED-DATA element: an SD-ID and its params in order (names may repeat)."""

    id: str
    params: tuple[tuple[str, str], ...] = ()


@attrs.frozen
class SyslogMessage:
    facility: int
    severity: int
    version: int = 1
    timestamp: str | None = None  # RFC 3339 text as sent; None for NILVALUE
    hostname: str | None = None
    app_name: str | None = None
    procid: str | None = None
    msgid: str | None = None
    structured_data: tuple[SDElement, ...] = ()
    msg: bytes | None = None  # without the BOM; None when absent
    bom: bool = False

    @property
    def pri(self) -> int:
        return self.facility * 8 + self.severity


# HEADER: PRI VERSION SP TIMESTAMP SP HOSTNAME SP APP-NAME SP PROCID SP MSGID SP
# Header fields are PRINTUSASCII (%d33-126): the character class checks that.
_HEADER = re.compile(
    rb"<(\d{1,3})>([1-9]\d{0,2}) ([!-~]+) ([!-~]{1,%d}) ([!-~]{1,%d}) ([!-~]{1,%d}) "
    rb"([!-~]{1,%d}) " % (MAX_HOSTNAME, MAX_APP_NAME, MAX_PROCID, MAX_MSGID)
)
_TIMESTAMP = re.compile(TIMESTAMP_PATTERN)
# SD-NAME: 1*32 PRINTUSASCII except '=', SP, ']' and '"'.
_NAME = b"[%s]{1,%d}" % (SD_NAME_CHARS.encode(), MAX_SD_NAME)
_SD_ELEMENT = re.compile(
    rb"\[(" + _NAME + rb")((?: " + _NAME + rb'="(?:[^"\\]|\\.)*")*)\]', re.DOTALL
)
_SD_PARAM = re.compile(rb" (" + _NAME + rb')="((?:[^"\\]|\\.)*)"', re.DOTALL)
_UNESCAPE = re.compile(rb'\\(["\\\]])')


def _text(value: bytes) -> str | None:
    return None if value == b"-" else value.decode("ascii")


def parse(line: bytes) -> SyslogMessage:
    """Parse one RFC 5424 message (no trailing LF); raise :class:`ParseError` if invalid."""
    m = _HEADER.match(line)
    if m is None:
        raise ParseError(_header_problem(line))
    pri = int(m.group(1))
    if pri > 191 or (len(m.group(1)) > 1 and m.group(1)[0] == 0x30):
        raise ParseError(f"invalid PRI {m.group(1).decode()!r}")
    fields = m.groups()[2:]
    ts = _text(fields[0])
    if ts is not None and not _TIMESTAMP.fullmatch(ts):
        raise ParseError(f"invalid TIMESTAMP {ts[:40]!r}")
    sd, pos = parse_structured_data(line, m.end())
    msg: bytes | None = None
    bom = False
    if pos < len(line):
        if line[pos : pos + 1] != b" ":
            raise ParseError(f"expected SP before MSG at byte {pos}")
        msg = line[pos + 1 :]
        if msg.startswith(BOM):
            bom, msg = True, msg[len(BOM) :]
    return SyslogMessage(
        facility=pri >> 3,
        severity=pri & 7,
        version=int(m.group(2)),
        timestamp=ts,
        hostname=_text(fields[1]),
        app_name=_text(fields[2]),
        procid=_text(fields[3]),
        msgid=_text(fields[4]),
        structured_data=sd,
        msg=msg,
        bom=bom,
    )


def parse_structured_data(line: bytes, pos: int = 0) -> tuple[tuple[SDElement, ...], int]:
    """STRUCTURED-DATA (``-`` or ``[...]...``) starting at ``pos``; the elements and the end."""
    if line[pos : pos + 1] == b"-":
        return (), pos + 1
    if line[pos : pos + 1] != b"[":
        raise ParseError(f"expected STRUCTURED-DATA ('-' or '[') at byte {pos}")
    sd: list[SDElement] = []
    while line[pos : pos + 1] == b"[":
        em = _SD_ELEMENT.match(line, pos)
        if em is None:
            raise ParseError(f"malformed STRUCTURED-DATA at byte {pos}")
        params = tuple(
            (name.decode("ascii"), _unescape(value).decode("utf-8", "replace"))
            for name, value in _SD_PARAM.findall(em.group(2))
        )
        sd.append(SDElement(em.group(1).decode("ascii"), params))
        pos = em.end()
    return tuple(sd), pos


def _unescape(value: bytes) -> bytes:
    # RFC 5424 §6.3.3: only \" \\ and \] are escapes; any other backslash is data.
    return _UNESCAPE.sub(rb"\1", value) if b"\\" in value else value


def _header_problem(line: bytes) -> str:
    if re.match(rb"<\d{1,3}>[1-9]\d{0,2} ", line) and re.search(rb"[^!-~ ]", line[:600]):
        return "header field contains non-printable or non-ASCII bytes"
    if not line.startswith(b"<"):
        return "does not start with a PRI ('<')"
    if not re.match(rb"<\d{1,3}>", line):
        return "malformed PRI"
    if not re.match(rb"<\d{1,3}>[1-9]\d{0,2} ", line):
        return "missing or invalid VERSION"
    return "malformed HEADER (TIMESTAMP HOSTNAME APP-NAME PROCID MSGID)"


# ---------------------------------------------------------------------------
# Formatting

_NEEDS_ESCAPE = re.compile(r'["\\\]]')
_SD_NAME_TEXT = re.compile(f"[{SD_NAME_CHARS}]{{1,{MAX_SD_NAME}}}")
_HEADER_TEXT = re.compile(r"[!-~]+")
# SD-IDs and PARAM-NAMEs already checked: they come from code, so a handful.
_GOOD_NAMES: set[str] = set()
_GOOD_NAMES_MAX = 1024


# RFC 5424 §6.3.3: the three characters a PARAM-VALUE escapes, as a str.translate table.
PARAM_VALUE_ESCAPES = str.maketrans({'"': '\\"', "\\": "\\\\", "]": "\\]"})


def escape_param_value(value: str) -> str:
    """Escape an SD-PARAM value: ``"`` → ``\\"``, ``\\`` → ``\\\\``, ``]`` → ``\\]``."""
    if not _NEEDS_ESCAPE.search(value):
        return value
    # Backslash first, so the escapes added after it stay single.
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def header_text(value: str, limit: int) -> str:
    """A header field from untrusted text: anything but PRINTUSASCII becomes ``_``,
    cut to ``limit`` characters; nothing left is NILVALUE (``-``)."""
    if _HEADER_TEXT.fullmatch(value):  # the usual case, without a loop per character
        return value[:limit]
    cleaned = "".join(c if "!" <= c <= "~" else "_" for c in value)[:limit]
    return cleaned or NILVALUE


_SECOND_TEXT: dict[datetime.datetime, str] = {}


def format_timestamp(ts: float) -> str:
    """TIMESTAMP for POSIX time ``ts``: UTC, six fraction digits (``...T03:04:05.250000Z``).

    The text of the second is cached: events come in bursts.
    """
    moment = datetime.datetime.fromtimestamp(ts, datetime.UTC)
    second = moment.replace(microsecond=0)
    text = _SECOND_TEXT.get(second)
    if text is None:
        if len(_SECOND_TEXT) >= 16:
            _SECOND_TEXT.clear()
        text = _SECOND_TEXT[second] = second.strftime("%Y-%m-%dT%H:%M:%S")
    return f"{text}.{moment.microsecond:06d}Z"


def _header_field(value: str | None, name: str, limit: int) -> str:
    if value is None or value == "":
        return NILVALUE
    if len(value) > limit or not _HEADER_TEXT.fullmatch(value):
        raise ValueError(f"{name} must be 1-{limit} printable US-ASCII characters: {value!r}")
    return value


def _sd_name(value: str, what: str) -> str:
    if value in _GOOD_NAMES:
        return value
    if not _SD_NAME_TEXT.fullmatch(value):
        raise ValueError(f"{what} must be 1-32 printable US-ASCII characters without '= ]\"'")
    if len(_GOOD_NAMES) < _GOOD_NAMES_MAX:
        _GOOD_NAMES.add(value)
    return value


def _structured_data_text(elements: Iterable[SDElement | tuple]) -> str:
    out = []
    for element in elements:
        sd_id, params = (element.id, element.params) if isinstance(element, SDElement) else element
        out.append("[" + _sd_name(sd_id, "SD-ID"))
        # (Inline checks: this runs for every decoy event.)
        for name, value in params:
            if name not in _GOOD_NAMES:
                _sd_name(name, "PARAM-NAME")
            if _NEEDS_ESCAPE.search(value):
                value = escape_param_value(value)
            out.append(f' {name}="{value}"')
        out.append("]")
    return "".join(out) or NILVALUE


def format_structured_data(elements: Iterable[SDElement | tuple]) -> bytes:
    """``[id name="value" ...]...`` or ``-`` when there are no elements."""
    return _structured_data_text(elements).encode("utf-8")


def format_message(
    *,
    facility: int = 1,
    severity: int = 6,
    timestamp: str | float | None = None,
    hostname: str | None = None,
    app_name: str | None = None,
    procid: str | None = None,
    msgid: str | None = None,
    structured_data: Sequence[SDElement | tuple] = (),
    msg: bytes | str | None = None,
    bom: bool | None = None,
    version: int = 1,
) -> bytes:
    """A valid RFC 5424 message (no trailing LF).

    ``timestamp`` is RFC 3339 text, or POSIX seconds (written by
    :func:`format_timestamp`).  A ``str`` MSG is encoded as UTF-8 with a BOM
    (RFC 5424 §6.4); ``bytes`` are sent as given unless ``bom=True``.  Header
    fields are validated, never silently cleaned (:func:`header_text` does that
    for untrusted text): a bad field is a ``ValueError``.
    """
    if not (0 <= facility <= 23 and 0 <= severity <= 7):
        raise ValueError("facility must be 0-23 and severity 0-7")
    if not 1 <= version <= 999:
        raise ValueError("VERSION must be 1-999")
    when = _timestamp_field(timestamp)
    fields = (
        _header_field(hostname, "HOSTNAME", MAX_HOSTNAME),
        _header_field(app_name, "APP-NAME", MAX_APP_NAME),
        _header_field(procid, "PROCID", MAX_PROCID),
        _header_field(msgid, "MSGID", MAX_MSGID),
    )
    head = (
        f"<{facility * 8 + severity}>{version} {when} {' '.join(fields)} "
        f"{_structured_data_text(structured_data)}"
    )
    if msg is None:
        return head.encode("utf-8")
    return head.encode("utf-8") + b" " + _body(msg, bom)


def _timestamp_field(timestamp: str | float | None) -> str:
    if timestamp is None:
        return NILVALUE
    if not isinstance(timestamp, str):
        return format_timestamp(timestamp)
    if not _TIMESTAMP.fullmatch(timestamp):
        raise ValueError(f"TIMESTAMP must be RFC 3339: {timestamp!r}")
    return timestamp


def _body(msg: bytes | str, bom: bool | None) -> bytes:
    if isinstance(msg, str):
        body = msg.encode("utf-8")
        bom = True if bom is None else bom
    else:
        body = msg
    return BOM + body if bom else body
