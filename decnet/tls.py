"""pyOpenSSL contexts for every daemon and client: our CA only, role and pin checks.

The trust rules (``docs/Security.md``):

* the only trust root is the DECNET CA, TLS 1.2 or newer, a certificate is
  required from both sides;
* a verify callback additionally checks, *inside the handshake of the same
  connection*, that the peer's role (the ``OU`` marker, consistent with its
  CN) is one the caller accepts, that its leaf fingerprint equals the pinned
  value when one is given, and that it is not revoked;
* server certificates are pinned by CA + chain + fingerprint, never by DNS name,
  because workers are reached at whatever address the operator typed.
* TLS 1.2 offers only ECDHE key exchange with an AEAD cipher (AES-GCM,
  ChaCha20-Poly1305): no CBC, no SHA-1 MAC, no static RSA.  TLS 1.3 suites
  are all AEAD already (OpenSSL's defaults).

Every refusal is logged once, as a warning without traceback, with the peer
address and the reason.
"""

from __future__ import annotations

import enum
import hmac
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from twisted.application.service import Service
from twisted.internet import ssl
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from decnet import config, pki
from decnet.errors import DecnetError, MissingFileError
from decnet.interfaces import IDecnetReactor
from decnet.pki import CertIdentity, identity_of
from decnet.revocation import RevocationSet
from decnet.threads import run_in_pool

log = Logger(namespace="decnet.tls")

# X509_V_ERR_* codes we name in refusals; anything else is reported by number.
_X509_ERRORS = {
    2: "unable to get issuer certificate",
    7: "certificate signature failure",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate (not issued by our CA)",
    19: "self-signed certificate in chain (not our CA)",
    20: "certificate not issued by our CA",
    21: "unable to verify the first certificate",
    24: "invalid CA certificate",
    26: "unsupported certificate purpose",
}


# TLS 1.2 suites every daemon and client accepts ("ECDHE+AESGCM" and
# "ECDHE+CHACHA20" expand to both ECDSA and RSA authentication).  Only the TLS
# 1.2 list is set here: OpenSSL configures TLS 1.3 suites separately, and all of
# them are AEAD.
AEAD_CIPHERS = ssl.AcceptableCiphers.fromOpenSSLCipherString(
    "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"
)


def describe_x509_error(errno: int) -> str:
    return _X509_ERRORS.get(errno, f"certificate verification error {errno}")


@attrs.frozen
class Accept:
    """One kind of peer a context accepts: a role, optionally an exact CN and a pinned leaf."""

    role: str
    cn: str | None = None
    fingerprint: str | None = None

    def describe(self) -> str:
        return self.cn or self.role


class RefusalKind(enum.Enum):
    """Which rule of the trust model refused a TLS peer."""

    UNTRUSTED = "untrusted"  # the chain check failed: another CA, expired, not yet valid, ...
    NO_ROLE = "no role"  # no valid DECNET role marker
    REVOKED = "revoked"
    ROLE = "role"  # a role this endpoint does not accept
    PEER = "peer"  # the right role, but not the expected CN
    FINGERPRINT = "fingerprint"  # the expected CN, but not the pinned certificate
    DROPPED = "dropped"  # closed by us before its handshake ended (already logged)


@attrs.frozen
class Refusal:
    """Why one peer was refused: the rule (``kind``) and a sentence for logs and errors."""

    kind: RefusalKind
    detail: str

    def __str__(self) -> str:
        return self.detail


class PeerCertificateRefused(SSL.Error):
    """A handshake failed because our policy refused the peer's certificate.

    The connection whose verify callback refused raises it instead of
    OpenSSL's generic "certificate verify failed", so the refusal reaches that
    connection's protocol, and only that one, as the reason of its
    ``connectionLost``.  It is an ``SSL.Error`` because that is what Twisted's
    TLS layer expects a failed handshake to raise.
    """

    def __init__(self, refusal: Refusal):
        # The shape of OpenSSL's error queue: [(library, function, reason)].
        super().__init__([("DECNET", "certificate policy", refusal.detail)])
        self.refusal = refusal


