"""``decnet-admin init / enroll / hosts / decommission``."""

from __future__ import annotations

import argparse
import time

from decnet import config, pki
from decnet.cli import fleet, output
from decnet.cli.arguments import (
    command,
    duration,
    flag,
    json_flag,
    listener_address,
    timeout_option,
)
from decnet.cli.decommission import DECOMMISSION_EXAMPLES, TEARDOWN_TIMEOUT, cmd_decommission
from decnet.cli.expiry import expires_cell, expiry_fields
from decnet.errors import ValidationError
from decnet.master import enroll_tokens, enrollment, retire
from decnet.master.registry import Registry

ENROLL_EXAMPLES = [
    "decnet-admin enroll web-01 --address 10.0.0.5 --updater --token",
    "decnet-admin enroll web-01 --address 10.0.0.5 --token --token-ttl 1h --json",
    "decnet-admin enroll dmz-07 --address 192.0.2.7 --updater --out /media/usb/dmz-07",
    "decnet-admin enroll web-02 --address 10.0.1.8 --out ./web-02 --listener 10.0.0.5:6514 "
    "--listener 10.0.0.6:6514",
]


def register(sub, parents) -> None:
    p = command(
        sub,
        parents,
        "init",
        cmd_init,
        summary="create the CA and the master identity (idempotent)",
        description="Create the private CA and the master identity under --home. Running it "
        "again keeps both and the stored master address; --master-host changes that address "
        "(printed as old -> new) for bundles enrolled from then on.",
        examples=[
            "decnet-admin --home /var/lib/decnet-master init --master-host 10.0.0.1",
            "decnet-admin init --master-host master.example --san 10.0.0.1",
            "decnet-admin init        # again: keeps the CA, identities and master address",
        ],
        needs_home=False,
    )
    p.add_argument(
        "--master-host",
        default=None,
        help="address workers use to reach this master's log listener (default: the one "
        "stored by an earlier init, else 127.0.0.1)",
    )
    _san_option(p, "extra DNS name or IP for the master certificate (repeatable)")
    _key_type_option(p, "key type of the CA and master identities made now (existing keys stay)")
    json_flag(p)

    p = command(
        sub,
        parents,
        "enroll",
        cmd_enroll,
        summary="enroll a worker: a one-time token (--token) or an offline bundle (--out)",
        description="With --token: record a one-time enrollment token for NAME and print it "
        "with the CA fingerprint; on the worker, `decnet-worker join` makes the keys there and "
        "sends CSRs to `twistd decnet-enroll` (the master never holds the worker's keys). "
        "With --out (air-gapped hosts): issue the worker certificate (and with --updater the "
        "updater certificate), record their fingerprints in the registry and write the worker "
        "bundle, keys included, to DIR; copy it to the worker. With --token, run the printed "
        "`decnet-worker join` line on the worker while `twistd decnet-enroll` runs on the "
        "master (docs/SWARM-Mode.md).",
        examples=ENROLL_EXAMPLES,
    )
    p.add_argument("name", help="worker host name (a-z, 0-9, '.', '-'; max 63)")
    p.add_argument("--address", required=True, help="IP or DNS name the master uses to reach it")
    _san_option(p, "extra DNS name or IP for the worker certificate (repeatable)")
    flag(p, "--updater", "also issue the updater certificate")
    p.add_argument(
        "--agent-port",
        type=int,
        default=config.AGENT_PORT,
        help="port of the worker's agent API, recorded in the registry and the bundle "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--updater-port",
        type=int,
        default=config.UPDATER_PORT,
        help="port of the worker's updater API (default: %(default)s)",
    )
    p.add_argument(
        "--syslog-port",
        type=int,
        default=None,
        help="master log listener port "
        f"(default: ${config.ENV_SYSLOG_PORT} or {config.SYSLOG_PORT})",
    )
    p.add_argument("--master-host", default=None, help="override the master address from init")
    p.add_argument(
        "--key-type",
        choices=pki.KEY_TYPES,
        default=pki.DEFAULT_KEY_TYPE,
        help="key type of an --out bundle (default: %(default)s; with --token the worker chooses)",
    )
    p.add_argument(
        "--validity-days",
        type=int,
        default=config.LEAF_VALIDITY_DAYS,
        help="certificate lifetime in days (default: %(default)s)",
    )
    how = p.add_mutually_exclusive_group(required=True)
    flag(how, "--token", "print a one-time enrollment token for `decnet-worker join`")
    how.add_argument("--out", metavar="DIR", help="new directory for an offline bundle")
    p.add_argument(
        "--token-ttl",
        type=enroll_tokens.parse_ttl,
        default=enroll_tokens.DEFAULT_TTL,
        metavar="DURATION",
        help="how long the token may be used: 15m, 900s, 2h, 1d (default: 15m)",
    )
    p.add_argument(
        "--enroll-port",
        type=int,
        default=config.ENROLL_PORT,
        help="port of twistd decnet-enroll shown in the join command (default: %(default)s)",
    )
    json_flag(p)
    p.add_argument(
        "--listener",
        action="append",
        type=listener_address,
        default=None,
        metavar="HOST:PORT",
        help="with --out: a log listener the worker may ship to (repeatable, in order; "
        "default: the list of `decnet-admin listeners`, else the master's own listener; "
        "token bundles always get that default)",
    )

    p = command(
        sub,
        parents,
        "hosts",
        cmd_hosts,
        summary="list enrolled hosts, when their logs were last seen and their log lag",
        description="List every enrolled host with its status, certificate fingerprints, "
        "and from the log listener's state (<ingest>/workers.json, no network): LAST SEEN "
        "(STALE when longer ago than --stale) and LOG LAG (bytes on the worker not yet "
        "durable on the master; unknown for plain RFC 5425 senders).",
        examples=HOSTS_EXAMPLES,
    )
    fleet.stale_option(p)
    json_flag(p)

    p = command(
        sub,
        parents,
        "decommission",
        cmd_decommission,
        summary="retire a host: tear down its deckies, stop its forwarder, revoke it",
        description="Ask for confirmation (--yes skips it), then, best effort, tear down "
        "NAME's deckies through its agent, wait until its forwarder has shipped what it read "
        "(the log listener's workers.json shows a log lag of 0; at most --drain-timeout) and "
        "stop the forwarder through NAME's updater (each outcome is reported; --no-teardown "
        "skips all three for a machine that is gone), then mark NAME decommissioned and add "
        "its worker and "
        "updater certificates to the revocation list (the log listener refuses them from then "
        "on, and decnet-admin never contacts the host again). Unused enrollment tokens for "
        "NAME are cancelled. Running it again for a decommissioned host re-asserts its "
        "revocation entries and restores any that are missing. A decommissioned name is never "
        "enrolled again.",
        examples=DECOMMISSION_EXAMPLES,
    )
    p.add_argument("name", help="the host to retire (see `decnet-admin hosts`)")
    flag(p, "--yes", "do not ask for confirmation (required when stdin is not a terminal)")
    flag(p, "--no-teardown", "only revoke: do not contact the worker first")
    json_flag(p)
    timeout_option(
        p,
        TEARDOWN_TIMEOUT,
        "seconds each request to the worker (the teardown, the forwarder stop) may take "
        "before going on and revoking anyway (default: %(default)s)",
    )
    p.add_argument(
        "--drain-timeout",
        type=duration,
        default=retire.DRAIN_TIMEOUT,
        metavar="DURATION",
        help="how long to wait for the forwarder to ship what it read before stopping it "
        "(10s, 1m; default: 10s)",
    )
    p.add_argument(
        "--ingest-dir",
        default=None,
        metavar="DIR",
        help="the log listener's ingest directory, where it keeps workers.json "
        "(default: <home>/ingest)",
    )


