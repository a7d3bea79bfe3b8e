"""A running worker in-process on real loopback sockets, for the renewal tests.

Agent, updater, forwarder and the master's listener are the real services with
real certificates; only the processes are shared (one reactor).  Their
identity watchers look at the bundle every 0.1 s instead of 2 s.
"""

from __future__ import annotations

import os

import attrs
from twisted.internet import reactor, task
from twisted.internet.utils import getProcessOutputAndValue

from decnet import config, pki
from decnet.agent.service import AgentService
from decnet.forwarder.service import ForwarderService
from decnet.listener.service import ListenerService
from decnet.master import enrollment
from decnet.master.http import client_for_host
from decnet.master.registry import Registry
from decnet.revocation import RevocationSet
from decnet.tls import TLSIdentity
from decnet.updater.service import LocalAgent, UpdaterService
from tests.logpipe_support import syslog_line
from tests.support import BIN, record_ports, started_agent, started_updater

FAST = 0.1


@attrs.define
class Worker:
    master: enrollment.MasterState
    name: str
    bundle: pki.WorkerBundle
    agent: AgentService
    updater: UpdaterService
    listener: ListenerService
    forwarder: ForwarderService
    log_file: object
    mirror: object
    written: bytearray = attrs.field(factory=bytearray)
    writer: task.LoopingCall | None = None
    probes: list = attrs.field(factory=list)
    prober: task.LoopingCall | None = None

    @property
    def registry(self) -> Registry:
        return Registry(self.master.paths.registry)

    def write_lines(self, count: int = 20) -> None:
        """Append ``count`` log lines (what the agent's decoys would log)."""
        start = self.written.count(b"\n")
        data = b"".join(syslog_line(i) + b"\n" for i in range(start, start + count))
        with open(self.log_file, "ab") as fh:
            fh.write(data)
        self.written += data

    def start_traffic(self) -> None:
        """Lines every 20 ms, and an agent health call with the master's pins every 50 ms."""
        self.writer = task.LoopingCall(self.write_lines)
        self.writer.start(0.02)
        self.prober = task.LoopingCall(self._probe)
        self.prober.start(0.05)

    async def stop_traffic(self) -> None:
        for loop in (self.writer, self.prober):
            if loop is not None and loop.running:
                loop.stop()

    async def _probe(self) -> None:
        result = await agent_health(self)
        self.probes.append(result)


async def agent_health(worker: Worker) -> str:
    """``ok`` or the error of one ``GET /health`` pinned the way the master pins now."""
    identity = TLSIdentity.master(worker.master.paths)
    host = worker.registry.get(worker.name)
    client = client_for_host(reactor, identity, host, config.ROLE_WORKER, timeout=5)
    try:
        await client.call("GET", "health")
        return "ok"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        await client.close()


async def start_worker(master: enrollment.MasterState, tmp_path, name: str) -> Worker:
    enrolled = enrollment.enroll(master, name, "127.0.0.1", tmp_path / "bundle", updater=True)
    bundle = pki.WorkerBundle.load(enrolled.bundle_dir)
    agent = await started_agent(
        enrolled.bundle_dir,
        tmp_path,
        reload_interval=FAST,
        state_dir=tmp_path / "agent-state",
        log_file=tmp_path / "agent.log",
    )
    agent_port = agent.port
    updater = await started_updater(
        enrolled.bundle_dir,
        tmp_path,
        LocalAgent(
            host="127.0.0.1",
            port=agent_port,
            control="spawn",
            state_dir=str(tmp_path / "agent-state"),
            log_file=str(tmp_path / "agent.log"),
        ),
        reload_interval=FAST,
    )
    updater_port = updater.port.getHost().port
    record_ports(master.paths, name, agent_port=agent_port, updater_port=updater_port)
    revocations = RevocationSet(master.paths.revocations)
    listener = ListenerService(
        reactor,
        identity=TLSIdentity.master(master.paths),
        revocations=revocations,
        ingest_dir=tmp_path / "ingest",
        listen="tcp:0:interface=127.0.0.1",
    )
    listener.watcher.interval = FAST
    listener.startService()
    log_file = tmp_path / "decnet.log"
    log_file.write_bytes(b"")
    forwarder = ForwarderService(
        reactor,
        identity=TLSIdentity.from_bundle(bundle, "worker"),
        master_host="127.0.0.1",
        master_port=listener.port_service.port.getHost().port,
        master_fingerprint=bundle.master_fingerprint,
        log_file=log_file,
        state_file=tmp_path / "forwarder.sqlite",
        poll_interval=0.05,
        max_retry_delay=0.3,
        bundle=bundle,
        reload_interval=FAST,
    )
    forwarder.startService()
    return Worker(
        master=master,
        name=name,
        bundle=bundle,
        agent=agent,
        updater=updater,
        listener=listener,
        forwarder=forwarder,
        log_file=log_file,
        mirror=tmp_path / "ingest" / name / "decnet.log",
    )


async def stop_worker(worker: Worker) -> None:
    await worker.stop_traffic()
    for service in (worker.forwarder, worker.listener, worker.updater, worker.agent):
        await service.stopService()


async def admin_async(master: enrollment.MasterState, *args: str) -> tuple[str, str, int]:
    """``decnet-admin --home HOME ARGS`` without blocking the reactor: (stdout, stderr, code)."""
    env = {k: v for k, v in os.environ.items() if k != config.ENV_HOME}
    out, err, code = await getProcessOutputAndValue(
        str(BIN / "decnet-admin"), ["--home", str(master.paths.home), *args], env=env
    )
    return out.decode(), err.decode(), code
