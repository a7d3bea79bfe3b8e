"""What ``decnet-admin sandbox`` shows a person: every sandbox report object as lines or JSON.

The sandbox (:mod:`decnet.sandbox`) computes and hands over data
(:mod:`decnet.sandbox.report`, :class:`~decnet.sandbox.poke.PokeReport`);
this module alone decides how it reads.  :func:`lines` renders one progress
object (table-driven, :data:`RENDER`); :class:`SandboxConsole` writes them as
they come, through :mod:`decnet.cli.output`, the one escaping layer; the
``*_lines`` and ``*_json`` functions render the report a command ends with.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import attrs

from decnet import pki
from decnet.cli import output
from decnet.cli.sandbox_live import LiveLines, host_table, human_bytes
from decnet.sandbox import report as r
from decnet.sandbox.layout import short
from decnet.sandbox.poke import Outcome, PokeReport, PokeStarted
from decnet.sandbox.prepare import Prepared

ORPHANS = "`sandbox up` is gone but some of its processes still run: `decnet-admin sandbox down`."
PROCESS_HEADERS = ("PROCESS", "PID", "STATE", "ADDRESS", "LOG")


def elapsed(seconds: float) -> str:
    return f"{seconds:.1f}s"


def where(place: r.Where | None) -> str:
    """``host:port`` where a process listens, ``-> host:port`` where it sends."""
    if place is None:
        return ""
    return f"{'-> ' if place.forwards else ''}{place.host}:{place.port}"


# -- sandbox up ---------------------------------------------------------------------------


def _prepared(e: Prepared) -> list[str]:
    how = "created" if e.created else "reused"
    out = [
        f"  master   {short(e.master_home)}  CA {how}, fingerprint "
        f"{pki.colon_fingerprint(e.ca_fingerprint)[:23]}..."
    ]
    for w in e.workers:
        if w.active:
            out.append(
                f"  {w.layout.name:<8} {w.layout.address:<12} {w.action}, bundle "
                f"{short(w.layout.bundle)}"
            )
        else:
            out.append(f"  {w.layout.name:<8} decommissioned at {w.host.revoked_at}: left out")
    if e.others:
        out.append(f"  (also enrolled, not started: {', '.join(e.others)})")
    return out


def _daemon_started(e: r.DaemonStarted) -> list[str]:
    place = where(e.where) + (f" (agent :{e.agent_port})" if e.agent_port else "")
    return [f"  {e.name:<14} {place:<30} pid {e.pid}"]


def _wheelhouse_ready(e: r.WheelhouseReady) -> list[str]:
    how = e.how if e.seconds is None else f"{e.how} in {elapsed(e.seconds)}"
    return [f"  wheelhouse {short(e.path)} ({e.wheels} wheels, {how})"]


def deploy_summary(worker: str, spec: dict, result: dict) -> list[str]:
    """Lines describing what a deploy started on ``worker``: decky, address, services."""
    lines = []
    for i, decky in enumerate(spec["deckies"]):
        services = []
        for s in decky["services"]:
            name = s.get("name", s["type"])
            state = result.get("deckies", {}).get(decky["name"], {}).get(name, {}).get("state")
            mark = "" if state == "listening" else f" ({output.printable(str(state or '?'), 40)})"
            services.append(f"{name}:{s['port']}{mark}")
        head = worker if i == 0 else ""
        lines.append(
            f"  {head:<4}{decky['name']:<10} {decky['services'][0]['bind']:<13} "
            + " ".join(services)
        )
    return lines


def _deploy_done(e: r.DeployDone) -> list[str]:
    if not e.failed:
        return [f"  all {e.total} services listening"]
    return [
        f"  {len(e.failed)} of {e.total} services failed to start:",
        *(f"    {problem}" for problem in e.failed),
    ]


def admin_command(argv0: str | None = None) -> str:
    """The script as this shell can run it (``.venv/bin/decnet-admin`` under make)."""
    script = Path(sys.argv[0] if argv0 is None else argv0)
    return short(script.absolute()) if script.name == "decnet-admin" else "decnet-admin"


def _ready(e: r.Ready) -> list[str]:
    return [
        "",
        f"Ready in {elapsed(e.seconds)}: {e.workers} workers, "
        f"listener on 127.0.0.1:{e.listener_port}, logs in {short(e.logs_dir)}/",
        f"Play the attacker from another terminal:  {admin_command()} sandbox poke --dir "
        f"{short(e.root)}",
        "Ctrl-C stops every process this command started.",
        "",
    ]


# -- sandbox down and poke (progress) -------------------------------------------------------


def _outcome(o: Outcome) -> list[str]:
    t = o.target
    place = f"{t.address}:{t.port}"
    mark = "" if o.ok else "FAILED "
    return [f"  {t.worker:<4} {t.decky:<9} {t.service:<10} {place:<16} {mark}{o.did}"]


def _poke_started(e: PokeStarted) -> list[str]:
    return [
        f"Poking {e.services} services on {e.deckies} deckies of "
        f"{len(e.workers)} workers ({', '.join(e.workers)}) ..."
    ]


RENDER: dict[type, Callable[[Any], list[str]]] = {
    # sandbox up
    r.Preparing: lambda e: [f"DECNET sandbox in {short(e.root)}"],
    Prepared: _prepared,
    r.DaemonsStarting: lambda e: [
        f"Starting the daemons (real twistd processes, logs in {short(e.logs_dir)}/):"
    ],
    r.DaemonStarted: _daemon_started,
    r.ReleaseStarting: lambda e: [
        "Release of this checkout (the same path as `decnet-admin update --all`):"
    ],
    r.WheelhouseBuilding: lambda e: [
        "  building the offline wheelhouse from this environment with pip "
        "(first run only; pip may use its index or cache) ..."
    ],
    r.WheelhouseReady: _wheelhouse_ready,
    r.ReleaseBuilt: lambda e: [f"  release {e.release}: {e.files} files, {human_bytes(e.size)}"],
    r.AlreadyCurrent: lambda e: [
        f"  [{e.worker}] release {e.release} already installed and current"
    ],
    r.RolloutProgress: lambda e: [f"  [{e.host}] {e.message}"],
    r.StillInstalling: lambda e: [
        f"  ... installing on {', '.join(e.workers)} ({elapsed(e.seconds)}; pip, offline)"
    ],
    r.DeployStarting: lambda e: [
        "Deckies (deployed through each agent's mTLS API; every listener bound):"
    ],
    r.Deployed: lambda e: deploy_summary(e.worker, e.spec, e.result),
    r.DeployDone: _deploy_done,
    r.Ready: _ready,
    r.ChildExited: lambda e: [f"!! {e.name} {e.how}: {e.words}", f"!! (its log: {short(e.log)})"],
    r.Stopping: lambda e: ["", f"Stopping {e.count} processes ..."],
    r.Stopped: lambda e: [
        f"Stopped in {elapsed(e.seconds)}; everything is kept in {short(e.root)} "
        "(`sandbox up` starts it again)."
    ],
    # sandbox down
    r.UpAsked: lambda e: [f"Asked `sandbox up` (pid {e.pid}) to stop its processes; waiting ..."],
    r.UpKilled: lambda e: [
        f"`sandbox up` (pid {e.pid}) did not stop in {e.timeout:g}s; killing it"
    ],
    r.LeftoversStopping: lambda e: [
        f"Stopping {len(e.names)} leftover processes: {', '.join(e.names)}"
    ],
    r.LeftoverKilled: lambda e: [f"  {e.name} (pid {e.pid}) ignored SIGTERM; killed"],
    # sandbox poke
    PokeStarted: _poke_started,
    Outcome: _outcome,
}


def lines(event: object) -> list[str]:
    """The lines one progress object reads as (an item may be a whole table)."""
    return RENDER[type(event)](event)


class SandboxConsole:
    """Where the sandbox talks to its operator: whole lines, escaped, flushed at once.

    ``show`` is the sandbox's ``report`` callable.  A terminal that went away (a
    closed pipe, a hung-up tty) must not keep ``up`` from stopping its children:
    output errors switch the console off.
    """

    def __init__(self, stream: IO[str] | None = None):
        self.stream = stream  # None: sys.stdout at the time of writing
        self.broken = False
        self.live = LiveLines()

    def _write(self, write: Callable[[str, IO[str]], None], text: str) -> None:
        if self.broken:
            return
        try:
            write(text, self.stream or sys.stdout)
        except (OSError, ValueError):
            self.broken = True

    def line(self, text: str = "") -> None:
        """One line; a newline in it (worker-supplied text) is escaped, never obeyed."""
        self._write(output.line, text)

    def show(self, event: object) -> None:
        if isinstance(event, r.HostTable):
            # A table from output.table: several lines, every cell already escaped.
            for block in self.live.table(event):
                self._write(output.text, block)
            return
        shown = self.live.events(event) if isinstance(event, r.FeedEvents) else lines(event)
        for text in shown:
            self.line(text)


# -- the reports commands end with -------------------------------------------------------


def status_lines(report: r.StatusReport) -> list[str]:
    """``sandbox status``: the processes, the hosts, and what to do about orphans."""
    if not report.found:
        return [f"No sandbox in {report.root} (start one with `decnet-admin sandbox up`)."]
    out = [f"Sandbox in {report.root}: {report.phase or '?'}"]
    if not report.processes:
        return [*out, "  nothing runs (start it with `decnet-admin sandbox up`)."]
    table = [
        (p.name, p.pid, "running" if p.running else "GONE", where(p.where), p.log or "")
        for p in report.processes
    ]
    out.append(output.table(PROCESS_HEADERS, table))
    if report.hosts:
        out += ["", host_table(report.hosts)]
    if report.orphaned:
        out += ["", ORPHANS]
    return out


def status_json(report: r.StatusReport) -> dict:
    if not report.found:
        return {"dir": str(report.root), "healthy": False, "processes": []}
    return {
        "dir": str(report.root),
        "phase": report.phase,
        "healthy": report.healthy,
        "listener": report.listener,
        "release": report.release,
        "processes": [
            {"name": p.name, "pid": p.pid, "running": p.running, "log": p.log}
            for p in report.processes
        ],
        "hosts": [attrs.asdict(h) for h in report.hosts],
    }


def down_lines(report: r.DownReport) -> list[str]:
    if not report.found:
        return [f"No sandbox in {report.root}; nothing to stop."]
    if report.still_running:
        return [f"Still running: {', '.join(report.still_running)}"]
    return ["Nothing of the sandbox runs any more."]


def poke_lines(report: PokeReport) -> list[str]:
    """How many conversations were done, and which did not arrive or arrived as another."""
    done = len(report.outcomes) - len(report.failed)
    out = [f"{done} of {len(report.outcomes)} conversations done in {report.seconds:.1f}s."]
    if report.wait > 0 and report.seconds_to_master is not None and not report.misattributed:
        out.append(
            f"All {len(report.found)} reached the master "
            f"{report.seconds_to_master:.2f}s after the last one ended, each recorded under "
            "the worker it was sent to (source_worker, from its certificate)."
        )
    for o in report.missing:
        out.append(
            f"  not at the master after {report.wait:g}s: {o.target.label} (src port {o.src_port})"
        )
    for o, got in report.misattributed:
        out.append(f"  WRONG WORKER: {o.target.label} arrived as {got}")
    return out


def poke_json(report: PokeReport) -> dict:
    to_master = report.seconds_to_master
    return {
        "conversations": [
            {**o.as_dict(), "arrived_as": report.found.get(o.key())} for o in report.outcomes
        ],
        "seconds": round(report.seconds, 3),
        "seconds_to_master": None if to_master is None else round(to_master, 3),
        "missing": [o.target.label for o in report.missing],
        "misattributed": [[o.target.label, got] for o, got in report.misattributed],
    }
