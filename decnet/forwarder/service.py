"""The forwarder service: locate the stream, watch the file, keep a connection up."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall, IReactorFDSet, IStreamClientEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from decnet import config
from decnet.forwarder.client import ForwarderFactory, Shipper
from decnet.forwarder.core import DeliveryCore
from decnet.forwarder.journal import Plan
from decnet.forwarder.offsets import JournalStore
from decnet.forwarder.rendezvous import Listener, ListenerChoice
from decnet.forwarder.tail import DEFAULT_ROTATE_WAIT, Tailer
from decnet.interfaces import IDecnetReactor
from decnet.pki import WorkerBundle, format_listener
from decnet.systemd import SystemdService
from decnet.threads import serial_runner
from decnet.tls import (
    Accept,
    BundleIdentity,
    IdentityWatcher,
    PeerPolicy,
    PolicyOptions,
    TLSIdentity,
)

# How long stopping waits for the master to answer our TLS close before cutting it.
STOP_GRACE = 5.0

_jitter = random.SystemRandom()


def forwarder_options(
    identity: TLSIdentity, master_fingerprint: str | None, mode: str, *, several: bool = False
) -> tuple[PolicyOptions, PeerPolicy]:
    """Client TLS options: the master only (pinned when we know its fingerprint).

    ``several``: the bundle names several listeners, so the worker may move between
    them; it then offers ``decnet-syslog/2`` as well (an older listener picks /1).
    """
    policy = PeerPolicy([Accept(config.ROLE_MASTER, fingerprint=master_fingerprint)])
    protocols = [config.ACK_ALPN_MOVES, config.ACK_ALPN] if several else [config.ACK_ALPN]
    alpn = None if mode == "plain" else protocols
    return PolicyOptions(identity, policy, acceptable_protocols=alpn), policy


def readable_delays(policy: Callable[[int], float]) -> Callable[[int], float]:
    """``policy`` with its delays rounded to 0.1 s: the retry log line says "in 1.9
    seconds", not "in 1.9603283599477868 seconds" (the jitter stays, to a tenth)."""
    return lambda attempt: max(0.1, round(policy(attempt), 1))


@implementer(IStreamClientEndpoint)
class _ReportingEndpoint:
    """Connects to the factory's current choice of listener and tells the factory
    about failed attempts (refused, unreachable), which may move it to the next.

    Its ``repr`` is what Twisted's ClientService names in "Scheduling retry 1 to
    connect {endpoint} in {delay} seconds.": the listener, not an object id.
    """

    def __init__(
        self,
        reactor: IDecnetReactor,
        options: Callable[[bool], PolicyOptions],
        factory: ForwarderFactory,
    ):
        self._reactor = reactor
        self._options = options  # TLS options for one listener or several
        self._factory = factory

    def __repr__(self) -> str:
        choice = self._factory.choice
        where = format_listener(*choice.target) if choice is not None else "?"
        return f"the master's listener at {where} (TLS)"

    def connect(self, protocol_factory):
        choice = self._factory.choice
        assert choice is not None  # the service always gives its factory one
        host, port = choice.target
        options = self._options(choice.several)
        endpoint = wrapClientTLS(options, HostnameEndpoint(self._reactor, host, port))
        d = endpoint.connect(protocol_factory)

        def failed(failure):
            self._factory.failed_attempt(failure.getErrorMessage())
            return failure

        return d.addErrback(failed)


