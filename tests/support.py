"""Helpers shared by the tests: minting identities on disk, TLS plumbing, polling."""

from __future__ import annotations

import datetime
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import connectedServerAndClient
from zope.interface import implementer

from decnet import config, pki
from decnet.tls import PolicyOptions, TLSIdentity, TLSServerFactory

BIN = Path(sys.executable).parent


def write_identity(
    directory: Path,
    ca: pki.CertificateAuthority,
    role: str,
    name: str | None = None,
    *,
    trust: pki.CertificateAuthority | None = None,
    **issue_kw,
) -> TLSIdentity:
    """Issue a leaf, write cert/key/CA files into ``directory`` and load it for TLS.

    ``trust`` is the CA this identity trusts (defaults to its issuer).
    """
    directory.mkdir(parents=True, exist_ok=True)
    leaf = pki.issue_leaf(ca, role, name, **issue_kw)
    stem = directory / (name or role)
    cert_path, key_path = stem.with_suffix(".crt"), stem.with_suffix(".key")
    ca_path = directory / "ca.crt"
    cert_path.write_bytes(pki.cert_pem(leaf.cert))
    key_path.write_bytes(pki.key_pem(leaf.key))
    os.chmod(key_path, 0o600)
    ca_path.write_bytes(pki.cert_pem((trust or ca).cert))
    return TLSIdentity.load(cert_path, key_path, ca_path)


def expired_kw() -> dict:
    """issue_leaf() arguments for a certificate that expired a year ago."""
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=400)
    return {"not_before": start, "validity_days": 30}


@implementer(IHandshakeListener)
class RecordingProtocol(Protocol):
    """Records handshake completion, received bytes and the loss reason."""

    def __init__(self):
        self.handshake_done = False
        self.received = b""
        self.lost_reason = None

    def handshakeCompleted(self):
        self.handshake_done = True

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.lost_reason = reason


def tls_pair(server_identity, server_policy, client_identity, client_policy, *, alpn=None):
    """Run a TLS handshake in memory; return (client_app, server_app, pump)."""
    server_options = PolicyOptions(server_identity, server_policy, acceptable_protocols=alpn)
    client_options = PolicyOptions(client_identity, client_policy, acceptable_protocols=alpn)
    return tls_pair_with(server_options, client_options)


def tls_pair_with(server_options, client_options):
    """Like :func:`tls_pair` with ready-made options (or any context factory)."""
    client_app, server_app, pump = tls_connection(server_options, client_options)
    pump.flush()
    client_app.transport.write(b"ping")
    pump.flush()
    return client_app, server_app, pump


def tls_connection(server_options, client_options):
    """A TLS connection in memory, not pumped yet: (client_app, server_app, pump).

    ``pump.pump()`` moves one batch of bytes each way, so a test can stop a
    handshake half-way (and run another one meanwhile).
    """
    clock = Clock()
    server_app, client_app = RecordingProtocol(), RecordingProtocol()
    server_factory = TLSServerFactory(
        server_options, Factory.forProtocol(lambda: server_app), clock=clock
    )
    client_factory = TLSMemoryBIOFactory(
        client_options, True, Factory.forProtocol(lambda: client_app), clock=clock
    )
    _client, _server, pump = connectedServerAndClient(
        lambda: server_factory.buildProtocol(None),
        lambda: client_factory.buildProtocol(None),
        greet=False,
        clock=clock,
    )
    return client_app, server_app, pump


# -- polling, with a deadline: only where a child process (or a kernel) is involved -----