@attrs.define
class Handshake:
    """How one connection's TLS handshake went: one record per connection, never shared."""

    done: bool = False
    refusal: Refusal | None = None  # why we refused the peer (already logged)
    error: str | None = None  # OpenSSL's words, when the handshake failed

    def refuse(self, refusal: Refusal) -> None:
        """Record ``refusal`` (the first one stands)."""
        if self.refusal is None:
            self.refusal = refusal


class PeerPolicy:
    """Who may complete a handshake with us, beyond "signed by our CA"."""

    def __init__(self, accept: Iterable[Accept], revocations: RevocationSet | None = None):
        self.accept = tuple(accept)
        if not self.accept:
            raise ValueError("a PeerPolicy must accept at least one kind of peer")
        self.revocations = revocations

    def check(self, identity: CertIdentity) -> Refusal | None:
        """``None`` if ``identity`` is acceptable, else why it is not."""
        if identity.role is None:
            detail = f"certificate {identity.cn!r} has no valid DECNET role marker"
            return Refusal(RefusalKind.NO_ROLE, detail)
        if self.revocations is not None and identity.fingerprint in self.revocations:
            return Refusal(RefusalKind.REVOKED, f"certificate of {identity.cn!r} is revoked")
        by_role = [a for a in self.accept if a.role == identity.role]
        if not by_role:
            wanted = ", ".join(sorted({a.role for a in self.accept}))
            detail = (
                f"role {identity.role!r} ({identity.cn!r}) not accepted here (accepts: {wanted})"
            )
            return Refusal(RefusalKind.ROLE, detail)
        by_cn = [a for a in by_role if a.cn is None or a.cn == identity.cn]
        if not by_cn:
            wanted = ", ".join(str(a.cn) for a in by_role)
            return Refusal(RefusalKind.PEER, f"{identity.cn!r} is not the expected peer ({wanted})")
        return _pin_refusal(identity, by_cn)


def _pin_refusal(identity: CertIdentity, rules: list[Accept]) -> Refusal | None:
    """``None`` if a rule is unpinned or pins ``identity``'s own fingerprint."""
    for rule in rules:
        if rule.fingerprint is None or hmac.compare_digest(rule.fingerprint, identity.fingerprint):
            return None
    pinned = str(rules[0].fingerprint)
    return Refusal(
        RefusalKind.FINGERPRINT,
        f"fingerprint mismatch for {identity.cn!r}: pinned {pinned[:16]}…, "
        f"presented {identity.fingerprint[:16]}…",
    )