class TailWatcher(Service):
    """Wakes the shipper on inotify events for the log directory, and on a poll timer."""

    log = Logger()

    def __init__(
        self,
        reactor: IDecnetReactor,
        path: Path,
        notify: Callable[[], None],
        poll_interval: float,
    ):
        self.reactor = reactor
        self.path = path
        self.notify = notify
        self.poll = LoopingCall(self._tick)
        self.poll.clock = reactor
        self.poll_interval = poll_interval
        self._inotify = None
        self._watching = False
        self._unwatchable = False

    def startService(self):
        super().startService()
        self._inotify = self._open_inotify()
        self._watch()
        self.poll.start(self.poll_interval, now=True)

    def _open_inotify(self):
        """An inotify reader on the reactor, or ``None`` (the poll timer alone) and why."""
        if not IReactorFDSet.providedBy(self.reactor):
            return self._polling_only("the reactor cannot watch file descriptors")
        try:
            from twisted.internet import inotify
        except ImportError as exc:  # not Linux, or no usable libc
            return self._polling_only(str(exc))
        try:
            reader = inotify.INotify(reactor=self.reactor)
        except inotify.INotifyError as exc:  # out of inotify instances
            return self._polling_only(str(exc))
        reader.startReading()
        return reader

    def _polling_only(self, why: str) -> None:
        self.log.info(
            "inotify unavailable ({error}); polling {path} every {interval}s",
            error=why,
            path=str(self.path),
            interval=self.poll_interval,
        )

    def _watch(self) -> None:
        if self._inotify is None or self._watching:
            return
        from twisted.internet import inotify
        from twisted.python.filepath import FilePath

        mask = (
            inotify.IN_MODIFY
            | inotify.IN_CREATE
            | inotify.IN_MOVED_TO
            | inotify.IN_MOVED_FROM
            | inotify.IN_DELETE
            | inotify.IN_CLOSE_WRITE
            | inotify.IN_ATTRIB
        )
        try:
            self._inotify.watch(FilePath(str(self.path.parent)), mask, callbacks=[self._event])
        except inotify.INotifyError as exc:
            # No such directory yet, no permission, or no watches left: the poll
            # timer covers it and retries.  Said once, not once per tick.
            if not self._unwatchable:
                self.log.info(
                    "Cannot watch {directory} with inotify ({error}); polling it every "
                    "{interval}s until it can",
                    directory=str(self.path.parent),
                    error=str(exc),
                    interval=self.poll_interval,
                )
            self._unwatchable = True
            return
        self._watching = True
        if self._unwatchable:
            self.log.info("Watching {directory} with inotify", directory=str(self.path.parent))
        self._unwatchable = False

    def _event(self, _watch, _path, _mask):
        self.notify()

    def _tick(self):
        self._watch()
        self.notify()

    def stopService(self):
        if self.poll.running:
            self.poll.stop()
        if self._inotify is not None:
            self._inotify.loseConnection()
            self._inotify = None
        return super().stopService()


def _cancelled(result, call: IDelayedCall):
    if call.active():
        call.cancel()
    return result


