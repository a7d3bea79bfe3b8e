"""``smtp``: a Postfix-like MTA that advertises AUTH, captures every attempt, relays nothing.

Events: ``connect``; ``command`` (``command``, ``args``) for each non-empty line;
``login`` (``mechanism``, ``user``, ``password``) for each AUTH PLAIN/LOGIN
attempt (decoded from base64; undecodable input is logged as sent);
``disconnect``.  MAIL FROM is accepted, RCPT TO is refused ("relay access
denied"), so nothing is ever delivered.
"""

from __future__ import annotations

import base64
import binascii

from decnet.agent.decoys.base import DecoyFactory, LineDecoy, ServiceRuntime, split_command


def _b64(data: bytes) -> bytes | None:
    try:
        return base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None


EMPTY_REPLY = b"500 5.5.2 Error: bad syntax"


class SMTPDecoy(LineDecoy):
    def connectionMade(self):
        super().connectionMade()
        self.hostname = self.runtime.spec.option("hostname")
        self.pending_auth: tuple[str, bytes | None] | None = None
        self.send_line(f"220 {self.hostname} {self.runtime.spec.option('banner')}")

    def blank_line_reply(self) -> bytes | None:
        # In an AUTH dialogue an empty line is an (empty) answer.
        return EMPTY_REPLY if self.pending_auth is None else None

    def handle_line(self, line: bytes) -> None:
        if self.pending_auth is not None:
            self._continue_auth(line, self.pending_auth)
            return
        verb, rest = split_command(line)
        if not verb:
            # An empty line: counted, answered as Postfix does, nothing to record.
            self.send_line(EMPTY_REPLY)
            return
        if verb == "AUTH":
            self._start_auth(rest)
            return
        self.session.event("command", ("command", verb), ("args", rest))
        if verb == "EHLO":
            self.send_line(
                f"250-{self.hostname}\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n"
                "250-VRFY\r\n250-ETRN\r\n250-AUTH PLAIN LOGIN\r\n250-ENHANCEDSTATUSCODES\r\n"
                "250-8BITMIME\r\n250-DSN\r\n250 SMTPUTF8"
            )
        elif verb == "HELO":
            self.send_line(f"250 {self.hostname}")
        elif verb == "MAIL":
            self.send_line("250 2.1.0 Ok")
        elif verb == "RCPT":
            self.send_line("554 5.7.1 <unknown>: Relay access denied")
        elif verb == "DATA":
            self.send_line("554 5.5.1 Error: no valid recipients")
        elif verb in ("RSET", "NOOP"):
            self.send_line("250 2.0.0 Ok")
        elif verb == "VRFY":
            self.send_line("252 2.0.0 Send some mail, I'll try my best")
        elif verb == "QUIT":
            self.send_line("221 2.0.0 Bye")
            self.close("quit")
        elif verb == "STARTTLS":
            self.send_line("454 4.7.0 TLS not available due to local problem")
        else:
            self.send_line("502 5.5.2 Error: command not recognized")

    def _start_auth(self, rest: bytes) -> None:
        mechanism, _, initial = rest.strip().partition(b" ")
        mech = mechanism.decode("ascii", "replace").upper()
        if mech == "PLAIN":
            if initial:
                self._finish_plain(initial)
            else:
                self.pending_auth = ("PLAIN", None)
                self.transport.write(b"334 \r\n")
        elif mech == "LOGIN":
            if initial:
                self.pending_auth = ("LOGIN", _b64(initial) or initial)
                self.transport.write(b"334 UGFzc3dvcmQ6\r\n")
            else:
                self.pending_auth = ("LOGIN", None)
                self.transport.write(b"334 VXNlcm5hbWU6\r\n")
        else:
            self.session.event("command", ("command", "AUTH"), ("args", rest))
            self.send_line(
                "535 5.7.8 Error: authentication failed: Invalid authentication mechanism"
            )

    def _continue_auth(self, line: bytes, pending: tuple[str, bytes | None]) -> None:
        mech, user = pending
        if line.strip() == b"*":
            self.pending_auth = None
            self.send_line("501 5.7.0 Authentication aborted")
            return
        if mech == "PLAIN":
            self.pending_auth = None
            self._finish_plain(line)
        elif user is None:
            decoded = _b64(line)
            self.pending_auth = ("LOGIN", decoded if decoded is not None else line)
            self.transport.write(b"334 UGFzc3dvcmQ6\r\n")
        else:
            self.pending_auth = None
            decoded = _b64(line)
            self.session.login(
                ("mechanism", "LOGIN"),
                ("user", user),
                ("password", decoded if decoded is not None else line),
            )
            self.send_line("535 5.7.8 Error: authentication failed: authentication failure")

    def _finish_plain(self, payload: bytes) -> None:
        decoded = _b64(payload)
        if decoded is None:
            self.session.login(("mechanism", "PLAIN"), ("raw", payload))
            self.send_line("501 5.5.2 Cannot decode response")
            return
        parts = decoded.split(b"\x00")
        if len(parts) == 3:
            authzid, user, password = parts
        else:
            authzid, user, password = b"", decoded, b""
        self.session.login(
            ("mechanism", "PLAIN"),
            ("authzid", authzid or None),
            ("user", user),
            ("password", password),
        )
        self.send_line("535 5.7.8 Error: authentication failed: authentication failure")


def make_factory(runtime: ServiceRuntime) -> DecoyFactory:
    return DecoyFactory(runtime, SMTPDecoy)
