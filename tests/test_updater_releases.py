"""The release store: journal transitions, the reconcile planner, and a crash at every step."""

import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from decnet import config
from decnet.errors import ConfigError, NoPreviousRelease, UnknownRelease
from decnet.release import RELEASE_FILE
from decnet.updater.releases import (
    IDLE,
    OP_ROLLBACK,
    OP_SELF,
    OP_UPDATE,
    ROLLING_BACK,
    STAGING,
    SWITCHED,
    DiscardRelease,
    DiskState,
    IllegalTransition,
    Journal,
    PointCurrent,
    ReleaseStore,
    plan_prune,
    plan_reconcile,
)

A, B, C, D = (c * 16 for c in "abcd")


# -- transitions --------------------------------------------------------------


def test_an_update_goes_staging_switched_idle_and_pushes_the_previous_release():
    j = Journal().begin_install(B, A)
    assert (j.state, j.op, j.release, j.previous) == (STAGING, OP_UPDATE, B, A)
    j = j.begin_switch(B, A, OP_UPDATE)
    assert j.state == SWITCHED
    j = j.commit()
    assert j == Journal(history=(A,))


def test_a_failed_update_reverts_keeps_the_history_and_marks_the_release_failed():
    j = Journal(history=(C,)).begin_switch(B, A, OP_UPDATE).begin_revert()
    assert j.state == ROLLING_BACK
    assert j.abort() == Journal(history=(C,), failed=(B,))


def test_a_failed_release_that_later_activates_fine_is_no_longer_failed():
    j = Journal(history=(C,), failed=(B, D)).begin_switch(B, A, OP_UPDATE).commit()
    assert j == Journal(history=(C, A), failed=(D,))


def test_an_install_that_fails_before_the_switch_marks_nothing():
    assert Journal().begin_install(B, A).abort() == Journal()


def test_a_rollback_pops_the_stack_down_to_its_target():
    j = Journal(history=(A, B, C)).begin_switch(B, D, OP_ROLLBACK).commit()
    assert j.history == (A,)
    assert Journal(history=(A,)).begin_switch(D, C, OP_ROLLBACK).commit().history == (A,)


def test_the_rollback_target_is_the_newest_history_entry_still_installed():
    j = Journal(history=(A, B, C))
    assert j.rollback_target([A, B]) == B
    with pytest.raises(NoPreviousRelease):
        Journal().rollback_target([A])


@pytest.mark.parametrize(
    "journal, call",
    [
        (Journal(), lambda j: j.commit()),
        (Journal(), lambda j: j.begin_revert()),
        (Journal(), lambda j: j.abort()),
        (Journal(state=SWITCHED, op=OP_UPDATE, release=B), lambda j: j.begin_install(C, B)),
        (Journal(state=STAGING, op=OP_UPDATE, release=B), lambda j: j.begin_switch(C, A, "update")),
    ],
)
def test_illegal_transitions_are_bugs_not_silent(journal, call):
    with pytest.raises(IllegalTransition):
        call(journal)


def test_the_journal_round_trips_and_refuses_garbage():
    j = Journal(state=SWITCHED, op=OP_UPDATE, release=B, previous=A, history=(C,))
    assert Journal.from_json(j.to_json()) == j
    for raw in (b"{", b"[]", json.dumps({"format": "x"}).encode()):
        with pytest.raises(ConfigError):
            Journal.from_json(raw)
    bad = json.loads(j.to_json())
    bad["release"] = "../../etc"
    with pytest.raises(ConfigError, match="bad release id"):
        Journal.from_json(json.dumps(bad).encode())


# -- the reconcile planner ------------------------------------------------------


def disk(complete=(A,), incomplete=(), current=A, **kw):
    return DiskState(
        complete=tuple(complete), incomplete=frozenset(incomplete), current=current, **kw
    )


def test_an_idle_consistent_directory_needs_nothing():
    plan = plan_reconcile(Journal(), disk())
    assert plan.actions == () and plan.current == A


def test_a_crash_while_staging_removes_the_partial_release_and_keeps_current():
    j = Journal().begin_install(B, A)
    plan = plan_reconcile(j, disk(incomplete=(B,)))
    assert DiscardRelease(B) in plan.actions
    assert not plan.moved_current
    assert plan.journal == Journal()