class _Poll:
    """One look at ``predicate`` at a time: its value once truthy, an error past the deadline."""

    def __init__(self, predicate, timeout: float, what: str):
        self.predicate = predicate
        self.timeout = timeout
        self.what = what
        self.deadline = time.monotonic() + timeout

    def look(self):
        value = self.predicate()
        if not value and time.monotonic() > self.deadline:
            raise AssertionError(f"timed out after {self.timeout}s waiting for {self.what}")
        return value


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` until truthy, blocking (no reactor runs here); returns its value."""
    poll = _Poll(predicate, timeout, what)
    while not (value := poll.look()):
        time.sleep(interval)
    return value


async def eventually(
    predicate, timeout: float = 20.0, interval: float = 0.02, what: str = "condition"
):
    """Poll ``predicate`` until truthy, letting the reactor run in between; returns its value."""
    from twisted.internet import reactor, task

    poll = _Poll(predicate, timeout, what)
    while not (value := poll.look()):
        await task.deferLater(reactor, interval, lambda: None)
    return value


def ends_on_ctrl_c(proc) -> None:
    """Ctrl-C (SIGINT) ends the command ``proc`` with 130 and no traceback."""
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and b"Traceback" not in err, err


def master_paths(tmp_path: Path) -> config.MasterPaths:
    return config.MasterPaths.resolve(tmp_path / "home")


# ---------------------------------------------------------------------------
# Agent and decoy tests


class FrozenClock:
    """A clock whose ``seconds()`` is fixed (exact event lines) but whose timers are real."""

    def __init__(self, reactor, now: float = 1767323045.25):
        self._reactor = reactor
        self.now = now

    def seconds(self) -> float:
        return self.now

    def callLater(self, delay, fn, *args, **kw):
        return self._reactor.callLater(delay, fn, *args, **kw)


def counter_ids(prefix: str = "s"):
    """Deterministic decoy session ids: s1, s2, …"""
    import itertools

    numbers = itertools.count(1)
    return lambda: f"{prefix}{next(numbers)}"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind 0, read, close)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class RawClient(Protocol):
    """A scripted TCP client for decoy tests: send bytes, await expected output, await close."""

    def __init__(self):
        from twisted.internet import defer

        self._defer = defer
        self.received = b""
        self.sent = 0
        self.closed = defer.Deferred()
        self._waiting: list = []

    def dataReceived(self, data):
        self.received += data
        self._check()

    def connectionLost(self, reason):
        waiting, self._waiting = self._waiting, []
        for needle, d in waiting:
            d.errback(AssertionError(f"closed before {needle!r}; got {self.received!r}"))
        self.closed.callback(self.received)

    def _check(self):
        # Firing a waiter may resume the test, which may add waiters: take the
        # ready ones out first.
        ready = [(n, d) for n, d in self._waiting if n in self.received]
        self._waiting = [(n, d) for n, d in self._waiting if n not in self.received]
        for _needle, d in ready:
            d.callback(self.received)

    def expect(self, needle: bytes, timeout: float = 10.0):
        """Fires with everything received once ``needle`` has been received."""
        from twisted.internet import reactor

        d = self._defer.Deferred()
        self._waiting.append((needle, d))
        self._check()
        return d.addTimeout(timeout, reactor)

    def send(self, data: bytes) -> None:
        self.sent += len(data)
        self.transport.write(data)

    def connectionMade(self):
        self.port = self.transport.getHost().port

    def local_port(self) -> int:
        return self.port


async def raw_connect(port: int, host: str = "127.0.0.1") -> RawClient:
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    return await connectProtocol(TCP4ClientEndpoint(reactor, host, port), RawClient())


# Remote updates: release trees, local updaters

REPO_ROOT = Path(__file__).resolve().parent.parent


def copy_release_tree(dest: Path, root: Path = REPO_ROOT) -> Path:
    """Copy what tar_tree would ship from ``root`` into ``dest`` (a new source tree)."""
    import shutil

    from decnet.master import tar_tree

    files, _ = tar_tree.collect(root)
    for name, path in files:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    return dest


def tree_snapshot(root) -> dict:
    """Everything under ``root``: names, link targets, file bytes and modes."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            if os.path.islink(path):
                out[rel] = ("link", os.readlink(path))
            elif os.path.isfile(path):
                with open(path, "rb") as fh:
                    out[rel] = ("file", st.st_mode, fh.read())
            else:
                out[rel] = ("dir", st.st_mode)
    return out


def make_tarball(members, *, gz: bool = True) -> bytes:
    """A tarball from ``(TarInfo or name, bytes | None)`` pairs, hostile ones included."""
    import gzip
    import io
    import tarfile

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if isinstance(info, str):
                info = tarfile.TarInfo(info)
                info.mode = 0o644
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    body = raw.getvalue()
    return gzip.compress(body, mtime=0) if gz else body


def minimal_release(extra=(), *, name: str = "demo") -> bytes:
    """A tiny well-formed release tarball (a project that installs nothing real)."""
    members = [
        ("setup.cfg", f"[metadata]\nname = {name}\nversion = 1.0\n".encode()),
        ("pyproject.toml", b'[build-system]\nrequires = ["setuptools"]\n'),
        (f"{name}/__init__.py", b"VERSION = 1\n"),
        *extra,
    ]
    return make_tarball(members)


def https_get_json(
    port: int,
    paths: config.MasterPaths,
    route: str = "health",
    timeout=5.0,
    host: str = "127.0.0.1",
):
    """``GET /route`` as the master, synchronously (subprocess tests); ``None`` if it fails."""
    import http.client
    import json
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(paths.ca_cert)
    ctx.load_cert_chain(paths.master_cert, paths.master_key)
    conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=timeout)
    try:
        conn.request("GET", "/" + route)
        response = conn.getresponse()
        body = response.read()
        return json.loads(body) if response.status == 200 else None
    except (OSError, ssl.SSLError, ValueError, http.client.HTTPException):
        return None
    finally:
        conn.close()


class LocalUpdater:
    """A ``twistd decnet-updater`` subprocess on loopback, supervising its agent (spawn)."""

    def __init__(
        self,
        base: Path,
        paths: config.MasterPaths,
        name: str,
        *,
        health_timeout=8,
        compile=False,
        extra: Sequence[str] = (),
    ):
        from decnet.master import enrollment

        self.paths = paths
        self.name = name
        self.base = base / name
        self.base.mkdir(parents=True)
        # Fixed, not port 0 with --port-file: the registry must know the port before
        # `decnet-admin update` runs, and update-self re-executes the updater with the
        # same --listen.
        self.port = free_port()
        self.agent_port = free_port()
        master = enrollment.load_master(paths)
        enrollment.enroll(
            master,
            name,
            "127.0.0.1",
            self.base / "bundle",
            updater=True,
            agent_port=self.agent_port,
            updater_port=self.port,
        )
        self.install = self.base / "install"
        self.log = self.base / "updater.log"
        self.health_timeout = health_timeout
        self.compile = compile
        self.extra = list(extra)  # more decnet-updater options
        self.process = None

    def argv(self) -> list[str]:
        return [
            str(BIN / "twistd"),
            "--nodaemon",
            "--pidfile=",
            "--logfile",
            str(self.log),
            "decnet-updater",
            "--bundle",
            str(self.base / "bundle"),
            "--listen",
            f"tcp:{self.port}:interface=127.0.0.1",
            "--install-dir",
            str(self.install),
            "--agent-url",
            f"https://127.0.0.1:{self.agent_port}",
            "--agent-control",
            "spawn",
            "--agent-state-dir",
            str(self.base / "agent-state"),
            "--agent-log-file",
            str(self.base / "agent.log"),
            "--health-timeout",
            str(self.health_timeout),
            *([] if self.compile else ["--no-compile"]),
            *self.extra,
        ]

    def start(self, wait: bool = True):
        import subprocess

        env = {k: v for k, v in os.environ.items() if k != "DECNET_RELEASE_ID"}
        with open(self.base / "updater.out", "ab") as out:
            self.process = subprocess.Popen(
                self.argv(), stdout=out, stderr=subprocess.STDOUT, env=env, cwd=self.base
            )
        if wait:
            wait_for(self.ready, 30, what=f"updater {self.name} to be ready")
        return self

    def health(self):
        return https_get_json(self.port, self.paths)

    def ready(self):
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"updater {self.name} exited: {self.tail()}")
        doc = self.health()
        return doc if doc and doc.get("status") == "ok" else None

    def agent_health(self):
        return https_get_json(self.agent_port, self.paths)

    def agent_release(self):
        doc = self.agent_health()
        return doc.get("release") if doc else None

    def journal(self) -> dict:
        import json

        try:
            return json.loads((self.install / config.JOURNAL_FILE).read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def current(self) -> str | None:
        try:
            return os.readlink(self.install / config.CURRENT_LINK).split("/")[-1]
        except OSError:
            return None

    def tail(self, size: int = 4000) -> str:
        text = ""
        for path in (self.log, self.base / "updater.out"):
            if path.exists():
                text += path.read_text(errors="replace")[-size:]
        return text

    def kill9(self):
        import signal

        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self):
        import signal

        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except Exception:
                self.process.kill()
                self.process.wait(10)


def record_ports(paths: config.MasterPaths, name: str, **ports: int) -> None:
    """Record in the registry the ports a daemon started on port 0 was given (``--port-file``)."""
    import attrs

    from decnet.master.registry import Registry

    registry = Registry(paths.registry)
    with registry.lock():
        host = registry.get(name)
        registry.remove(name)
        registry.add(attrs.evolve(host, **ports))


def admin(paths: config.MasterPaths, *args: str, timeout: float = 300):
    """Run ``decnet-admin --home HOME ARGS``; the CompletedProcess."""
    import subprocess

    return subprocess.run(
        [str(BIN / "decnet-admin"), "--home", str(paths.home), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ensure_wheelhouse() -> Path:
    """The offline wheelhouse for this tree (``decnet.master.wheelhouse``), cached across
    sessions under ``$XDG_CACHE_HOME/decnet-tests`` so release venvs install with ``--no-index``.
    """
    from decnet.master import wheelhouse

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "decnet-tests"
    cache.mkdir(parents=True, exist_ok=True)
    return wheelhouse.build(REPO_ROOT, cache)


async def started_agent(
    bundle_dir: Path, tmp_path: Path, *, reload_interval: float | None = None, **kw
):
    """A real AgentService of the bundle in ``bundle_dir`` on a loopback port, started and
    restored (the caller stops it); ``service.port`` is the port its API listens on.
    ``kw`` may replace its ``state_dir`` and ``log_file`` (under ``tmp_path``)."""
    from twisted.internet import reactor

    from decnet.agent.service import AgentService

    bundle = pki.WorkerBundle.load(bundle_dir)
    options = {"state_dir": tmp_path / "state", "log_file": tmp_path / "decnet.log", **kw}
    service = AgentService(
        reactor,
        bundle=bundle,
        identity=TLSIdentity.from_bundle(bundle, "worker"),
        listen="tcp:0:interface=127.0.0.1",
        **options,
    )
    if reload_interval is not None:
        service.identity_watcher.interval = reload_interval
    service.startService()
    service.port = (await service.api.ready).getHost().port
    await service.restored
    return service


async def started_updater(
    bundle_dir: Path, tmp_path: Path, agent, *, reload_interval: float | None = None
):
    """A real UpdaterService of the bundle in ``bundle_dir`` on a loopback port, started
    (the caller stops it); ``agent`` is its :class:`decnet.updater.service.LocalAgent`, and
    ``service.port.getHost().port`` the port its API listens on."""
    from twisted.internet import reactor

    from decnet.updater.service import UpdaterService

    bundle = pki.WorkerBundle.load(bundle_dir)
    service = UpdaterService(
        reactor,
        bundle=bundle,
        identity=TLSIdentity.from_bundle(bundle, "updater"),
        listen="tcp:0:interface=127.0.0.1",
        install_dir=tmp_path / "install",
        agent=agent,
    )
    if reload_interval is not None:
        for watcher in service.watchers:
            watcher.interval = reload_interval
    service.startService()
    await service.port_service.ready
    return service


async def admin_output(home: Path, *args: str) -> tuple[str, str, int]:
    """``decnet-admin --home HOME ARGS`` without blocking the reactor: (stdout, stderr, code)."""
    from twisted.internet.utils import getProcessOutputAndValue

    env = {k: v for k, v in os.environ.items() if k != config.ENV_HOME}
    out, err, code = await getProcessOutputAndValue(
        str(BIN / "decnet-admin"), ["--home", str(home), *args], env=env
    )
    return out.decode(), err.decode(), code
