"""Open N idle acknowledged-mode connections to a listener (for bench/logpipe.py).

    python bench/_idle_clients.py BUNDLE PORT N

Each connection is a forwarder's: mTLS with the worker certificate, ALPN
decnet-syslog/1, HELLO for its own stream, RESUME received, then silence.
Prints one line once all are established and stays until terminated.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.protocol import Protocol

from decnet import config, pki
from decnet.forwarder.service import forwarder_options
from decnet.syslog import ackproto
from decnet.syslog.framing import OctetCountingDecoder, encode_frame
from decnet.tls import TLSIdentity


class Idle(Protocol):
    def __init__(self, stream, resumed):
        self.stream = stream
        self.resumed = resumed
        self.decoder = OctetCountingDecoder(strip_lf=False)

    def connectionMade(self):
        self.transport.write(encode_frame(ackproto.encode_hello(self.stream)))

    def dataReceived(self, data):
        for frame in self.decoder.feed(data):
            if isinstance(ackproto.decode(frame), ackproto.Resume) and not self.resumed.called:
                self.resumed.callback(None)


async def main(bundle_dir, port, n):
    bundle = pki.WorkerBundle.load(bundle_dir)
    identity = TLSIdentity.from_bundle(bundle, config.ROLE_WORKER)
    options, _ = forwarder_options(identity, bundle.master_fingerprint, "ack")
    protos = []
    sem = defer.DeferredSemaphore(50)

    async def one(i):
        resumed = defer.Deferred()
        endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", port))
        proto = await connectProtocol(endpoint, Idle(f"idle{i}", resumed))
        await resumed
        protos.append(proto)

    await defer.gatherResults([sem.run(lambda i=i: defer.ensureDeferred(one(i))) for i in range(n)])
    print(f"{len(protos)} idle connections", flush=True)
    await defer.Deferred()  # until terminated


if __name__ == "__main__":
    bundle_dir, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    task.react(lambda _r: defer.ensureDeferred(main(bundle_dir, port, n)))
