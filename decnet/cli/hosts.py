"""``decnet-admin init / enroll / hosts / decommission``."""

from __future__ import annotations

import argparse

from decnet import config, pki
from decnet.cli import output
from decnet.cli.arguments import command, examples, flag, json_flag, listener_address
from decnet.master import enrollment
from decnet.master.registry import Registry


def register(sub, parents) -> None:
    p = command(
        sub,
        parents,
        "init",
        cmd_init,
        summary="create the CA and the master identity (idempotent)",
        description="Create the private CA and the master identity under --home. Running it "
        "again keeps both and only updates --master-host.",
    )
    p.add_argument(
        "--master-host",
        default="127.0.0.1",
        help="address workers use to reach this master's log listener (default: %(default)s)",
    )
    _san_option(p, "extra DNS name or IP for the master certificate (repeatable)")
    p.add_argument("--key-type", choices=pki.KEY_TYPES, default=pki.DEFAULT_KEY_TYPE)

    p = command(
        sub,
        parents,
        "enroll",
        cmd_enroll,
        summary="issue a worker's certificates and write its bundle",
        description="Issue the worker certificate (and with --updater the updater certificate), "
        "record their fingerprints in the registry and write the worker bundle to --out. "
        "Copy that directory to the worker; the master keeps no private key.",
    )
    p.add_argument("name", help="worker host name (a-z, 0-9, '.', '-'; max 63)")
    p.add_argument("--address", required=True, help="IP or DNS name the master uses to reach it")
    _san_option(p, "extra DNS name or IP for the worker certificate (repeatable)")
    flag(p, "--updater", "also issue the updater certificate")
    p.add_argument("--agent-port", type=int, default=config.AGENT_PORT)
    p.add_argument("--updater-port", type=int, default=config.UPDATER_PORT)
    p.add_argument(
        "--syslog-port",
        type=int,
        default=None,
        help="master log listener port "
        f"(default: ${config.ENV_SYSLOG_PORT} or {config.SYSLOG_PORT})",
    )
    p.add_argument("--master-host", default=None, help="override the master address from init")
    p.add_argument("--key-type", choices=pki.KEY_TYPES, default=pki.DEFAULT_KEY_TYPE)
    p.add_argument(
        "--validity-days",
        type=int,
        default=config.LEAF_VALIDITY_DAYS,
        help="certificate lifetime in days (default: %(default)s)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="new directory for the bundle")
    p.add_argument(
        "--listener",
        action="append",
        type=listener_address,
        default=None,
        metavar="HOST:PORT",
        help="a log listener the worker may ship to (repeatable, in order; default: the list "
        "of `decnet-admin listeners`, else the master's own listener)",
    )
    examples(
        p,
        "decnet-admin enroll web-01 --address 10.0.1.7 --updater --out ./web-01",
        "decnet-admin enroll web-02 --address 10.0.1.8 --out ./web-02 \\",
        "    --listener 10.0.0.5:6514 --listener 10.0.0.6:6514",
    )

    p = command(
        sub,
        parents,
        "hosts",
        cmd_hosts,
        summary="list enrolled hosts",
        description="List every enrolled host with its status and certificate fingerprints.",
    )
    json_flag(p)

    p = command(
        sub,
        parents,
        "decommission",
        cmd_decommission,
        summary="retire a host and revoke its certificates",
        description="Mark NAME decommissioned and add its worker and updater certificates to "
        "the revocation list (the log listener refuses them from then on, and decnet-admin "
        "never contacts the host again). Running it again for a decommissioned host "
        "re-asserts its revocation entries and restores any that are missing.",
    )
    p.add_argument("name")


def _san_option(parser: argparse.ArgumentParser, text: str) -> None:
    parser.add_argument("--san", action="append", default=[], metavar="ADDR", help=text)


def cmd_init(args: argparse.Namespace) -> int:
    state = enrollment.init_master(
        args.paths, master_host=args.master_host, addresses=args.san, key_type=args.key_type
    )
    paths = state.paths
    output.line(f"DECNET master initialised in {paths.home}")
    output.line(f"  CA certificate      {paths.ca_cert}")
    output.line(f"  CA fingerprint      {pki.colon_fingerprint(state.ca.fingerprint)}")
    output.line(f"  master certificate  {paths.master_cert}")
    output.line(f"  master fingerprint  {pki.colon_fingerprint(state.master_cert_fingerprint)}")
    output.line(f"  listener identity   {paths.listener_dir}  (all the log listener reads)")
    output.line(f"  listener fingerprint {pki.colon_fingerprint(state.listener_cert_fingerprint)}")
    output.line(f"  registry            {paths.registry}")
    output.line(f"  master host         {state.master_host}")
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
    options["listeners"] = options.pop("listener")
    result = enrollment.enroll(master, args.name, args.address, args.out, sans=args.san, **options)
    host = result.host
    output.line(f"Enrolled {host.name} ({host.address}); bundle written to {result.bundle_dir}")
    output.line(f"  worker fingerprint   {pki.colon_fingerprint(host.worker_fingerprint)}")
    if host.updater_fingerprint:
        output.line(f"  updater fingerprint  {pki.colon_fingerprint(host.updater_fingerprint)}")
    listed = pki.WorkerBundle.load(result.bundle_dir).listeners
    output.line(f"  listeners            {', '.join(pki.format_listener(*x) for x in listed)}")
    output.line("Copy the bundle directory to the worker (it holds private keys: keep it 0700).")
    return 0


def cmd_hosts(args: argparse.Namespace) -> int:
    hosts = Registry(args.paths.registry).list() if args.paths.registry.exists() else []
    if args.json:
        output.print_json([h.as_dict() for h in hosts])
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
        )
        for h in hosts
    ]
    headers = ("NAME", "ADDRESS", "STATUS", "WORKER FP", "UPDATER FP", "UPDATER", "ENROLLED")
    output.print_table(headers, rows)
    return 0


def cmd_decommission(args: argparse.Namespace) -> int:
    master = enrollment.load_master(args.paths)
    done = enrollment.decommission(master, args.name)
    host = done.host
    if not done.already:
        output.line(
            f"Decommissioned {host.name} at {host.revoked_at}; its certificates are revoked"
        )
    elif done.restored:
        output.line(
            f"{host.name} was already decommissioned at {host.revoked_at}; "
            f"restored {len(done.restored)} missing revocation "
            f"{'entry' if len(done.restored) == 1 else 'entries'}:"
        )
        for entry in done.restored:
            output.line(
                f"  {entry['role']:<8} {entry['cn']}  {output.short_fp(entry['fingerprint'])}"
            )
    else:
        output.line(
            f"{host.name} was already decommissioned at {host.revoked_at}; "
            f"its {len(done.entries)} revocation "
            f"{'entry is' if len(done.entries) == 1 else 'entries are'} in place"
        )
    output.line(f"  revocation list  {args.paths.revocations}")
    return 0
