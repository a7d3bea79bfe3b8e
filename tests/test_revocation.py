"""The revocation list file and its live reload."""

import json

import pytest
import pytest_twisted
from twisted.internet import reactor

from decnet.errors import ConfigError
from decnet.revocation import FORMAT, RevocationSet, RevocationWatcher, add_entries, read_entries

FP1, FP2 = "1" * 64, "2" * 64


def test_a_missing_file_is_an_empty_list(tmp_path):
    assert read_entries(tmp_path / "revoked.json") == []
    assert len(RevocationSet(tmp_path / "revoked.json")) == 0


def test_entries_are_appended_once_and_written_in_the_documented_format(tmp_path):
    path = tmp_path / "revoked.json"
    add_entries(path, [{"fingerprint": FP1, "cn": "w1", "role": "worker", "revoked_at": "t"}])
    add_entries(path, [{"fingerprint": FP1.upper(), "cn": "w1"}, {"fingerprint": FP2}])
    doc = json.loads(path.read_text())
    assert doc["format"] == FORMAT
    assert [e["fingerprint"] for e in doc["revoked"]] == [FP1, FP2]


@pytest.mark.parametrize(
    "body",
    [
        "{",
        "[]",
        '{"format": "x", "revoked": []}',
        '{"format": "decnet-revocations/1", "revoked": [{"fingerprint": "zz"}]}',
    ],
)
def test_a_malformed_file_is_an_error_naming_it(tmp_path, body):
    path = tmp_path / "revoked.json"
    path.write_text(body)
    with pytest.raises(ConfigError, match=r"revoked\.json"):
        RevocationSet(path)


def test_reload_picks_up_changes_and_tells_subscribers_what_is_new(tmp_path):
    path = tmp_path / "revoked.json"
    rs = RevocationSet(path)
    seen = []
    rs.subscribe(seen.append)
    assert rs.reload() is False
    add_entries(path, [{"fingerprint": FP1}])
    assert rs.reload() is True
    assert FP1 in rs and FP2 not in rs
    assert seen == [frozenset({FP1})]


@pytest_twisted.ensureDeferred
async def test_the_watcher_reloads_off_the_reactor_and_survives_a_bad_file(tmp_path):
    path = tmp_path / "revoked.json"
    rs = RevocationSet(path)
    watcher = RevocationWatcher(rs, reactor, interval=3600)
    add_entries(path, [{"fingerprint": FP1}])
    await watcher.check()
    assert FP1 in rs
    path.write_text("not json")
    await watcher.check()  # logs an error, keeps the previous list
    assert FP1 in rs
