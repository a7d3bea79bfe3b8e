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
import struct
import zlib
from itertools import chain
from pathlib import Path
from typing import ClassVar

from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from twisted.conch import error as conch_error
from twisted.conch.ssh import _kex, common, connection, keys, transport, userauth
from twisted.conch.ssh.common import getNS
from twisted.cred import credentials
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, protocol
from zope.interface import implementer

from decnet.agent.decoys.base import RUN_STEP, DecoyMixin, ServiceRuntime
from decnet.agent.decoys.budget import TURN_ITEMS
from decnet.agent.decoys.inbox import TOO_LONG
from decnet.fsutil import PRIVATE_FILE_MODE, ensure_private_dir, write_new_file

MAX_PREAMBLE = 4096  # bytes before and including the version line, as Conch allows
MAX_PACKET = 1024 * 1024  # Conch's limit on packet_length
_PLAIN_HEADER = struct.Struct("!LBB")  # packet_length, padding_length, message number
_UNIMPLEMENTED = struct.Struct("!LBBL")  # ... and the rejected packet's sequence number
_NOOP_MESSAGES = frozenset((transport.MSG_IGNORE, transport.MSG_UNIMPLEMENTED, transport.MSG_DEBUG))

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


@implementer(IRealm)
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


def _whole_plain_packet(packet_len: int, padding_len: int, available: int) -> bool:
    """A well-formed unencrypted packet (block size 8) that has fully arrived."""
    return (
        packet_len <= MAX_PACKET
        and (packet_len + 4) % 8 == 0
        and packet_len >= padding_len + 2
        and available >= packet_len + 4
    )


