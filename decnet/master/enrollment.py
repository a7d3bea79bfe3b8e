"""Operator actions on the master's state: init, enroll, decommission.

Blocking (key generation, file and SQLite I/O); the CLI calls these directly.
Every action validates all of its input before it writes anything, and an
enrollment is all-or-nothing: registry row and bundle directory both land, or
neither does.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path

import attrs

from decnet import config, pki, revocation
from decnet.clock import utc_iso
from decnet.errors import UnknownHost, ValidationError
from decnet.fsutil import atomic_write, ensure_private_dir, fsync_dir, locked, write_new_file
from decnet.master.listeners import read_listeners
from decnet.master.registry import Host, Registry, Tokens, utc_now_iso

LISTENER_DIR_MODE = 0o750
DEFAULT_MASTER_HOST = "127.0.0.1"  # what a first init without --master-host stores
LISTENER_KEY_MODE = 0o640


@attrs.frozen
class MasterState:
    """The master's CA, identity and settings, as loaded from ``--home``."""

    paths: config.MasterPaths
    ca: pki.CertificateAuthority
    master_cert_fingerprint: str
    listener_cert_fingerprint: str
    settings: dict
    # What ``init`` found stored before it ran (None: a new home); see init_master.
    previous_master_host: str | None = None

    @property
    def master_host(self) -> str:
        return self.settings["master_host"]


def init_master(
    paths: config.MasterPaths,
    *,
    master_host: str | None = None,
    addresses: Sequence[str] = (),
    key_type: str = pki.DEFAULT_KEY_TYPE,
) -> MasterState:
    """Create (or load) the CA and the master identity.  Idempotent.

    ``master_host`` is the address workers use to reach the listener; it and
    ``addresses`` become SANs of the master and listener certificates.  On a
    second run the existing CA and identities are kept; ``master_host`` is
    updated if given, else the stored one is kept (a new home gets
    :data:`DEFAULT_MASTER_HOST`), and a home made before ``listener/`` existed
    gets it.  The result's ``previous_master_host`` is what was stored before.
    """
    given = [master_host] if master_host is not None else []
    problems = _problems([partial(pki.parse_address, a) for a in (*given, *addresses)])
    if problems:
        raise ValidationError(problems)
    _ensure_home(paths.home)
    ca = pki.ensure_ca(paths.ca_dir)
    ensure_private_dir(paths.master_dir)
    with locked(paths.master_dir / ".lock"):
        settings = _read_settings(paths)
        previous = settings.get("master_host")
        chosen = master_host or previous or DEFAULT_MASTER_HOST
        sans = [chosen, *addresses]
        _ensure_identity(ca, paths.master_cert, paths.master_key, sans, key_type)
        if previous != chosen:
            settings["master_host"] = chosen
            atomic_write(paths.master_config, (json.dumps(settings, indent=2) + "\n").encode())
    _ensure_listener(paths, ca, sans, key_type)
    Registry(paths.registry)  # create and migrate
    return attrs.evolve(load_master(paths), previous_master_host=previous)


def _ensure_home(home: Path) -> None:
    """``home`` is 0700, or 0710 where the operator made it exactly that.

    On a real master the operator creates it 0710 with group ``decnet-listener``,
    so the listener reaches ``listener/`` and ``ingest/`` by name and can list or
    read nothing else (docs/Operations.md).  Any other mode is tightened to 0700.
    """
    home.mkdir(mode=stat.S_IRWXU, parents=True, exist_ok=True)
    mode = stat.S_IMODE(home.stat().st_mode)
    if mode not in (stat.S_IRWXU, stat.S_IRWXU | stat.S_IXGRP):
        os.chmod(home, stat.S_IRWXU)


