"""``sandbox up`` leaves nothing git would track, and a taken address says to use --net."""

from __future__ import annotations

import socket
import subprocess

from decnet import config
from decnet.sandbox.layout import worker_address
from tests.support import BIN

NET = 97  # a loopback network no other test's sandbox uses


def test_a_sandbox_directory_ignores_itself_and_a_taken_address_suggests_net(tmp_path):
    """``sandbox up --dir state3`` in a checkout: its keys are never untracked files; and
    a worker address another program holds is one error that says what to do."""
    repo = tmp_path / "checkout"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    with socket.socket() as taken:
        taken.bind((worker_address(NET, 1), config.UPDATER_PORT))
        taken.listen()
        result = subprocess.run(
            [str(BIN / "decnet-admin"), "sandbox", "up", "--workers", "1", "--net", str(NET),
             "--dir", str(repo / "state3")],
            capture_output=True, text=True, timeout=180, cwd=repo,
        )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Address already in use" in result.stderr, result.stderr
    assert "--net N" in result.stderr and "Traceback" not in result.stderr
    assert any((repo / "state3").rglob("*.key"))  # it did make keys...
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"],
        capture_output=True, text=True, cwd=repo, check=True,
    )  # fmt: skip
    assert status.stdout == ""  # ...which git does not see
