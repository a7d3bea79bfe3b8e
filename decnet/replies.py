"""What a client accepts from a worker's agent and updater: one declarative schema per reply.

A compromised worker holds a valid certificate and may answer anything.  Every
reply is checked here before any code reads it (:class:`~decnet.httpclient.PinnedClient`
does it for every call), so the CLI, the rollout, the sandbox and the updater's
health probe only ever see the types they expect; a reply that breaks its schema
becomes :class:`~decnet.errors.BadReply` for that one host.

Same style as the spec validator (:mod:`decnet.agent.spec`): pure, and it
reports *every* problem with where it is (``deckies.web-01.services.ssh.port:
must be an integer``), capped at :data:`MAX_PROBLEMS`.  Keys a schema does not
name are allowed (a newer daemon may add fields) and left alone.  The decky and
service name rules are the spec's own.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Protocol

import attrs

from decnet.agent.spec import DECKY_NAME_RE, SERVICE_NAME_RE

MAX_PROBLEMS = 5
MAX_DEPTH = 32  # nesting of the free-form objects (a spec, an output map) we pass through
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_.@-]{1,64}")


def _at(where: str, key) -> str:
    if isinstance(key, int):
        return f"{where}[{key}]"
    label = key if _PLAIN_KEY.fullmatch(key) else json.dumps(key[:40])
    return f"{where}.{label}" if where else label


class _Problems(list):
    """The problems found so far; stops the walk once :data:`MAX_PROBLEMS` are known."""

    @property
    def full(self) -> bool:
        return len(self) >= MAX_PROBLEMS


class Schema(Protocol):
    """Anything that checks one JSON value: the field types below, and :class:`Obj`."""

    def check(self, value: object, where: str, problems: _Problems) -> None: ...


_KINDS = ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"))


def _name(value) -> str:
    """What a JSON value is, for a problem message (never the value: it may be anything)."""
    if value is None:
        return "null"
    for kind, name in _KINDS:
        if isinstance(value, kind):
            return name
    return "a list" if isinstance(value, list) else "an object"


@attrs.frozen
class Str:
    """A string; optionally one of ``choices`` or matching ``pattern`` (whole string)."""

    choices: tuple[str, ...] = ()
    pattern: re.Pattern | None = None
    what: str = "a string"

    def check(self, value, where: str, problems: _Problems) -> None:
        if not isinstance(value, str):
            problems.append(f"{where}: must be {self.what}, not {_name(value)}")
        elif self.choices and value not in self.choices:
            problems.append(f"{where}: must be one of {', '.join(self.choices)}")
        elif self.pattern is not None and not self.pattern.fullmatch(value):
            problems.append(f"{where}: must be {self.what}")


@attrs.frozen
class Int:
    """An integer (never a boolean) from ``lo`` to ``hi``."""

    lo: int = 0
    hi: int = 2**63 - 1

    def check(self, value, where: str, problems: _Problems) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not self.lo <= value <= self.hi:
            problems.append(f"{where}: must be an integer from {self.lo} to {self.hi}")


@attrs.frozen
class Num:
    """A finite number (never a boolean)."""

    def check(self, value, where: str, problems: _Problems) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            problems.append(f"{where}: must be a number, not {_name(value)}")
        elif isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{where}: must be a finite number")


@attrs.frozen
class Bool:
    def check(self, value, where: str, problems: _Problems) -> None:
        if not isinstance(value, bool):
            problems.append(f"{where}: must be true or false, not {_name(value)}")


@attrs.frozen
class Nullable:
    inner: Schema

    def check(self, value, where: str, problems: _Problems) -> None:
        if value is not None:
            self.inner.check(value, where, problems)


@attrs.frozen
class ListOf:
    item: Schema

    def check(self, value, where: str, problems: _Problems) -> None:
        if not isinstance(value, list):
            problems.append(f"{where}: must be a list, not {_name(value)}")
            return
        for i, item in enumerate(value):
            if problems.full:
                return
            self.item.check(item, _at(where, i), problems)


@attrs.frozen
class MapOf:
    """An object used as a map: every key matches ``key``, every value ``value``."""

    value: Schema
    key: Str = Str()

    def check(self, value, where: str, problems: _Problems) -> None:
        if not isinstance(value, dict):
            problems.append(f"{where}: must be an object, not {_name(value)}")
            return
        for k, v in value.items():
            if problems.full:
                return
            self.key.check(k, f"{_at(where, k)} (key)", problems)
            self.value.check(v, _at(where, k), problems)


@attrs.frozen
class Obj:
    """An object with ``required`` and ``optional`` fields (others are allowed, unchecked)."""

    required: Mapping[str, Schema] = attrs.field(factory=dict)
    optional: Mapping[str, Schema] = attrs.field(factory=dict)

    def check(self, value, where: str, problems: _Problems) -> None:
        if not isinstance(value, dict):
            problems.append(f"{where or 'the reply'}: must be an object, not {_name(value)}")
            return
        for key, schema in self.required.items():
            if problems.full:
                return
            if key not in value:
                problems.append(f"{_at(where, key)}: is required")
            else:
                schema.check(value[key], _at(where, key), problems)
        for key, schema in self.optional.items():
            if problems.full:
                return
            if key in value:
                schema.check(value[key], _at(where, key), problems)


@attrs.frozen
class Free:
    """Any JSON object we pass through without reading it (a spec, captured output)."""

    def check(self, value, where: str, problems: _Problems) -> None:
        if not isinstance(value, dict):
            problems.append(f"{where}: must be an object, not {_name(value)}")
        elif _depth(value) > MAX_DEPTH:
            problems.append(f"{where}: nested deeper than {MAX_DEPTH} levels")


def _depth(value, level: int = 0) -> int:
    if level > MAX_DEPTH:
        return level
    if isinstance(value, dict):
        value = list(value.values())
    children = value if isinstance(value, list) else ()
    return max((_depth(c, level + 1) for c in children), default=level)


def problems_of(schema: Schema, doc: object) -> list[str]:
    """Every problem of ``doc`` against ``schema`` (at most :data:`MAX_PROBLEMS`), or ``[]``."""
    found = _Problems()
    schema.check(doc, "", found)
    return list(found)


# -- field types ---------------------------------------------------------------------

TEXT = Str()
OPT_TEXT = Nullable(TEXT)
COUNT = Int()
NUMBER = Num()
BOOL = Bool()
PORT = Int(0, 65535)
DECKY = Str(pattern=DECKY_NAME_RE, what="a decky name")
SERVICE = Str(pattern=SERVICE_NAME_RE, what="a service name")
PROBLEMS = ListOf(TEXT)

# -- any daemon ----------------------------------------------------------------------

#: The default: a JSON object, nothing more known about it.
OBJECT = Obj()

#: Every 4xx/5xx: the agent's and the updater's ``{"problems": [...], ...}``.
ERROR = Obj(
    required={"problems": PROBLEMS},
    optional={
        "result": TEXT,
        "release": OPT_TEXT,
        "current": OPT_TEXT,
        "rolled_back": BOOL,
        "healthy": BOOL,
        "output": Free(),
    },
)

# -- the agent (docs/Agent.md) ---------------------------------------------------------

AGENT_HEALTH = Obj(
    required={"status": TEXT},
    optional={
        "host": TEXT,
        "version": OPT_TEXT,
        "release": OPT_TEXT,
        "engine": TEXT,
        "uptime": Nullable(NUMBER),
    },
)

SERVICE_STATE = Obj(
    required={
        "type": TEXT,
        "bind": TEXT,
        "port": PORT,
        "state": TEXT,
        "connections": COUNT,
        "events": COUNT,
    },
    optional={"reason": OPT_TEXT, "address": OPT_TEXT, "active": COUNT, "refused": COUNT},
)

AGENT_STATUS = Obj(
    required={
        "deckies": MapOf(Obj(required={"services": MapOf(SERVICE_STATE, SERVICE)}), DECKY),
        "summary": Obj(
            required={"deckies": COUNT, "services": COUNT, "listening": COUNT},
            optional={"failed": COUNT},
        ),
    },
    optional={"host": TEXT, "spec": Free(), "spec_hash": TEXT, "applied_at": Nullable(NUMBER)},
)

SERVICE_APPLIED = Obj(
    required={"action": TEXT, "state": TEXT},
    optional={"address": OPT_TEXT, "reason": OPT_TEXT, "type": TEXT, "port": PORT},
)

#: ``POST /deploy`` and ``POST /teardown``.
AGENT_APPLY = Obj(
    required={
        "spec_hash": TEXT,
        "changed": BOOL,
        "ok": BOOL,
        "failed": ListOf(TEXT),
        "deckies": MapOf(MapOf(SERVICE_APPLIED, SERVICE), DECKY),
        "removed": ListOf(Obj(required={"decky": DECKY, "service": SERVICE})),
    }
)

# -- the updater (docs/Remote-Updates.md) ---------------------------------------------------

UPDATER_HEALTH = Obj(
    required={"status": TEXT},
    optional={
        "version": OPT_TEXT,
        "release": OPT_TEXT,
        "current": OPT_TEXT,
        "busy": OPT_TEXT,
        "phase": OPT_TEXT,
        "agent": Free(),
        "uptime": Nullable(NUMBER),
    },
)

RELEASES = Obj(
    required={
        "releases": ListOf(
            Obj(
                required={"id": TEXT},
                optional={
                    "installed_at": OPT_TEXT,
                    "git_sha": OPT_TEXT,
                    "sha256": OPT_TEXT,
                    "current": BOOL,
                    "rollback_target": BOOL,
                    "failed": BOOL,
                    "in_use": BOOL,
                },
            )
        )
    },
    optional={"current": OPT_TEXT, "updater_release": OPT_TEXT},
)

SHA256 = Str(pattern=re.compile(r"[0-9a-f]{64}"), what="a sha256 (64 lowercase hex digits)")

WHEELS = Obj(required={"wheels": ListOf(SHA256), "deps": ListOf(SHA256)})

_OUTCOME: dict[str, Schema] = {
    "previous": OPT_TEXT,
    "detail": TEXT,
    "health": Free(),
    "seconds": NUMBER,
}

UPDATE = Obj(
    required={"result": Str(choices=("updated",)), "release": TEXT},
    optional={**_OUTCOME, "installed": BOOL},
)

UPDATE_SELF = Obj(
    required={"result": Str(choices=("restarting",)), "release": TEXT},
    optional={**_OUTCOME, "running": OPT_TEXT},
)

ROLLBACK = Obj(
    required={"result": Str(choices=("rolled_back",)), "release": TEXT},
    optional=_OUTCOME,
)

# POST /listeners on an updater: the bundle's listener list now, and whether it changed.
LISTENERS = Obj(required={"listeners": ListOf(TEXT), "changed": BOOL})

# -- certificate renewal (docs/Operations.md) ------------------------------------------------

_ROLES = ("worker", "updater")

RENEW_CSR = Obj(
    required={"csrs": MapOf(TEXT, Str(choices=_ROLES))},
    optional={"current": TEXT},
)

RENEW_INSTALL = Obj(required={"installed": MapOf(TEXT, Str(choices=_ROLES))})

# POST /forwarder/stop on an updater (decommission): the units it stopped, or
# not_managed when it does not run the forwarder (--agent-control spawn).
FORWARDER_STOP = Obj(
    required={"result": Str(choices=("stopped", "not_managed")), "units": ListOf(TEXT)}
)
