"""Certificate renewal on the worker: new keys made here, certificates installed atomically.

The master drives a renewal over the updater's API (``docs/Operations.md``,
"Renewing certificates"); this module is what the updater does with it.  The
new keys never leave the worker:

1. ``POST /renew/csr``: a key per role is made (0600, ``O_EXCL``, fsynced) in
   ``<bundle>/.renew``, or taken from there when an earlier attempt left it, and
   CSRs for them go back.  The CSRs ask for nothing: the
   master decides subject, SANs, EKUs and role (:func:`decnet.pki.certify`).
2. ``POST /renew/install``: each certificate is checked (issued by the bundle's
   CA, for this host's name and role, for the pending key), staged next to its
   key, and then key and certificate are renamed over the bundle's pair.  The
   agent, forwarder and updater pick the new pair up without a restart
   (:class:`decnet.tls.IdentityWatcher`).

The updater writes only inside the bundle directory, which it owns (setgid,
group ``decnet-worker``: a new ``worker.key`` gets the group the agent and the
forwarder read it by without the updater being in that group); the systemd unit
makes that one directory writable (docs/Operations.md, "Renewing certificates").
A bundle laid out otherwise is refused at the first step, before anything changes
(:func:`key_group_problem`).

Crash safety comes from the pure planner :func:`plan` over what is on disk
(:class:`Observed`): every step is idempotent, and the updater runs the plan at
start-up, so an install cut short (``kill -9``, power cut) is finished before
anything reads the bundle again.  A certificate pushed again for a pair
already installed is answered the same way (the master retrying).
"""

from __future__ import annotations

import enum
import os
import shutil
import stat
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from twisted.logger import Logger

from decnet import config, pki
from decnet.errors import (
    BundleNotWritable,
    DecnetError,
    MissingFileError,
    PKIError,
    RenewalRefused,
)
from decnet.fsutil import (
    PRIVATE_FILE_MODE,
    atomic_write,
    ensure_private_dir,
    fsync_dir,
    write_new_file,
)
from decnet.threads import Runner

log = Logger(namespace="decnet.updater.renewal")


class Phase(enum.Enum):
    """Where a worker's renewal stands, as the files show it."""

    IDLE = "idle"  # nothing pending
    KEYS = "keys"  # new keys made, waiting for the master's certificates
    STAGED = "staged"  # every certificate staged next to its key: install, then clean up


@attrs.frozen
class Observed:
    """What is on disk: per role, a pending key, a staged certificate, installed or not."""

    roles: tuple[str, ...]
    keys: frozenset[str] = frozenset()  # a pending key that loads
    staged: frozenset[str] = frozenset()  # a staged certificate for that pending key
    installed: frozenset[str] = frozenset()  # the bundle's pair already is the staged one
    leftovers: bool = False  # the pending directory exists


@attrs.frozen
class Plan:
    phase: Phase
    make_keys: tuple[str, ...] = ()  # roles that need a (new) pending key, for a CSR request
    install: tuple[str, ...] = ()  # roles whose staged pair goes into the bundle
    clean_up: bool = False  # remove the pending directory afterwards


def plan(observed: Observed) -> Plan:
    """The steps from ``observed`` to a settled state (pure).

    Staged everywhere: install what is not in the bundle yet and clean up.
    Otherwise the renewal waits for certificates; :func:`request_csrs` makes
    the keys that are missing.
    """
    roles = observed.roles
    if observed.staged and set(observed.staged) == set(roles):
        todo = tuple(r for r in roles if r not in observed.installed)
        return Plan(Phase.STAGED, install=todo, clean_up=True)
    if not observed.keys:
        return Plan(Phase.IDLE, make_keys=roles, clean_up=observed.leftovers)
    missing = tuple(r for r in roles if r not in observed.keys)
    return Plan(Phase.KEYS, make_keys=missing)


PENDING_DIR = ".renew"


def pending_dir(bundle: pki.WorkerBundle) -> Path:
    """``<bundle>/.renew``: the new keys until their certificates arrive (inside the one
    directory the updater may write, on the same file system for the renames)."""
    return bundle.directory / PENDING_DIR


def key_group_problem(bundle: pki.WorkerBundle, roles: Iterable[str]) -> str | None:
    """Why a new key of one of ``roles`` could not get its current key's group, or ``None``.

    A file made in the bundle directory gets the directory's group if it is
    setgid, else ours; we may also give it any group we are in.  ``worker.key``
    must stay readable by ``decnet-worker``, which the updater is not in.
    """
    if os.geteuid() == 0:
        return None
    directory = bundle.directory.stat()
    made_with = directory.st_gid if directory.st_mode & stat.S_ISGID else os.getegid()
    mine = {os.getegid(), *os.getgroups()}
    for role in roles:
        try:
            gid = bundle.key_path(role).stat().st_gid
        except FileNotFoundError:
            continue
        if gid != made_with and gid not in mine:
            return (
                f"a new {role}.key could not keep the group ({gid}) the current one is read "
                f"by: make {bundle.directory} this updater's, setgid with that group "
                "(docs/Operations.md, 'Renewing certificates')"
            )
    return None


