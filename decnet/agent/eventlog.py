"""Decoy events as RFC 5424 lines, and the writer that appends them without blocking.

One interaction (a connection, a login attempt, a command, a disconnect) is one
line::

    <134>1 2026-01-02T03:04:05.000000Z web-01 ssh - connect [decnet@32473 session="…" src_ip="…" …]

* HOSTNAME is the decky, APP-NAME the service type, PROCID ``-``, MSGID the
  event kind; every datum is an SD-PARAM of one ``decnet@<PEN>`` element and
  there is no free-text MSG part (nothing to parse twice).
* Values are attacker-controlled, so they are escaped in two layers, which
  keeps every line one line *and* keeps the value recoverable byte for byte:

  1. *printable layer*: ``\\`` becomes ``\\\\``, ``\\n`` ``\\r`` ``\\t`` become
     those two-character escapes, any other non-printable character becomes
     ``\\xNN`` (C0, DEL) or ``\\uNNNN`` / ``\\UNNNNNNNN``, and a byte that is not
     valid UTF-8 becomes ``\\xNN`` (NN ≥ 80);
  2. *RFC 5424 §6.3.3*: ``"``, ``\\`` and ``]`` get a backslash.

  A reader that RFC-unescapes a value gets the printable form;
  :func:`decode_value` inverts both layers.
* Each value is capped (in bytes of its escaped form, never cutting an escape
  in half); capped values are listed in a ``trunc`` parameter.  The whole line
  never exceeds :data:`decnet.config.EVENT_LINE_MAX` bytes.

:class:`EventLog` appends whole lines through one thread lane, in order, with
``O_APPEND`` and a loop over short writes, so the forwarder never sees half a
line and the reactor never waits for the disk.

The line itself is written by the log pipeline's one RFC 5424 formatter
(:func:`decnet.syslog.rfc5424.format_message`); this module adds the printable
layer, the caps and the writer.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Generator
from pathlib import Path
from typing import cast

import attrs
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from decnet import config
from decnet.groupcommit import Batch, Committer
from decnet.syslog import rfc5424
from decnet.threads import Runner, serial_runner

FACILITY_LOCAL0 = 16
SEVERITY_NOTICE = 5
SEVERITY_INFO = 6

DEFAULT_VALUE_MAX = 256
# Larger caps for the fields that carry most of an attacker's payload.
VALUE_MAX = {
    "command": 1024,
    "args": 1024,
    "path": 1024,
    "headers": 2048,
    "body": 2048,
    "data": 1024,
    "user_agent": 512,
    "kex": 1024,
}
TRUNC_PARAM = "trunc"

_PLAIN_ASCII_RE = re.compile(r"[ !#-\[^-~]*")  # printable ASCII without " \ ]


@attrs.frozen
class Event:
    """One decoy interaction, before formatting."""

    decky: str
    service: str
    kind: str
    params: tuple[tuple[str, object], ...]
    severity: int = SEVERITY_INFO


def _printable_layer(ch: str) -> str:
    if ch == "\\":
        return "\\\\"
    if ch == "\n":
        return "\\n"
    if ch == "\r":
        return "\\r"
    if ch == "\t":
        return "\\t"
    o = ord(ch)
    if 0xDC80 <= o <= 0xDCFF:  # an undecodable byte, via surrogateescape
        return f"\\x{o - 0xDC00:02x}"
    if o < 0x20 or o == 0x7F:
        return f"\\x{o:02x}"
    if ch.isprintable():
        return ch
    return f"\\u{o:04x}" if o <= 0xFFFF else f"\\U{o:08x}"


def _as_text(value: object) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "surrogateescape")
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def printable_value(value: object, limit: int = DEFAULT_VALUE_MAX) -> tuple[str, bool]:
    """``(printable text, truncated)`` for one PARAM-VALUE: the first layer only.

    The text is cut so that its RFC 5424 escaped form (what the line holds)
    is at most ``limit`` UTF-8 bytes, never in the middle of an escape.
    """
    text = _as_text(value)
    if len(text) <= limit and _PLAIN_ASCII_RE.fullmatch(text):
        return text, False
    out: list[str] = []
    size = 0
    escapes = rfc5424.PARAM_VALUE_ESCAPES
    for ch in text:
        piece = _printable_layer(ch)
        n = len(piece.translate(escapes).encode("utf-8"))
        if size + n > limit:
            return "".join(out), True
        out.append(piece)
        size += n
    return "".join(out), False


def escape_value(value: object, limit: int = DEFAULT_VALUE_MAX) -> tuple[str, bool]:
    """``(wire text, truncated)`` for one PARAM-VALUE, at most ``limit`` UTF-8 bytes."""
    text, cut = printable_value(value, limit)
    return rfc5424.escape_param_value(text), cut


_DECODE_RE = re.compile(
    r'\\(["\\\]])'  # RFC 5424 layer
)
_PRINTABLE_DECODE_RE = re.compile(r"\\(\\|n|r|t|x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8})")


def _unprintable(match: re.Match) -> str:
    code = match.group(1)
    simple = {"\\": "\\", "n": "\n", "r": "\r", "t": "\t"}
    if code in simple:
        return simple[code]
    number = int(code[1:], 16)
    if code[0] == "x" and number >= 0x80:
        return chr(0xDC00 + number)  # back to surrogateescape: the raw byte
    return chr(number)


def decode_value(wire: str) -> str:
    """Invert :func:`escape_value`; raw bytes come back as surrogate escapes.

    ``decode_value(v).encode("utf-8", "surrogateescape")`` is the attacker's
    original bytes.
    """
    return decode_printable(_DECODE_RE.sub(lambda m: m.group(1), wire))


def decode_printable(text: str) -> str:
    """Invert only the printable layer: for a value an RFC 5424 parser already unescaped."""
    return _PRINTABLE_DECODE_RE.sub(_unprintable, text)


@attrs.define
class _Params:
    """An event's SD-PARAMs as printable text, and which of them were cut."""

    names: list[str]
    texts: list[str]
    truncated: list[str]

    @classmethod
    def of(cls, event: Event) -> _Params:
        params = cls([], [], [])
        for name, value in event.params:
            if value is None:
                continue
            if name == TRUNC_PARAM:
                raise ValueError(f"invalid SD-PARAM name {name!r}")
            text, cut = printable_value(value, VALUE_MAX.get(name, DEFAULT_VALUE_MAX))
            params.names.append(name)
            params.texts.append(text)
            if cut:
                params.truncated.append(name)
        return params

    def pairs(self) -> list[tuple[str, str]]:
        pairs = list(zip(self.names, self.texts, strict=True))
        if self.truncated:
            pairs.append((TRUNC_PARAM, ",".join(self.truncated)))
        return pairs

    def shrink(self, event: Event, excess: int) -> bool:
        """Cut the largest value by ``excess`` bytes; ``False`` when nothing is left to cut."""
        wires = [rfc5424.escape_param_value(t) for t in self.texts]
        i = max(range(len(wires)), key=lambda k: len(wires[k]))
        if not wires[i]:
            return False  # only fixed-size parts left; cannot happen with sane names
        budget = max(0, len(wires[i].encode("utf-8")) - excess)
        self.texts[i], _ = printable_value(event_value(event, self.names[i]), budget)
        if self.names[i] not in self.truncated:
            self.truncated.append(self.names[i])
        return True


