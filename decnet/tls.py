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

import hmac
import os
from collections.abc import Iterable, Sequence

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from decnet import config, pki
from decnet.errors import MissingFileError
from decnet.pki import CertIdentity, identity_of
from decnet.revocation import RevocationSet

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


class PeerPolicy:
    """Who may complete a handshake with us, beyond "signed by our CA"."""

    def __init__(self, accept: Iterable[Accept], revocations: RevocationSet | None = None):
        self.accept = tuple(accept)
        if not self.accept:
            raise ValueError("a PeerPolicy must accept at least one kind of peer")
        self.revocations = revocations
        # The last refusal, for clients that turn a failed handshake into a
        # typed error (FingerprintMismatch, PeerRefused).
        self.last_refusal: str | None = None

    def check(self, identity: CertIdentity) -> str | None:
        """``None`` if ``identity`` is acceptable, else the reason it is not."""
        if identity.role is None:
            return f"certificate {identity.cn!r} has no valid DECNET role marker"
        if self.revocations is not None and identity.fingerprint in self.revocations:
            return f"certificate of {identity.cn!r} is revoked"
        by_role = [a for a in self.accept if a.role == identity.role]
        if not by_role:
            wanted = ", ".join(sorted({a.role for a in self.accept}))
            return f"role {identity.role!r} ({identity.cn!r}) not accepted here (accepts: {wanted})"
        by_cn = [a for a in by_role if a.cn is None or a.cn == identity.cn]
        if not by_cn:
            wanted = ", ".join(a.cn for a in by_role)
            return f"{identity.cn!r} is not the expected peer ({wanted})"
        for rule in by_cn:
            if rule.fingerprint is None or hmac.compare_digest(
                rule.fingerprint, identity.fingerprint
            ):
                return None
        pinned = by_cn[0].fingerprint
        return (
            f"fingerprint mismatch for {identity.cn!r}: pinned {pinned[:16]}…, "
            f"presented {identity.fingerprint[:16]}…"
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


@implementer(IOpenSSLClientConnectionCreator)
class PolicyOptions(ssl.CertificateOptions):
    """``CertificateOptions`` pinned to our CA, plus the :class:`PeerPolicy` verify callback.

    Usable as a server context factory, as a client context factory, and as a
    client connection creator (for treq / ``Agent``).  Session resumption stays
    off (the ``CertificateOptions`` default), so every connection runs the full
    verify callback.
    """

    def __init__(
        self,
        identity: TLSIdentity,
        policy: PeerPolicy,
        *,
        acceptable_protocols: Sequence[bytes] | None = None,
    ):
        super().__init__(
            privateKey=identity.key,
            certificate=identity.cert,
            trustRoot=ssl.trustRootFromCertificates([ssl.Certificate(identity.ca)]),
            raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
            acceptableCiphers=AEAD_CIPHERS,
            acceptableProtocols=acceptable_protocols,
        )
        self.identity = identity
        self.policy = policy
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

    def _verify(self, conn, cert, errno, depth, preverify_ok) -> bool:
        try:
            if not preverify_ok:
                reason = describe_x509_error(errno)
                subject = identity_of(cert.to_cryptography()).cn
                self._refuse(conn, f"{reason} (subject CN {subject!r}, depth {depth})")
                return False
            if depth != 0:
                return True
            reason = self.policy.check(identity_of(cert.to_cryptography()))
            if reason is not None:
                self._refuse(conn, reason)
                return False
            return True
        except Exception:
            # An exception escaping into OpenSSL would be re-raised later in an
            # unrelated place; refuse here instead, loudly.
            log.failure("Certificate policy check crashed; refusing the peer")
            return False

    def _refuse(self, conn, reason: str) -> None:
        self.policy.last_refusal = reason
        protocol = conn.get_app_data()
        peer = _peer_of(protocol)
        if isinstance(protocol, TLSMemoryBIOProtocol):
            protocol.decnet_refusal = reason
        log.warn("Refused TLS peer {peer}: {reason}", peer=peer, reason=reason)


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


class _RefusalLoggingTLSProtocol(TLSMemoryBIOProtocol):
    """Logs handshakes that fail before our verify callback could say why.

    (No client certificate, plaintext on the TLS port, a protocol version
    below 1.2, garbage bytes.)
    """

    decnet_refusal: str | None = None
    _received_any = False

    def dataReceived(self, data):
        self._received_any = True
        super().dataReceived(data)

    def connectionLost(self, reason):
        # A connect-and-close without a byte (a port probe) is not worth a
        # warning per connection; anything that sent bytes and failed is.
        if not self._handshakeDone and self.decnet_refusal is None and self._received_any:
            # The TLS error that ended the handshake is kept in _reason; the
            # transport itself only ever reports a clean close.
            log.warn(
                "TLS handshake with {peer} failed: {reason}",
                peer=_peer_of(self),
                reason=_short_reason(getattr(self, "_reason", None) or reason),
            )
        super().connectionLost(reason)


def _short_reason(reason) -> str:
    value = reason.value
    if isinstance(value, SSL.Error) and value.args and isinstance(value.args[0], list):
        parts = [item[-1] for item in value.args[0] if isinstance(item, tuple)]
        if parts:
            return "; ".join(parts)
    return reason.getErrorMessage() or type(value).__name__


class TLSServerFactory(TLSMemoryBIOFactory):
    """``TLSMemoryBIOFactory`` whose protocol logs failed handshakes with the peer."""

    protocol = _RefusalLoggingTLSProtocol

    def __init__(self, options: PolicyOptions, wrapped_factory, clock=None):
        super().__init__(options, False, wrapped_factory, clock=clock)


def listen_tls(reactor, description: str, options: PolicyOptions, factory, *, gate=None):
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

    def __init__(self, options: PolicyOptions):
        self.options = options

    def creatorForNetloc(self, hostname, port):
        return self.options
