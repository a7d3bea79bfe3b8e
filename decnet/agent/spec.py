"""The deployment spec: which deckies a worker runs, validated completely before use.

Pure (no I/O).  :func:`parse_spec` either returns a :class:`DeploymentSpec`
with every default filled in, or raises :class:`ValidationError` listing
*every* problem, so an operator fixes a spec in one round trip.  The canonical
form (defaults applied, keys sorted) is what is persisted, reported by
``/status`` and hashed: two specs that mean the same thing have the same hash.

Format (``docs/Agent.md`` has the reference and an example)::

    {"format": "decnet-spec/1",            # optional
     "deckies": [
       {"name": "web-01",
        "services": [
          {"type": "ssh", "port": 22, "bind": "0.0.0.0", "version": "SSH-2.0-…"},
          {"type": "http", "port": 80, "server": "Apache/2.4.62 (Debian)"}]}]}
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from collections.abc import Callable, Mapping

import attrs

from decnet import config
from decnet.errors import ValidationError

FORMAT = "decnet-spec/1"
# Used with ``fullmatch`` only (``match`` + ``$`` would accept a trailing newline).
DECKY_NAME_RE = re.compile(r"[a-z0-9][a-z0-9.-]{0,62}")
SERVICE_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
_SCOPE_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")  # an interface name after '%' in IPv6
TEXT_MAX = 1024


# -- option validators: each returns a problem string or None ---------------


def _int_range(lo: int, hi: int) -> Callable[[object], str | None]:
    def check(value):
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            return f"must be an integer from {lo} to {hi}"
        return None

    return check


def _number_range(lo: float, hi: float) -> Callable[[object], str | None]:
    def check(value):
        if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
            return f"must be a number from {lo:g} to {hi:g}"
        return None

    return check


def _text(value) -> str | None:
    if not isinstance(value, str) or len(value) > TEXT_MAX:
        return f"must be a string of at most {TEXT_MAX} characters"
    if "\x00" in value:
        return "must not contain NUL"
    return None


def _bytes_text(value) -> str | None:
    """A banner sent as ISO-8859-1: one character per byte, so binary greetings fit."""
    if not isinstance(value, str) or len(value) > TEXT_MAX:
        return f"must be a string of at most {TEXT_MAX} characters"
    if any(ord(c) > 0xFF for c in value):
        return "must only use characters U+0000 to U+00FF (each is sent as one byte)"
    return None


def _token(value) -> str | None:
    """One line of printable ASCII (it ends up in a protocol header)."""
    if not isinstance(value, str) or not 1 <= len(value) <= 200:
        return "must be a string of 1 to 200 characters"
    if not all(" " <= c <= "~" for c in value):
        return "must be printable ASCII on one line"
    return None


def _ssh_version(value) -> str | None:
    problem = _token(value)
    if problem:
        return problem
    if not value.startswith("SSH-2.0-") or len(value) == len("SSH-2.0-"):
        return "must look like 'SSH-2.0-<software> [comment]'"
    return None


def _hostname(value) -> str | None:
    if not isinstance(value, str) or not DECKY_NAME_RE.fullmatch(value):
        return "must be a host name (a-z, 0-9, '.', '-'; at most 63 characters)"
    return None


def _optional(check):
    return lambda value: None if value is None else check(value)


@attrs.frozen
class Option:
    default: object
    check: Callable[[object], str | None]


COMMON_OPTIONS: dict[str, Option] = {
    "idle_timeout": Option(60, _number_range(0.1, 3600)),
    "max_lifetime": Option(300, _number_range(1, 86400)),
    "max_connections": Option(256, _int_range(1, 10000)),
}

# Default ports per type; ``None`` means the port must be given.
DEFAULT_PORTS: dict[str, int | None] = {
    "ssh": 22,
    "telnet": 23,
    "http": 80,
    "ftp": 21,
    "smtp": 25,
    "redis": 6379,
    "tcp-banner": None,
}

# Per-type options.  A default of ``None`` for a host name means "the decky's name".
TYPE_OPTIONS: dict[str, dict[str, Option]] = {
    "ssh": {
        "version": Option("SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3", _ssh_version),
        "max_auth_tries": Option(6, _int_range(1, 20)),
    },
    "telnet": {
        "banner": Option("Debian GNU/Linux 12", _text),
        "hostname": Option(None, _optional(_hostname)),
        "max_attempts": Option(3, _int_range(1, 10)),
    },
    "http": {
        "server": Option("Apache/2.4.62 (Debian)", _token),
        "title": Option("Sign in", _token),
        "realm": Option(None, _optional(_token)),
        "max_body": Option(64 * 1024, _int_range(0, 1024 * 1024)),
    },
    "ftp": {
        "banner": Option("(vsFTPd 3.0.3)", _token),
        "max_attempts": Option(3, _int_range(1, 10)),
    },
    "smtp": {
        "hostname": Option(None, _optional(_hostname)),
        "banner": Option("ESMTP Postfix (Debian/GNU)", _token),
    },
    "redis": {},
    "tcp-banner": {
        "banner": Option("", _bytes_text),
        "capture_bytes": Option(1024, _int_range(1, 64 * 1024)),
    },
}

SERVICE_TYPES = tuple(TYPE_OPTIONS)
_BASE_KEYS = {"type", "name", "bind", "port"}


@attrs.frozen
class ServiceSpec:
    """One decoy service of a decky, every option filled in."""

    decky: str
    type: str
    name: str
    bind: str
    port: int
    options: Mapping[str, object] = attrs.field(converter=lambda m: dict(sorted(m.items())))

    def canonical(self) -> dict:
        return {"type": self.type, "name": self.name, "bind": self.bind, "port": self.port} | dict(
            self.options
        )

    @property
    def key(self) -> tuple[str, str]:
        return (self.decky, self.name)

    @property
    def digest(self) -> str:
        return digest_of(self.canonical())

    def option(self, name: str):
        return self.options[name]


@attrs.frozen
class DeckySpec:
    name: str
    services: tuple[ServiceSpec, ...]

    def canonical(self) -> dict:
        return {"name": self.name, "services": [s.canonical() for s in self.services]}


@attrs.frozen
class DeploymentSpec:
    deckies: tuple[DeckySpec, ...]

    def canonical(self) -> dict:
        return {"format": FORMAT, "deckies": [d.canonical() for d in self.deckies]}

    @property
    def digest(self) -> str:
        return digest_of(self.canonical())

    def services(self) -> list[ServiceSpec]:
        return [s for d in self.deckies for s in d.services]

    def decky(self, name: str) -> DeckySpec | None:
        for decky in self.deckies:
            if decky.name == name:
                return decky
        return None

    def without(self, name: str | None) -> DeploymentSpec:
        """This spec minus decky ``name`` (everything when ``None``)."""
        if name is None:
            return DeploymentSpec(deckies=())
        return DeploymentSpec(deckies=tuple(d for d in self.deckies if d.name != name))


EMPTY = DeploymentSpec(deckies=())


def digest_of(doc) -> str:
    return hashlib.sha256(
        json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def _bind_address(value) -> str | None:
    if not isinstance(value, str):
        return None
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    # ``ipaddress`` takes any text after '%' as the IPv6 scope ("fe80::1%x\n").
    scope = getattr(address, "scope_id", None)
    if scope is not None and not _SCOPE_RE.fullmatch(scope):
        return None
    return str(address)


def _service_type(where: str, doc, problems: list[str]) -> str | None:
    if not isinstance(doc, dict):
        problems.append(f"{where}: must be an object")
        return None
    kind = doc.get("type")
    if kind not in TYPE_OPTIONS:
        problems.append(f"{where}.type: must be one of {', '.join(SERVICE_TYPES)} (got {kind!r})")
        return None
    return kind


def _service_port(where: str, kind: str, doc: dict, problems: list[str]) -> int | None:
    port = doc.get("port", DEFAULT_PORTS[kind])
    if port is None:
        problems.append(f"{where}.port: is required for {kind}")
    elif problem := _int_range(0, 65535)(port):
        problems.append(f"{where}.port: {problem}")
    else:
        return port
    return None


def _service_options(where: str, kind: str, decky: str, doc: dict, problems: list[str]) -> dict:
    """The type's options: those given (checked), then every default (host names: the decky's)."""
    allowed = COMMON_OPTIONS | TYPE_OPTIONS[kind]
    options = {}
    for key in sorted(set(doc) - _BASE_KEYS):
        if key not in allowed:
            known = ", ".join(sorted(_BASE_KEYS | set(allowed)))
            problems.append(f"{where}: unknown option {key!r} (known: {known})")
        elif problem := allowed[key].check(doc[key]):
            problems.append(f"{where}.{key}: {problem}")
        else:
            options[key] = doc[key]
    for key, option in allowed.items():
        options.setdefault(key, option.default)
    if "hostname" in options and options["hostname"] is None:
        options["hostname"] = decky
    return options


def _parse_service(decky: str, where: str, doc, problems: list[str]) -> ServiceSpec | None:
    kind = _service_type(where, doc, problems)
    if kind is None:
        return None
    name = doc.get("name", kind)
    name_ok = isinstance(name, str) and SERVICE_NAME_RE.fullmatch(name) is not None
    if not name_ok:
        problems.append(f"{where}.name: must match {SERVICE_NAME_RE.pattern}")
    where = f"{where} ({kind})"
    bind = _bind_address(doc.get("bind", "0.0.0.0"))  # noqa: S104 - a decoy listens on every address by default
    if bind is None:
        problems.append(f"{where}.bind: must be an IPv4 or IPv6 address literal")
    port = _service_port(where, kind, doc, problems)
    options = _service_options(where, kind, decky, doc, problems)
    if bind is None or port is None or not name_ok:
        return None
    return ServiceSpec(decky=decky, type=kind, name=name, bind=bind, port=port, options=options)


def _overlaps(a: ServiceSpec, b: ServiceSpec) -> bool:
    if a.port == 0 or a.port != b.port:
        return False
    ia, ib = ipaddress.ip_address(a.bind), ipaddress.ip_address(b.bind)
    if ia.version != ib.version:
        return False
    return ia == ib or ia.is_unspecified or ib.is_unspecified


def _top_level(doc, problems: list[str]) -> list:
    """The raw ``deckies`` list, after the checks on the document around it."""
    if not isinstance(doc, dict):
        raise ValidationError("the spec must be a JSON object with a 'deckies' list")
    for key in sorted(set(doc) - {"format", "deckies"}):
        problems.append(f"unknown top-level key {key!r} (known: deckies, format)")
    if "format" in doc and doc["format"] != FORMAT:
        problems.append(f"format: must be {FORMAT!r} (got {doc['format']!r})")
    raw_deckies = doc.get("deckies")
    if not isinstance(raw_deckies, list):
        problems.append("deckies: must be a list (it may be empty)")
        raise ValidationError(problems)
    if len(raw_deckies) > config.AGENT_MAX_DECKIES:
        problems.append(f"deckies: at most {config.AGENT_MAX_DECKIES} per worker")
    return raw_deckies


def _decky_name(
    where: str, raw: dict, seen: set[str], problems: list[str]
) -> tuple[str | None, str]:
    """The decky's name (``None`` if invalid) and how its problems are located."""
    for key in sorted(set(raw) - {"name", "services"}):
        problems.append(f"{where}: unknown key {key!r} (known: name, services)")
    name = raw.get("name")
    if not isinstance(name, str) or not DECKY_NAME_RE.fullmatch(name):
        problems.append(
            f"{where}.name: must be a host name (a-z, 0-9, '.', '-'; at most 63 characters)"
        )
        return None, where
    if name in seen:
        # A second decky of that name keeps its index: "decky 'x'" would be ambiguous.
        problems.append(f"{where}.name: decky {name!r} appears twice")
        return name, where
    seen.add(name)
    return name, f"decky {name!r}"