def _ensure_listener(
    paths: config.MasterPaths, ca: pki.CertificateAuthority, sans: Sequence[str], key_type: str
) -> None:
    """``listener/``: a copy of the CA certificate, the listener's own identity, revocations.

    The listener's key is its own (role ``master``, pinned by the forwarders as
    ``listener_fingerprint``), so it can never act as ``decnet-admin`` towards
    an agent or updater, which pin the master's key.  A new directory is 0750;
    an existing one keeps its group and setgid bit (docs/Operations.md), which is
    what makes the files below readable by ``decnet-listener``.
    """
    directory = paths.listener_dir
    try:
        directory.mkdir(mode=LISTENER_DIR_MODE)
    except FileExistsError:
        pass
    else:
        os.chmod(directory, LISTENER_DIR_MODE)  # whatever the umask
    with locked(directory / ".lock"):
        # The revocation list moves first: a listener that finds its identity
        # always finds the list with it.
        legacy = paths.legacy_revocations
        if legacy.exists():
            revocation.add_entries(paths.revocations, revocation.read_entries(legacy))
            legacy.unlink()
            fsync_dir(paths.home)
        ca_pem = pki.cert_pem(ca.cert)
        copy = paths.listener_ca_cert
        if not (copy.is_file() and copy.read_bytes() == ca_pem):
            atomic_write(copy, ca_pem)
            os.chmod(copy, 0o644)
        # Group-readable only once complete; the group is decnet-listener's.
        if _ensure_identity(
            ca, paths.listener_cert, paths.listener_key, sans, key_type, shared=True
        ):
            fsync_dir(directory)


def _ensure_identity(
    ca: pki.CertificateAuthority,
    cert: Path,
    key: Path,
    sans: Sequence[str],
    key_type: str,
    *,
    shared: bool = False,
) -> bool:
    """Issue a ``master``-role identity into ``cert`` and ``key`` unless both exist.

    A pair a crash left half-written is replaced.  ``shared``: the key is made
    group-readable (:data:`LISTENER_KEY_MODE`) and the certificate world-readable
    once each is complete.  Whether a new identity was written.
    """
    if cert.exists() and key.exists():
        return False
    for leftover in (cert, key):
        leftover.unlink(missing_ok=True)
    leaf = pki.issue_leaf(ca, config.ROLE_MASTER, addresses=sans, key_type=key_type)
    write_new_file(key, pki.key_pem(leaf.key), 0o600)
    if shared:
        os.chmod(key, LISTENER_KEY_MODE)
    write_new_file(cert, pki.cert_pem(leaf.cert))
    if shared:
        os.chmod(cert, 0o644)
    return True


def _problems(checks: Iterable[Callable[[], object]]) -> list[str]:
    """Every problem the validating ``checks`` raise (:class:`ValidationError`), in order."""
    problems: list[str] = []
    for check in checks:
        try:
            check()
        except ValidationError as exc:
            problems.extend(exc.problems)
    return problems


def _read_settings(paths: config.MasterPaths) -> dict:
    try:
        return json.loads(paths.master_config.read_text())
    except FileNotFoundError:
        return {}


def load_master(paths: config.MasterPaths) -> MasterState:
    """Load what ``init`` created; :class:`MissingFileError` names what is absent."""
    ca = pki.load_ca(paths.ca_dir)
    master_cert = pki.load_cert(paths.master_cert, "master certificate (run `decnet-admin init`)")
    listener_cert = pki.load_cert(
        paths.listener_cert,
        "listener certificate (run `decnet-admin init`; it also upgrades an older home)",
    )
    settings = _read_settings(paths)
    settings.setdefault("master_host", DEFAULT_MASTER_HOST)
    return MasterState(
        paths=paths,
        ca=ca,
        master_cert_fingerprint=pki.fingerprint(master_cert),
        listener_cert_fingerprint=pki.fingerprint(listener_cert),
        settings=settings,
    )


@attrs.frozen
class Enrollment:
    host: Host
    bundle_dir: Path


