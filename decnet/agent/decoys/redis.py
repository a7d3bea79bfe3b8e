"""``redis``: a Redis server with ``requirepass`` set; AUTH captured, everything refused.

Speaks RESP (multibulk arrays) and inline commands through a small sans-IO
parser with hard limits.  Events: ``connect``; ``login`` (``user``,
``password``) for ``AUTH`` and ``HELLO … AUTH``; ``command`` (``command``,
``argc``, ``args`` joined by spaces) for anything else; ``disconnect``.  A
protocol error answers like Redis (``-ERR Protocol error: …``) and closes.
"""

from __future__ import annotations

from twisted.internet.protocol import Protocol

from decnet.agent.decoys.base import DecoyFactory, DecoyMixin, ServiceRuntime

MAX_INLINE = 64 * 1024
MAX_BULK = 512 * 1024
MAX_ARGS = 1024

NOAUTH = b"-NOAUTH Authentication required.\r\n"
WRONGPASS = b"-WRONGPASS invalid username-password pair or user is disabled.\r\n"
HELLO_NOAUTH = (
    b"-NOAUTH HELLO must be called with the client already authenticated, otherwise the "
    b"HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and "
    b"select the RESP protocol version at the same time\r\n"
)


class RespError(Exception):
    """The client broke the protocol; the message is Redis's own wording."""


class RespParser:
    """Incremental RESP request parser: ``feed(bytes)`` → complete commands."""

    def __init__(self):
        self._buf = b""

    def feed(self, data: bytes) -> list[list[bytes]]:
        self._buf += data
        commands = []
        while self._buf:
            parsed = self._parse_one()
            if parsed is None:
                break
            command, used = parsed
            self._buf = self._buf[used:]
            if command:
                commands.append(command)
        return commands

    def _parse_one(self) -> tuple[list[bytes], int] | None:
        buf = self._buf
        if buf[:1] != b"*":
            end = buf.find(b"\n")
            if end < 0:
                if len(buf) > MAX_INLINE:
                    raise RespError("too big inline request")
                return None
            if end > MAX_INLINE:
                raise RespError("too big inline request")
            return buf[:end].rstrip(b"\r").split(), end + 1
        end = buf.find(b"\r\n")
        if end < 0:
            if len(buf) > 32:
                raise RespError("invalid multibulk length")
            return None
        try:
            count = int(buf[1:end])
        except ValueError:
            raise RespError("invalid multibulk length") from None
        if count > MAX_ARGS:
            raise RespError("invalid multibulk length")
        pos = end + 2
        args: list[bytes] = []
        for _ in range(max(count, 0)):
            if pos >= len(buf):
                return None
            if buf[pos : pos + 1] != b"$":
                got = buf[pos : pos + 1].decode("latin-1")
                raise RespError(f"expected '$', got '{got}'")
            end = buf.find(b"\r\n", pos)
            if end < 0:
                if len(buf) - pos > 32:
                    raise RespError("invalid bulk length")
                return None
            try:
                size = int(buf[pos + 1 : end])
            except ValueError:
                raise RespError("invalid bulk length") from None
            if not 0 <= size <= MAX_BULK:
                raise RespError("invalid bulk length")
            start = end + 2
            if len(buf) < start + size + 2:
                return None
            args.append(buf[start : start + size])
            pos = start + size + 2
        return args, pos


class _RespProtocol(Protocol):
    """Below :class:`DecoyMixin` in the MRO: it gets the bytes after bookkeeping."""

    def dataReceived(self, data: bytes) -> None:
        self.handle_data(data)


class RedisDecoy(DecoyMixin, _RespProtocol):
    def connectionMade(self):
        self.parser = RespParser()
        super().connectionMade()

    def handle_data(self, data: bytes) -> None:
        try:
            commands = self.parser.feed(data)
        except RespError as exc:
            self.session.event("command", ("command", "PROTOCOL-ERROR"), ("args", str(exc)))
            self.transport.write(f"-ERR Protocol error: {exc}\r\n".encode())
            self.close("protocol-error")
            return
        for command in commands:
            if self.close_reason is not None or not self.count_command():
                return
            self.handle_command(command)

    def handle_command(self, argv: list[bytes]) -> None:
        name = argv[0].decode("ascii", "replace").upper()[:32]
        args = argv[1:]
        if name == "AUTH":
            if len(args) == 1:
                self.session.login(("user", "default"), ("password", args[0]))
                self.transport.write(WRONGPASS)
            elif len(args) == 2:
                self.session.login(("user", args[0]), ("password", args[1]))
                self.transport.write(WRONGPASS)
            else:
                self._command(name, args)
                self.transport.write(b"-ERR wrong number of arguments for 'auth' command\r\n")
            return
        if name == "HELLO":
            upper = [a.upper() for a in args]
            if b"AUTH" in upper and len(args) >= upper.index(b"AUTH") + 3:
                i = upper.index(b"AUTH")
                self.session.login(("user", args[i + 1]), ("password", args[i + 2]))
                self.transport.write(WRONGPASS)
                return
            self._command(name, args)
            self.transport.write(HELLO_NOAUTH)
            return
        self._command(name, args)
        if name == "QUIT":
            self.transport.write(b"+OK\r\n")
            self.close("quit")
        else:
            self.transport.write(NOAUTH)

    def _command(self, name: str, args: list[bytes]) -> None:
        self.session.event(
            "command", ("command", name), ("argc", len(args)), ("args", b" ".join(args))
        )


def make_factory(runtime: ServiceRuntime) -> DecoyFactory:
    return DecoyFactory(runtime, RedisDecoy)