class SSHDecoyTransport(DecoyMixin, transport.SSHServerTransport):
    """Conch's server transport, fed one version line or one packet at a time.

    Conch's own ``dataReceived`` copies the rest of its buffer for every
    packet and handles every packet of a read at once; here the version
    exchange and the binary packets (RFC 4253 sections 4.2 and 6) are read
    from the connection's inbox, one item per :meth:`next_item`, and each
    packet, ``IGNORE`` and unknown ones included, counts toward the command
    cap.  Malformed input closes the connection (``protocol-error``) without
    a traceback in the agent's log.
    """

    _first: bytes | None = None  # the decrypted first block of a packet in progress
    _preamble = 0  # bytes received before the version line

    def next_item(self) -> bool:
        if not self.gotVersion:
            return self._version_line()
        if self._first is None and self.currentEncryptions.inCipType == b"none":
            n, unanswered, plain_out = self._plaintext_run()
            if n:
                if self.count_commands(n) == n and unanswered:
                    self._unimplemented(unanswered, plain_out)
                return True
        try:
            payload = self._read_packet()
            if payload is None:
                return False
            if self.count_command():
                self.dispatchMessage(payload[0], payload[1:])
        except (ValueError, IndexError, TypeError, struct.error, conch_error.ConchError):
            # Conch's handlers parse attacker bytes; anything they cannot parse
            # is the client's fault, reported by the disconnect reason.
            self.close("protocol-error")
        return True

    def _version_line(self) -> bool:
        room = MAX_PREAMBLE - self._preamble
        line = self.inbox.next_line(b"\n", max(0, room - 1))
        if line is TOO_LONG:
            self.sendDisconnect(
                transport.DISCONNECT_CONNECTION_LOST,
                b"Peer version string longer than 4KB. Preventing a denial of service attack.",
            )
            return True
        if line is None:
            return False
        self._preamble += len(line) + 1
        if not self.count_command():
            return True
        # RFC 4253 section 4.2: other lines may precede the version line.
        if line.startswith(b"SSH-"):
            self.gotVersion = True
            self.otherVersionString = line.rstrip(b"\r")
            remote_version = line.split(b"-")[1]
            if remote_version not in self.supportedVersions:
                self._unsupportedVersionReceived(remote_version)
        return True

    def _plaintext_run(self) -> tuple[int, list[int], bool]:
        """Skip a run of unencrypted packets that mean nothing.

        Returns how many, the sequence numbers to answer with UNIMPLEMENTED,
        and whether our side still sends in plain text.

        Before the first key exchange completes, packets are plain text.  IGNORE,
        DEBUG and UNIMPLEMENTED change nothing and an unknown message type only
        earns an UNIMPLEMENTED answer (RFC 4253 section 11.4), so a run of them
        is walked in one loop, :data:`RUN_STEP` at most, instead of one pump
        step each.  While our side still sends in plain text too, the answers are
        built here and written at once; otherwise Conch encrypts each one, and
        the run stops after a turn's worth of them.
        """
        plain_out = self._sends_plain()
        buf, start, end = self.inbox.view()
        pos, n, sequence = start, 0, self.incomingPacketSequence
        unanswered: list[int] = []
        header, header_size = _PLAIN_HEADER.unpack_from, _PLAIN_HEADER.size
        while n < RUN_STEP and end - pos >= header_size:
            if not plain_out and len(unanswered) >= TURN_ITEMS:
                break
            packet_len, padding_len, message = header(buf, pos)
            if not _whole_plain_packet(packet_len, padding_len, end - pos):
                break
            noop = message in _NOOP_MESSAGES
            if not noop and self._has_meaning(message):
                break  # a message with a meaning: the normal path
            pos += packet_len + 4
            sequence += 1
            n += 1
            if not noop:
                # Conch's sendUnimplemented() reports the sequence number so far.
                unanswered.append(sequence)
        self.incomingPacketSequence = sequence
        self.inbox.advance(pos - start, header_size * (n + 1))
        return n, unanswered, plain_out

    def _sends_plain(self) -> bool:
        """Whether our side still sends in plain text (no cipher, MAC or compression yet)."""
        ciphers = self.currentEncryptions
        return (
            ciphers.outCipType == b"none"
            and ciphers.outMACType == b"none"
            and not self.outgoingCompression
        )

    def _has_meaning(self, message: int) -> bool:
        """A transport message Conch handles, or anything once a service runs."""
        return (message < 50 and message in transport.messages) or bool(self.service)

    def _unimplemented(self, sequence_numbers: list[int], plain_out: bool) -> None:
        if not plain_out:
            for seq in sequence_numbers:
                self.sendPacket(transport.MSG_UNIMPLEMENTED, struct.pack("!L", seq))
            return
        # What sendPacket() builds with the "none" cipher and MAC: 4+1+5 bytes
        # and 6 of padding make one 16-byte block.
        padding = os.urandom(6 * len(sequence_numbers))
        self.transport.write(
            b"".join(
                _UNIMPLEMENTED.pack(12, 6, transport.MSG_UNIMPLEMENTED, seq)
                + padding[6 * i : 6 * i + 6]
                for i, seq in enumerate(sequence_numbers)
            )
        )
        self.outgoingPacketSequence += len(sequence_numbers)

    def _read_packet(self) -> bytes | None:
        """The next packet's payload (decrypted, verified), or ``None`` until it is complete."""
        ciphers = self.currentEncryptions
        block, mac_size = ciphers.decBlockSize, ciphers.verifyDigestSize
        if self._first is None:
            if len(self.inbox) < block:
                return None
            self._first = ciphers.decrypt(self.inbox.take(block))
        first = self._first
        packet_len, padding_len = struct.unpack("!LB", first[:5])
        if packet_len > MAX_PACKET or (packet_len + 4) % block or packet_len < padding_len + 2:
            self.sendDisconnect(
                transport.DISCONNECT_PROTOCOL_ERROR, b"bad packet length %d" % packet_len
            )
            return None
        rest = packet_len + 4 - block
        if len(self.inbox) < rest + mac_size:
            return None
        self._first = None
        packet = first + ciphers.decrypt(self.inbox.take(rest))
        if mac_size and not ciphers.verify(
            self.incomingPacketSequence, packet, self.inbox.take(mac_size)
        ):
            self.sendDisconnect(transport.DISCONNECT_MAC_ERROR, b"bad MAC")
            return None
        payload = packet[5 : len(packet) - padding_len]
        if self.incomingCompression:
            try:
                payload = self.incomingCompression.decompress(payload)
            except zlib.error:
                self.sendDisconnect(transport.DISCONNECT_COMPRESSION_ERROR, b"compression error")
                return None
        self.incomingPacketSequence += 1
        return payload

    def dispatchMessage(self, messageNum, payload):
        # Conch's, without the log line (debug here, info in the service) it
        # writes for every unknown message: an attacker's flood of them must
        # cost no more than answering them, and never fill the agent's log.
        if messageNum < 50 and messageNum in transport.messages:
            handler = getattr(self, "ssh_" + transport.messages[messageNum][4:], None)
            if handler is not None:
                handler(payload)
                return
        elif self.service and messageNum in self.service.protocolMessages:
            self.service.packetReceived(messageNum, payload)
            return
        self.sendUnimplemented()

    def sendDisconnect(self, reason, desc):
        # Conch logs every disconnect it initiates; for a decoy that is
        # attacker-triggered noise, and the disconnect event says why.
        self.sendPacket(
            transport.MSG_DISCONNECT, struct.pack(">L", reason) + common.NS(desc) + common.NS(b"")
        )
        if reason == transport.DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE:
            self.close("too-many-failures")
        else:
            self.close("protocol-error")

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
        # OpenSSH's offer: zlib only after authentication, which never
        # succeeds here; no zlib before it (no decompression bombs either).
        t.supportedCompressions = [b"none", b"zlib@openssh.com"]
        return t


def make_factory(runtime: ServiceRuntime, host_keys: dict[bytes, keys.Key]) -> SSHDecoyFactory:
    return SSHDecoyFactory(runtime, host_keys)