def test_a_crash_after_the_switch_goes_back_to_the_previous_release():
    j = Journal().begin_install(B, A).begin_switch(B, A, OP_UPDATE)
    for current in (A, B):  # before or after the rename
        plan = plan_reconcile(j, disk(complete=(A, B), current=current))
        assert plan.current == A
        assert plan.moved_current == (current == B)


def test_a_crash_while_rolling_back_finishes_the_rollback_and_marks_the_release_failed():
    j = Journal().begin_switch(B, A, OP_UPDATE).begin_revert()
    plan = plan_reconcile(j, disk(complete=(A, B), current=B))
    assert PointCurrent(A) in plan.actions
    assert plan.journal.failed == (B,)


def test_a_crash_after_the_switch_does_not_call_the_release_failed():
    """The updater died, not necessarily the release: it was only unconfirmed."""
    j = Journal().begin_switch(B, A, OP_UPDATE)
    assert plan_reconcile(j, disk(complete=(A, B), current=B)).journal.failed == ()


def test_failed_marks_of_releases_no_longer_installed_are_dropped():
    plan = plan_reconcile(Journal(failed=(B, C)), disk(complete=(A, B)))
    assert plan.journal.failed == (B,)


def test_a_crash_after_a_self_switch_rolls_forward():
    j = Journal().begin_switch(B, A, OP_SELF)
    plan = plan_reconcile(j, disk(complete=(A, B), current=A))
    assert plan.current == B


def test_a_first_install_that_crashed_after_the_switch_leaves_no_current():
    j = Journal().begin_install(A, None).begin_switch(A, None, OP_UPDATE)
    plan = plan_reconcile(j, disk(complete=(A,), current=A))
    assert plan.current is None and PointCurrent(None) in plan.actions


def test_current_naming_an_incomplete_release_falls_back_to_history():
    plan = plan_reconcile(Journal(history=(A,)), disk(complete=(A,), incomplete=(B,), current=B))
    assert plan.current == A
    assert DiscardRelease(B) in plan.actions


def test_temporary_links_and_trash_are_cleared():
    plan = plan_reconcile(Journal(), disk(temp_links=(".current.tmp-12",), trash=True))
    names = {type(a).__name__ for a in plan.actions}
    assert names == {"RemoveTempLink", "EmptyTrash"}


_IDS = st.sampled_from([A, B, C, D])


@st.composite
def _journals_and_disks(draw):
    journal = Journal(
        state=draw(st.sampled_from([IDLE, STAGING, SWITCHED, ROLLING_BACK])),
        op=draw(st.none() | st.sampled_from([OP_UPDATE, OP_ROLLBACK, OP_SELF])),
        release=draw(st.none() | _IDS),
        previous=draw(st.none() | _IDS),
        history=tuple(draw(st.lists(_IDS, max_size=5))),
        failed=tuple(draw(st.lists(_IDS, max_size=3))),
    )
    complete = draw(st.lists(_IDS, unique=True, max_size=4))
    incomplete = draw(st.sets(_IDS.filter(lambda r: r not in complete), max_size=2))
    return journal, disk(complete, incomplete, current=draw(st.none() | _IDS))


@settings(max_examples=300, deadline=None)
@given(_journals_and_disks())
def test_whatever_a_crash_left_the_plan_ends_idle_on_a_complete_release_or_none(case):
    journal, on_disk = case
    plan = plan_reconcile(journal, on_disk)
    complete = set(on_disk.complete)
    assert plan.current is None or plan.current in complete
    assert plan.journal.state == IDLE
    assert set(plan.journal.history) <= complete - {plan.current}
    assert set(plan.journal.failed) <= complete
    assert {a.release for a in plan.actions if isinstance(a, DiscardRelease)} == set(
        on_disk.incomplete
    )
    assert plan.moved_current == (plan.current != on_disk.current)
    # A start-up that found a current release never ends with none while the
    # history still names a complete one.
    if on_disk.current is not None and plan.current is None:
        assert not complete & set(journal.history)


