"""The forwarder's fault model: randomized schedules of writes, every rotation
style, crashes of either side, dropped connections and lost ACKs, against the
real tailer, delivery core and shell on an in-memory file system.

Invariant, checked after every schedule once everything is restarted and has
caught up: the listener's mirror is the concatenation of every generation
the writer wrote, byte for byte, except that a generation which is gone from
the disk (deleted or compressed before it was shipped) may be cut short, and
then the listener has recorded a gap exactly where its missing bytes were.
Nothing is duplicated, nothing is reordered, no gap is recorded anywhere else.
"""

import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from tests.forwarder_model import World, expected_mirror_ok

SCHEDULES = int(os.environ.get("DECNET_MODEL_SCHEDULES", "500"))


class ForwarderFaults(RuleBasedStateMachine):
    @initialize()
    def start(self):
        self.world = World()

    @rule(count=st.integers(0, 6), partial=st.booleans())
    def append(self, count, partial):
        self.world.writer.append(count, partial)

    @rule(style=st.sampled_from(["rename", "delete", "copytruncate"]))
    def rotate(self, style):
        self.world.writer.rotate(style)

    @rule(index=st.integers(0, 5))
    def compress_a_rotated_file(self, index):
        self.world.writer.compress(index)

    @rule(index=st.integers(0, 5))
    def delete_a_rotated_file(self, index):
        self.world.writer.delete(index)

    @rule(steps=st.integers(1, 8))
    def forwarder_works(self, steps):
        for _ in range(steps):
            self.world.run_job()

    @rule()
    def inotify(self):
        self.world.notify()

    @rule()
    def poll_timer(self):
        self.world.tick()

    @rule()
    def connect(self):
        self.world.connect()

    @rule(limit=st.none() | st.integers(0, 3))
    def frames_reach_the_listener(self, limit):
        self.world.deliver_to_listener(limit)

    @rule()
    def listener_commits(self):
        self.world.listener_commit()

    @rule()
    def replies_reach_the_forwarder(self):
        self.world.deliver_to_forwarder()

    @rule()
    def an_ack_is_lost(self):
        self.world.lose_message()

    @rule()
    def connection_drops(self):
        self.world.drop_connection()

    @rule()
    def forwarder_is_killed(self):
        self.world.crash_forwarder()

    @rule()
    def forwarder_starts(self):
        self.world.start_forwarder()

    @rule()
    def listener_is_killed(self):
        self.world.crash_listener()

    @rule()
    def listener_starts(self):
        self.world.start_listener()

    @invariant()
    def the_connection_was_never_refused(self):
        assert not getattr(self, "world", None) or not self.world.closed_reasons

    def teardown(self):
        world = getattr(self, "world", None)
        if world is None:
            return
        world.quiesce()
        expected_mirror_ok(world)


ForwarderFaults.TestCase.settings = settings(
    max_examples=SCHEDULES,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_the_mirror_is_every_generation_exactly_once_or_a_recorded_gap = ForwarderFaults.TestCase
