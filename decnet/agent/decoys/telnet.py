"""``telnet``: a Linux ``login:`` prompt; every username/password pair captured and refused.

Telnet option negotiation is handled by Conch's :class:`Telnet` parser (IAC
sequences never reach the captured text; the password prompt asks the client
to stop echoing, as ``login`` does).  Events: ``connect``; ``login`` (``user``,
``password``) for each attempt; ``disconnect``.  After ``max_attempts`` the
connection is closed.
"""

from __future__ import annotations

import re

from twisted.conch.telnet import ECHO, AlreadyNegotiating, OptionRefused, Telnet
from twisted.internet import error
from twisted.python.failure import Failure

from decnet.agent.decoys.base import DecoyFactory, DecoyMixin, ServiceRuntime

MAX_FIELD = 1024
_LINE_END = re.compile(rb"[\r\n]")


class _GuardedTelnet(Telnet):
    """Conch's parser raises ``ValueError`` on a malformed IAC sequence; close instead."""

    def dataReceived(self, data):
        try:
            super().dataReceived(data)
        except ValueError:
            self.close("protocol-error")


def _negotiation_ended(failure: Failure) -> None:
    # The client refused the option, never answered, or went away: all normal
    # for scanners and raw sockets, nothing to report.
    failure.trap(error.ConnectionDone, error.ConnectionLost, OptionRefused, AlreadyNegotiating)


class TelnetDecoy(DecoyMixin, _GuardedTelnet):
    def connectionMade(self):
        self.buffer = b""
        self.user: bytes | None = None
        self.failures = 0
        super().connectionMade()
        spec = self.runtime.spec
        banner = spec.option("banner")
        self.prompt = f"{spec.option('hostname')} login: ".encode()
        greeting = (b"\r\n" + banner.encode("utf-8") + b"\r\n\r\n") if banner else b""
        self.transport.write(greeting + self.prompt)

    def enableLocal(self, option):
        return option == ECHO

    def disableLocal(self, option):
        return None

    def applicationDataReceived(self, data: bytes) -> None:
        self.buffer += data
        while self.close_reason is None:
            match = _LINE_END.search(self.buffer)
            if match is None:
                if len(self.buffer) > MAX_FIELD:
                    self.close("line-too-long")
                return
            line, self.buffer = self.buffer[: match.start()], self.buffer[match.end() :]
            if match.group() == b"\r" and self.buffer.startswith(b"\n"):
                self.buffer = self.buffer[1:]
            if len(line) > MAX_FIELD:
                self.close("line-too-long")
                return
            if not self.count_command():
                return
            self.handle_line(line)

    def handle_line(self, line: bytes) -> None:
        if self.user is None:
            if not line.strip():
                self.transport.write(self.prompt)
                return
            self.user = line
            self.will(ECHO).addErrback(_negotiation_ended)
            self.transport.write(b"Password: ")
            return
        self.session.login(("user", self.user), ("password", line))
        self.user = None
        self.failures += 1
        if self.getOptionState(ECHO).us.state == "yes":
            self.wont(ECHO).addErrback(_negotiation_ended)
        self.transport.write(b"\r\nLogin incorrect\r\n")
        if self.failures >= self.runtime.spec.option("max_attempts"):
            self.close("too-many-failures")
        else:
            self.transport.write(self.prompt)


def make_factory(runtime: ServiceRuntime) -> DecoyFactory:
    return DecoyFactory(runtime, TelnetDecoy)