@settings(max_examples=300, deadline=None)
@given(
    complete=st.lists(_IDS, unique=True, max_size=4),
    current=st.none() | _IDS,
    history=st.lists(_IDS, max_size=5),
    keep=st.integers(-1, 5),
    failed=st.sets(_IDS, max_size=3),
    in_use=st.sets(_IDS, max_size=2),
)
def test_prune_deletes_only_unprotected_releases_and_keeps_keep_when_it_can(
    complete, current, history, keep, failed, in_use
):
    doomed = plan_prune(complete, current, history, keep, failed=failed, in_use=in_use)
    assert len(set(doomed)) == len(doomed) and set(doomed) <= set(complete)
    assert not set(doomed) & ({current} | set(in_use))
    known = [h for h in history if h in complete]
    if known:
        assert known[-1] not in doomed  # the rollback target
    kept = [r for r in complete if r not in doomed]
    assert len(kept) >= min(len(complete), max(keep, 0))
    # Failed releases go before good ones.
    assert doomed == sorted(doomed, key=lambda r: (r not in failed, complete.index(r)))


def test_prune_keeps_the_newest_the_current_and_the_rollback_target():
    assert plan_prune([A, B, C, D], D, [A, C], keep=2) == [A, B]
    assert plan_prune([A, B, C, D], D, [A], keep=3) == [B]
    assert plan_prune([A, B], B, [], keep=5) == []


def test_what_must_stay_stays_even_beyond_keep():
    # After a rollback to A: current A, rollback target B; C and D go with keep=1.
    assert plan_prune([A, B, C, D], A, [B], keep=1) == [C, D]
    assert plan_prune([A, B, C, D], D, [B, C], keep=1, in_use=[A]) == [B]


def test_the_repro_the_forwarders_known_good_release_stays_and_the_broken_one_goes():
    """--keep 3: A (the forwarder's), B, C rolled back (failed), D current.

    Before: the oldest, A, was deleted and the broken C kept."""
    assert plan_prune([A, B, C, D], D, [A, B], keep=3, failed=[C], in_use=[A]) == [C]
    assert plan_prune([A, B, C, D], D, [A, B], keep=3, failed=[C]) == [C]


def test_failed_releases_go_first_oldest_first_then_the_oldest_good_ones():
    E, F = "e" * 16, "f" * 16
    assert plan_prune([A, B, C, D, E, F], F, [], keep=3, failed=[B, D]) == [B, D, A]
    assert plan_prune([A, B, C, D, E, F], F, [], keep=4, failed=[B, D]) == [B, D]
    assert plan_prune([A, B, C, D, E, F], F, [], keep=2, failed=[B, D]) == [B, D, A, C]
    assert plan_prune([A, B, C, D, E, F], F, [], keep=5, failed=[B, D]) == [B]


def test_the_previous_good_release_is_kept_even_when_the_rollback_target_failed():
    # History A then B; a later rollback to B failed: B is failed, A is the previous good.
    assert plan_prune([A, B, C, D], D, [A, B], keep=1, failed=[B, C]) == [C]


def test_a_release_in_use_is_never_pruned_whatever_else_is_true():
    assert plan_prune([A, B, C], C, [], keep=1, failed=[A], in_use=[A]) == [B]


# -- the store on disk ----------------------------------------------------------


def install(store: ReleaseStore, release: str, **info):
    """A fake install: files in src/ and venv/, then complete."""
    directory = store.begin_install(release)
    (directory / "src").mkdir()
    (directory / "src" / "setup.cfg").write_text("[metadata]\n")
    (directory / "venv").mkdir()
    store.finish_install(release, {"installed_at": info.get("at", release), **info}, "log")
    return directory


def activate(store, release, op=OP_UPDATE):
    store.switch_to(release, op)
    store.commit()


