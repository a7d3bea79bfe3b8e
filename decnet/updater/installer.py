"""Install an extracted release into its own virtualenv, with child processes only.

``releases/<id>/venv`` is created *in place* (virtualenvs are not relocatable:
console scripts carry absolute shebangs), then pip installs ``releases/<id>/src``
into it:

* offline, ``--no-index --find-links src/wheelhouse``, when the tarball shipped
  a wheelhouse (it must then hold every dependency plus ``setuptools`` and
  ``wheel`` for the build: ``pip wheel --wheel-dir wheelhouse . setuptools wheel``);
* otherwise from whatever index pip is configured with on the worker
  (``/etc/pip.conf``, ``PIP_INDEX_URL`` in the unit's environment).

pip itself runs from the updater's own interpreter with ``--python`` pointing at
the new venv, so a release venv needs no pip of its own; when the updater has no
pip, or the release is the updater's own (it must be able to install the next
release), the venv is created with pip and that pip is used.

Last, the new venv's Python builds Twisted's plugin cache (``dropin.cache``):
the agent and the forwarder run from the release as users that cannot write it
(docs/Operations.md), so without it every start would rescan and warn.

A *wheel release* (``release.json``, :mod:`decnet.updater.manifest`) installs
in two parts instead, both offline (``--no-index``, ``--no-deps``, local wheel
files only, never the network):

* :meth:`Installer.build_deps`: a dependency environment ``deps/<id>`` (a venv
  without pip) gets every dependency wheel, is byte-compiled once and gets its
  own plugin cache; the store then makes it read-only (:mod:`decnet.updater.deps`);
* :meth:`Installer.install_wheel`: the release's small venv gets a ``.pth``
  file that adds the environment's ``site-packages`` (with
  ``site.addsitedir``, so the ``.pth`` files of the dependencies work too),
  the console scripts of the dependencies (``twistd``) with its own
  interpreter, and the decnet wheel with ``--no-deps``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import venv as venv_module
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from twisted.logger import Logger

from decnet import config
from decnet.errors import InstallFailed, WheelUnsupported
from decnet.interfaces import IDecnetReactor
from decnet.process import ProcessResult, child_env, run_process
from decnet.updater.bytecode import carry_over, compile_files
from decnet.updater.wheelinstall import (
    FINISH_SCRIPT,
    SH_EXEC,
    shebang,
    suite_dirs_pattern,
    unpack_wheel,
)

DEPS_PTH = "decnet-deps.pth"
# A release venv with at most this many files left to byte-compile, of at most this many
# bytes together, compiles them in the updater's thread rather than starting a child
# interpreter (about 0.4 CPU-s) for them.  Compiling holds the GIL (about 3 MiB of source a
# second), with no install timeout and at the updater's own priority: a large file (generated
# data, a zip bomb) goes to the child, which runs niced and under the timeout.
INLINE_COMPILE = 16
INLINE_COMPILE_BYTES = 1 << 20

# Run by the release's own Python; a release without Twisted has no cache to build.
PLUGIN_CACHE_SCRIPT = (
    "import importlib.util, sys\n"
    "if importlib.util.find_spec('twisted') is None:\n"
    "    sys.exit(0)\n"
    "from twisted.plugin import IPlugin, getPlugins\n"
    "list(getPlugins(IPlugin))\n"
)


def has_pip() -> bool:
    return importlib.util.find_spec("pip") is not None


class Installer:
    """Creates ``<release>/venv`` and pip-installs ``<release>/src`` into it."""

    log = Logger()

    def __init__(
        self,
        reactor: IDecnetReactor,
        *,
        python: str = sys.executable,
        timeout: float = config.DEFAULT_INSTALL_TIMEOUT,
        compile_bytecode: bool = True,
        use_own_pip: bool | None = None,
        to_thread: Callable[..., Awaitable[Any]] | None = None,
        unpack: bool = True,
    ):
        self.reactor = reactor
        self.python = python
        self.timeout = timeout
        self.compile_bytecode = compile_bytecode
        self.use_own_pip = has_pip() if use_own_pip is None else use_own_pip
        self.to_thread = to_thread
        self.unpack = unpack  # wheel releases: unpack wheels instead of running pip

    def commands(self, release_dir: Path, *, with_pip: bool = False) -> list[tuple[str, list[str]]]:
        """``(step, argv)`` pairs :meth:`install` runs, in order."""
        src = release_dir / config.RELEASE_SRC_DIR
        venv = release_dir / config.RELEASE_VENV_DIR
        venv_python = venv / "bin" / "python"
        own_pip = self.use_own_pip and not with_pip
        create = [self.python, "-m", "venv"]
        if own_pip:
            create.append("--without-pip")
        create.append(str(venv))
        if own_pip:
            pip = [self.python, "-m", "pip", "--python", str(venv_python)]
        else:
            pip = [str(venv_python), "-m", "pip"]
        install = [*pip, "install", "--disable-pip-version-check", "--no-input"]
        wheelhouse = src / config.RELEASE_WHEELHOUSE
        if wheelhouse.is_dir():
            install += ["--no-index", "--find-links", str(wheelhouse)]
        if not self.compile_bytecode:
            install.append("--no-compile")
        install.append(str(src))
        cache = [str(venv_python), "-c", PLUGIN_CACHE_SCRIPT]
        return [
            ("create the venv", create),
            ("pip install", install),
            ("build the plugin cache", cache),
        ]

    async def install(self, release_dir: Path, *, with_pip: bool = False) -> str:
        """Run every step; the combined output, or :class:`InstallFailed` carrying it."""
        release_dir = Path(release_dir)
        return await self._run(self.commands(release_dir, with_pip=with_pip), release_dir)

    async def _run(
        self, steps: list[tuple[str, list[str]]], cwd: Path, outputs: list[str] | None = None
    ) -> str:
        env = child_env({"PIP_NO_INPUT": "1", "PYTHONDONTWRITEBYTECODE": "1"})
        outputs = [] if outputs is None else outputs
        deadline = self.reactor.seconds() + self.timeout
        for step, argv in steps:
            remaining = max(1.0, deadline - self.reactor.seconds())
            self.log.info("Running {command}", command=" ".join(argv[:4]) + " ...")
            result: ProcessResult = await run_process(
                self.reactor, argv, env=env, path=str(cwd), timeout=remaining
            )
            outputs.append(f"$ {' '.join(argv)}\n{result.output}")
            if not result.ok:
                text = "\n".join(outputs)
                raise InstallFailed(
                    f"{step} failed ({result.describe()}); see the install output",
                    output={"install": text},
                )
        return "\n".join(outputs)

    # -- wheel releases ------------------------------------------------------

    def _venv_and_pip(
        self, venv: Path, *, with_pip: bool, compile_bytecode: bool | None = None
    ) -> tuple[list[str], list[str]]:
        """The argv creating ``venv`` and the pip prefix that installs into it."""
        own_pip = self.use_own_pip and not with_pip
        create = [self.python, "-m", "venv", *(["--without-pip"] if own_pip else []), str(venv)]
        venv_python = str(venv / "bin" / "python")
        pip = (
            [self.python, "-m", "pip", "--python", venv_python]
            if own_pip
            else [venv_python, "-m", "pip"]
        )
        install = [*pip, "install", "--disable-pip-version-check", "--no-input"]
        install += ["--no-index", "--no-deps"]
        if not (self.compile_bytecode if compile_bytecode is None else compile_bytecode):
            install.append("--no-compile")
        return create, install

    def deps_commands(self, env_dir: Path, wheels: list[Path]) -> list[tuple[str, list[str]]]:
        """``(step, argv)`` pairs :meth:`build_deps` runs, in order.

        Always byte-compiled, whatever ``compile_bytecode`` says: the environment is
        read-only, so no daemon could ever write the bytecode itself, and every start
        would compile Twisted and cryptography's Python again.
        """
        create, install = self._venv_and_pip(env_dir, with_pip=False, compile_bytecode=True)
        cache = [str(env_dir / "bin" / "python"), "-c", PLUGIN_CACHE_SCRIPT]
        return [
            ("create the dependency environment", create),
            ("pip install the dependency wheels", [*install, *map(str, wheels)]),
            ("build the plugin cache", cache),
        ]

    async def build_deps(
        self, env_dir: Path, wheels: list[Path], previous: Path | None = None
    ) -> str:
        """Install ``wheels`` (every dependency, offline, no resolution) into ``env_dir``.

        By unpacking (:mod:`decnet.updater.wheelinstall`) when every wheel allows
        it, else with pip; byte-compiled either way, carrying the byte code of the
        files that ``previous`` (the site-packages of the environment in use) has
        unchanged (:mod:`decnet.updater.bytecode`).
        """
        env_dir = Path(env_dir)
        if self.unpack:
            try:
                workers = os.cpu_count() or 1
                return await self._unpacked(env_dir, wheels, workers, previous=previous)
            except WheelUnsupported as exc:
                self.log.info("pip installs the dependency environment: {why}", why=str(exc))
                await self._blocking(empty_directory, env_dir)
        return await self._run(self.deps_commands(env_dir, wheels), env_dir)

    async def install_wheel(
        self,
        release_dir: Path,
        deps_site: Path,
        deps_bin: Path,
        wheel: Path,
        *,
        with_pip: bool,
        previous: Path | None = None,
    ) -> str:
        """The release's small venv: linked to ``deps_site``, plus ``wheel`` with ``--no-deps``.

        ``previous``: the site-packages of the release in use, whose byte code and
        plugin cache are carried over for unchanged files (:mod:`decnet.updater.bytecode`).
        """
        release_dir = Path(release_dir)
        venv = release_dir / config.RELEASE_VENV_DIR
        bundled = bundled_wheels() if with_pip else []
        if self.unpack and (bundled or not with_pip):
            try:
                workers = 1 if self.compile_bytecode else 0
                wheels = [wheel, *bundled]
                link = (deps_site, deps_bin)
                return await self._unpacked(venv, wheels, workers, link=link, previous=previous)
            except WheelUnsupported as exc:
                self.log.info("pip installs the decnet wheel: {why}", why=str(exc))
                await self._blocking(discard_tree, venv)
        create, install = self._venv_and_pip(venv, with_pip=with_pip)
        outputs: list[str] = []
        await self._run([("create the venv", create)], release_dir, outputs)
        linked = await self._blocking(link_deps, venv, deps_site, deps_bin)
        outputs.append(f"linked {deps_site} and {linked} console scripts")
        cache = [str(venv / "bin" / "python"), "-c", PLUGIN_CACHE_SCRIPT]
        steps = [("pip install the decnet wheel", [*install, str(wheel)])]
        return await self._run([*steps, ("build the plugin cache", cache)], release_dir, outputs)

    async def _unpacked(
        self,
        venv: Path,
        wheels: list[Path],
        compile_workers: int,
        link: tuple[Path, Path] | None = None,
        previous: Path | None = None,
    ) -> str:
        """A venv without pip holding ``wheels`` unpacked; ``compile_workers`` 0: no bytecode.

        The venv, the link to a dependency environment and the unpacking run in
        a thread; byte-compiling and the plugin cache in one child process of
        the venv's own interpreter (nice 10).  When the venv's interpreter is
        this one, byte code is first carried over from ``previous``; a release
        venv left with a few files to compile and its plugin cache carried needs
        no child: those files are compiled in the thread.
        """
        outputs: list[str] = []
        if self.python == sys.executable:
            await self._blocking(create_venv, venv)
            outputs.append(f"created {venv}")
        else:
            create = [self.python, "-m", "venv", "--without-pip", str(venv)]
            await self._run([("create the venv", create)], venv.parent, outputs)
        if link is not None:
            linked = await self._blocking(link_deps, venv, *link)
            outputs.append(f"linked {link[0]} and {linked} console scripts")
        outputs.append(await self._blocking(unpack_all, venv, wheels))
        if compile_workers and self.python == sys.executable and previous is not None:
            target = site_packages(venv)
            carried = await self._blocking(carry_over, target, previous)
            outputs.append(carried.describe(target))
            few = (
                len(carried.stale) <= INLINE_COMPILE and carried.stale_bytes <= INLINE_COMPILE_BYTES
            )
            if link is not None and carried.plugin_cache and few:
                outputs.append(await self._blocking(compile_files, carried.stale))
                return "\n".join(outputs)
        site = str(site_packages(venv)) if compile_workers else ""
        skip = suite_dirs_pattern(site) if site and link is None else ""
        finish = [str(venv / "bin" / "python"), "-c", FINISH_SCRIPT, site, str(compile_workers)]
        steps = [("byte-compile and build the plugin cache", [*finish, skip])]
        return await self._run(steps, venv.parent, outputs)

    async def _blocking(self, f: Callable[..., Any], *args: Any) -> Any:
        if self.to_thread is None:
            return f(*args)
        return await self.to_thread(f, *args)


def bundled_wheels() -> list[Path]:
    """The pip and setuptools wheels ``ensurepip`` would install (``python -m venv`` with
    pip), newest of each; none when this Python ships no bundled wheels (then pip's way)."""
    spec = importlib.util.find_spec("ensurepip")
    if spec is None or spec.origin is None:
        return []
    bundled = Path(spec.origin).parent / "_bundled"
    found = [sorted(bundled.glob(f"{name}-*.whl"))[-1:] for name in ("pip", "setuptools")]
    return found[0] + found[1] if found[0] else []


def create_venv(venv: Path) -> None:
    """``python -m venv --without-pip venv`` of this interpreter, in process.  Blocking."""
    venv_module.EnvBuilder(with_pip=False, symlinks=os.name != "nt").create(str(venv))


def site_packages(venv: Path) -> Path:
    sites = sorted(Path(venv).glob("lib/python*/site-packages"))
    if not sites:
        raise InstallFailed(f"{venv} has no site-packages", output={"install": ""})
    return sites[0]


def unpack_all(venv: Path, wheels: list[Path]) -> str:
    """Unpack every wheel into ``venv`` (:func:`~decnet.updater.wheelinstall.unpack_wheel`)."""
    site = site_packages(venv)
    for wheel in wheels:
        unpack_wheel(Path(wheel), site, venv / "bin", venv / "bin" / "python")
    return f"unpacked {len(wheels)} wheel(s) into {site}"


def discard_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def empty_directory(path: Path) -> None:
    """Remove everything inside ``path`` (a dependency environment being rebuilt)."""
    for entry in Path(path).iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def link_deps(venv: Path, deps_site: Path, deps_bin: Path) -> int:
    """Make ``venv`` use the dependency environment; the number of console scripts copied.

    A ``.pth`` line that starts with ``import`` is executed by :mod:`site`;
    ``site.addsitedir`` adds the directory *and* processes its own ``.pth``
    files.  The dependencies' console scripts (``twistd``) are copied with the
    release's interpreter in their ``#!`` line: run from the environment they
    would miss decnet.  Blocking.
    """
    line = f"import site; site.addsitedir({str(deps_site)!r})\n"
    (site_packages(venv) / DEPS_PTH).write_text(line)
    old = str(deps_bin.parent / "bin" / "python").encode()
    new = str(venv / "bin" / "python").encode()
    copied = 0
    for script in sorted(deps_bin.iterdir()) if deps_bin.is_dir() else []:
        target = venv / "bin" / script.name
        if target.exists() or target.is_symlink() or not script.is_file() or script.is_symlink():
            continue
        body = script_body(script.read_bytes(), old)
        if body is None:
            continue
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o755)
        with os.fdopen(fd, "wb") as fh:
            fh.write(shebang(new) + body)
        copied += 1
    return copied


def script_body(data: bytes, python: bytes) -> bytes | None:
    """The script without its interpreter line(s), if ``python`` runs it; else ``None``."""
    for head in (b"#!" + python + b"\n", SH_EXEC % python):
        if data.startswith(head):
            return data[len(head) :]
    return None
