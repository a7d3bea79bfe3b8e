"""One source of truth for ports, environment names, file names and paths.

Modules import names from here instead of repeating literals, so the docs in
``docs/SWARM-Mode.md`` (the master state tree, the bundle layout) can be checked
against one file.
"""

from __future__ import annotations

import os
from pathlib import Path

import attrs

# Ports (defaults; every daemon takes an override).
AGENT_PORT = 8765
UPDATER_PORT = 8766
SYSLOG_PORT = 6514
ENROLL_PORT = 8443  # twistd decnet-enroll (token enrollment, TLS without client certificates)
# Prometheus /metrics, one port per daemon, loopback unless the operator says otherwise
# (``--metrics``; off unless given).  See docs/Metrics.md.
METRICS_PORTS = {
    "listener": 9465,
    "forwarder": 9466,
    "agent": 9467,
    "updater": 9468,
    "sink": 9469,
}
METRICS_INTERFACE = "127.0.0.1"

# Environment variables.
ENV_HOME = "DECNET_HOME"
ENV_MASTER_HOST = "DECNET_SWARM_MASTER_HOST"
ENV_SYSLOG_PORT = "DECNET_SWARM_SYSLOG_PORT"

DEFAULT_HOME = "~/.decnet"

# Identity roles and the names bound to them.
ROLE_MASTER = "master"
ROLE_WORKER = "worker"
ROLE_UPDATER = "updater"
ROLES = (ROLE_MASTER, ROLE_WORKER, ROLE_UPDATER)
MASTER_CN = "decnet-master"
UPDATER_CN_PREFIX = "updater@"

# Certificate lifetimes (days).  Leaves are short enough that a stolen key
# expires within a year, long enough that a fleet is not re-enrolled monthly.
CA_VALIDITY_DAYS = 3650
LEAF_VALIDITY_DAYS = 397
# Renewal (docs/Operations.md): a certificate closer than this to its end is renewed
# by `decnet-admin renew --before` by default, and warned about by `check` and the listener.
RENEW_BEFORE_DAYS = 30
# How often the agent, updater and forwarder look for a renewed certificate in the bundle.
IDENTITY_RELOAD_INTERVAL = 2.0

# Seconds the master waits for one call to a worker daemon: one deadline for connecting,
# the TLS handshake, the headers and the whole body.
HTTP_TIMEOUT = 10.0
# A deploy waits for every listener to be bound (and SSH host keys to be generated on
# first use), so it gets a longer deadline than a probe.
AGENT_DEPLOY_TIMEOUT = 60.0

# Worker-side defaults (each daemon takes an option to override).
DEFAULT_LOG_FILE = "/var/log/decnet/decnet.log"
WORKER_STATE_DIR = "/var/lib/decnet"
DEFAULT_INSTALL_DIR = "/opt/decnet"

# Worker bundle file names (written by ``decnet-admin enroll``).
BUNDLE_CA = "ca.crt"
BUNDLE_WORKER_CERT = "worker.crt"
BUNDLE_WORKER_KEY = "worker.key"
BUNDLE_UPDATER_CERT = "updater.crt"
BUNDLE_UPDATER_KEY = "updater.key"
BUNDLE_CONFIG = "bundle.json"


