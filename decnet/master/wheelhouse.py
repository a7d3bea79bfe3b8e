"""An offline wheelhouse for releases: every dependency as a wheel, built once, cached.

A release tarball carries a wheelhouse so that the updater installs it with
``pip install --no-index`` (``docs/Remote-Updates.md``).  It is built from the
running environment: the requirements of the source tree (``install_requires``
in ``setup.cfg``, plus ``setuptools`` and ``wheel`` for building the release),
with every distribution this environment already has pinned to the version it
runs (a pip constraints file).  pip needs its index (or its cache) the first
time only; afterwards the cached wheelhouse is reused as long as the
requirements, the pins and the interpreter are the same.

The sandbox builds it asynchronously from :func:`plan` and :func:`wheel_command`;
tests and benchmarks call the blocking :func:`build`.
"""

from __future__ import annotations

import configparser
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

import attrs

from decnet.errors import ConfigError

BUILD_REQUIREMENTS = ("setuptools>=64", "wheel")
COMPLETE_MARKER = ".complete"
OWN_DISTRIBUTION = "decnet-swarm"


def install_requires(root: Path) -> list[str]:
    """``[options] install_requires`` of the tree at ``root`` (comments dropped)."""
    parser = configparser.ConfigParser()
    if not parser.read(Path(root) / "setup.cfg"):
        raise ConfigError(f"{root} has no setup.cfg (sandbox up needs a DECNET source tree)")
    try:
        raw = parser["options"]["install_requires"]
    except KeyError:
        raise ConfigError(f"{root}/setup.cfg has no [options] install_requires") from None
    lines = (line.split("#")[0].strip() for line in raw.splitlines())
    return [line for line in lines if line]


def installed_requires() -> list[str]:
    """The runtime requirements of the installed DECNET (no extras): a master with no checkout."""
    requirements = importlib.metadata.requires(OWN_DISTRIBUTION) or []
    return [r for r in requirements if "extra" not in r.partition(";")[2]]


def installed_pins() -> list[str]:
    """``name==version`` of every distribution in this environment but DECNET itself."""
    pins = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").strip()
        if name and _normal(name) != _normal(OWN_DISTRIBUTION):
            pins[_normal(name)] = f"{name}=={dist.version}"
    return [pins[k] for k in sorted(pins)]


def _normal(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def cache_key(requirements: list[str], constraints: list[str]) -> str:
    """Changes whenever what the wheelhouse must hold could change."""
    text = "\n".join([sys.version, sys.platform, *requirements, "--", *constraints])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def wheel_command(target: Path, requirements: list[str], constraints_file: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--disable-pip-version-check",
        "--no-input",
        "--quiet",
        "--wheel-dir",
        str(target),
        "--constraint",
        str(constraints_file),
        *requirements,
    ]


def is_complete(path: Path) -> bool:
    return (Path(path) / COMPLETE_MARKER).exists()


def wheels(path: Path) -> list[Path]:
    return sorted(p for p in Path(path).iterdir() if p.name.endswith(".whl"))


def finish(partial: Path, target: Path) -> Path:
    """Mark ``partial`` complete and move it into place (blocking)."""
    (partial / COMPLETE_MARKER).write_text("")
    if target.exists():  # built meanwhile by someone else: keep theirs
        shutil.rmtree(partial, ignore_errors=True)
    else:
        partial.rename(target)
    return target


@attrs.frozen
class Plan:
    """What a wheelhouse for the tree must hold, and the cache key naming it."""

    requirements: list[str]
    pins: list[str]
    key: str

    def target(self, cache_dir: Path) -> Path:
        return Path(cache_dir) / f"wheelhouse-{self.key}"


def plan(root: Path | None) -> Plan:
    """The wheelhouse the tree at ``root`` needs (blocking: reads setup.cfg and metadata);
    with ``root`` ``None``, what the installed DECNET requires."""
    own = install_requires(root) if root is not None else installed_requires()
    requirements = [*own, *BUILD_REQUIREMENTS]
    pins = installed_pins()
    return Plan(requirements, pins, cache_key(requirements, pins))


def build(root: Path | None, cache_dir: Path, timeout: float = 900) -> Path:
    """Build (or reuse) the wheelhouse for ``root`` under ``cache_dir``; blocking."""
    wanted = plan(root)
    target = wanted.target(cache_dir)
    if is_complete(target):
        return target
    partial = Path(cache_dir) / f".wheelhouse-{wanted.key}.{os.getpid()}"
    partial.mkdir(parents=True, exist_ok=True)
    constraints = Path(cache_dir) / f".constraints-{wanted.key}.{os.getpid()}.txt"
    constraints.write_text("\n".join(wanted.pins) + "\n")
    command = wheel_command(partial, wanted.requirements, constraints)
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    constraints.unlink()
    if result.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        raise ConfigError(f"pip could not build the wheelhouse:\n{result.stderr[-3000:]}")
    return finish(partial, target)