@attrs.frozen
class TLSIdentity:
    """Our own certificate and key, and the CA we trust (a pyOpenSSL ``X509`` for the store)."""

    ca: crypto.X509
    cert: x509.Certificate
    key: object
    identity: CertIdentity

    @classmethod
    def load(
        cls, cert_path: os.PathLike | str, key_path: os.PathLike | str, ca_path: os.PathLike | str
    ) -> TLSIdentity:
        """Load and check a cert/key/CA triple; missing files are named in the error."""
        ca = pki.load_cert(ca_path, "CA certificate")
        cert = pki.load_cert(cert_path, "certificate")
        key = pki.load_key(key_path)
        pub = lambda k: k.public_bytes(  # noqa: E731
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if pub(cert.public_key()) != pub(key.public_key()):
            raise pki.PKIError(f"{key_path} does not belong to {cert_path}")
        return cls(
            ca=crypto.X509.from_cryptography(ca), cert=cert, key=key, identity=identity_of(cert)
        )

    @classmethod
    def from_bundle(cls, bundle: pki.WorkerBundle, role: str) -> TLSIdentity:
        """The worker's (``role="worker"``) or updater's identity from an enrolled bundle."""
        return cls.load(bundle.cert_path(role), bundle.key_path(role), bundle.ca_path)

    @classmethod
    def master(cls, paths: config.MasterPaths) -> TLSIdentity:
        """The master identity under ``--home``; names the missing file if any."""
        for path, what in (
            (paths.master_cert, "master certificate (run `decnet-admin init`)"),
            (paths.master_key, "master private key (run `decnet-admin init`)"),
            (paths.ca_cert, "CA certificate (run `decnet-admin init`)"),
        ):
            if not path.exists():
                raise MissingFileError(path, what)
        return cls.load(paths.master_cert, paths.master_key, paths.ca_cert)


class PolicyConnection(SSL.Connection):
    """One TLS connection made by :class:`PolicyOptions`, with its own :class:`Handshake`.

    When the handshake fails it records OpenSSL's reason; when it failed
    because our verify callback refused the peer, it raises
    :class:`PeerCertificateRefused` (typed, with the refusal) instead of
    OpenSSL's generic error.  The alert OpenSSL sends the peer is unchanged.
    """

    def __init__(self, context: SSL.Context):
        super().__init__(context, None)
        self.handshake = Handshake()

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except SSL.WantReadError:
            raise
        except SSL.Error as exc:
            self.handshake.error = tls_error_text(exc)
            if self.handshake.refusal is None:
                raise
            raise PeerCertificateRefused(self.handshake.refusal) from exc
        self.handshake.done = True


def handshake_of(transport: object) -> Handshake | None:
    """The :class:`Handshake` of a TLS transport whose connection :class:`PolicyOptions` made.

    ``None`` for anything else (a plain TCP transport, another context factory).
    """
    get = getattr(transport, "getHandle", None)
    connection = get() if get is not None else None
    return connection.handshake if isinstance(connection, PolicyConnection) else None


class PolicyOptions(ssl.CertificateOptions):
    """``CertificateOptions`` pinned to our CA, plus the :class:`PeerPolicy` verify callback.

    A server and client connection creator (for ``TLSMemoryBIOFactory``,
    ``wrapClientTLS`` and treq / ``Agent``): every connection it makes is a
    :class:`PolicyConnection`, so each handshake keeps its own record.  Session
    resumption stays off (the ``CertificateOptions`` default), so every
    connection runs the full verify callback.
    """

    def __init__(
        self,
        identity: TLSIdentity,
        policy: PeerPolicy,
        *,
        acceptable_protocols: Sequence[bytes] | None = None,
    ):
        super().__init__(
            # pyOpenSSL takes cryptography's key and certificate as they are;
            # Twisted's annotations predate that.
            privateKey=cast(Any, identity.key),
            certificate=cast(Any, identity.cert),
            trustRoot=ssl.trustRootFromCertificates([ssl.Certificate(identity.ca)]),
            raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
            acceptableCiphers=AEAD_CIPHERS,
            acceptableProtocols=acceptable_protocols,
        )
        self.identity = identity
        self.policy = policy
        self.alpn = tuple(acceptable_protocols or ())
        self._verify_installed = False

    def reload(self, identity: TLSIdentity) -> None:
        """Present ``identity`` on every connection made from now on (certificate renewal).

        The cached ``SSL.Context`` is dropped, so the next connection builds a
        new one; a live connection keeps the context it was made with, so
        nothing in flight is cut.  The trust root stays (a renewal never
        changes the CA).
        """
        self.privateKey = cast(Any, identity.key)
        self.certificate = cast(Any, identity.cert)
        self.identity = identity
        self._context = None
        self._verify_installed = False

    def getContext(self) -> SSL.Context:
        ctx = super().getContext()
        if not self._verify_installed:
            ctx.set_verify(
                SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT | SSL.VERIFY_CLIENT_ONCE,
                self._verify,
            )
            self._verify_installed = True
        return ctx

    def serverConnectionForTLS(self, protocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        return self._connection()

    def clientConnectionForTLS(self, protocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        return self._connection()

    def _connection(self) -> PolicyConnection:
        connection = PolicyConnection(self.getContext())
        if self.alpn:
            connection.set_alpn_protos(list(self.alpn))
        return connection

    def _verify(
        self, conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, preverify_ok: int
    ) -> bool:
        try:
            refusal = self._refusal(cert, errno, depth, bool(preverify_ok))
        except Exception:
            # An exception escaping into OpenSSL would be re-raised later in an
            # unrelated place; refuse here instead, loudly.
            log.failure("Certificate policy check crashed; refusing the peer")
            return False
        if refusal is None:
            return True
        if isinstance(conn, PolicyConnection):
            conn.handshake.refuse(refusal)
        log.warn(
            "Refused TLS peer {peer}: {reason}",
            peer=_peer_of(conn.get_app_data()),
            reason=refusal.detail,
            refusal=refusal.kind.value,
        )
        return False

    def _refusal(
        self, cert: crypto.X509, errno: int, depth: int, preverify_ok: bool
    ) -> Refusal | None:
        if not preverify_ok:
            subject = identity_of(cert.to_cryptography()).cn
            detail = f"{describe_x509_error(errno)} (subject CN {subject!r}, depth {depth})"
            return Refusal(RefusalKind.UNTRUSTED, detail)
        if depth != 0:
            return None
        return self.policy.check(identity_of(cert.to_cryptography()))


def _peer_of(protocol) -> str:
    try:
        addr = protocol.transport.getPeer()
        return f"{addr.host}:{addr.port}"
    except Exception:
        return "unknown peer"


def peer_identity(transport) -> CertIdentity | None:
    """``(cn, role, fingerprint)`` of the peer on a live, handshaken TLS transport."""
    get = getattr(transport, "getPeerCertificate", None)
    cert = get() if get is not None else None
    if cert is None:
        return None
    return identity_of(cert.to_cryptography())


def days_left_of(transport: object, now: float) -> float | None:
    """Days until the peer certificate of a handshaken TLS transport expires (``None``: no peer)."""
    get = getattr(transport, "getPeerCertificate", None)
    cert = get() if get is not None else None
    if cert is None:
        return None
    return (cert.to_cryptography().not_valid_after_utc.timestamp() - now) / 86400


def tls_error_text(error: BaseException) -> str:
    """OpenSSL's own words for a TLS error ("certificate verify failed"), for logs and errors."""
    if isinstance(error, SSL.Error) and error.args and isinstance(error.args[0], list):
        parts = [item[-1] for item in error.args[0] if isinstance(item, tuple)]
        if parts:
            return "; ".join(str(part) for part in parts)
    return str(error) or type(error).__name__


class _HandshakeLoggingTLSProtocol(TLSMemoryBIOProtocol):
    """Logs handshakes that fail before our verify callback could say why.

    (No client certificate, plaintext on the TLS port, a protocol version
    below 1.2, garbage bytes.)  What happened comes from the connection's own
    :class:`Handshake` record.
    """

    _received_any = False

    def dataReceived(self, data: bytes) -> None:
        self._received_any = True
        super().dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # A connect-and-close without a byte (a port probe) is not worth a
        # warning per connection; anything that sent bytes and failed is.
        record = handshake_of(self)
        if self._received_any and record is not None and not record.done and not record.refusal:
            log.warn(
                "TLS handshake with {peer} failed: {reason}",
                peer=_peer_of(self),
                reason=record.error or reason.getErrorMessage(),
            )
        super().connectionLost(reason)


class TLSServerFactory(TLSMemoryBIOFactory):
    """``TLSMemoryBIOFactory`` whose protocol logs failed handshakes with the peer."""

    protocol = _HandshakeLoggingTLSProtocol

    def __init__(self, options: ssl.CertificateOptions, wrapped_factory, clock=None):
        super().__init__(options, False, wrapped_factory, clock=clock)


def listen_tls(
    reactor: IDecnetReactor,
    description: str,
    options: ssl.CertificateOptions,
    factory,
    *,
    gate=None,
):
    """Listen on an endpoint string (``tcp:…``, ``systemd:…``) with TLS; a Deferred port.

    ``gate``, when given, wraps the TLS factory: it sees each connection
    before any TLS state exists (the listener's pre-TLS budget).
    """
    endpoint = serverFromString(reactor, description)
    tls = TLSServerFactory(options, factory, clock=reactor)
    return endpoint.listen(gate(tls) if gate is not None else tls)


@implementer(IPolicyForHTTPS)
class PinnedHTTPSPolicy:
    """treq/``Agent`` policy: every HTTPS connection uses one :class:`PolicyOptions`.

    The policy is per target host (one pinned fingerprint), so a request can
    only complete over a connection whose handshake passed that pin.
    """

    def __init__(self, options: ssl.CertificateOptions):
        self.options = options

    def creatorForNetloc(self, hostname, port):
        return self.options


# ---------------------------------------------------------------------------
# Renewed identities: picked up from the bundle without a restart


def _stamp(path: os.PathLike | str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class BundleIdentity:
    """One role's certificate and key in a worker bundle, re-read when the files change.

    :meth:`read_if_changed` is blocking (two ``stat`` calls, and the files when
    they changed): :class:`IdentityWatcher` runs it in the thread pool.  A pair
    caught half-installed (the new key beside the old certificate) raises
    :class:`~decnet.pki.PKIError` and is read again next time; a certificate of
    another role or name is refused the same way, so a daemon only ever swaps
    to an identity of its own.
    """

    def __init__(
        self,
        bundle: pki.WorkerBundle,
        role: str,
        current: TLSIdentity,
        *,
        certificate_only: bool = False,
    ):
        self.bundle = bundle
        self.role = role
        self.current = current
        # Another daemon's certificate, followed to pin it (its key is not ours to read).
        self.certificate_only = certificate_only
        self._stamp = self._stamps()

    def _stamps(self) -> tuple[object, object]:
        key = None if self.certificate_only else _stamp(self.bundle.key_path(self.role))
        return (_stamp(self.bundle.cert_path(self.role)), key)

    def _load(self) -> TLSIdentity:
        if not self.certificate_only:
            return TLSIdentity.from_bundle(self.bundle, self.role)
        cert = pki.load_cert(self.bundle.cert_path(self.role))
        return attrs.evolve(self.current, cert=cert, identity=identity_of(cert))

    def read_if_changed(self) -> TLSIdentity | None:
        """The bundle's new identity, or ``None`` when it is the one already in use."""
        stamp = self._stamps()
        if stamp == self._stamp:
            return None
        identity = self._load()
        before, after = self.current.identity, identity.identity
        if (after.role, after.cn) != (before.role, before.cn):
            raise pki.PKIError(
                f"{self.bundle.cert_path(self.role)} is now a certificate of "
                f"{after.cn!r} ({after.role}), not of {before.cn!r}; keeping the current one"
            )
        self._stamp = stamp
        if after.fingerprint == before.fingerprint:
            return None
        self.current = identity
        return identity


class IdentityWatcher(Service):
    """Swap in a renewed bundle identity: new connections present it, live ones keep theirs.

    Every ``interval`` seconds the files are checked (off the reactor); a new
    identity is handed to each of ``apply`` (e.g. :meth:`PolicyOptions.reload`).
    """

    log = Logger(namespace="decnet.tls")

    def __init__(
        self,
        reactor: IReactorThreads,
        source: BundleIdentity,
        apply: Iterable[Callable[[TLSIdentity], None]],
        interval: float = config.IDENTITY_RELOAD_INTERVAL,
    ):
        self.reactor = reactor
        self.source = source
        self.apply = tuple(apply)
        self.interval = interval
        self._loop = LoopingCall(self.check)
        self._loop.clock = cast(IReactorTime, reactor)
        self._last_error: str | None = None

    def startService(self) -> None:
        super().startService()
        self._loop.start(self.interval, now=False)

    def stopService(self) -> Any:
        if self._loop.running:
            self._loop.stop()
        return super().stopService()

    def check(self) -> Any:
        d = run_in_pool(self.reactor, self.source.read_if_changed)
        d.addCallbacks(self._loaded, self._failed)
        return d

    def _loaded(self, identity: TLSIdentity | None) -> None:
        self._last_error = None
        if identity is None:
            return
        for apply in self.apply:
            apply(identity)
        doing = "pinning" if self.source.certificate_only else "presenting"
        self.log.info(
            "Now {doing} the renewed {role} certificate {fingerprint} "
            "(valid until {expires}) on new connections",
            doing=doing,
            role=self.source.role,
            fingerprint=identity.identity.fingerprint[:16],
            expires=identity.cert.not_valid_after_utc.isoformat(),
        )

    def _failed(self, failure: Failure) -> None:
        if not failure.check(DecnetError):
            self.log.failure("Reloading the {role} identity failed", failure, role=self.source.role)
            return
        message = failure.getErrorMessage()
        if message != self._last_error:  # once per distinct problem, not every interval
            self.log.warn(
                "Keeping the current {role} identity for now: {error}",
                role=self.source.role,
                error=message,
            )
        self._last_error = message