def snapshot(root):
    """Everything under ``root`` (names, link targets, file bytes) for before/after checks."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                out[rel] = ("link", os.readlink(path))
            elif os.path.isfile(path):
                with open(path, "rb") as fh:
                    out[rel] = ("file", fh.read())
            else:
                out[rel] = ("dir",)
    return out


@pytest.fixture
def store(tmp_path):
    s = ReleaseStore(tmp_path / "install")
    s.reconcile()
    return s


def test_a_release_is_complete_only_once_release_json_is_written(store):
    directory = store.begin_install(A)
    assert store.scan().incomplete == {A}
    assert store.list_releases() == []
    store.finish_install(A, {"installed_at": "t", "git_sha": "abc"}, "pip said hi")
    assert json.loads((directory / RELEASE_FILE).read_text())["id"] == A
    assert (directory / config.RELEASE_INSTALL_LOG).read_text() == "pip said hi"
    assert store.scan().complete == (A,)


def test_current_is_a_relative_symlink_switched_by_rename(store):
    install(store, A)
    activate(store, A)
    assert os.readlink(store.current_link) == f"releases/{A}"
    install(store, B)
    previous = store.switch_to(B, OP_UPDATE)
    store.commit()
    assert previous == A and store.current() == B
    assert store.journal.history == (A,)
    listing = store.list_releases()
    assert [(r["id"], r["current"], r["rollback_target"]) for r in listing] == [
        (B, True, False),
        (A, False, True),
    ]


def test_prune_removes_old_releases_through_the_trash(store):
    for i, r in enumerate((A, B, C, D)):
        install(store, r, at=str(i))
        activate(store, r)
    assert store.prune(2) == [A, B]
    assert store.scan().complete == (C, D)
    assert store.journal.history == (C,)
    assert not store.trash_dir.exists()


def test_rollback_targets_are_validated(store):
    install(store, A)
    activate(store, A)
    with pytest.raises(NoPreviousRelease):
        store.rollback_target(None)
    with pytest.raises(UnknownRelease):
        store.rollback_target(B)
    with pytest.raises(UnknownRelease):
        store.rollback_target("../../../etc")


class Crash(Exception):
    pass


class CrashAt:
    """A crash hook: raises before the ``n``-th durable step, records where ``current`` was."""

    def __init__(self, root, n):
        self.root, self.n = root, n
        self.steps: list[tuple[str, str | None]] = []

    def __call__(self, step):
        current = ReleaseStore(self.root).current()
        self.steps.append((step, current))
        if len(self.steps) == self.n:
            raise Crash(step)

    def committed_current(self, crashed: bool):
        """``current`` as of the last journal write back to idle that completed."""
        done = self.steps[:-1] if crashed else self.steps
        committed = A
        for step, current in done:
            if step == "journal:idle":
                committed = current
        return committed


def prepare(root):
    """An install dir with release A current and healthy."""
    s = ReleaseStore(root)
    s.reconcile()
    install(s, A, at="1")
    activate(s, A)


def loaded(root, hook=None):
    s = ReleaseStore(root, hook)
    s.journal = s.read_journal()
    return s


def successful_update(s):
    install(s, B, at="2")
    s.switch_to(B, OP_UPDATE)
    s.commit()
    s.prune(1)


def failed_update(s):
    install(s, B, at="2")
    s.switch_to(B, OP_UPDATE)
    s.begin_revert()
    s.finish_revert()


def failed_install(s):
    s.begin_install(B)
    s.abort_install(B)


def update_then_rollback(s):
    install(s, B, at="2")
    activate(s, B)
    s.switch_to(A, OP_ROLLBACK)
    s.commit()


SCENARIOS = {
    "update": successful_update,
    "failed-update": failed_update,
    "failed-install": failed_install,
    "update-then-rollback": update_then_rollback,
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_a_crash_at_every_step_is_repaired_on_start(tmp_path, name):
    """kill -9 before every durable operation: the next start finds a consistent tree.

    ``current`` names a complete release -- the one that was current when the
    journal last went back to idle, i.e. the last confirmed one -- and nothing
    partial (release directory, temporary link or journal, trash) is left.
    """
    scenario = SCENARIOS[name]
    counter = CrashAt(tmp_path / "count", 10**9)
    prepare(counter.root)
    scenario(loaded(counter.root, counter))
    total = len(counter.steps)
    assert total >= 5
    for n in range(1, total + 2):
        root = tmp_path / f"crash-{n}"
        prepare(root)
        hook = CrashAt(root, n)
        crashed = False
        try:
            scenario(loaded(root, hook))
        except Crash:
            crashed = True
        assert crashed == (n <= total)
        where = f"crash before step {n}/{total} ({hook.steps[-1][0]})"
        after = ReleaseStore(root)
        plan = after.reconcile()
        disk = after.scan()
        assert disk.incomplete == frozenset(), where
        assert disk.current in disk.complete, where
        assert disk.temp_links == () and not disk.trash, where
        assert after.read_journal().state == IDLE, where
        assert disk.current == hook.committed_current(crashed), (where, plan)
        # Repair is idempotent: a second start has nothing left to do.
        assert ReleaseStore(root).reconcile().actions == (), where


def test_a_failed_install_leaves_the_directory_exactly_as_it_was(tmp_path):
    root = tmp_path / "inst"
    prepare(root)
    before = snapshot(root)
    failed_install(loaded(root))
    assert snapshot(root) == before
