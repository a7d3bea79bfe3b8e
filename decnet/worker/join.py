"""``decnet-worker join``: enroll this worker with a one-time token; its keys never leave it.

1. The bundle directory is checked first: an existing bundle is never overwritten.
2. The worker and updater keys are made here and written first (0600,
   ``O_EXCL``) to ``.<dir>.pending`` next to it, or taken from there when an
   interrupted attempt left them (:func:`prepare_keys`).
3. Their CSRs go to the master's ``twistd decnet-enroll`` over TLS.  The master
   is trusted by the CA fingerprint the operator copied from ``decnet-admin
   enroll --token``, inside the handshake (:class:`CAPinnedOptions`); the
   system's CAs are never consulted.
4. The answer is checked (every certificate is the CA's, for our key, with
   the role and name of ``bundle.json``), the certificates and ``bundle.json``
   join the keys, and the directory is renamed into place (:func:`install`): the
   layout ``decnet-admin enroll --out`` writes, so the daemons load it unchanged.
"""

from __future__ import annotations

import datetime
import hmac
import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from hyperlink import URL
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IReactorTime
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.web.client import Agent, HTTPConnectionPool

from decnet import config, pki
from decnet.errors import (
    EnrollmentRefused,
    MissingFileError,
    PKIError,
    RemoteError,
    ValidationError,
)
from decnet.fsutil import PRIVATE_FILE_MODE, ensure_private_dir, fsync_dir, write_new_file
from decnet.httpclient import PinnedClient
from decnet.interfaces import IDecnetReactor
from decnet.threads import run_in_pool
from decnet.tls import (
    AEAD_CIPHERS,
    PinnedHTTPSPolicy,
    PolicyConnection,
    Refusal,
    RefusalKind,
)

JOIN_TIMEOUT = 30.0
ROLES = (config.ROLE_WORKER, config.ROLE_UPDATER)


class _PinnedConnection(PolicyConnection):
    """A connection of :class:`CAPinnedOptions`: it keeps the CA certificate its verify
    callback matched at depth 1, for the check of the leaf at depth 0."""

    def __init__(self, context: SSL.Context):
        super().__init__(context)
        self.pinned_ca: x509.Certificate | None = None


