"""Helpers for the listener's admission tests."""

from __future__ import annotations

from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory

from decnet import config
from decnet.tls import PolicyOptions
from tests.logpipe_support import MASTER_ONLY


def client_hello(identity) -> bytes:
    """The first flight of a real worker's handshake (a ClientHello), to trickle or replay."""
    options = PolicyOptions(identity, MASTER_ONLY, acceptable_protocols=[config.ACK_ALPN])
    proto = TLSMemoryBIOFactory(
        options, True, Factory.forProtocol(Protocol), clock=Clock()
    ).buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    return transport.value()
