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
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from twisted.logger import Logger

from decnet import config
from decnet.errors import InstallFailed
from decnet.process import ProcessResult, child_env, run_process

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
        reactor,
        *,
        python: str = sys.executable,
        timeout: float = config.DEFAULT_INSTALL_TIMEOUT,
        compile_bytecode: bool = True,
        use_own_pip: bool | None = None,
    ):
        self.reactor = reactor
        self.python = python
        self.timeout = timeout
        self.compile_bytecode = compile_bytecode
        self.use_own_pip = has_pip() if use_own_pip is None else use_own_pip

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
        env = child_env({"PIP_NO_INPUT": "1", "PYTHONDONTWRITEBYTECODE": "1"})
        outputs: list[str] = []
        deadline = self.reactor.seconds() + self.timeout
        for step, argv in self.commands(release_dir, with_pip=with_pip):
            remaining = max(1.0, deadline - self.reactor.seconds())
            self.log.info("Running {command}", command=" ".join(argv[:4]) + " ...")
            result: ProcessResult = await run_process(
                self.reactor, argv, env=env, path=str(release_dir), timeout=remaining
            )
            outputs.append(f"$ {' '.join(argv)}\n{result.output}")
            if not result.ok:
                text = "\n".join(outputs)
                raise InstallFailed(
                    f"{step} failed ({result.describe()}); see the install output",
                    output={"install": text},
                )
        return "\n".join(outputs)