def env_int(name: str, default: int) -> int:
    """An integer from the environment, or ``default`` when unset or empty."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        from decnet.errors import ConfigError

        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None


def syslog_port() -> int:
    return env_int(ENV_SYSLOG_PORT, SYSLOG_PORT)


@attrs.frozen
class MasterPaths:
    """The master's state tree under ``--home`` / ``$DECNET_HOME``.

    ::

        <home>/                    0700 (0710, group decnet-listener, on a real master)
          ca/ca.crt ca.key .lock   the private CA (key 0600, dir 0700): decnet-admin only
          master/master.crt .key   decnet-admin's identity towards agents and updaters (0700)
          listener/                0750: all the log listener reads
            ca.crt                 a copy of ca/ca.crt
            listener.crt .key      the listener's own identity (key 0640)
            revoked.json           the revocation list
          master.json              master host name/addresses given at init
          listeners.json           the listener list for new bundles (optional)
          registry.sqlite          the host registry
          ingest/                  log listener output (mirror + JSON feed)

    The listener's key is not the master's: workers pin each one separately, so
    whoever takes over the listener cannot act as ``decnet-admin`` towards them.
    """

    home: Path

    @classmethod
    def resolve(cls, home: str | os.PathLike | None = None) -> MasterPaths:
        chosen = home or os.environ.get(ENV_HOME) or DEFAULT_HOME
        return cls(Path(chosen).expanduser().absolute())

    @property
    def ca_dir(self) -> Path:
        return self.home / "ca"

    @property
    def ca_cert(self) -> Path:
        return self.ca_dir / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.ca_dir / "ca.key"

    @property
    def master_dir(self) -> Path:
        return self.home / "master"

    @property
    def master_cert(self) -> Path:
        return self.master_dir / "master.crt"

    @property
    def master_key(self) -> Path:
        return self.master_dir / "master.key"

    @property
    def master_config(self) -> Path:
        return self.home / "master.json"

    @property
    def registry(self) -> Path:
        return self.home / "registry.sqlite"

    @property
    def listeners(self) -> Path:
        """The listener list new bundles get (``decnet-admin listeners``)."""
        return self.home / "listeners.json"

    @property
    def listener_dir(self) -> Path:
        return self.home / "listener"

    @property
    def listener_ca_cert(self) -> Path:
        return self.listener_dir / "ca.crt"

    @property
    def listener_cert(self) -> Path:
        return self.listener_dir / "listener.crt"

    @property
    def listener_key(self) -> Path:
        return self.listener_dir / "listener.key"

    @property
    def revocations(self) -> Path:
        return self.listener_dir / "revoked.json"

    @property
    def legacy_revocations(self) -> Path:
        """Where homes made before ``listener/`` kept the list; ``init`` moves it."""
        return self.home / "revoked.json"

    @property
    def ingest_dir(self) -> Path:
        return self.home / "ingest"


# Worker agent (``twistd decnet-agent``) and its decoy engine.
DEFAULT_AGENT_STATE_DIR = WORKER_STATE_DIR + "/agent"
AGENT_STATE_FILE = "desired.json"  # the persisted desired deployment, atomic
AGENT_SSH_KEY_DIR = "ssh"  # per-decky SSH host keys under the state dir, 0600
AGENT_MAX_BODY = 256 * 1024  # a deployment spec is small; anything bigger is refused
AGENT_MAX_DECKIES = 256
AGENT_MAX_SERVICES_PER_DECKY = 32

# Decoy event lines (RFC 5424).  The SD-ID needs an IANA Private Enterprise
# Number; until DECNET has one we use 32473, the PEN RFC 5612 reserves for
# documentation.  Changing it changes every line, so it lives here only.
EVENT_PEN = 32473
EVENT_SD_ID = f"decnet@{EVENT_PEN}"
EVENT_LINE_MAX = 8192  # bytes, newline included; enforced by the formatter

# ---------------------------------------------------------------------------
# The log pipeline (docs/Logging.md)

# Frames (RFC 5425 octet counting).  RFC 5425 says receivers SHOULD accept
# 8192 bytes; we take 64 KiB by default.
DEFAULT_MAX_FRAME = 64 * 1024
# Room an acknowledged-mode DATA header needs inside a frame ("D start end ").
ACK_HEADER_ROOM = 64
# A line longer than this is shipped truncated, with TRUNCATION_MARKER appended.
DEFAULT_MAX_LINE = DEFAULT_MAX_FRAME - ACK_HEADER_ROOM
TRUNCATION_MARKER = b"...[decnet: line truncated]"

# TLS ALPN id of the acknowledged protocol; a peer that does not offer it gets
# plain RFC 5425.
ACK_ALPN = b"decnet-syslog/1"
# ... and of its second version: HELLO may carry the worker's acknowledged offset, so a
# listener the worker moves to starts a new mirror segment there (docs/Logging.md).  A
# forwarder offers it only when its bundle names several listeners.
ACK_ALPN_MOVES = b"decnet-syslog/2"
# A forwarder shipping to a listener other than its preferred one goes back after this
# many seconds (docs/SWARM-Mode.md, "Several listeners").
DEFAULT_LISTENER_RETURN = 300.0
# How often a forwarder re-reads its bundle's listener list (``bundle refresh``), seconds.
DEFAULT_BUNDLE_CHECK = 10.0

# Stream names: ack-mode forwarders name theirs (``--stream``); everything
# received in plain RFC 5425 lands in PLAIN_STREAM of the sending worker.
DEFAULT_STREAM = "decnet"
PLAIN_STREAM = "syslog"

# Listener defaults.
DEFAULT_LISTEN_INTERFACE = "0.0.0.0"  # noqa: S104 - the listener serves the fleet
DEFAULT_MAX_CONNECTIONS = 4096
DEFAULT_MAX_CONNECTIONS_PER_WORKER = 16
DEFAULT_IDLE_TIMEOUT = 60.0

# Forwarder defaults.
FORWARDER_STATE_FILE = "forwarder.sqlite"  # in a sandbox worker's directory
# The forwarder's journal on a real worker: its unit's StateDirectory=decnet/forwarder.
DEFAULT_FORWARDER_STATE = WORKER_STATE_DIR + "/forwarder/offsets.sqlite"
DEFAULT_POLL_INTERVAL = 1.0


# Remote updates (``twistd decnet-updater``, ``decnet-admin update``).
# The install directory layout (``docs/Remote-Updates.md``)::
#
#   <install-dir>/            agent releases, owned by the updater
#     releases/<id>/          one immutable release: src/, venv/, install.log, release.json
#     current -> releases/<id>   the active release (symlink, switched by atomic rename)
#     journal.json            the release journal (state of the transaction in flight)
#     .trash/                 releases being deleted (renamed here first, then removed)
#     updater/                the updater's own releases, same layout (``update-self``)
RELEASES_DIR = "releases"
CURRENT_LINK = "current"
JOURNAL_FILE = "journal.json"
TRASH_DIR = ".trash"
UPDATER_SELF_DIR = "updater"
RELEASE_SRC_DIR = "src"
RELEASE_VENV_DIR = "venv"
RELEASE_INSTALL_LOG = "install.log"
RELEASE_WHEELHOUSE = "wheelhouse"  # inside a release tarball: wheels for an offline install
RELEASE_BUILD_INFO = "decnet-build.json"  # inside a release tarball: what tar_tree recorded
# A release id is the first hex digits of the tarball's sha256: content
# addressed, so the same tree always installs as the same release.
RELEASE_ID_LENGTH = 16

DEFAULT_AGENT_URL = f"https://127.0.0.1:{AGENT_PORT}"
DEFAULT_AGENT_UNIT = "decnet-agent.service"
# Started by the updater (systemd control) once a release is current and healthy: its
# ExecStart runs from that release (contrib/systemd, docs/Operations.md).
DEFAULT_FORWARDER_UNIT = "decnet-forwarder.service"
AGENT_CONTROLS = ("systemd", "spawn")
DEFAULT_HEALTH_TIMEOUT = 30.0  # seconds for a restarted agent to report the new release
HEALTH_PROBE_INTERVAL = 0.25  # seconds between two /health probes
DEFAULT_KEEP_RELEASES = 3
DEFAULT_INSTALL_TIMEOUT = 900.0  # seconds for venv + pip of one release
AGENT_STOP_GRACE = 10.0  # seconds between SIGTERM and SIGKILL for a spawned agent
OUTPUT_TAIL_BYTES = 16 * 1024  # captured install/agent output returned to the master

# Upload and archive caps: a release is source plus an optional wheelhouse.
MAX_UPLOAD_BYTES = 256 * 1024 * 1024  # compressed body of POST /update(-self)
MAX_RELEASE_BYTES = 1024 * 1024 * 1024  # uncompressed total of all members
MAX_RELEASE_MEMBERS = 20_000
# One pax or GNU long-name header: a 4 KiB path and link name fit many times over.  tarfile
# reads such a header whole, so the raw scan (decnet/updater/tarscan.py) refuses a larger one.
MAX_RELEASE_HEADER_BYTES = 64 * 1024
MAX_SMALL_BODY = 64 * 1024  # any body from a caller that may not upload, and JSON bodies

# Master side.
DEFAULT_UPDATE_CONCURRENCY = 4
DEFAULT_UPDATE_TIMEOUT = 1800.0  # seconds the master waits for one host's POST /update
DEFAULT_SELF_UPDATE_WAIT = 120.0  # seconds for a re-executed updater to answer /health
RELEASES_TIMEOUT = 30.0  # seconds for GET /releases (it reads every release's metadata)


# ---------------------------------------------------------------------------
# The local sandbox (``decnet-admin sandbox``, docs/Sandbox.md): a master and
# N workers on loopback, every daemon a real twistd child process.
#
#   <dir>/                    0700
#     master/                 the master home (CA, registry, ingest/)
#     workers/<name>/         bundle/, install/, agent-state/, decnet.log, forwarder.sqlite
#     logs/<process>.log      the twistd log of every child (and sandbox.log: `up` itself)
#     cache/                  the offline wheelhouse and release tarballs
#     sandbox.json            who runs: the `up` process, every child (PID, start time, argv)
SANDBOX_DEFAULT_DIR = "state"
SANDBOX_DEFAULT_WORKERS = 2
SANDBOX_MAX_WORKERS = 32
# Loopback network number NET: worker i answers on 127.0.NET.i (agent and
# updater on their standard ports), its decky j binds 127.NET.i.j.
SANDBOX_DEFAULT_NET = 1
SANDBOX_STATE_FILE = "sandbox.json"
SANDBOX_MASTER_HOST = "127.0.0.1"
# A child gets this long between SIGTERM and SIGKILL; an updater needs up to
# AGENT_STOP_GRACE of it to stop the agent it supervises.
SANDBOX_STOP_GRACE = AGENT_STOP_GRACE + 5.0
SANDBOX_START_TIMEOUT = 60.0  # seconds for a daemon to answer after it was started
SANDBOX_FEED_POLL = 0.25  # seconds between two reads of the master's JSON feeds
SANDBOX_HOSTS_POLL = 3.0  # seconds between two health/status rounds of the live view
SANDBOX_TABLE_EVERY = 15.0  # the host table is reprinted at most this often without a change
SANDBOX_TABLE_QUIET = 2.0  # ... and only once no event arrived for this long (not mid-burst)
SANDBOX_TABLE_SETTLE = 0.2  # rows arriving within this long of each other make one table
SANDBOX_AGENT_TIMEOUT = 5.0  # the live view's deadline for one request to an agent
SANDBOX_FORWARDER_RETRY = 5.0  # forwarders' --max-retry-delay: reconnect quickly on loopback

# Wheel releases (issue 14, ``docs/Remote-Updates.md``): one built wheel of DECNET, a manifest,
# and the dependency wheels the worker lacks; dependencies live in content-addressed envs.
RELEASE_MANIFEST = "release.json"  # at the top of a wheel release tarball
RELEASE_WHEELS_DIR = "wheels"  # inside a wheel release tarball: the wheels shipped (flat)
DEPS_DIR = "deps"  # <install-dir>/deps/<sha256 of the wheel set>/: one read-only environment
WHEEL_STORE_DIR = "wheels"  # <install-dir>/wheels/<sha256>/<file>.whl: the worker's wheels
DEPS_ENV_FILE = "deps.json"  # written last into a dependency environment: it is complete
MAX_MANIFEST_BYTES = 256 * 1024  # a release.json larger than this is refused (400)
MAX_MANIFEST_WHEELS = 500  # dependency wheels one manifest may list
MAX_INVENTORY_WHEELS = 5000  # sha256s a worker's GET /wheels may report (master side cap)