def roles_of(bundle: pki.WorkerBundle) -> tuple[str, ...]:
    return (
        (config.ROLE_WORKER, config.ROLE_UPDATER) if bundle.has_updater else (config.ROLE_WORKER,)
    )


def _expected_cn(bundle: pki.WorkerBundle, role: str) -> str:
    return pki.cn_for(role, bundle.name)


def _load_key(path: Path) -> Any:
    try:
        return pki.load_key(path)
    except (MissingFileError, PKIError):
        return None


def _same_cert(path: Path, cert: x509.Certificate) -> bool:
    try:
        return pki.fingerprint(pki.load_cert(path)) == pki.fingerprint(cert)
    except DecnetError:
        return False


def observe(bundle: pki.WorkerBundle) -> Observed:
    """Read what the pending directory and the bundle hold (blocking)."""
    pending = pending_dir(bundle)
    roles = roles_of(bundle)
    keys, staged, installed = set(), set(), set()
    for role in roles:
        key = _load_key(pending / f"{role}.key")
        if key is None:
            continue
        keys.add(role)
        try:
            cert = pki.load_cert(pending / f"{role}.crt")
        except DecnetError:
            continue
        if pki.spki(cert.public_key()) != pki.spki(key.public_key()):
            continue
        staged.add(role)
        if _same_cert(bundle.cert_path(role), cert) and _same_key(bundle.key_path(role), key):
            installed.add(role)
    return Observed(
        roles=roles,
        keys=frozenset(keys),
        staged=frozenset(staged),
        installed=frozenset(installed),
        leftovers=pending.exists(),
    )


def _same_key(path: Path, key: Any) -> bool:
    current = _load_key(path)
    return current is not None and pki.spki(current.public_key()) == pki.spki(key.public_key())


def settle(bundle: pki.WorkerBundle) -> Phase:
    """Finish an install a crash cut short (updater start-up); the phase left (blocking)."""
    steps = plan(observe(bundle))
    if steps.phase is Phase.STAGED:
        _install(bundle, steps)
        return Phase.IDLE
    if steps.phase is Phase.IDLE and steps.clean_up:
        shutil.rmtree(pending_dir(bundle), ignore_errors=True)
    return steps.phase


def _install(bundle: pki.WorkerBundle, steps: Plan) -> None:
    pending = pending_dir(bundle)
    for role in steps.install:
        # Key first, then certificate: a crash between the two leaves a pair that
        # does not match, which no daemon swaps to (BundleIdentity) and which the
        # next settle() completes from the staged copies.
        key_path, cert_path = bundle.key_path(role), bundle.cert_path(role)
        _replace_key(key_path, (pending / f"{role}.key").read_bytes())
        atomic_write(cert_path, (pending / f"{role}.crt").read_bytes(), _mode(cert_path, 0o644))
    if steps.clean_up:
        shutil.rmtree(pending)
        fsync_dir(pending.parent)


def _mode(path: Path, default: int) -> int:
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        return default


def _replace_key(path: Path, data: bytes) -> None:
    """Replace a key keeping its mode and its group (``decnet-worker`` reads ``worker.key``)."""
    try:
        before = path.stat()
    except FileNotFoundError:
        atomic_write(path, data, PRIVATE_FILE_MODE)
        return
    # The group first, then the mode, then the rename: never readable by the wrong group.
    atomic_write(path, data, before.st_mode & 0o777, gid=before.st_gid)


def request_csrs(bundle: pki.WorkerBundle, key_type: str = pki.DEFAULT_KEY_TYPE) -> dict[str, str]:
    """CSRs for this worker's pending keys, made now or kept from an earlier request (blocking).

    Asked again before the certificates arrived (the master was interrupted),
    the same keys answer, so a renewal never leaves two generations of keys.
    """
    if settle(bundle) is Phase.STAGED:  # pragma: no cover - settle() always installs
        raise RenewalRefused("a renewal is being installed; ask again")
    problem = key_group_problem(bundle, roles_of(bundle))
    if problem is not None:
        raise BundleNotWritable(problem)
    pending = pending_dir(bundle)
    ensure_private_dir(pending)
    steps = plan(observe(bundle))
    for role in steps.make_keys:
        path = pending / f"{role}.key"
        path.unlink(missing_ok=True)  # a key a crash cut short was never sent
        path.with_suffix(".crt").unlink(missing_ok=True)
        write_new_file(path, pki.key_pem(pki.generate_key(key_type)), PRIVATE_FILE_MODE)
    fsync_dir(pending)
    return {
        role: pki.make_csr(pki.load_key(pending / f"{role}.key")).decode()
        for role in roles_of(bundle)
    }


