"""The manifest of a wheel release (``release.json``): pure, shared by master and updater.

A wheel release tarball holds, flat::

    release.json                  this manifest
    wheels/<decnet wheel>         always: the one wheel of DECNET built for this release
    wheels/<dependency wheel>     only those the worker lacks (``GET /wheels``)

The manifest names every wheel of the release with its sha256::

    {"format": "decnet-release/2",
     "release": "<16 hex>",                       derived, checked: see release_id()
     "decnet": {"file", "name", "version", "sha256"},
     "deps": [{"file", "name", "version", "sha256"}, ...],   sorted by name
     "deps_id": "<64 hex>",                       derived, checked: see deps_id()
     "build": {"source": "checkout" | "installed", "git_sha"?, "git_dirty"?}}

``deps_id`` is the sha256 of the exact dependency-wheel set: it names the
worker's dependency environment (``deps/<deps_id>/``), so two releases with the
same dependencies share one.  The release id is derived from the decnet wheel's
sha256 and ``deps_id``: the same wheels always install as the same release,
whatever else was shipped alongside them.

Everything in a manifest is hostile until :func:`parse_manifest` accepted it:
wrong types, unknown formats, a wheel file name that is not a plain wheel name
(``..``, ``/``, absolute, a leading dot), a name listed twice, a derived id that
does not match, too many wheels.  :func:`check_wheels` then compares it with
what the tarball really carried (each shipped wheel's sha256 was computed while
it streamed) and with what the worker already stores.  Each refusal is a
:class:`~decnet.errors.BadManifest` (400) raised before the install directory
is touched.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping

import attrs

from decnet import config
from decnet.errors import BadManifest

FORMAT = "decnet-release/2"
SOURCES = ("checkout", "installed")

# PEP 427: {distribution}-{version}(-{build tag})?-{python tag}-{abi tag}-{platform tag}.whl
_WHEEL_RE = re.compile(
    r"(?P<name>[A-Za-z0-9][A-Za-z0-9_.]*)-(?P<version>[A-Za-z0-9_.!+]+)"
    r"(?:-\d[A-Za-z0-9_.]*)?-[A-Za-z0-9_.]+-[A-Za-z0-9_.]+-[A-Za-z0-9_.]+\.whl"
)
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_MAX_FILE = 200
_MAX_TEXT = 200


def normal_name(name: str) -> str:
    """PEP 503 normalisation: ``Zope.Interface`` and ``zope_interface`` are one project."""
    return re.sub(r"[-_.]+", "-", name).lower()


@attrs.frozen
class Wheel:
    """One wheel of a release: its file name, project name and version, and sha256."""

    file: str
    name: str
    version: str
    sha256: str

    def as_dict(self) -> dict[str, str]:
        return attrs.asdict(self)


def wheel_of(file: str, sha256: str) -> Wheel:
    """The :class:`Wheel` named ``file`` (a plain wheel file name) with content ``sha256``."""
    problem = wheel_file_problem(file)
    if problem:
        raise BadManifest(problem)
    match = _WHEEL_RE.fullmatch(file)
    assert match is not None  # wheel_file_problem checked it
    return Wheel(file, match["name"], match["version"], sha256)


def wheel_file_problem(file: object) -> str | None:
    """Why ``file`` is not a plain wheel file name that may be written under a directory."""
    if not isinstance(file, str):
        return "a wheel file name must be a string"
    shown = ascii(file[:80])
    if not file or len(file) > _MAX_FILE:
        return f"wheel file name {shown} is empty or longer than {_MAX_FILE} characters"
    if "/" in file or "\\" in file or "\x00" in file:
        return f"wheel file name {shown} contains a path separator or NUL"
    if ".." in file or file.startswith("."):
        return f"wheel file name {shown} contains '..' or starts with a dot"
    if not _WHEEL_RE.fullmatch(file):
        return f"{shown} is not a wheel file name (name-version-python-abi-platform.whl)"
    return None


def deps_id(deps: Iterable[Wheel]) -> str:
    """The sha256 naming a dependency environment: of the sorted ``sha256 file`` lines."""
    lines = sorted(f"{w.sha256} {w.file}" for w in deps)
    return hashlib.sha256(("\n".join(lines) + "\n").encode()).hexdigest()


def release_id(decnet: Wheel, deps: str) -> str:
    """The release id: derived from the decnet wheel and the dependency set, nothing else."""
    text = f"{FORMAT}\n{decnet.sha256} {decnet.file}\n{deps}\n"
    return hashlib.sha256(text.encode()).hexdigest()[: config.RELEASE_ID_LENGTH]


@attrs.frozen
class Manifest:
    """An accepted manifest (:func:`make_manifest` on the master, :func:`parse_manifest`)."""

    decnet: Wheel
    deps: tuple[Wheel, ...]
    build: Mapping[str, str | bool] = attrs.field(factory=dict)

    @property
    def deps_id(self) -> str:
        return deps_id(self.deps)

    @property
    def release(self) -> str:
        return release_id(self.decnet, self.deps_id)

    @property
    def wheels(self) -> tuple[Wheel, ...]:
        return (self.decnet, *self.deps)

    def to_json(self) -> bytes:
        doc = {
            "format": FORMAT,
            "release": self.release,
            "decnet": self.decnet.as_dict(),
            "deps": [w.as_dict() for w in self.deps],
            "deps_id": self.deps_id,
            "build": dict(self.build),
        }
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def make_manifest(
    decnet: Wheel, deps: Iterable[Wheel], build: Mapping[str, str | bool] | None = None
) -> Manifest:
    """The manifest of ``decnet`` plus ``deps`` (sorted by name); checked like a parsed one."""
    manifest = Manifest(decnet, tuple(sorted(deps, key=lambda w: normal_name(w.name))), build or {})
    return parse_manifest(manifest.to_json())


def parse_manifest(raw: bytes) -> Manifest:
    """The manifest in ``raw``, or :class:`BadManifest` saying what is wrong with it."""
    if len(raw) > config.MAX_MANIFEST_BYTES:
        raise BadManifest(f"release.json is larger than {config.MAX_MANIFEST_BYTES} bytes")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadManifest("release.json is not JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise BadManifest(f"release.json is not a {FORMAT} manifest")
    decnet = _wheel_entry(doc.get("decnet"), "decnet")
    deps_doc = doc.get("deps")
    if not isinstance(deps_doc, list):
        raise BadManifest("release.json: deps must be a list")
    if len(deps_doc) > config.MAX_MANIFEST_WHEELS:
        raise BadManifest(f"release.json lists more than {config.MAX_MANIFEST_WHEELS} wheels")
    deps = tuple(_wheel_entry(entry, f"deps[{i}]") for i, entry in enumerate(deps_doc))
    _unique((decnet, *deps))
    manifest = Manifest(decnet, deps, _build(doc.get("build")))
    if doc.get("deps_id") != manifest.deps_id:
        raise BadManifest("release.json: deps_id is not the sha256 of its dependency set")
    if doc.get("release") != manifest.release:
        raise BadManifest("release.json: release is not the id its wheels derive")
    return manifest


def _wheel_entry(entry: object, where: str) -> Wheel:
    if not isinstance(entry, dict):
        raise BadManifest(f"release.json: {where} must be an object")
    values = {key: entry.get(key) for key in ("file", "name", "version", "sha256")}
    for key, value in values.items():
        if not isinstance(value, str) or not value or len(value) > _MAX_FILE:
            raise BadManifest(f"release.json: {where}.{key} must be a short string")
    problem = wheel_file_problem(values["file"])
    if problem:
        raise BadManifest(f"release.json: {where}: {problem}")
    if not _SHA256_RE.fullmatch(values["sha256"] or ""):
        raise BadManifest(f"release.json: {where}.sha256 must be 64 lowercase hex digits")
    wheel = wheel_of(str(values["file"]), str(values["sha256"]))
    if (
        normal_name(wheel.name) != normal_name(str(values["name"]))
        or wheel.version != values["version"]
    ):
        raise BadManifest(f"release.json: {where}: name and version disagree with its file name")
    return attrs.evolve(wheel, name=str(values["name"]))


def _unique(wheels: Iterable[Wheel]) -> None:
    names: set[str] = set()
    files: set[str] = set()
    for wheel in wheels:
        name = normal_name(wheel.name)
        if name in names or wheel.file in files:
            raise BadManifest(f"release.json lists {wheel.name!a} more than once")
        names.add(name)
        files.add(wheel.file)


def _build(doc: object) -> dict[str, str | bool]:
    """Only short strings and booleans of the build information travel on."""
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise BadManifest("release.json: build must be an object")
    out: dict[str, str | bool] = {}
    for key in ("source", "git_sha", "version"):
        value = doc.get(key)
        if isinstance(value, str) and len(value) <= _MAX_TEXT:
            out[key] = value
    if isinstance(doc.get("git_dirty"), bool):
        out["git_dirty"] = doc["git_dirty"]
    return out


def check_wheels(
    manifest: Manifest, shipped: Mapping[str, str], stored: Iterable[str], *, have_env: bool
) -> tuple[Wheel, ...]:
    """Compare the manifest with the wheels shipped (file → sha256, as hashed on arrival) and
    the sha256s the worker stores; the dependency wheels that were shipped.

    Refused: a shipped wheel the manifest does not list, a shipped wheel whose
    sha256 is not the manifest's, no decnet wheel, and a dependency that is
    neither shipped nor stored (unless its environment ``have_env`` is built).
    """
    listed = {w.file: w for w in manifest.wheels}
    for file, sha256 in shipped.items():
        wheel = listed.get(file)
        if wheel is None:
            raise BadManifest(f"the tarball ships {file!a}, which release.json does not list")
        if wheel.sha256 != sha256:
            raise BadManifest(f"{file!a} has sha256 {sha256}, release.json says {wheel.sha256}")
    if manifest.decnet.file not in shipped:
        raise BadManifest("the tarball does not ship the decnet wheel release.json names")
    have = set(stored)
    missing = [w.file for w in manifest.deps if w.file not in shipped and w.sha256 not in have]
    if missing and not have_env:
        raise BadManifest(
            f"{len(missing)} dependency wheel(s) neither shipped nor stored on this worker, "
            f"e.g. {missing[0]!a}: ask GET /wheels and send them"
        )
    return tuple(w for w in manifest.deps if w.file in shipped)


def missing_wheels(manifest: Manifest, wheels: Iterable[str], envs: Iterable[str]) -> list[Wheel]:
    """The dependency wheels a worker with this inventory lacks (master side)."""
    if manifest.deps_id in set(envs):
        return []
    have = set(wheels)
    return [w for w in manifest.deps if w.sha256 not in have]