class CAPinnedOptions(ssl.CertificateOptions):
    """A TLS client that trusts exactly one CA, known by its SHA-256 fingerprint.

    No trust store is loaded.  The verify callback accepts the server's chain
    only if the certificate above the leaf is the pinned CA (compared in
    constant time) and the leaf is a ``master`` certificate that CA signed and
    that is valid now; each refusal is recorded on the connection, so the
    client reports "not the CA you pinned" rather than a bare TLS failure.
    """

    def __init__(self, ca_fingerprint: str):
        super().__init__(raiseMinimumTo=ssl.TLSVersion.TLSv1_2, acceptableCiphers=AEAD_CIPHERS)
        self.ca_fingerprint = pki.normalize_fingerprint(ca_fingerprint)
        self._verify_installed = False

    def getContext(self) -> SSL.Context:
        ctx = super().getContext()
        if not self._verify_installed:
            ctx.set_verify(SSL.VERIFY_PEER, self._verify)
            self._verify_installed = True
        return ctx

    def clientConnectionForTLS(self, protocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        return _PinnedConnection(self.getContext())

    def _verify(
        self, conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int
    ) -> bool:
        if not isinstance(conn, _PinnedConnection):
            return False  # not a connection of ours: nothing to record the CA on
        refusal = self._refusal(conn, cert.to_cryptography(), depth)
        if refusal is not None:
            conn.handshake.refuse(refusal)
        return refusal is None

    def _refusal(
        self, conn: _PinnedConnection, cert: x509.Certificate, depth: int
    ) -> Refusal | None:
        if depth >= 1:
            found = pki.fingerprint(cert)
            if depth == 1 and hmac.compare_digest(found, self.ca_fingerprint):
                conn.pinned_ca = cert
                return None
            return Refusal(
                RefusalKind.FINGERPRINT,
                f"the master's CA has fingerprint {pki.colon_fingerprint(found)}, not the "
                f"{pki.colon_fingerprint(self.ca_fingerprint)} given with --ca-fingerprint "
                "(check it against `decnet-admin enroll --token` on the master)",
            )
        return _leaf_refusal(conn.pinned_ca, cert)


def _leaf_refusal(ca: x509.Certificate | None, leaf: x509.Certificate) -> Refusal | None:
    """Why the server's own certificate is not a valid master certificate of ``ca``."""
    if ca is None:
        return Refusal(
            RefusalKind.UNTRUSTED,
            "the server's certificate is not issued by the CA with the pinned fingerprint "
            "(is this the master's decnet-enroll port?)",
        )
    try:
        leaf.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return Refusal(
            RefusalKind.UNTRUSTED, "the server's certificate is not issued by the pinned CA"
        )
    now = datetime.datetime.now(datetime.UTC)
    if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
        return Refusal(RefusalKind.UNTRUSTED, "the server certificate is expired or not yet valid")
    if pki.identity_of(leaf).role != config.ROLE_MASTER:
        return Refusal(RefusalKind.ROLE, "the server certificate is not the master's")
    return None


class EnrollClient(PinnedClient):
    """:class:`PinnedClient`'s deadline, body cap, redirect refusal and error mapping,
    over a connection that trusts only the pinned CA and carries no client certificate."""

    def __init__(
        self,
        reactor: IDecnetReactor,
        url: URL,
        ca_fingerprint: str,
        *,
        timeout: float = JOIN_TIMEOUT,
        clock: IReactorTime | None = None,
    ):
        self.timeout = timeout
        self.clock = clock or reactor
        self._pool = HTTPConnectionPool(reactor, persistent=False)
        self.options = CAPinnedOptions(ca_fingerprint)
        self._agent = Agent(
            reactor,
            contextFactory=PinnedHTTPSPolicy(self.options),
            connectTimeout=timeout,
            pool=self._pool,
        )
        self.base = url
        self.where = f"the master's enrollment service at {url.host}:{url.port}"


def parse_master_url(text: str) -> URL:
    """``https://HOST[:PORT][/]`` (port 8443 by default), else :class:`ValidationError`."""
    wrong = ValidationError(
        f"expected https://MASTER[:PORT] (the master's decnet-enroll), got {text!r}"
    )
    try:
        parts = urlsplit(text)
        port = parts.port or config.ENROLL_PORT
    except (ValueError, TypeError):
        raise wrong from None
    if parts.scheme != "https" or not parts.hostname or parts.username or parts.password:
        raise wrong
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise wrong
    pki.parse_address(parts.hostname)
    return URL(scheme="https", host=parts.hostname, port=port)


def check_target(directory: Path) -> None:
    """Refuse a ``--dir`` that exists and is not empty: never overwrite a bundle."""
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ValidationError(
            f"{directory} already exists and is not empty (a bundle is never overwritten); "
            "remove it first, or choose another --dir"
        )


def pending_dir(directory: Path) -> Path:
    """Where the keys wait for their certificates: ``.<name>.pending`` next to the bundle."""
    return directory.with_name(f".{directory.name}.pending")


def prepare_keys(directory: Path, key_type: str) -> tuple[dict[str, Any], bool]:
    """This worker's keys, on disk before anything is sent; whether they were there already.

    They are made (0600, ``O_EXCL``, fsynced) in :func:`pending_dir`, or read from
    it when an earlier attempt left them: a join interrupted after the master
    answered (kill, power cut, a lost connection) is completed by running the
    same command again, because the master answers a used token again to the
    holder of the same keys.  Writing them first also proves the disk takes the
    bundle while the token is still unused.  A key a crash cut short was never
    sent (keys are sent only once both are complete): it is made again.
    """
    check_target(directory)
    pending = pending_dir(directory)
    keys: dict[str, Any] = {}
    resumed = pending.is_dir()
    try:
        ensure_private_dir(pending)
        for role in ROLES:
            path = pending / f"{role}.key"
            try:
                keys[role] = pki.load_key(path)
                continue
            except MissingFileError:
                resumed = False
            except PKIError:
                path.unlink()
                resumed = False
            keys[role] = pki.generate_key(key_type)
            write_new_file(path, pki.key_pem(keys[role]), PRIVATE_FILE_MODE)
        fsync_dir(pending)
    except OSError as exc:
        raise ValidationError(
            f"cannot write the keys next to {directory}: {exc.strerror or exc}; "
            "nothing was sent, the token is still valid"
        ) from None
    return keys, resumed


def install(directory: Path, files: dict[str, bytes]) -> None:
    """Add ``files`` (certificates, bundle.json) next to the keys and rename into place."""
    pending = pending_dir(directory)
    for role in ROLES:
        if f"{role}.crt" not in files:  # not certified (a token without --updater)
            (pending / f"{role}.key").unlink(missing_ok=True)
    for name, data in files.items():
        (pending / name).unlink(missing_ok=True)  # what an interrupted install left
        write_new_file(pending / name, data)
    fsync_dir(pending)
    check_target(directory)  # again: the operator may have made one meanwhile
    os.rename(pending, directory)  # replaces an empty directory atomically
    fsync_dir(directory.parent)
    pki.WorkerBundle.load(directory)


@attrs.frozen
class JoinResult:
    name: str
    directory: Path
    fingerprints: dict[str, str]
    resumed: bool = False  # completed an earlier, interrupted join with its keys

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "bundle": str(self.directory),
            "fingerprints": dict(self.fingerprints),
            "resumed": self.resumed,
        }


