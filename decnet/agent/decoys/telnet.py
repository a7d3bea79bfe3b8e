"""``telnet``: a Linux ``login:`` prompt; every username/password pair captured and refused.

The byte stream is split by our own scanner (:meth:`TelnetDecoy.next_item`):
it jumps from one special byte (IAC, CR, LF) to the next with a regular
expression, so plain text costs no Python per byte.  IAC sequences never
reach the captured text; option negotiation (WILL/WONT/DO/DONT) is handed to
Conch's :class:`Telnet` state machine, and the password prompt asks the client
to stop echoing, as ``login`` does.  A line ends at CR LF, CR NUL, LF or a
lone CR.  Every line and every IAC command counts toward the connection's
command cap; a subnegotiation longer than Conch's limit, or an unknown IAC
command, closes the connection (``protocol-error``).

Events: ``connect``; ``login`` (``user``, ``password``) for each attempt;
``disconnect``.  After ``max_attempts`` the connection is closed.
"""

from __future__ import annotations

import re

from twisted.conch.telnet import (
    ECHO,
    AlreadyDisabled,
    AlreadyEnabled,
    AlreadyNegotiating,
    OptionRefused,
    Telnet,
)
from twisted.internet import error
from twisted.python.failure import Failure

from decnet.agent.decoys.base import (
    RUN_STEP,
    DecoyFactory,
    DecoyMixin,
    ServiceRuntime,
    run_of,
)

MAX_FIELD = 1024
MAX_SUBNEGOTIATION = Telnet._MAX_SUBNEGOTIATION_LENGTH

_IAC, _SB, _SE = 0xFF, 0xFA, 0xF0
_CR, _LF, _NUL = 0x0D, 0x0A, 0x00
_NEGOTIATION = frozenset((0xFB, 0xFC, 0xFD, 0xFE))  # WILL WONT DO DONT
# EOR NOP DM BRK IP AO AYT EC EL GA: two-byte commands, no option byte.
_SIMPLE = frozenset((0xEF, 0xF1, 0xF2, 0xF3, 0xF4, 0xF5, 0xF6, 0xF7, 0xF8, 0xF9))
_SPECIAL = re.compile(rb"[\xff\r\n]")
# Runs handled in one go: empty lines at the login prompt (each answered with
# the prompt again) and two-byte IAC commands with no effect (NOP, AYT, ...).
_EMPTY_LINES = run_of(rb"\r[\n\x00]|\n")
_NOOP_COMMANDS = run_of(rb"\xff[\xef\xf1-\xf9]")
_NEGOTIATIONS = run_of(rb"\xff[\xfb-\xfe][\x00-\xff]", RUN_STEP)
_ECHO = ord(ECHO)
_REFUSALS = {0xFB: 0xFE, 0xFD: 0xFC}  # WILL -> DONT, DO -> WONT


def _negotiation_ended(failure: Failure) -> None:
    # The client refused the option, never answered, asked for it first, or
    # went away: all normal for scanners and raw sockets, nothing to report.
    failure.trap(
        error.ConnectionDone,
        error.ConnectionLost,
        OptionRefused,
        AlreadyNegotiating,
        AlreadyEnabled,
        AlreadyDisabled,
    )


class TelnetDecoy(DecoyMixin, Telnet):
    def connectionMade(self):
        self.line = bytearray()
        self.after_cr = False  # a line just ended with CR: one LF or NUL after it is part of it
        self.sb_scan = 2  # where the search for the end of a subnegotiation resumes
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

    def next_item(self) -> bool:
        inbox = self.inbox
        if not len(inbox):
            return False
        if self.after_cr:
            self.after_cr = False
            if inbox.byte_at(0) in (_LF, _NUL):
                inbox.skip(1)
                return True
        if not self.line and self.user is None and (end := inbox.match(_EMPTY_LINES)):
            n = self.count_commands(inbox.count(b"\n", end) + inbox.count(b"\r\x00", end))
            inbox.skip(end)
            self.transport.write(self.prompt * n)
            return True
        if end := inbox.match(_NOOP_COMMANDS):
            self.count_commands(end // 2)
            inbox.skip(end)
            return True
        found = inbox.search(_SPECIAL)
        if found is None:
            return self._text(inbox.take(len(inbox)))
        at, special = found
        if at:
            return self._text(inbox.take(at))
        if special != b"\xff":
            inbox.skip(1)
            self.after_cr = special == b"\r"
            self._line_end()
            return True
        return self._iac()

    def _text(self, data: bytes) -> bool:
        self.line += data
        if len(self.line) > MAX_FIELD:
            self.close("line-too-long")
        return True

    def _iac(self) -> bool:
        inbox = self.inbox
        if len(inbox) < 2:
            return False
        command = inbox.byte_at(1)
        if command == _IAC:  # an escaped 0xFF data byte
            inbox.skip(2)
            return self._text(b"\xff")
        if command in _NEGOTIATION:
            return self._negotiations()
        if command in _SIMPLE:
            inbox.skip(2)
            if self.count_command():
                self.commandReceived(bytes((command,)), None)
            return True
        if command == _SB:
            return self._subnegotiation()
        self.close("protocol-error")
        return True

    def _negotiations(self) -> bool:
        """A run of IAC WILL/WONT/DO/DONT requests.

        Requests about options this decoy never negotiated are answered
        directly, as Conch's RFC 1143 state machine would (WILL gets DONT, DO
        gets WONT, WONT and DONT need no answer), all answers in one write; the
        first request about an option in use (ECHO, or one already seen by
        Conch) goes to Conch, one item at a time.
        """
        inbox = self.inbox
        run = inbox.match(_NEGOTIATIONS)
        if not run:
            return False  # the option byte has not arrived
        data = inbox.peek(run)
        answers = bytearray()
        done = 0
        for i in range(0, run, 3):
            verb, option = data[i + 1], data[i + 2]
            if option == _ECHO or bytes((option,)) in self.options:
                break
            if verb in _REFUSALS:
                answers += bytes((_IAC, _REFUSALS[verb], option))
            done += 1
        if done:
            inbox.skip(3 * done)
            if self.count_commands(done) == done and answers:
                self.transport.write(bytes(answers))
            return True
        inbox.skip(3)
        if self.count_command():
            self.commandReceived(bytes((verb,)), bytes((option,)))
        return True

    def _subnegotiation(self) -> bool:
        # IAC SB ... IAC SE; IAC IAC inside is an escaped 0xFF.  No option we
        # emulate uses subnegotiation, so it is counted and dropped.  The
        # search resumes where it stopped when the end has not arrived yet.
        inbox = self.inbox
        limit = MAX_SUBNEGOTIATION + 4
        while True:
            at = inbox.find(b"\xff", self.sb_scan, limit)
            if at < 0 or at + 1 >= len(inbox):
                if len(inbox) >= limit:
                    self.close("protocol-error")
                    return True
                self.sb_scan = at if at >= 0 else max(2, len(inbox))
                return False
            if inbox.byte_at(at + 1) == _SE:
                inbox.skip(at + 2)
                self.sb_scan = 2
                self.count_command()
                return True
            self.sb_scan = at + 2

    def _line_end(self) -> None:
        line = bytes(self.line)
        self.line.clear()
        if self.count_command():
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
