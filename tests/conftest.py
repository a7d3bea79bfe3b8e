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
