"""``ssh``: an OpenSSH look-alike (Twisted Conch); every authentication attempt refused.

The server completes a real key exchange with a per-decky host key (generated
on first start into the agent's state dir, 0600, never shipped), offers
``publickey`` and ``password`` authentication, records every attempt and
refuses it.

Events: ``connect``; ``kex`` (``client_version``, ``hassh`` — the MD5 client
fingerprint of https://github.com/salesforce/hassh — and ``kex`` the client's
key-exchange list); ``login`` (``method`` = ``password`` with ``user`` and
``password``, or ``publickey`` with ``user``, ``key_type``, ``key_fp`` (SHA256,
as ``ssh-keygen -l`` prints it) and ``signed``); ``disconnect``.
"""

from __future__ import annotations

import hashlib
import os
from itertools import chain
from pathlib import Path
from typing import ClassVar

from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from twisted.conch import error as conch_error
from twisted.conch.ssh import _kex, connection, keys, transport, userauth
from twisted.conch.ssh.common import getNS
from twisted.cred import credentials
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet import defer, protocol
from zope.interface import implementer

from decnet.agent.decoys.base import DecoyMixin, ServiceRuntime
from decnet.fsutil import PRIVATE_FILE_MODE, ensure_private_dir, write_new_file

HOST_KEYS = (
    ("ssh_host_ed25519_key", ed25519.Ed25519PrivateKey.generate),
    ("ssh_host_ecdsa_key", lambda: ec.generate_private_key(ec.SECP256R1())),
)


def load_or_create_host_keys(directory: str | os.PathLike) -> dict[bytes, keys.Key]:
    """The decky's host keys in ``directory``, generated (0600) on first use.  Blocking."""
    directory = ensure_private_dir(Path(directory))
    found: dict[bytes, keys.Key] = {}
    for name, generate in HOST_KEYS:
        path = directory / name
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            data = keys.Key(generate()).toString("openssh")
            try:
                write_new_file(path, data, PRIVATE_FILE_MODE)
            except FileExistsError:
                data = path.read_bytes()  # another start won the race: use its key
        key = keys.Key.fromString(data)
        found[key.sshType()] = key
    return found


@implementer(ICredentialsChecker)
class RefuseEverything:
    """Every credential is wrong: a decoy never lets anyone in."""

    credentialInterfaces = (credentials.ISSHPrivateKey, credentials.IUsernamePassword)

    def requestAvatarId(self, creds):
        return defer.fail(UnauthorizedLogin("decoy"))


class _NoRealm:
    def requestAvatar(self, avatar_id, mind, *interfaces):  # pragma: no cover - unreachable
        raise conch_error.ConchError("a decoy has no accounts")


class DecoyUserAuth(userauth.SSHUserAuthServer):
    """Records each password / public-key attempt before the portal refuses it."""

    passwordDelay = 1  # like OpenSSH, slow down guessing; tests may set 0

    def serviceStarted(self):
        runtime = self.transport.runtime
        self.clock = runtime.clock
        super().serviceStarted()
        # Conch disconnects once loginAttempts exceeds this: max_auth_tries failures.
        self.attemptsBeforeDisconnect = runtime.spec.option("max_auth_tries") - 1

    def auth_password(self, packet):
        password = getNS(packet[1:])[0]
        self.transport.session.login(
            ("method", "password"), ("user", self.user), ("password", password)
        )
        return super().auth_password(packet)

    def auth_publickey(self, packet):
        signed = bool(packet[:1] and packet[0])
        algorithm, blob, _rest = getNS(packet[1:], 2)
        try:
            fp = keys.Key.fromString(blob).fingerprint(keys.FingerprintFormats.SHA256_BASE64)
            key_fp = f"SHA256:{fp}"
        except (keys.BadKeyError, ValueError, TypeError):
            key_fp = None
        self.transport.session.login(
            ("method", "publickey"),
            ("user", self.user),
            ("key_type", algorithm),
            ("key_fp", key_fp),
            ("signed", signed),
        )
        return super().auth_publickey(packet)


class SSHDecoyTransport(DecoyMixin, transport.SSHServerTransport):
    def ssh_KEXINIT(self, packet):
        try:
            strings = getNS(packet[16:], 10)[:-1]
            kex, _hostkeys, enc_cs, _enc_sc, mac_cs, _mac_sc, comp_cs = strings[:7]
            hassh = hashlib.md5(  # noqa: S324 - hassh is defined as MD5; not for security
                b";".join((kex, enc_cs, mac_cs, comp_cs))
            ).hexdigest()
        except (ValueError, IndexError):
            kex, hassh = None, None
        self.session.event(
            "kex",
            ("client_version", self.otherVersionString),
            ("hassh", hassh),
            ("kex", kex),
        )
        return super().ssh_KEXINIT(packet)


class SSHDecoyFactory(protocol.Factory):
    """An SSH server factory for one decoy service (host keys already loaded)."""

    noisy = False
    protocol = SSHDecoyTransport
    services: ClassVar[dict] = {
        b"ssh-userauth": DecoyUserAuth,
        b"ssh-connection": connection.SSHConnection,
    }

    def __init__(self, runtime: ServiceRuntime, host_keys: dict[bytes, keys.Key]):
        self.runtime = runtime
        self.privateKeys = host_keys
        self.publicKeys = {kind: key.public() for kind, key in host_keys.items()}
        self.portal = Portal(_NoRealm(), [RefuseEverything()])
        self.primes = None
        self.version = runtime.spec.option("version").encode("ascii")

    def getService(self, transport_, service):
        return self.services.get(service)

    def getDHPrime(self, bits):  # pragma: no cover - dynamic groups are not offered
        raise conch_error.ConchError("no dynamic DH groups")

    def buildProtocol(self, addr):
        if not self.runtime.admit():
            return None
        t = super().buildProtocol(addr)
        t.runtime = self.runtime
        t.ourVersionString = self.version
        t.supportedPublicKeys = list(
            chain.from_iterable(k.supportedSignatureAlgorithms() for k in self.privateKeys.values())
        )
        # No moduli file: offer the fixed groups and curves only (as
        # SSHFactory does, without logging it for every connection).
        t.supportedKeyExchanges = [
            k for k in t.supportedKeyExchanges if not _kex.isDynamicPrimesGroup(k)
        ]
        return t


def make_factory(runtime: ServiceRuntime, host_keys: dict[bytes, keys.Key]) -> SSHDecoyFactory:
    return SSHDecoyFactory(runtime, host_keys)
