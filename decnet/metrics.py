"""Prometheus metrics for every daemon: one registry each, served from Twisted.

``--metrics ENDPOINT`` (:data:`METRICS_OPTION`, off unless given) makes a
daemon serve ``GET /metrics`` in the Prometheus text exposition format on a
plain HTTP endpoint string such as ``tcp:9465:interface=127.0.0.1``.  See
docs/Metrics.md for what each daemon exports.

* **One registry per daemon** (:func:`daemon_registry`, a :class:`DaemonMetrics`),
  never prometheus_client's global one, so several daemons in one test process
  never collide.  It holds the process collector, ``decnet_build_info`` and
  the expiry of the daemon's own certificate.
* **Counts are read at scrape time.**  The daemons already count what they
  do; their collectors (``decnet/<daemon>/metrics.py``, :class:`Sampled`)
  copy those numbers on the reactor thread, where they live and change.
* **Building and encoding are off the reactor.**  prometheus_client's own
  Twisted resource imports the global reactor and runs every collector in a
  thread (where reactor-side dicts change under it); instead
  :class:`MetricsResource` only copies numbers on the reactor and hands the
  copy to the thread pool, which builds the metric families and the text
  (both grow with the number of series).  ``bench/metrics.py`` measures both.
* **The endpoint is unauthenticated plain HTTP**: loopback in the units; a
  non-loopback address is logged as a warning at start-up.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol, cast

from cryptography import x509
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.application.service import IServiceCollection
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.pages import notFound
from twisted.web.resource import Resource

from decnet import __version__, config
from decnet.daemon import PortService, absolute_path
from decnet.httpapi import BodyLimits, make_site
from decnet.interfaces import IDecnetReactor
from decnet.threads import Runner, pool_runner
from decnet.tls import TLSIdentity

# A scrape is a GET without a body; a slow or idle client is dropped after this.
SCRAPE_IDLE_TIMEOUT = 30
NO_BODY = BodyLimits(max_size=0)
METRICS_PATH = b"metrics"
# The classic text format (what generate_latest writes), which every Prometheus reads.
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


def metrics_endpoint(value: str) -> str:
    """``--metrics``: a server endpoint string Twisted can parse (not bound yet)."""
    if not (value.isascii() and value.isprintable()) or not value.strip():
        raise ValueError(f"--metrics must be an endpoint such as {example_endpoint('listener')}")
    try:
        # Parsing builds the endpoint object only; the reactor is not touched
        # until listen(), which MetricsService does with the real one.
        serverFromString(cast(Any, None), value)
        _check_port(value)
    except (ValueError, KeyError, TypeError, IndexError, OSError) as exc:
        raise ValueError(
            f"--metrics {value!r} is not an endpoint ({exc or type(exc).__name__}); "
            f"e.g. {example_endpoint('listener')}"
        ) from None
    return value


def _check_port(value: str) -> None:
    """A TCP port must fit in 16 bits (Twisted would only fail at bind time)."""
    kind, _, rest = value.partition(":")
    if kind in ("tcp", "tcp6"):
        tokens = rest.split(":")
        named = [t[len("port=") :] for t in tokens if t.startswith("port=")]
        text = (named or [t for t in tokens if "=" not in t] or ["0"])[0]
        port = int(text)
        if not 0 <= port <= 65535:
            raise ValueError(f"port {port} is not 0-65535")


metrics_endpoint.__name__ = "endpoint"


def example_endpoint(daemon: str) -> str:
    """The endpoint the units use for ``daemon``'s metrics (its port on loopback)."""
    return f"tcp:{config.METRICS_PORTS[daemon]}:interface={config.METRICS_INTERFACE}"


def metrics_options(daemon: str) -> list[list]:
    """The ``optParameters`` rows every daemon has: ``--metrics`` and ``--metrics-port-file``."""
    return [
        [
            "metrics",
            None,
            None,
            "Serve Prometheus metrics at /metrics on this endpoint (plain HTTP, no "
            f"authentication: keep it on loopback), e.g. {example_endpoint(daemon)} "
            "[default: off]",
            metrics_endpoint,
        ],
        [
            "metrics-port-file",
            None,
            None,
            "Write the bound metrics port number here once listening",
            absolute_path,
        ],
    ]


