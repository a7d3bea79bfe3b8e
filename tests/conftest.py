import pytest

from decnet import config, pki


@pytest.fixture(scope="session")
def ca(tmp_path_factory) -> pki.CertificateAuthority:
    """The DECNET CA every test identity is issued from (RSA-4096, made once)."""
    return pki.ensure_ca(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="session")
def foreign_ca(tmp_path_factory) -> pki.CertificateAuthority:
    """A second CA with the very same subject: an impostor's."""
    return pki.ensure_ca(tmp_path_factory.mktemp("foreign-ca"), key_size=2048)


@pytest.fixture(scope="session")
def master_home(tmp_path_factory) -> config.MasterPaths:
    """An initialised master state directory, shared read-mostly by tests."""
    from decnet.master import enrollment

    paths = config.MasterPaths.resolve(tmp_path_factory.mktemp("master") / "home")
    enrollment.init_master(paths)
    return paths


def _install_requires() -> list[str]:
    import configparser

    from tests.support import REPO_ROOT

    parser = configparser.ConfigParser()
    parser.read(REPO_ROOT / "setup.cfg")
    raw = parser["options"]["install_requires"]
    return [line.split("#")[0].strip() for line in raw.splitlines() if line.split("#")[0].strip()]


@pytest.fixture(scope="session")
def wheelhouse():
    """Wheels of every dependency (plus setuptools and wheel, for the build) for offline installs.

    Built once with ``pip wheel`` and cached across sessions under
    ``$XDG_CACHE_HOME/decnet-tests`` (keyed by the requirements and the
    Python version), so release venvs in the tests install with ``--no-index``.
    """
    import hashlib
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.support import BIN

    requirements = [*_install_requires(), "setuptools>=64", "wheel"]
    key = hashlib.sha256("\n".join([sys.version, *sorted(requirements)]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "decnet-tests"
    target = cache / f"wheelhouse-{key}"
    if (target / ".complete").exists():
        return target
    partial = cache / f".wheelhouse-{key}.{os.getpid()}"
    partial.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [str(BIN / "pip"), "wheel", "--quiet", "--wheel-dir", str(partial), *requirements],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        pytest.fail(f"could not build the test wheelhouse:\n{result.stderr[-3000:]}")
    (partial / ".complete").write_text("")
    try:
        partial.rename(target)
    except OSError:  # another session won the race
        import shutil

        shutil.rmtree(partial, ignore_errors=True)
    return target


@pytest.fixture(scope="session")
def release_trees(tmp_path_factory):
    """Source trees to release, copied from this repository (what tar_tree ships).

    ``good1``/``good2`` differ by a comment (two release ids); ``crash`` has an
    agent that dies at start; ``wrong`` has an agent that never reports the
    release it runs (its health check can only time out).  The agent is the
    real one when the repository has it, else the stand-in from tests/support.
    """
    from tests.support import copy_release_tree

    base = tmp_path_factory.mktemp("release-trees")
    trees = {}
    for name in ("good1", "good2", "crash", "wrong"):
        trees[name] = copy_release_tree(base / name)
    with open(trees["good2"] / "decnet" / "__init__.py", "a") as fh:
        fh.write("# release two\n")
    with open(trees["crash"] / "decnet" / "agent" / "tap.py", "a") as fh:
        fh.write('\nraise SystemExit("this release is broken on purpose")\n')
    with open(trees["wrong"] / "decnet" / "release.py", "a") as fh:
        fh.write('\n\ndef release_id():\n    return "not-the-release-it-runs"\n')
    return trees
