"""``http``: a web server with a login page; every request and credential captured.

Every request is answered like Apache would (``Server`` header and error pages
from the spec's ``server`` string): ``/`` and the usual login paths serve a
login form, a POST to them re-renders it with "invalid credentials", anything
else is a 404.  With ``realm`` set, every request gets a ``401`` Basic
challenge instead.

Events: ``connect``; ``request`` (``method``, ``path``, ``version``, ``host``,
``user_agent``, ``headers`` as ``Name: value`` lines, ``body`` up to the
capture cap, ``body_size``) for each request; ``login`` (``method`` =
``basic``/``form``, ``user``, ``password``) when a request carries credentials;
``disconnect``.  Bodies are never buffered beyond ``max_body`` bytes.
"""

from __future__ import annotations

import base64
import binascii
import html
import io
import re
from collections.abc import Callable
from urllib.parse import parse_qsl

from twisted.web import http, server
from twisted.web.resource import Resource

from decnet.agent.decoys.base import DecoyMixin, ServiceRuntime
from decnet.agent.decoys.inbox import TOO_LONG
from decnet.interfaces import IDecnetReactor

RAW_SLICE = 2048

LOGIN_PATHS = {b"/", b"/login", b"/login.html", b"/index.html", b"/admin", b"/admin/"}
USER_FIELDS = ("username", "user", "login", "email", "uname", "log", "usr")
PASSWORD_FIELDS = ("password", "pass", "passwd", "pwd", "secret")

