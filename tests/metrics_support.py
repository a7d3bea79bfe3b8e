"""Scraping ``/metrics`` in tests and reading it with prometheus_client's own parser."""

from __future__ import annotations

import contextlib
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.support import wait_for


class Scrape:
    """One parsed scrape: every sample by name, and the family names."""

    def __init__(self, text: str):
        self.text = text
        self.families = list(text_string_to_metric_families(text))
        self.samples = [s for family in self.families for s in family.samples]

    @property
    def names(self) -> set[str]:
        """Every name a query could use: family and sample names, ``_total`` of every counter
        (one with no sample yet included), ``_bucket``/``_sum``/``_count`` of histograms."""
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
        return (
            {f.name for f in self.families}
            | {s.name for s in self.samples}
            | {f.name + end for f in self.families for end in suffixes.get(f.type, ())}
        )

    def value(self, name: str, **labels: str) -> float:
        """The one sample called ``name`` whose labels include ``labels``."""
        found = [
            s.value
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]
        assert len(found) == 1, f"{name} {labels}: {len(found)} samples\n{self.text}"
        return found[0]

    def get(self, name: str, **labels: str) -> float | None:
        """Like :meth:`value`, ``None`` when there is no such sample (yet)."""
        found = [
            s.value
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]
        return found[0] if len(found) == 1 else None

    def labels_of(self, name: str, label: str) -> set[str]:
        return {s.labels[label] for s in self.samples if s.name == name}


def scrape_url(url: str, timeout: float = 10.0) -> Scrape:
    """``GET url`` (blocking: for subprocess tests, never inside the reactor)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback
        assert response.status == 200
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        return Scrape(response.read().decode())


def port_from(path: Path, proc=None) -> int:
    """The port a daemon wrote to ``path`` once bound (fails if the daemon died)."""

    def bound():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"daemon exited: {proc.stderr.read().decode()[-2000:]}")
        return path.exists() and path.read_text().strip()

    return int(wait_for(bound, what=f"a port in {path}"))


def metrics_args(tmp_path: Path, name: str) -> tuple[list[str], Path]:
    """``--metrics tcp:0`` on loopback with a port file; (argv, port file)."""
    port_file = tmp_path / f"metrics-port-{name}"
    return [
        "--metrics",
        "tcp:0:interface=127.0.0.1",
        "--metrics-port-file",
        str(port_file),
    ], port_file


def render(registry) -> Scrape:
    """What a scrape of ``registry`` would answer, encoded and parsed like Prometheus does."""
    from prometheus_client.exposition import generate_latest

    return Scrape(generate_latest(registry).decode())


async def scrape_port(port: int, path: str = "/metrics") -> tuple[int, bytes, dict]:
    """``GET http://127.0.0.1:port/path`` in the running reactor: (status, body, headers)."""
    import treq

    response = await treq.get(f"http://127.0.0.1:{port}{path}", persistent=False)
    body = await treq.content(response)
    headers = {k.decode().lower(): v[0].decode() for k, v in response.headers.getAllRawHeaders()}
    return response.code, body, headers


async def scrape_running(port: int) -> Scrape:
    status, body, headers = await scrape_port(port)
    assert status == 200, body
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    return Scrape(body.decode())


async def scrape_until(port: int, check, what: str, timeout: float = 20.0) -> Scrape:
    """Scrape ``port`` until ``check(scrape)`` holds; the scrape that satisfied it."""
    from twisted.internet import reactor, task

    deadline = reactor.seconds() + timeout
    while True:
        scrape = await scrape_running(port)
        if check(scrape):
            return scrape
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last scrape:\n{scrape.text}")
        await task.deferLater(reactor, 0.05, lambda: None)


def build_daemon(tap, *argv: str):
    """A daemon's service tree through its own tap, with ``--metrics`` on a loopback port 0."""
    options = tap.Options()
    options.parseOptions([*argv, "--metrics", "tcp:0:interface=127.0.0.1"])
    return tap.makeService(options)


def metrics_port(service) -> int:
    """The port the service tree's :class:`~decnet.metrics.MetricsService` is bound to."""
    from decnet.metrics import MetricsService

    (metrics,) = [s for s in service if isinstance(s, MetricsService)]
    assert metrics.port is not None
    return metrics.port.getHost().port


LOCAL = "tcp:0:interface=127.0.0.1"


def daemon_argv(daemon: str, tmp: Path, *, bundle: Path | None = None, home=None) -> list[str]:
    """Arguments that run ``daemon`` on loopback with its state under ``tmp``.

    The forwarder's master port is closed (nothing listens there).
    """
    from tests.support import free_port

    if daemon == "listener":
        return ["--home", str(home), "--ingest-dir", str(tmp / "ingest"), "--listen", LOCAL]
    if daemon == "forwarder":
        return [
            *("--bundle", str(bundle), "--log-file", str(tmp / "decnet.log")),
            *("--state", str(tmp / "fw.sqlite"), "--master-host", "127.0.0.1"),
            *("--master-port", str(free_port()), "--poll-interval", "0.1"),
            *("--max-retry-delay", "0.5"),
        ]
    if daemon == "agent":
        return [
            *("--bundle", str(bundle), "--listen", LOCAL),
            *("--state-dir", str(tmp / "state"), "--log-file", str(tmp / "agent.log")),
        ]
    return [
        *("--bundle", str(bundle), "--listen", LOCAL),
        *("--install-dir", str(tmp / "install"), "--agent-control", "spawn"),
    ]


def build_named(daemon: str, tmp: Path, **where):
    """``daemon``'s service tree through its tap, on loopback, with ``--metrics``."""
    import importlib

    tap = importlib.import_module(f"decnet.{daemon}.tap")
    return build_daemon(tap, *daemon_argv(daemon, tmp, **where))


@contextlib.asynccontextmanager
async def serving(service):
    """Start ``service`` (a daemon's tree), yield its metrics port, stop it at the end."""
    service.startService()
    try:
        yield metrics_port(service)
    finally:
        await service.stopService()
