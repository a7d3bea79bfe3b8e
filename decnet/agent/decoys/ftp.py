"""``ftp``: a vsftpd-like login dialogue; USER/PASS captured and always refused.

Events: ``connect``; ``login`` (``user``, ``password``) for each PASS;
``command`` (``command``, ``args``) for anything else but an empty line;
``disconnect``.
After ``max_attempts`` refused logins the server closes the connection, as
vsftpd does.
"""

from __future__ import annotations

from decnet.agent.decoys.base import DecoyFactory, LineDecoy, ServiceRuntime, split_command

EMPTY_REPLY = b"500 Unknown command."


class FTPDecoy(LineDecoy):
    def connectionMade(self):
        super().connectionMade()
        self.user: bytes | None = None
        self.failures = 0
        self.send_line(f"220 {self.runtime.spec.option('banner')}")

    def blank_line_reply(self) -> bytes:
        return EMPTY_REPLY

    def handle_line(self, line: bytes) -> None:
        verb, rest = split_command(line)
        if not verb:
            # An empty line: counted, answered, nothing to record.
            self.send_line(EMPTY_REPLY)
            return
        if verb == "USER":
            self.user = rest
            self.send_line("331 Please specify the password.")
        elif verb == "PASS":
            if self.user is None:
                self.session.event("command", ("command", verb), ("args", rest))
                self.send_line("503 Login with USER first.")
                return
            self.session.login(("user", self.user), ("password", rest))
            self.user = None
            self.failures += 1
            self.send_line("530 Login incorrect.")
            if self.failures >= self.runtime.spec.option("max_attempts"):
                self.close("too-many-failures")
        elif verb == "QUIT":
            self.session.event("command", ("command", verb), ("args", rest))
            self.send_line("221 Goodbye.")
            self.close("quit")
        else:
            self.session.event("command", ("command", verb), ("args", rest))
            if verb == "FEAT":
                self.send_line(
                    "211-Features:\r\n EPRT\r\n EPSV\r\n MDTM\r\n PASV\r\n"
                    " REST STREAM\r\n SIZE\r\n TVFS\r\n211 End"
                )
            elif verb == "SYST" or verb == "AUTH":
                self.send_line("530 Please login with USER and PASS.")
            elif verb == "NOOP":
                self.send_line("200 NOOP ok.")
            else:
                self.send_line("530 Please login with USER and PASS.")


def make_factory(runtime: ServiceRuntime) -> DecoyFactory:
    return DecoyFactory(runtime, FTPDecoy)