def _san_option(parser: argparse.ArgumentParser, text: str) -> None:
    parser.add_argument("--san", action="append", default=[], metavar="ADDR", help=text)


def _key_type_option(parser: argparse.ArgumentParser, text: str) -> None:
    parser.add_argument(
        "--key-type",
        choices=pki.KEY_TYPES,
        default=pki.DEFAULT_KEY_TYPE,
        help=f"{text}: {', '.join(pki.KEY_TYPES)} (default: %(default)s)",
    )


def cmd_init(args: argparse.Namespace) -> int:
    state = enrollment.init_master(
        args.paths, master_host=args.master_host, addresses=args.san, key_type=args.key_type
    )
    paths = state.paths
    previous = state.previous_master_host
    if args.json:
        output.print_json(
            {
                "home": str(paths.home),
                "ca_certificate": str(paths.ca_cert),
                "ca_fingerprint": state.ca.fingerprint,
                "master_certificate": str(paths.master_cert),
                "master_fingerprint": state.master_cert_fingerprint,
                "listener_dir": str(paths.listener_dir),
                "listener_fingerprint": state.listener_cert_fingerprint,
                "registry": str(paths.registry),
                "master_host": state.master_host,
                "previous_master_host": previous,
            }
        )
        return 0
    output.line(f"DECNET master initialised in {paths.home}")
    output.line(f"  CA certificate      {paths.ca_cert}")
    output.line(f"  CA fingerprint      {pki.colon_fingerprint(state.ca.fingerprint)}")
    output.line(f"  master certificate  {paths.master_cert}")
    output.line(f"  master fingerprint  {pki.colon_fingerprint(state.master_cert_fingerprint)}")
    output.line(f"  listener identity   {paths.listener_dir}  (all the log listener reads)")
    output.line(f"  listener fingerprint {pki.colon_fingerprint(state.listener_cert_fingerprint)}")
    output.line(f"  registry            {paths.registry}")
    output.line(f"  master host         {state.master_host}")
    if previous is not None and previous != state.master_host:
        output.line(
            f"Master host changed: {previous} -> {state.master_host} (bundles enrolled from "
            "now on use it; re-enroll, or pass --master-host to forwarders, for older ones)"
        )
    return 0