class ForwarderService(MultiService):
    """Everything ``twistd decnet-forwarder`` runs."""

    log = Logger()

    def __init__(
        self,
        reactor,
        *,
        identity: TLSIdentity,
        master_host: str | None = None,
        master_port: int | None = None,
        listeners: Sequence[Listener] = (),
        master_fingerprint: str | None,
        log_file: Path,
        state_file: Path,
        stream: str = config.DEFAULT_STREAM,
        mode: str = "auto",
        max_line: int = config.DEFAULT_MAX_LINE,
        poll_interval: float = config.DEFAULT_POLL_INTERVAL,
        rotate_wait: float = DEFAULT_ROTATE_WAIT,
        max_retry_delay: float = 30.0,
        return_after: float = config.DEFAULT_LISTENER_RETURN,
        bundle_dir: Path | None = None,
        bundle_check: float = config.DEFAULT_BUNDLE_CHECK,
        bundle: WorkerBundle | None = None,
        reload_interval: float = config.IDENTITY_RELOAD_INTERVAL,
    ):
        """Ships to ``listeners`` (several: chosen by rendezvous hashing of the worker's
        CN, see :mod:`decnet.forwarder.rendezvous`), or to ``master_host:master_port``."""
        super().__init__()
        self.reactor = reactor
        self.stream = stream
        self.state_file = state_file
        run = serial_runner(reactor)
        self.run = run
        self.tailer = Tailer(log_file, max_line=max_line, rotate_wait=rotate_wait)
        self.max_payload = max_line
        self.store: JournalStore | None = None
        self.shipper: Shipper | None = None  # once the journal is read
        if not listeners:
            if master_host is None or master_port is None:
                raise TypeError("give listeners, or master_host and master_port")
            listeners = [(master_host, master_port)]
        choice = ListenerChoice(identity.identity.cn, listeners, return_after)
        tls = {
            several: forwarder_options(identity, master_fingerprint, mode, several=several)[0]
            for several in (False, True)
        }
        self.factory = ForwarderFactory(
            None,
            stream=stream,
            mode=mode,
            target=format_listener(*choice.target),
            choice=choice,
            clock=reactor,
        )
        self.client = ClientService(
            _ReportingEndpoint(reactor, tls.__getitem__, self.factory),
            self.factory,
            retryPolicy=readable_delays(
                backoffPolicy(
                    initialDelay=0.5, maxDelay=max_retry_delay, factor=2.0, jitter=_jitter.random
                )
            ),
            clock=reactor,
        )
        self.watcher = TailWatcher(reactor, Path(log_file), self._notify, poll_interval)
        # The bundle's listener list may be replaced (``decnet-admin bundle refresh``).
        self.bundle_dir = bundle_dir
        self.bundle_poll = LoopingCall(self._check_bundle)
        self.bundle_poll.clock = reactor
        self.bundle_check = bundle_check
        self.return_after = return_after
        self.cn = identity.identity.cn
        self._bundle_problem: str | None = None
        if bundle is not None:
            # A renewed certificate is used from the next connection on; the
            # live one keeps shipping (the journal is untouched either way).
            IdentityWatcher(
                reactor,
                BundleIdentity(bundle, config.ROLE_WORKER, identity),
                [tls[False].reload, tls[True].reload],
                interval=reload_interval,
            ).setServiceParent(self)
        self.systemd = SystemdService(reactor)
        self.systemd.setServiceParent(self)
        self.factory.state_listeners.append(lambda _state, detail: self.systemd.status(detail))

    def startService(self):
        super().startService()
        d = self.run(self._locate)
        d.addCallbacks(self._located, self._locate_failed)

    def _locate(self) -> tuple[int, Plan]:
        """Open the journal and every generation still to ship; record them first."""
        self.store = JournalStore(self.state_file, self.reactor.seconds)
        journal = self.store.load(self.stream)
        plan = self.tailer.start(journal)
        self.store.commit(self.stream, records=self.tailer.take_records(), forget=plan.forget)
        return journal.acked, plan

    def _located(self, located: tuple[int, Plan]) -> None:
        acked, plan = located
        for note in plan.notes:
            self.log.warn("Stream {stream}: {note}", stream=self.stream, note=note)
        self.log.info(
            "Forwarding {path} as stream {stream}: {count} file(s) to follow, "
            "acknowledged up to logical offset {offset}",
            path=str(self.tailer.path),
            stream=self.stream,
            count=len(plan.generations),
            offset=acked,
        )
        delivery = DeliveryCore(self.stream, acked=acked, max_payload=self.max_payload)
        assert self.store is not None  # opened by _locate
        self.shipper = Shipper(delivery, self.tailer, self.store, self.reactor, self.run)
        self.factory.shipper = self.shipper
        self.watcher.setServiceParent(self)
        self.client.setServiceParent(self)
        if self.bundle_dir is not None:
            self.bundle_poll.start(self.bundle_check, now=False)
        # Ready once the file is being followed; the connection comes and goes
        # (STATUS says which), and a master that is down must not fail the unit.
        self.systemd.ready(f"following {self.tailer.path}")

    def _notify(self) -> None:
        if self.shipper is not None:
            self.shipper.notify()

    def _locate_failed(self, failure) -> None:
        self.log.failure(
            "Cannot open the forwarder state {state}", failure, state=str(self.state_file)
        )
        self.reactor.stop()

    def _check_bundle(self) -> defer.Deferred:
        """Read the bundle's listener list (off the reactor) and follow a change."""
        directory = self.bundle_dir
        assert directory is not None  # (only polled with a bundle)
        d = self.run(lambda: WorkerBundle.load(directory).listeners)
        d.addCallbacks(self._listeners_read, self._bundle_unreadable)
        return d

    def _listeners_read(self, listeners: list[Listener]) -> None:
        choice = self.factory.choice
        if choice is None or not listeners or sorted(listeners) == sorted(choice.order):
            return
        self._bundle_problem = None
        self.factory.replace_listeners(ListenerChoice(self.cn, listeners, self.return_after))

    def _bundle_unreadable(self, failure) -> None:
        problem = failure.getErrorMessage()
        if problem != self._bundle_problem:
            self.log.warn(
                "Cannot read the listener list of {bundle}: {problem}; keeping the current one",
                bundle=str(self.bundle_dir),
                problem=problem,
            )
        self._bundle_problem = problem

    def stopService(self):
        if self.bundle_poll.running:
            self.bundle_poll.stop()
        self.factory.stop()
        current = self.factory.current
        if current is not None and not current.lost and self.shipper is not None:
            self.shipper.detach(current)
        d = super().stopService()
        if current is not None and not current.lost:
            # A graceful TLS close waits for the master's answer; a master
            # that stopped reading never gives it.
            abort = self.reactor.callLater(STOP_GRACE, current.transport.abortConnection)
            d.addBoth(_cancelled, abort)

        def close(result):
            if self.shipper is None:
                return self.run(self._close)
            self.shipper.stop()
            flushed = self.shipper.flush()
            flushed.addCallback(lambda _: self.run(self._close))
            return flushed

        d.addBoth(close)
        return d

    def _close(self) -> None:
        self.tailer.close()
        if self.store is not None:
            self.store.close()