LOGIN_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font-family:sans-serif;background:#f2f2f2}}form{{width:300px;margin:80px auto;
padding:24px;background:#fff;border:1px solid #ccc}}input{{width:100%;margin:6px 0;padding:6px}}
.err{{color:#b00}}</style></head>
<body><form method="post" action="/login"><h2>{title}</h2>{error}
<label>Username<input name="username" autocomplete="username"></label>
<label>Password<input name="password" type="password" autocomplete="current-password"></label>
<input type="submit" value="Sign in"></form></body></html>
"""

APACHE_ERROR = """<!DOCTYPE HTML PUBLIC "-//IETF//DTD HTML 2.0//EN">
<html><head>
<title>{code} {phrase}</title>
</head><body>
<h1>{phrase}</h1>
<p>{text}</p>
<hr>
<address>{server} Server at {host} Port {port}</address>
</body></html>
"""


_CHUNK_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:;[\t -~]*)?")
_CHUNK_SIZE_CRLF = re.compile(rb"([0-9A-Fa-f]{1,16})\r\n")
MAX_CHUNK_SIZE_LINE = 1024  # as twisted.web
MAX_TRAILERS = 16 * 1024


_SIZE, _DATA, _CRLF, _TRAILER, _DONE = range(5)
_WAIT = -1  # what a step returns when it needs more input


class ChunkedBody:
    """The chunked transfer coding (RFC 9112 section 7.1), decoded for a decoy.

    Used instead of twisted.web's decoder, which costs several times as much
    per chunk: a body of one-byte chunks is a cheap flood.  ``on_chunks(data,
    count)`` gets the data of the chunks decoded from one read, and how many
    they were; ``on_done(rest)`` what follows the body.  Malformed input raises
    twisted.web's ``_MalformedChunkedDataError`` (a 400 and the connection
    closed).  Linear: one buffer and an offset, one loop, and the search for a
    line end resumes where it stopped.

    A state machine: each state has a step (``_steps``) that parses from an
    offset and returns where the next step starts, or ``_WAIT`` (having
    consumed nothing) until more input arrives.
    """

    def __init__(
        self, on_chunks: Callable[[bytes, int], object], on_done: Callable[[bytes], object]
    ):
        self.on_chunks = on_chunks
        self.on_done = on_done
        self._buf = bytearray()
        self._pos = 0
        self._scan = 0  # where the search for the next CRLF resumes
        self._state = _SIZE
        self._remaining = 0
        self._trailers = 0
        self._parts: list[bytes | bytearray] = []  # the chunks decoded from the current read
        self._count = 0
        self._steps = (self._size, self._data, self._crlf, self._trailer, self._after_end)

    def dataReceived(self, data: bytes) -> None:
        self._buf += data
        self._parts, self._count = [], 0
        pos, steps = self._pos, self._steps
        try:
            while (after := steps[self._state](pos)) != _WAIT:
                pos = after
            self._flush()
        finally:
            if self._state != _DONE:
                self._consumed(pos)

    def _size(self, pos: int) -> int:
        """A chunk size line; the whole chunk too when it is here (the usual case)."""
        buf = self._buf
        m = _CHUNK_SIZE_CRLF.match(buf, pos)  # the usual line: no extension
        if m is not None:
            size, pos = int(m.group(1), 16), m.end()
        else:
            end = buf.find(b"\r\n", max(pos, self._scan), pos + MAX_CHUNK_SIZE_LINE + 2)
            if end < 0 and self._line_end(pos, MAX_CHUNK_SIZE_LINE) < 0:
                return _WAIT
            m = _CHUNK_SIZE_LINE.fullmatch(buf, pos, end)
            if m is None:
                raise http._MalformedChunkedDataError("bad chunk size line")
            size, pos = int(m.group(1), 16), end + 2
        if not size:
            self._state = _TRAILER
            return pos
        self._count += 1
        after = pos + size
        if len(buf) < after + 2:
            self._remaining, self._state = size, _DATA
            return pos
        _expect_crlf(buf, after)
        self._parts.append(buf[pos:after])
        return after + 2

    def _data(self, pos: int) -> int:
        """Data of a chunk that arrives over several reads."""
        n = min(self._remaining, len(self._buf) - pos)
        if not n:
            return _WAIT
        self._parts.append(bytes(self._buf[pos : pos + n]))
        self._remaining -= n
        if not self._remaining:
            self._state = _CRLF
        return pos + n

    def _crlf(self, pos: int) -> int:
        """The CRLF after such a chunk."""
        if len(self._buf) - pos < 2:
            return _WAIT
        _expect_crlf(self._buf, pos)
        self._state = _SIZE
        return pos + 2

    def _trailer(self, pos: int) -> int:
        """A trailer field line; the empty line ends the body."""
        end = self._line_end(pos, MAX_TRAILERS)
        if end < 0:
            return _WAIT
        self._trailers += end + 2 - pos
        if self._trailers > MAX_TRAILERS:
            raise http._MalformedChunkedDataError("trailers too long")
        if end != pos:
            return end + 2
        rest = bytes(self._buf[end + 2 :])
        self._buf, self._pos, self._state = bytearray(), 0, _DONE
        self._flush()
        self.on_done(rest)
        return _WAIT

    def _after_end(self, pos: int) -> int:
        raise http._MalformedChunkedDataError("data after the last chunk")

    def _flush(self) -> None:
        if self._parts:
            self.on_chunks(b"".join(self._parts), self._count)
            self._parts = []

    def _consumed(self, pos: int) -> None:
        """Drop the parsed prefix of the buffer; keep the offsets right."""
        if pos:
            del self._buf[:pos]
            self._scan = max(0, self._scan - pos)
            pos = 0
        self._pos = pos

    def _line_end(self, pos: int, limit: int) -> int:
        """Index of the CRLF ending the line at ``pos``, or -1 until it arrives."""
        buf = self._buf
        end = buf.find(b"\r\n", max(pos, self._scan), pos + limit + 2)
        if end < 0:
            if len(buf) - pos > limit + 1:
                raise http._MalformedChunkedDataError("line too long")
            self._scan = max(pos, len(buf) - 1)
        return end


def _expect_crlf(buf: bytearray, at: int) -> None:
    if buf[at] != 13 or buf[at + 1] != 10:
        raise http._MalformedChunkedDataError("chunk not followed by CRLF")


class DecoyRequest(server.Request):
    """A request that keeps at most ``max_body`` bytes of its body (and counts the rest)."""

    channel: DecoyChannel
    content: io.BytesIO  # type: ignore[assignment]  # twisted.web declares it None
    body_size = 0
    max_body = 0

    def gotLength(self, length):
        self.max_body = self.channel.runtime.spec.option("max_body")
        # Small or unknown declared length: an in-memory buffer, never a temp file.
        super().gotLength(0 if length is None else min(length, self.max_body))
        self.content = io.BytesIO()

    def handleContentChunk(self, data):
        if self.channel.close_reason is None:
            self._keep(data)

    def handle_chunks(self, data: bytes, count: int) -> None:
        """Data of ``count`` chunks of a chunked body (see :class:`ChunkedBody`)."""
        # Each chunk is an item like a header line: a flood of one-byte
        # chunks meets the connection's command cap.
        if self.channel.close_reason is None and self.channel.count_commands(count) == count:
            self._keep(data)

    def _keep(self, data: bytes) -> None:
        room = self.max_body - self.body_size
        if room > 0:
            self.content.write(data[:room])
        self.body_size += len(data)


def _credentials_from_basic(value: bytes | None) -> tuple[bytes, bytes] | None:
    if not value or not value[:6].lower() == b"basic ":
        return None
    try:
        decoded = base64.b64decode(value[6:].strip(), validate=True)
    except (binascii.Error, ValueError):
        return (value[6:].strip(), b"")
    user, _, password = decoded.partition(b":")
    return user, password


def _credentials_from_form(body: bytes) -> tuple[bytes | None, bytes | None]:
    fields: dict[str, bytes] = {}
    for key, value in parse_qsl(body, keep_blank_values=True):
        fields.setdefault(key.decode("utf-8", "replace").lower(), value)
    user = next((fields[k] for k in USER_FIELDS if k in fields), None)
    password = next((fields[k] for k in PASSWORD_FIELDS if k in fields), None)
    return user, password


class DecoyResource(Resource):
    isLeaf = True

    def __init__(self, runtime: ServiceRuntime):
        super().__init__()
        self.runtime = runtime

    def render(self, request: DecoyRequest) -> bytes:
        spec = self.runtime.spec
        form_login = self._record(request)
        request.setHeader(b"server", spec.option("server").encode())
        realm = spec.option("realm")
        path = request.path
        if realm is not None:
            request.setResponseCode(http.UNAUTHORIZED)
            request.setHeader(b"www-authenticate", f'Basic realm="{realm}"'.encode())
            return self._error(request, 401, "Unauthorized", _UNAUTHORIZED_TEXT)
        if path in LOGIN_PATHS:
            request.setHeader(b"content-type", b"text/html; charset=utf-8")
            failed = form_login or request.method == b"POST"
            error = '<p class="err">Invalid username or password.</p>' if failed else ""
            title = html.escape(spec.option("title"))
            return LOGIN_PAGE.format(title=title, error=error).encode()
        request.setResponseCode(http.NOT_FOUND)
        return self._error(
            request, 404, "Not Found", "The requested URL was not found on this server."
        )

    def _record(self, request: DecoyRequest) -> bool:
        """The ``request`` event and any ``login``; whether a login form was posted."""
        session = request.channel.session
        request.content.seek(0)
        body = request.content.read()
        headers = b"\n".join(
            name + b": " + value
            for name, values in request.requestHeaders.getAllRawHeaders()
            for value in values
        )
        session.event(
            "request",
            ("method", request.method),
            ("path", request.uri),
            ("version", request.clientproto),
            ("host", request.getHeader(b"host")),
            ("user_agent", request.getHeader(b"user-agent")),
            ("headers", headers),
            ("body", body or None),
            ("body_size", request.body_size or None),
        )
        basic = _credentials_from_basic(request.getHeader(b"authorization"))
        if basic is not None:
            session.login(("method", "basic"), ("user", basic[0]), ("password", basic[1]))
        content_type = (request.getHeader(b"content-type") or b"").lower()
        if request.method == b"POST" and content_type.startswith(
            b"application/x-www-form-urlencoded"
        ):
            user, password = _credentials_from_form(body)
            if user is not None or password is not None:
                session.login(("method", "form"), ("user", user), ("password", password))
                return True
        return False

    def _error(self, request, code: int, phrase: str, text: str) -> bytes:
        spec = self.runtime.spec
        request.setHeader(b"content-type", b"text/html; charset=iso-8859-1")
        return APACHE_ERROR.format(
            code=code,
            phrase=phrase,
            text=text,
            server=html.escape(spec.option("server")),
            host=html.escape(spec.decky),
            port=request.getHost().port,
        ).encode()


_UNAUTHORIZED_TEXT = (
    "This server could not verify that you\nare authorized to access the document\n"
    "requested.  Either you supplied the wrong\ncredentials (e.g., bad password), or your\n"
    "browser doesn't understand how to supply\nthe credentials required."
)


class DecoyChannel(DecoyMixin, http.HTTPChannel):
    """One attacker connection: ``connect``/``disconnect`` events around HTTP requests.

    twisted.web parses each line and body; the splitting into lines is ours
    (:meth:`next_item`, on the connection's inbox): ``LineReceiver`` copies the
    rest of its buffer for every line.  Every request line, header line and
    body chunk of a chunked request counts toward the command cap; raw body
    bytes are handed over :data:`RAW_SLICE` at a time.  Like Apache
    (``LimitRequestFields``), more than 100 header fields are a 400.
    """

    maxHeaders = 100

    def next_item(self) -> bool:
        if self.line_mode:
            line = self.inbox.next_line(self.delimiter, self.MAX_LENGTH)
            if line is None:
                return False
            if line is TOO_LONG:
                self.close("line-too-long")
            elif self.count_command():
                self.lineReceived(line)
            return True
        if not len(self.inbox):
            return False
        self.rawDataReceived(self.inbox.take(RAW_SLICE))
        return True

    def _maybeChooseTransferDecoder(self, header, data):
        ok = super()._maybeChooseTransferDecoder(header, data)
        if ok and isinstance(self._transferDecoder, http._ChunkedTransferDecoder):
            self._transferDecoder = ChunkedBody(
                self.requests[-1].handle_chunks, self._finishRequestBody
            )
        return ok

    def setLineMode(self, extra=b""):
        # twisted.web hands back what it buffered while a request was being
        # handled: it came from our inbox, so it goes back to the front.
        self.line_mode = 1
        if extra:
            self.inbox.unread(extra)
            self.pump()

    def _respondToBadRequestAndDisconnect(self):
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        self.close("protocol-error")

    def loseConnection(self):
        # A response to a non-persistent request is done: hang up like close()
        # does, with the grace period for a peer that does not read.
        self.close(self.close_reason or "closed")


class DecoySite(server.Site):
    protocol = DecoyChannel  # type: ignore[assignment]  # an HTTPChannel, as Site expects
    requestFactory = DecoyRequest
    displayTracebacks = False
    noisy = False

    def __init__(self, runtime: ServiceRuntime, reactor: IDecnetReactor):
        # No twisted.web idle timer: DecoyMixin's idle_timeout (reset on every
        # read) and max_lifetime apply, as for every decoy.
        super().__init__(DecoyResource(runtime), timeout=None, reactor=reactor)
        self.runtime = runtime

    def buildProtocol(self, addr):
        if not self.runtime.admit():
            return None
        channel = super().buildProtocol(addr)
        channel.runtime = self.runtime
        return channel

    def log(self, request):
        # The decoy's own ``request`` event is the access log; twistd's log
        # must not fill with attacker traffic.
        return None


def make_factory(runtime: ServiceRuntime, reactor: IDecnetReactor) -> DecoySite:
    return DecoySite(runtime, reactor)