async def join(
    reactor: IDecnetReactor,
    url: URL,
    token: str,
    ca_fingerprint: str,
    directory: Path,
    *,
    key_type: str = pki.DEFAULT_KEY_TYPE,
    timeout: float = JOIN_TIMEOUT,
) -> JoinResult:
    """Join the master at ``url`` with ``token``; the bundle is in ``directory`` on return."""
    directory = directory.absolute()
    pinned = pki.normalize_fingerprint(ca_fingerprint)
    keys, resumed = await run_in_pool(reactor, prepare_keys, directory, key_type)
    csrs = {role: pki.make_csr(key).decode("ascii") for role, key in keys.items()}
    client = EnrollClient(reactor, url, pinned, timeout=timeout)
    try:
        reply = await client.call("POST", "enroll", json={"token": token, "csrs": csrs})
    except RemoteError as exc:
        raise _refusal_of(exc) from None
    finally:
        await client.close()
    files, fingerprints, name = check_reply(reply, keys, pinned)
    await run_in_pool(reactor, install, directory, files)
    return JoinResult(name=name, directory=directory, fingerprints=fingerprints, resumed=resumed)


def _refusal_of(exc: RemoteError) -> Exception:
    said = "; ".join(exc.problems)
    if exc.status == 403:
        return EnrollmentRefused(f"the master refused the token: {said}")
    if exc.status == 429:
        return EnrollmentRefused(f"the master is rate-limiting this address: {said}")
    return EnrollmentRefused(f"the master refused the request (HTTP {exc.status}): {said}")


def check_reply(
    reply: dict, keys: dict[str, Any], pinned: str
) -> tuple[dict[str, bytes], dict[str, str], str]:
    """The bundle files from the master's answer (all but the keys, already on disk),
    once every part of it checks out."""
    try:
        ca = x509.load_pem_x509_certificate(reply["ca"].encode("ascii"))
        bundle = reply["bundle"]
        certs = {
            role: x509.load_pem_x509_certificate(pem.encode("ascii"))
            for role, pem in reply["certificates"].items()
            if role in ROLES
        }
        name = pki.validate_host_name(bundle["name"])
        encoded = json.dumps(bundle, indent=2).encode() + b"\n"
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise PKIError(f"the master's answer is not a usable bundle: {exc}") from None
    if not hmac.compare_digest(pki.fingerprint(ca), pinned) or bundle.get(
        "ca_fingerprint"
    ) != pki.fingerprint(ca):
        raise PKIError("the master answered with another CA than the one pinned")
    if config.ROLE_WORKER not in certs:
        raise PKIError("the master's answer has no worker certificate")
    files = {config.BUNDLE_CA: pki.cert_pem(ca), config.BUNDLE_CONFIG: encoded}
    fingerprints: dict[str, str] = {}
    for role, cert in certs.items():
        _check_cert(cert, ca, keys[role], pki.cn_for(role, name), role)
        files[f"{role}.crt"] = pki.cert_pem(cert)
        fingerprints[role] = pki.fingerprint(cert)
    return files, fingerprints, name


def _check_cert(cert: x509.Certificate, ca: x509.Certificate, key: Any, cn: str, role: str) -> None:
    identity = pki.identity_of(cert)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise PKIError(f"the {role} certificate is not signed by the pinned CA") from None
    if pki.spki(cert.public_key()) != pki.spki(key.public_key()):
        raise PKIError(f"the {role} certificate is not for the key this worker made")
    if identity.role != role or identity.cn != cn:
        raise PKIError(f"the {role} certificate names {identity.cn!r}, not {cn!r}")