def _decky_services(
    decky: str | None, where: str, raw_services: list, problems: list[str]
) -> list[ServiceSpec]:
    if len(raw_services) > config.AGENT_MAX_SERVICES_PER_DECKY:
        problems.append(
            f"{where}.services: at most {config.AGENT_MAX_SERVICES_PER_DECKY} per decky"
        )
    services: list[ServiceSpec] = []
    for j, raw_service in enumerate(raw_services):
        service = _parse_service(decky or "-", f"{where}.services[{j}]", raw_service, problems)
        if service is None:
            continue
        if any(s.name == service.name for s in services):
            problems.append(f"{where}: two services are named {service.name!r}; give one a 'name'")
            continue
        services.append(service)
    return services


def _parse_decky(i: int, raw, seen: set[str], problems: list[str]) -> DeckySpec | None:
    where = f"deckies[{i}]"
    if not isinstance(raw, dict):
        problems.append(f"{where}: must be an object with 'name' and 'services'")
        return None
    name, where = _decky_name(where, raw, seen, problems)
    raw_services = raw.get("services")
    if not isinstance(raw_services, list) or not raw_services:
        problems.append(f"{where}.services: must be a non-empty list")
        return None
    services = _decky_services(name, where, raw_services, problems)
    if name is None:
        return None
    return DeckySpec(name=name, services=tuple(services))


def _port_conflicts(deckies: list[DeckySpec], problems: list[str]) -> None:
    all_services = [s for d in deckies for s in d.services]
    for i, a in enumerate(all_services):
        for b in all_services[i + 1 :]:
            if _overlaps(a, b):
                problems.append(
                    f"{a.decky}/{a.name} ({a.bind}:{a.port}) and {b.decky}/{b.name} "
                    f"({b.bind}:{b.port}) would listen on the same port"
                )


def parse_spec(doc) -> DeploymentSpec:
    """Validate a spec document; :class:`ValidationError` lists every problem."""
    problems: list[str] = []
    seen: set[str] = set()
    deckies = []
    for i, raw in enumerate(_top_level(doc, problems)):
        decky = _parse_decky(i, raw, seen, problems)
        if decky is not None:
            deckies.append(decky)
    _port_conflicts(deckies, problems)
    if problems:
        raise ValidationError(problems)
    return DeploymentSpec(deckies=tuple(deckies))