def enroll(
    master: MasterState,
    name: str,
    address: str,
    out_dir: str | Path,
    *,
    sans: Sequence[str] = (),
    updater: bool = False,
    agent_port: int = config.AGENT_PORT,
    updater_port: int = config.UPDATER_PORT,
    syslog_port: int | None = None,
    master_host: str | None = None,
    key_type: str = pki.DEFAULT_KEY_TYPE,
    validity_days: int = config.LEAF_VALIDITY_DAYS,
    registry: Registry | None = None,
    listeners: Sequence[str] | None = None,
) -> Enrollment:
    """Issue a worker (and optionally updater) identity and write its bundle to ``out_dir``.

    The master keeps the fingerprints, never the private keys.  ``listeners``
    (``HOST:PORT``, in order) go into the bundle; without them the master's list
    (``decnet-admin listeners``) does, and without that the bundle names the
    master's own listener only, as bundles always have.
    """
    out_dir = Path(out_dir).absolute()
    chosen = list(listeners) if listeners else read_listeners(master.paths)
    check_enrollment(
        name, address, sans, agent_port, updater_port, validity_days, out_dir, listeners=chosen
    )
    registry = registry or Registry(master.paths.registry)

    def issue(role: str) -> pki.Leaf:
        return pki.issue_leaf(
            master.ca,
            role,
            name,
            addresses=[address, *sans],
            key_type=key_type,
            validity_days=validity_days,
        )

    worker = issue(config.ROLE_WORKER)
    files = {
        config.BUNDLE_CA: pki.cert_pem(master.ca.cert),
        config.BUNDLE_WORKER_CERT: pki.cert_pem(worker.cert),
        config.BUNDLE_WORKER_KEY: pki.key_pem(worker.key),
    }
    updater_fp = None
    if updater:
        upd = issue(config.ROLE_UPDATER)
        files[config.BUNDLE_UPDATER_CERT] = pki.cert_pem(upd.cert)
        files[config.BUNDLE_UPDATER_KEY] = pki.key_pem(upd.key)
        updater_fp = upd.fingerprint
    settings = bundle_settings(
        master, name, address, agent_port, updater_port, syslog_port, master_host, chosen
    )
    files[config.BUNDLE_CONFIG] = bundle_json(settings)

    host = Host(
        name=name,
        address=address,
        agent_port=agent_port,
        updater_port=updater_port,
        worker_fingerprint=worker.fingerprint,
        updater_fingerprint=updater_fp,
        enrolled_at=utc_now_iso(),
        expires_at=utc_iso(worker.cert.not_valid_after_utc.timestamp()),
    )
    # Under the registry lock, so that undoing a failed bundle write can never
    # delete a row another process has changed (decommissioned) meanwhile.
    with registry.lock():
        registry.add(host)  # refuses duplicates before anything is on disk
        try:
            pki.write_bundle(
                out_dir, files, private={config.BUNDLE_WORKER_KEY, config.BUNDLE_UPDATER_KEY}
            )
        except BaseException:
            registry.remove(name)
            raise
    return Enrollment(host=host, bundle_dir=out_dir)


def check_enrollment(
    name: str,
    address: str,
    sans: Sequence[str],
    agent_port: int,
    updater_port: int,
    validity_days: int,
    out_dir: Path | None,
    *,
    listeners: Sequence[str] = (),
) -> None:
    """:class:`ValidationError` with every problem of an enrollment's input (``out_dir``
    ``None``: a token, whose bundle is written on the worker)."""
    problems = _problems(
        [
            partial(pki.validate_host_name, name),
            partial(pki.parse_address, address),
            *[partial(pki.parse_address, s) for s in sans],
            *([partial(pki.validate_listeners, listeners)] if listeners else []),
        ]
    )
    problems += _setting_problems(agent_port, updater_port, validity_days, out_dir)
    if problems:
        raise ValidationError(problems)


def bundle_settings(
    master: MasterState,
    name: str,
    address: str,
    agent_port: int,
    updater_port: int,
    syslog_port: int | None,
    master_host: str | None,
    listeners: Sequence[str] | None = None,
) -> dict[str, object]:
    """``bundle.json`` of a worker: what its daemons read (the same for both enrollment paths).

    ``listeners`` (``HOST:PORT``, in order) default to the master's list
    (``decnet-admin listeners``); without one the bundle names the master's own
    listener only, as bundles always have.
    """
    chosen = list(listeners) if listeners else read_listeners(master.paths)
    settings: dict[str, object] = {
        "name": name,
        "address": address,
        "agent_port": agent_port,
        "updater_port": updater_port,
        "master_host": master_host or master.master_host,
        "syslog_port": syslog_port or config.syslog_port(),
        "master_fingerprint": master.master_cert_fingerprint,
        "listener_fingerprint": master.listener_cert_fingerprint,
        "ca_fingerprint": master.ca.fingerprint,
    }
    if chosen:
        settings["listeners"] = pki.validate_listeners(chosen)
    return settings