def check_certificate(
    bundle: pki.WorkerBundle, ca: x509.Certificate, role: str, pem: object
) -> x509.Certificate:
    """The pushed certificate for ``role``, if it is one this worker may install."""
    if not isinstance(pem, str) or len(pem) > pki.MAX_CSR_SIZE:
        raise RenewalRefused(f"the {role} certificate must be a PEM string")
    try:
        cert = x509.load_pem_x509_certificate(pem.encode("ascii"))
        cert.verify_directly_issued_by(ca)
    except (ValueError, UnicodeEncodeError, InvalidSignature, TypeError):
        raise RenewalRefused(
            f"the {role} certificate is not one issued by this worker's CA"
        ) from None
    identity = pki.identity_of(cert)
    if identity.role != role or identity.cn != _expected_cn(bundle, role):
        raise RenewalRefused(
            f"the {role} certificate is for {identity.cn!r} ({identity.role}), "
            f"not {_expected_cn(bundle, role)!r}"
        )
    return cert


def install(bundle: pki.WorkerBundle, certificates: Mapping[str, object]) -> dict[str, str]:
    """Install the pushed certificates with their pending keys; each role's fingerprint.

    A push of the pair already installed (a retry) answers the same; a
    certificate for a key this worker does not hold is refused, and nothing changes.
    """
    ca = pki.load_cert(bundle.ca_path, "CA certificate")
    roles = roles_of(bundle)
    if set(certificates) != set(roles):
        raise RenewalRefused(f"expected certificates for {', '.join(roles)}")
    certs = {role: check_certificate(bundle, ca, role, certificates[role]) for role in roles}
    pending = pending_dir(bundle)
    staged: list[str] = []
    for role, cert in certs.items():
        if _same_cert(bundle.cert_path(role), cert):
            continue  # already installed: this is a retry
        key = _load_key(pending / f"{role}.key")
        if key is None or pki.spki(key.public_key()) != pki.spki(cert.public_key()):
            raise RenewalRefused(
                f"no pending {role} key for this certificate (it was made for another "
                "request); run `decnet-admin renew` again"
            )
        staged.append(role)
    for role in staged:
        atomic_write(pending / f"{role}.crt", pki.cert_pem(certs[role]))
    if staged:
        settle(bundle)
    return {role: pki.fingerprint(cert) for role, cert in certs.items()}


class Renewer:
    """The updater's renewal routes' domain object: one renewal step at a time, off the reactor.

    ``after_install`` are called once new certificates are in the bundle (the
    updater's own :class:`~decnet.tls.IdentityWatcher` checks at once, so its
    next connection already presents the new certificate).
    """

    def __init__(
        self,
        bundle: pki.WorkerBundle,
        run: Runner,
        after_install: Iterable[Callable[[], object]] = (),
    ):
        self.bundle = bundle
        self.run = run
        self.after_install = tuple(after_install)

    async def _blocking(self, f: Callable[..., Any], *args: Any) -> Any:
        try:
            return await self.run(f, *args)
        except BundleNotWritable as exc:
            log.error("Renewal refused: {reason}", reason=str(exc))
            raise
        except OSError as exc:
            log.error(
                "Renewal: cannot write next to the bundle {bundle}: {error}",
                bundle=str(self.bundle.directory),
                error=exc.strerror or str(exc),
            )
            raise BundleNotWritable(
                f"this updater cannot write its bundle ({exc.strerror or exc}); "
                "see docs/Operations.md, 'Renewing certificates'"
            ) from None

    async def csrs(self) -> dict[str, object]:
        """CSRs for the pending keys, and the worker certificate in use (whose SANs the
        master keeps: it checks it against its pin before reading it)."""
        csrs = await self._blocking(request_csrs, self.bundle)
        current = await self._blocking(self.bundle.cert_path(config.ROLE_WORKER).read_text)
        log.info("Renewal: new keys are ready for {roles}", roles=", ".join(sorted(csrs)))
        return {"csrs": csrs, "current": current}

    async def install(self, certificates: object) -> dict[str, object]:
        if not isinstance(certificates, dict):
            raise RenewalRefused('expected {"certificates": {"worker": PEM, ...}}')
        installed = await self._blocking(install, self.bundle, certificates)
        for notify in self.after_install:
            notify()
        log.info(
            "Renewal: installed the new certificates {fingerprints}",
            fingerprints=", ".join(f"{r} {fp[:16]}" for r, fp in sorted(installed.items())),
        )
        return {"installed": installed}
