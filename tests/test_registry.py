"""The master's SQLite host registry."""

import fcntl
import os
import sqlite3
import threading

import pytest

from decnet.errors import DuplicateHost, RegistryError, UnknownHost
from decnet.master.registry import MIGRATIONS, Host, Registry


def host(name="w1", fp="a", ufp=None, **kw):
    return Host(
        name=name,
        address="10.0.0.1",
        agent_port=8765,
        updater_port=8766,
        worker_fingerprint=fp * 64,
        updater_fingerprint=ufp and ufp * 64,
        enrolled_at="2026-01-01T00:00:00+00:00",
        **kw,
    )


def test_a_new_registry_is_at_the_latest_schema_version(tmp_path):
    assert Registry(tmp_path / "r.sqlite").schema_version == len(MIGRATIONS)


def test_hosts_round_trip_and_list_sorted(tmp_path):
    reg = Registry(tmp_path / "r.sqlite")
    reg.add(host("web", "a", "b"))
    reg.add(host("db", "c"))
    assert [h.name for h in reg.list()] == ["db", "web"]
    assert reg.get("web") == host("web", "a", "b")
    assert reg.get("web").has_updater and not reg.get("db").has_updater


def test_duplicate_names_are_refused_with_advice(tmp_path):
    reg = Registry(tmp_path / "r.sqlite")
    reg.add(host("web", "a"))
    with pytest.raises(DuplicateHost, match="already enrolled"):
        reg.add(host("web", "b"))


def test_decommissioning_dates_the_revocation_on_the_registrys_clock(tmp_path):
    reg = Registry(tmp_path / "r.sqlite", now=lambda: 1767323045.75)
    reg.add(host("web", "a"))
    assert reg.decommission("web").revoked_at == "2026-01-02T03:04:05+00:00"


def test_status_changes_but_decommissioned_is_final(tmp_path):
    reg = Registry(tmp_path / "r.sqlite")
    reg.add(host("web", "a"))
    reg.set_status("web", "active")
    assert reg.get("web").status == "active"
    reg.decommission("web", "2026-02-02T00:00:00+00:00")
    reg.set_status("web", "active")
    got = reg.get("web")
    assert got.status == "decommissioned" and got.revoked_at == "2026-02-02T00:00:00+00:00"
    with pytest.raises(UnknownHost):
        reg.set_status("nope", "active")
    with pytest.raises(ValueError):
        reg.set_status("web", "bogus")


def test_a_database_from_a_newer_version_is_refused(tmp_path):
    path = tmp_path / "r.sqlite"
    Registry(path)
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    db.close()
    with pytest.raises(RegistryError, match="newer"):
        Registry(path)


def test_an_old_database_is_migrated_on_open(tmp_path):
    path = tmp_path / "r.sqlite"
    sqlite3.connect(path).close()  # version 0: empty
    assert Registry(path).schema_version == len(MIGRATIONS)


def test_concurrent_writers_from_threads_all_land(tmp_path):
    reg = Registry(tmp_path / "r.sqlite")
    errors = []

    def add(i):
        try:
            reg.add(host(f"w{i}", f"{i:x}"))
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(reg.list()) == 10


def test_the_registry_lock_excludes_every_other_holder_until_released(tmp_path):
    reg = Registry(tmp_path / "r.sqlite")
    lock_file = tmp_path / ".r.sqlite.lock"

    def try_lock() -> bool:
        fd = os.open(lock_file, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(fd)

    with reg.lock():
        assert not try_lock()
    assert try_lock()