def bundle_json(settings: Mapping[str, object]) -> bytes:
    return (json.dumps(dict(settings), indent=2) + "\n").encode()


def _setting_problems(
    agent_port: int, updater_port: int, validity_days: int, out_dir: Path | None
) -> list[str]:
    """What is wrong with an enrollment's ports, validity and bundle directory."""
    problems = [
        f"{label} {port} is not in 1-65535"
        for label, port in (("agent port", agent_port), ("updater port", updater_port))
        if not 1 <= port <= 65535
    ]
    if not 1 <= validity_days <= config.CA_VALIDITY_DAYS:
        problems.append(f"validity of {validity_days} days is not in 1-{config.CA_VALIDITY_DAYS}")
    if out_dir is None:  # a token: the bundle is written on the worker
        return problems
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        problems.append(f"{out_dir} already exists and is not empty; choose a new --out directory")
    return problems


@attrs.frozen
class Decommission:
    """What ``decommission`` did: ``already`` when the host was decommissioned before,
    ``restored`` the revocation entries that were missing and have been written again,
    ``cancelled_tokens`` the unused enrollment tokens issued for the name.

    ``host`` is ``None`` when the name had only pending tokens (it never joined).
    """

    host: Host | None
    already: bool
    entries: tuple[dict, ...]
    restored: tuple[dict, ...]
    cancelled_tokens: int = 0


def revocation_entries(host: Host, when: str) -> list[dict]:
    """The revocation entries of ``host``'s worker and (if any) updater certificates.

    A renewal under way has issued a second pair (``pending_*``): revoked too,
    so a decommission racing a renewal leaves no certificate of the host usable.
    """
    pins = [
        (host.worker_fingerprint, host.name, "worker"),
        (host.updater_fingerprint, config.UPDATER_CN_PREFIX + host.name, "updater"),
        (host.pending_worker_fingerprint, host.name, "worker"),
        (host.pending_updater_fingerprint, config.UPDATER_CN_PREFIX + host.name, "updater"),
    ]
    return [
        {"fingerprint": fp, "cn": cn, "role": role, "revoked_at": when}
        for fp, cn, role in pins
        if fp
    ]


def decommission(master: MasterState, name: str, registry: Registry | None = None) -> Decommission:
    """Mark ``name`` decommissioned and revoke its worker and updater certificates.

    Unused enrollment tokens for ``name`` are cancelled first, so a join cannot
    complete after this returns.  The whole read-decide-write runs under the
    registry's lock, which a join holds too: a join and a decommission of the
    same name happen one after the other, never interleaved (docs/SWARM-Mode.md).

    Idempotent: for a host that is already decommissioned it re-asserts the
    revocation entries, which repairs one that an interrupted or racing run
    lost (``restored`` says which).  ``revoked.json`` has its own lock inside.
    """
    registry = registry or Registry(master.paths.registry)
    with registry.lock():
        cancelled = Tokens(registry).cancel(name)
        try:
            host = registry.get(name)
        except UnknownHost:
            if cancelled:
                return Decommission(None, False, (), (), cancelled)
            raise
        already = host.decommissioned
        entries = revocation_entries(host, host.revoked_at or utc_now_iso())
        # Revoke first: if we crash before the registry update, the certificates
        # are already refused everywhere and a second decommission completes it.
        added = revocation.add_entries(master.paths.revocations, entries)
        if not already:
            host = registry.decommission(name, entries[0]["revoked_at"])
    return Decommission(
        host=host,
        already=already,
        entries=tuple(entries),
        restored=tuple(added) if already else (),
        cancelled_tokens=cancelled,
    )
