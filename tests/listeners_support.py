"""Shared by the tests of several listeners: a master home of a test's own."""

from __future__ import annotations

import shutil
from pathlib import Path

from decnet import config


def own_master_home(master_home: config.MasterPaths, tmp_path: Path) -> config.MasterPaths:
    """A master home of its own: the session's CA and identities copied (no keygen), a
    fresh registry, no listener list."""
    from decnet.master import enrollment

    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    for sub in ("ca", "master", "listener"):
        shutil.copytree(master_home.home / sub, home / sub)
    shutil.copy(master_home.master_config, home / "master.json")
    paths = config.MasterPaths.resolve(home)
    enrollment.init_master(paths)  # the registry
    return paths
