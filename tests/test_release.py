"""How a daemon learns the release it runs from."""

import json

from decnet import release


def test_release_json_next_to_the_venv_names_the_release(tmp_path, monkeypatch):
    (tmp_path / "venv").mkdir()
    (tmp_path / "release.json").write_text(json.dumps({"id": "r1", "git_sha": "abc"}))
    assert release.release_info(tmp_path / "venv")["id"] == "r1"
    monkeypatch.delenv(release.ENV_RELEASE_ID, raising=False)
    monkeypatch.setattr(release.sys, "prefix", str(tmp_path / "venv"))
    assert release.release_id() == "r1"


def test_the_environment_overrides_and_a_checkout_has_no_release(tmp_path, monkeypatch):
    monkeypatch.setattr(release.sys, "prefix", str(tmp_path / "venv"))
    monkeypatch.delenv(release.ENV_RELEASE_ID, raising=False)
    assert release.release_id() is None
    monkeypatch.setenv(release.ENV_RELEASE_ID, "r2")
    assert release.release_id() == "r2"


def test_a_malformed_release_file_is_no_release(tmp_path):
    (tmp_path / "release.json").write_text("[1]")
    assert release.release_info(tmp_path / "venv") is None
