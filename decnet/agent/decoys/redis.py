"""``redis``: a Redis server with ``requirepass`` set; AUTH captured, everything refused.

Speaks RESP (multibulk arrays) and inline commands through a small sans-IO
parser with hard limits, linear in its input.  Events: ``connect``; ``login`` (``user``,
``password``) for ``AUTH`` and ``HELLO … AUTH``; ``command`` (``command``,
``argc``, ``args`` joined by spaces) for anything else; ``disconnect``.  A
protocol error answers like Redis (``-ERR Protocol error: …``) and closes.
"""

from __future__ import annotations

from twisted.internet.protocol import Protocol

from decnet.agent.decoys.base import DecoyFactory, DecoyMixin, ServiceRuntime, run_of
from decnet.agent.decoys.inbox import Inbox

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


_STAR, _DOLLAR = ord("*"), ord("$")
# Complete commands with no arguments, one per LF: blank inline lines and
# multibulks of zero or a negative number of arguments.
_DEGENERATE = run_of(rb"[ \t\r\x0b\x0c]{0,1024}\n|\*(?:-?0{1,18}|-[0-9]{1,18})\r\n")


class RespParser:
    """Incremental RESP request parser over an :class:`Inbox`: one command per call.

    :meth:`next_command` returns the next complete command (its arguments),
    the number of degenerate commands in a run of them (blank inline lines,
    ``*0``, ``*-1``: Redis ignores those, but they still count as commands),
    or ``None`` until more input arrives.  It keeps its place inside a multibulk request (the
    arguments parsed so far, the bulk it waits for, where its search for a line
    end stopped), so every byte is scanned and copied once however the input
    is chunked.
    """

    def __init__(self, inbox: Inbox):
        self.inbox = inbox
        self._args: list[bytes] | None = None  # a multibulk request in progress
        self._remaining = 0  # its arguments still to come
        self._bulk: int | None = None  # the size of the bulk whose header was read
        self._scan = 0  # where the search for the next line end resumes

    def next_command(self) -> list[bytes] | int | None:
        if self._args is None:
            started = self._start_command()
            if started is not None:
                return started
        return self._bulks()

    def _start_command(self) -> list[bytes] | int | None:
        """Parse up to the start of a multibulk request, or a whole simpler command.

        ``None`` once a multibulk request is under way (or nothing is complete
        yet: ``self._args`` tells which).
        """
        inbox = self.inbox
        if not len(inbox):
            return None
        if end := inbox.match(_DEGENERATE):
            # A run of blank lines / empty multibulks, counted in one go.
            n = inbox.count(b"\n", end)
            inbox.skip(end)
            return n
        if inbox.byte_at(0) != _STAR:
            line_end = self._line_end(b"\n", MAX_INLINE, "too big inline request")
            if line_end is None:
                return None
            line = inbox.take(line_end)
            inbox.skip(1)
            return line.split() or 1
        count = self._header_number("invalid multibulk length")
        if count is None:
            return None
        if count > MAX_ARGS:
            raise RespError("invalid multibulk length")
        if count <= 0:
            return 1
        self._args, self._remaining = [], count
        return None

    def _bulks(self) -> list[bytes] | None:
        """Read the bulks of the multibulk request under way; its arguments once all are in."""
        inbox, args = self.inbox, self._args
        if args is None:
            return None
        while self._remaining:
            if self._bulk is None:
                if not len(inbox):
                    return None
                if inbox.byte_at(0) != _DOLLAR:
                    got = chr(inbox.byte_at(0))
                    raise RespError(f"expected '$', got '{got}'")
                size = self._header_number("invalid bulk length")
                if size is None:
                    return None
                if not 0 <= size <= MAX_BULK:
                    raise RespError("invalid bulk length")
                self._bulk = size
            if len(inbox) < self._bulk + 2:
                return None
            args.append(inbox.take(self._bulk))
            inbox.skip(2)
            self._bulk = None
            self._remaining -= 1
        self._args = None
        return args

    def _header_number(self, problem: str) -> int | None:
        """The number of a ``*<n>`` or ``$<n>`` header line; ``None`` until it is complete."""
        end = self._line_end(b"\r\n", 32, problem)
        if end is None:
            return None
        header = self.inbox.take(end)
        self.inbox.skip(2)
        try:
            return int(header[1:])
        except ValueError:
            raise RespError(problem) from None

    def _line_end(self, delimiter: bytes, limit: int, problem: str) -> int | None:
        """Relative index of the next ``delimiter`` within ``limit`` bytes, or ``None``."""
        i = self.inbox.find(delimiter, self._scan, limit + len(delimiter))
        if i < 0:
            pending = len(self.inbox)
            if pending > limit:
                raise RespError(problem)
            self._scan = max(0, pending - len(delimiter) + 1)
            return None
        if i > limit:
            raise RespError(problem)
        self._scan = 0
        return i


class RedisDecoy(DecoyMixin, Protocol):
    def connectionMade(self):
        super().connectionMade()
        self.parser = RespParser(self.inbox)

    def next_item(self) -> bool:
        try:
            command = self.parser.next_command()
        except RespError as exc:
            self.session.event("command", ("command", "PROTOCOL-ERROR"), ("args", str(exc)))
            self.transport.write(f"-ERR Protocol error: {exc}\r\n".encode())
            self.close("protocol-error")
            return True
        if command is None:
            return False
        if isinstance(command, int):
            self.count_commands(command)
        elif self.count_command():
            self.handle_command(command)
        return True

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