# The options of ``enroll`` passed to enrollment.enroll() under the same names.
_ENROLL_OPTIONS = (
    "updater",
    "agent_port",
    "updater_port",
    "syslog_port",
    "master_host",
    "key_type",
    "validity_days",
    "listener",
)


def cmd_enroll(args: argparse.Namespace) -> int:
    master = enrollment.load_master(args.paths)
    options = {name: getattr(args, name) for name in _ENROLL_OPTIONS}
    listeners = options.pop("listener")
    if args.token:
        if listeners:
            raise ValidationError(
                [
                    "--listener goes with --out; a token's bundle gets the master's list "
                    "(decnet-admin listeners add HOST:PORT first)"
                ]
            )
        del options["key_type"]
        issued = enroll_tokens.issue_token(
            master, args.name, args.address, sans=args.san, ttl=args.token_ttl, **options
        )
        _show_token(args, master, issued)
        return 0
    options["listeners"] = listeners
    result = enrollment.enroll(master, args.name, args.address, args.out, sans=args.san, **options)
    host = result.host
    if args.json:
        output.print_json({**host.as_dict(), "bundle": str(result.bundle_dir)})
        return 0
    output.line(f"Enrolled {host.name} ({host.address}); bundle written to {result.bundle_dir}")
    output.line(f"  worker fingerprint   {pki.colon_fingerprint(host.worker_fingerprint)}")
    if host.updater_fingerprint:
        output.line(f"  updater fingerprint  {pki.colon_fingerprint(host.updater_fingerprint)}")
    listed = pki.WorkerBundle.load(result.bundle_dir).listeners
    output.line(f"  listeners            {', '.join(pki.format_listener(*x) for x in listed)}")
    output.line("Copy the bundle directory to the worker (it holds private keys: keep it 0700).")
    return 0


def _show_token(
    args: argparse.Namespace, master: enrollment.MasterState, issued: enroll_tokens.IssuedToken
) -> None:
    fp = pki.colon_fingerprint(issued.ca_fingerprint)
    where = args.master_host or master.master_host
    url = (
        f"https://{where}:{args.enroll_port}"
        if ":" not in where
        else f"https://[{where}]:{args.enroll_port}"
    )
    command_line = f"decnet-worker join {url} --token {issued.token} --ca-fingerprint {fp}"
    if args.json:
        output.print_json({**issued.as_dict(), "join_command": command_line})
        return
    output.line(
        f"Enrollment token for {issued.name} ({issued.address}), "
        f"usable once, until {issued.expires_at}:"
    )
    output.line(f"  token           {issued.token}")
    output.line(f"  CA fingerprint  {fp}")
    output.line("On the worker (with `twistd decnet-enroll` running on this master):")
    output.line(f"  {command_line}")


HOSTS_EXAMPLES = [
    "decnet-admin hosts   # the table",
    "decnet-admin hosts --stale 1m   # flag workers whose logs were not seen for a minute",
    'decnet-admin hosts --json   # one object per host, with its "logs"',
]
HOSTS_HEADERS = (
    "NAME",
    "ADDRESS",
    "STATUS",
    "WORKER FP",
    "UPDATER FP",
    "UPDATER",
    "ENROLLED",
    "LAST SEEN",
    "LOG LAG",
    "EXPIRES",
)


def cmd_hosts(args: argparse.Namespace) -> int:
    hosts = Registry(args.paths.registry).list() if args.paths.registry.exists() else []
    logs = fleet.log_healths(fleet.ingest_dir(args), [h.name for h in hosts], args.stale)
    now = time.time()
    if args.json:
        output.print_json(
            [
                {**h.as_dict(), **expiry_fields(h, now), "logs": logs[h.name].as_dict()}
                for h in hosts
            ]
        )
        return 0
    if not hosts:
        output.line("No hosts enrolled yet (use `decnet-admin enroll`).")
        return 0
    rows = [
        (
            h.name,
            h.address,
            h.status,
            output.short_fp(h.worker_fingerprint),
            output.short_fp(h.updater_fingerprint),
            "yes" if h.has_updater else "no",
            h.enrolled_at,
            "-" if h.decommissioned else fleet.last_seen(logs[h.name], now),
            "-" if h.decommissioned else fleet.log_lag(logs[h.name]),
            expires_cell(h, now),
        )
        for h in hosts
    ]
    output.print_table(HOSTS_HEADERS, rows)
    return 0