def metrics_epilog(daemon: str) -> str:
    """The ``--help`` example for the metrics endpoint of ``daemon``."""
    return (
        f"Metrics: --metrics {example_endpoint(daemon)} serves "
        f"http://127.0.0.1:{config.METRICS_PORTS[daemon]}/metrics for Prometheus "
        "(see docs/Metrics.md)."
    )


# -- the registry --------------------------------------------------------------


Build = Callable[[], Iterable[Metric]]


class Sampled(Protocol):
    """A daemon's own counts, sampled on the reactor and turned into families elsewhere."""

    def sample(self) -> Build:
        """Copy the numbers now (on the reactor, cheaply); the result builds the families
        from that copy, on any thread, without touching the daemon's objects again."""
        ...


def certificate_expiry(role: str, cert: x509.Certificate) -> Metric:
    """The notAfter of our own certificate, for the "certificate expiring" alert."""
    return gauge(
        "decnet_certificate_expiry_timestamp_seconds",
        "When this daemon's own TLS certificate stops being valid (Unix time)",
        ["role"],
        [([role], cert.not_valid_after_utc.timestamp())],
    )


Rows = Iterable[tuple[Sequence[str], float]]


def _family(
    kind: type[CounterMetricFamily | GaugeMetricFamily],
    name: str,
    documentation: str,
    labels: Sequence[str],
    rows: Rows,
) -> Metric:
    family = kind(name, documentation, labels=list(labels))
    for values, value in rows:
        family.add_metric(list(values), value)
    return family


def counter(name: str, documentation: str, labels: Sequence[str], rows: Rows) -> Metric:
    """A counter family (``name`` without ``_total``) with one sample per ``(labels, value)``."""
    return _family(CounterMetricFamily, name, documentation, labels, rows)


def gauge(name: str, documentation: str, labels: Sequence[str], rows: Rows) -> Metric:
    """A gauge family with one sample per ``(label values, value)`` row."""
    return _family(GaugeMetricFamily, name, documentation, labels, rows)


class _StaticCollector:
    """Families that never change while the daemon runs (build info, certificate expiry)."""

    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


class DaemonMetrics:
    """Everything one daemon exports.

    ``registry`` (never prometheus_client's global one) holds what is safe to
    collect from any thread: the process collector, the static families and
    prometheus_client's own metric objects (histograms; they lock).  ``sampled``
    holds the daemon's collectors, which read reactor-side state.
    """

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.sampled: list[Sampled] = []

    def add(self, source: Sampled) -> None:
        self.sampled.append(source)

    def sample(self) -> Callable[[], list[Metric]]:
        """On the reactor: sample every collector; the result builds all families (any thread)."""
        builds = [source.sample() for source in self.sampled]

        def build() -> list[Metric]:
            families = list(self.registry.collect())
            for one in builds:
                families.extend(one())
            return families

        return build

    def collect(self) -> list[Metric]:
        """Everything at once, on this thread (tests; ``generate_latest(metrics)``)."""
        return self.sample()()


def daemon_registry(daemon: str, identity: TLSIdentity | None) -> DaemonMetrics:
    """A fresh registry for one daemon: process metrics, build info, certificate expiry."""
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    families = [
        gauge(
            "decnet_build_info",
            "The DECNET daemon and version (always 1)",
            ["daemon", "version"],
            [([daemon, __version__], 1)],
        )
    ]
    if identity is not None:
        families.append(certificate_expiry(identity.identity.role or daemon, identity.cert))
    registry.register(_StaticCollector(families))
    return DaemonMetrics(registry)


