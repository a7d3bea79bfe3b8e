"""Before anything runs: the master and the workers' identities (blocking, thread pool).

``sandbox up`` goes through the same operator steps as a real deployment:
``decnet-admin init`` (master host 127.0.0.1) and, per worker,
``decnet-admin enroll w<i> --address 127.0.<net>.<i> --updater``.  On a second
``up`` in the same directory the CA, the registry and the bundles are reused:
nothing is issued again.  A decommissioned worker stays decommissioned (a name
is never reused) and is left out.
"""

from __future__ import annotations

from pathlib import Path

import attrs

from decnet import config, pki
from decnet.errors import DecnetError, SandboxError, UnknownHost
from decnet.fsutil import ensure_private_dir
from decnet.master import enrollment
from decnet.master.registry import Host, Registry
from decnet.sandbox.layout import SandboxLayout, WorkerLayout
from decnet.tls import TLSIdentity


@attrs.frozen
class WorkerPlan:
    layout: WorkerLayout
    host: Host
    action: str  # "enrolled", "reused" or "decommissioned"

    @property
    def active(self) -> bool:
        return self.action != "decommissioned"


@attrs.frozen
class Prepared:
    created: bool  # the CA was made just now
    master_home: Path
    ca_fingerprint: str
    identity: TLSIdentity
    workers: tuple[WorkerPlan, ...]
    others: tuple[str, ...]  # enrolled hosts beyond --workers, not started


def prepare(layout: SandboxLayout, workers: int, net: int) -> Prepared:
    """``init`` the master and enroll ``w1..wN`` where needed (idempotent)."""
    ensure_private_dir(layout.root)
    for directory in (layout.logs_dir, layout.cache_dir, layout.workers_dir):
        ensure_private_dir(directory)
    paths = layout.master
    created = not paths.ca_cert.exists()
    master = enrollment.init_master(paths, master_host=config.SANDBOX_MASTER_HOST)
    registry = Registry(paths.registry)
    plans = []
    for index in range(1, workers + 1):
        worker = layout.worker(index, net)
        plans.append(_worker(master, registry, worker))
    wanted = {p.layout.name for p in plans}
    others = tuple(h.name for h in registry.list() if h.name not in wanted)
    return Prepared(
        created=created,
        master_home=paths.home,
        ca_fingerprint=master.ca.fingerprint,
        identity=TLSIdentity.master(paths),
        workers=tuple(plans),
        others=others,
    )


def _worker(master, registry: Registry, worker: WorkerLayout) -> WorkerPlan:
    try:
        host = registry.get(worker.name)
    except UnknownHost:
        host = None
    if host is None:
        if worker.bundle.exists() and any(worker.bundle.iterdir()):
            raise SandboxError(
                f"{worker.bundle} exists but {worker.name} is not in the registry "
                f"({master.paths.registry}); remove {worker.root} or use a new --dir"
            )
        ensure_private_dir(worker.root)
        result = enrollment.enroll(
            master,
            worker.name,
            worker.address,
            worker.bundle,
            updater=True,
            master_host=config.SANDBOX_MASTER_HOST,
            registry=registry,
        )
        return WorkerPlan(worker, result.host, "enrolled")
    if host.decommissioned:
        return WorkerPlan(worker, host, "decommissioned")
    problems = []
    if host.address != worker.address:
        problems.append(
            f"{worker.name} was enrolled with address {host.address}, this sandbox would give it "
            f"{worker.address} (was --net changed?); use the same --net or a new --dir"
        )
    if not host.has_updater:
        problems.append(f"{worker.name} was enrolled without an updater certificate")
    try:
        pki.WorkerBundle.load(worker.bundle)
    except DecnetError as exc:
        problems.append(f"the bundle of {worker.name} is unusable: {exc}")
    if problems:
        raise SandboxError("; ".join(problems))
    return WorkerPlan(worker, host, "reused")
