"""Private rsyslogd instances for interop tests and the benchmark.

Each instance has its own config, pid file, work directory and loopback port;
the system daemon is never touched.  TLS uses the gtls driver (its ``x509/name``
check is the one that really refuses unpermitted peers); ``%rawmsg%`` keeps
lines byte-identical; ``processInternalMessages`` makes TLS errors visible in
``internal.log``.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

RSYSLOGD = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"


def available() -> bool:
    """rsyslogd and its gtls driver (package rsyslog-gnutls) are installed."""
    return Path(RSYSLOGD).exists() and bool(list(Path("/usr/lib").glob("**/lmnsd_gtls.so")))


# Tuned for throughput (bench/logpipe.py's reference run, docs/Logging.md "Performance"):
# queues large enough that flow control never throttles a 1M-line burst, large
# dequeue batches (fewer wake-ups and transactions), imfile submitting in
# batches, and omfile writing synchronously through a 4 MiB buffer flushed at
# the end of each batch (no extra writer thread, nothing held back at the end).
_QUEUE = 'queue.type="FixedArray" queue.size="500000" queue.dequeueBatchSize="16384"'


def _global(work: Path, ca: Path, cert: Path, key: Path) -> str:
    return f"""
global(workDirectory="{work}" maxMessageSize="256k" processInternalMessages="on"
       parser.escapeControlCharactersOnReceive="off"
       defaultNetstreamDriver="gtls"
       defaultNetstreamDriverCAFile="{ca}"
       defaultNetstreamDriverCertFile="{cert}"
       defaultNetstreamDriverKeyFile="{key}")
main_queue({_QUEUE})
*.* action(type="omfile" file="{work}/internal.log")
"""


def receiver_config(work: Path, port: int, out: Path, ca, cert, key, peers) -> str:
    """imtcp over TLS: only ``peers`` (by certificate name) may send; lines to ``out``."""
    permitted = ", ".join(f'"{p}"' for p in peers)
    return (
        _global(work, ca, cert, key)
        + f"""
module(load="imtcp" streamDriver.name="gtls" streamDriver.mode="1"
       streamDriver.authMode="x509/name" permittedPeer=[{permitted}]
       maxSessions="2000" flowControl="off")
template(name="raw" type="string" string="%rawmsg%\\n")
ruleset(name="in" {_QUEUE}) {{
    action(type="omfile" file="{out}" template="raw" asyncWriting="off" ioBufferSize="4m"
           flushOnTXEnd="on")
}}
input(type="imtcp" port="{port}" address="127.0.0.1" ruleset="in")
"""
    )


def sender_config(work: Path, source: Path, port: int, ca, cert, key, peer: str) -> str:
    """imfile → omfwd, RFC 5425 octet-counted over TLS to 127.0.0.1:``port``."""
    return (
        _global(work, ca, cert, key)
        + f"""
module(load="imfile" mode="inotify")
template(name="raw" type="string" string="%rawmsg%")
ruleset(name="fwd" {_QUEUE}) {{
    action(type="omfwd" target="127.0.0.1" port="{port}" protocol="tcp"
           StreamDriver="gtls" StreamDriverMode="1" StreamDriverAuthMode="x509/name"
           StreamDriverPermittedPeers="{peer}" TCP_Framing="octet-counted" template="raw"
           action.resumeRetryCount="-1" action.resumeInterval="1")
}}
input(type="imfile" File="{source}" Tag="decnet" ruleset="fwd" addMetadata="off"
      MaxSubmitAtOnce="4096")
"""
    )


class Rsyslogd:
    """One private ``rsyslogd -n`` with its own config, pid file and work directory."""

    def __init__(self, directory: Path, config_text: str):
        self.directory = Path(directory)
        self.work = self.directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.conf = self.directory / "rsyslog.conf"
        self.conf.write_text(config_text)
        self.pidfile = self.directory / "rsyslogd.pid"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        check = subprocess.run(
            [RSYSLOGD, "-N1", "-f", str(self.conf)], capture_output=True, text=True
        )
        if check.returncode != 0:
            raise RuntimeError(f"rsyslog config invalid: {check.stdout}{check.stderr}")
        self.proc = subprocess.Popen(
            [RSYSLOGD, "-n", "-f", str(self.conf), "-i", str(self.pidfile)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def internal_log(self) -> str:
        path = self.directory / "internal.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0