def format_event(
    event: Event,
    timestamp: float,
    *,
    sd_id: str = config.EVENT_SD_ID,
    line_max: int = config.EVENT_LINE_MAX,
    facility: int = FACILITY_LOCAL0,
) -> bytes:
    """The RFC 5424 line for ``event`` (newline included), at most ``line_max`` bytes.

    Written by :func:`decnet.syslog.rfc5424.format_message`: HOSTNAME is the
    decky, APP-NAME the service, MSGID the kind (each made printable by
    :func:`~decnet.syslog.rfc5424.header_text`), one SD-ELEMENT ``sd_id``.
    """
    hostname = rfc5424.header_text(event.decky, rfc5424.MAX_HOSTNAME)
    app_name = rfc5424.header_text(event.service, rfc5424.MAX_APP_NAME)
    msgid = rfc5424.header_text(event.kind, rfc5424.MAX_MSGID)

    def render(params: _Params) -> bytes:
        line = rfc5424.format_message(
            facility=facility,
            severity=event.severity,
            timestamp=timestamp,
            hostname=hostname,
            app_name=app_name,
            msgid=msgid,
            structured_data=[(sd_id, params.pairs())],
        )
        return line + b"\n"

    params = _Params.of(event)
    data = render(params)
    # The per-field caps keep ordinary events far below the line cap; when an
    # event has many large fields, shrink the largest until it fits.
    while len(data) > line_max and params.texts and params.shrink(event, len(data) - line_max):
        data = render(params)
    return data