class Snapshot:
    """Families already built, for the text encoder (it only calls ``collect``)."""

    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def encode(build: Callable[[], list[Metric]]) -> bytes:
    """The text exposition of what ``build`` makes (run in the thread pool)."""
    return generate_latest(Snapshot(build()))


# -- serving -------------------------------------------------------------------


class MetricsResource(Resource):
    """``GET /metrics``: sample on the reactor, build and encode in a thread, answer."""

    isLeaf = True
    log = Logger()

    def __init__(self, metrics: DaemonMetrics, run: Runner):
        super().__init__()
        self.metrics = metrics
        self.run = run

    def render_GET(self, request: server.Request) -> int | bytes:
        if request.postpath not in ([], [b""]):
            request.setResponseCode(404)
            return b"not found: metrics are at /metrics\n"
        try:
            build = self.metrics.sample()
        except Exception:
            self.log.failure("Collecting metrics failed")
            request.setResponseCode(500)
            return b"collecting metrics failed (see the daemon's log)\n"
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        d = self.run(encode, build)
        d.addCallbacks(
            self._encoded,
            self._failed,
            callbackArgs=(request, gone),
            errbackArgs=(request, gone),
        )
        d.addErrback(lambda failure: self.log.failure("Answering a scrape failed", failure))
        return server.NOT_DONE_YET

    def _encoded(self, body: bytes, request: server.Request, gone: list[bool]) -> None:
        if gone:
            return  # the scraper hung up meanwhile
        request.setHeader(b"content-type", CONTENT_TYPE)
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-length", b"%d" % len(body))
        request.write(body)
        request.finish()

    def _failed(self, failure: Failure, request: server.Request, gone: list[bool]) -> None:
        self.log.failure("Encoding metrics failed", failure)
        if gone:
            return
        request.setResponseCode(500)
        request.write(b"encoding metrics failed (see the daemon's log)\n")
        request.finish()


class _Root(Resource):
    """Everything but ``/metrics`` is a plain 404 (nothing echoed back)."""

    def getChild(self, path: bytes, request: server.Request) -> Resource:
        return cast(Resource, notFound("Not Found", "Metrics are at /metrics."))


def metrics_site(
    metrics: DaemonMetrics, run: Runner, reactor: IReactorTime | None = None
) -> server.Site:
    """The HTTP site: ``/metrics`` and 404 for everything else; no request bodies."""
    root = _Root()
    root.putChild(METRICS_PATH, MetricsResource(metrics, run))
    return make_site(root, limits=NO_BODY, timeout=SCRAPE_IDLE_TIMEOUT, reactor=reactor)


class MetricsService(PortService):
    """Serves ``registry`` on ``description``; a failed bind stops the daemon like any port."""

    def __init__(
        self,
        reactor: IDecnetReactor,
        description: str,
        metrics: DaemonMetrics,
        run: Runner,
        *,
        port_file: str | None = None,
    ):
        super().__init__(
            reactor,
            description,
            metrics_site(metrics, run, reactor),
            port_file=port_file,
            label="Prometheus scrapes",
        )
        self.metrics = metrics

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        host = getattr(self.port.getHost() if self.port else None, "host", None)
        if host is not None and not _is_loopback(host):
            self.log.warn(
                "Metrics on {endpoint} are reachable beyond this host, without "
                "authentication; bind them to 127.0.0.1 unless a firewall covers the port",
                endpoint=self.description,
            )


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def attach_metrics(
    parent: IServiceCollection,
    reactor: object,
    options: Any,
    registry_for: Callable[[], DaemonMetrics],
) -> MetricsService | None:
    """From a tap's options: a :class:`MetricsService` under ``parent``, or ``None`` when off.

    ``reactor`` is the global one (a tap's): it provides every interface used here.
    """
    if not options["metrics"]:
        return None
    typed = cast(IDecnetReactor, reactor)
    service = MetricsService(
        typed,
        options["metrics"],
        registry_for(),
        pool_runner(typed),
        port_file=options["metrics-port-file"],
    )
    service.setServiceParent(parent)
    return service