def event_value(event: Event, name: str) -> object:
    for key, value in event.params:
        if key == name:
            return value
    raise KeyError(name)


class EventLog(Service):
    """Appends event lines to ``path`` through one thread lane, in order.

    :meth:`emit` formats on the reactor thread (cheap, pure) and queues the
    bytes; a group commit (:mod:`decnet.groupcommit`) sends one batch at a
    time to the lane, so lines are never interleaved and their order is the
    order of :meth:`emit`.  The file is reopened when it was rotated away (its
    inode changed or it vanished), and a torn last line left by a crash is
    terminated before new lines are appended.

    If the disk stalls, at most ``max_pending`` bytes are queued; beyond that,
    events are dropped and counted (``dropped``), never buffered without bound.
    Nothing is written before :meth:`startService`.
    """

    log = Logger()

    def __init__(
        self,
        path: str | os.PathLike,
        reactor: IReactorThreads,
        *,
        now: Callable[[], float] | None = None,
        max_pending: int = 16 * 1024 * 1024,
        mode: int = 0o640,
        run: Runner | None = None,
    ):
        self.path = Path(path)
        self.now = now or cast(IReactorTime, reactor).seconds
        self.max_pending = max_pending
        self.mode = mode
        self.written_lines = 0
        self.dropped = 0
        self.write_errors = 0
        self._fd: int | None = None
        self._run = run or serial_runner(reactor)
        self._lines: Committer[bytes] = Committer(
            self._write, committed=self._written, failed=self._write_failed, running=False
        )
        self._overflowing = False

    @property
    def pending_bytes(self) -> int:
        """Bytes queued and not yet handed to the writer."""
        return self._lines.queue.pending_size

    # -- reactor side ------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._lines.start()

    @defer.inlineCallbacks
    def stopService(self) -> Generator[defer.Deferred, object, None]:
        super().stopService()
        yield self.flush()
        self._lines.pause()
        if self._fd is not None:
            yield self._run(self._close)

    def emit(self, event: Event) -> None:
        """Format ``event`` with the current time and queue its line."""
        self.write_line(format_event(event, self.now()))

    def write_line(self, line: bytes) -> None:
        if self.pending_bytes + len(line) > self.max_pending:
            self.dropped += 1
            if not self._overflowing:
                self._overflowing = True
                self.log.warn(
                    "Event log {path} is not keeping up; dropping events until it drains",
                    path=str(self.path),
                )
            return
        self._lines.add(line, len(line))

    def flush(self) -> defer.Deferred:
        """A Deferred that fires once every line queued so far is written (or failed)."""
        return self._lines.flush()

    def _write(self, batch: Batch[bytes]) -> defer.Deferred:
        return self._run(self._write_batch, b"".join(batch.items))

    def _written(self, batch: Batch[bytes]) -> None:
        self.written_lines += len(batch.items)
        if self._overflowing and not self._lines.queue.pending:
            self._overflowing = False
            self.log.info(
                "Event log caught up; {dropped} events dropped so far", dropped=self.dropped
            )

    def _write_failed(self, batch: Batch[bytes], failure: Failure) -> None:
        self.write_errors += 1
        self.log.failure("Cannot append to event log {path}", failure, path=str(self.path))

    # -- writer thread -----------------------------------------------------

    def _open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, self.mode)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            # A crash tore the last line: end it so our first line stands alone.
            os.write(fd, b"\n")
        return fd

    def _current_fd(self) -> int:
        if self._fd is not None:
            try:
                on_disk = os.stat(self.path)
                mine = os.fstat(self._fd)
                if (on_disk.st_dev, on_disk.st_ino) == (mine.st_dev, mine.st_ino):
                    return self._fd
            except FileNotFoundError:
                pass
            self._close()
        self._fd = self._open()
        return self._fd

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _write_batch(self, data: bytes) -> None:
        fd = self._current_fd()
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]


def lines_of(path: str | os.PathLike) -> list[bytes]:
    """The complete lines of an event log (tests and tools)."""
    return Path(path).read_bytes().splitlines(keepends=True)
