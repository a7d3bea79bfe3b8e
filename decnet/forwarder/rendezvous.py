"""Which listener a worker ships to: rendezvous (highest-random-weight) hashing.

Pure.  Every worker ranks the listeners of its bundle by a hash of (its CN,
the listener) and prefers the first; the others are its failover order.  The
choice is sticky: adding a listener to N moves only the workers that now rank
the new one first (about 1/(N+1) of them), removing one moves only its own
workers, and every worker computes the same order without talking to anyone.

:class:`ListenerChoice` is the forwarder's position in that order: which
listener the next connection attempt goes to, when it moves on (a failed
attempt), and when it goes back to the preferred one (see ``docs/SWARM-Mode.md``,
"Several listeners").
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from decnet.pki import format_listener

Listener = tuple[str, int]


def weight(cn: str, listener: Listener) -> int:
    """The rendezvous weight of ``listener`` for the worker ``cn`` (SHA-256, 64 bits)."""
    key = cn.encode("utf-8") + b"\x00" + format_listener(*listener).encode("utf-8")
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big")


def rendezvous_order(cn: str, listeners: Sequence[Listener]) -> list[Listener]:
    """``listeners`` ranked for ``cn``: the preferred one first, then the failover order.

    Ties (a 64-bit collision) fall back to the list order, so the result is
    always deterministic."""
    ranked = sorted(enumerate(listeners), key=lambda item: (-weight(cn, item[1]), item[0]))
    return [listener for _, listener in ranked]


class ListenerChoice:
    """Where the next connection attempt goes.

    * every fresh start of a connection (the first, and after a working
      connection ends) begins with the preferred listener;
    * a failed attempt moves on to the next listener in rendezvous order
      (wrapping round, so a fleet whose listeners are all down keeps trying
      each of them with the usual backoff);
    * a connection to any listener but the preferred one is handed back after
      ``return_after`` seconds (the caller closes it; the next attempt begins
      with the preferred listener again and fails over once more if it is
      still down).
    """

    def __init__(self, cn: str, listeners: Sequence[Listener], return_after: float):
        if not listeners:
            raise ValueError("a forwarder needs at least one listener")
        self.order = rendezvous_order(cn, listeners)
        self.return_after = return_after
        self.index = 0
        self.connected_to: Listener | None = None
        self.moved = False

    @property
    def preferred(self) -> Listener:
        return self.order[0]

    @property
    def target(self) -> Listener:
        """The listener the next attempt goes to."""
        return self.order[self.index]

    @property
    def several(self) -> bool:
        """Whether the worker may move between listeners: several are listed, or the list
        was replaced while running (``moved``).  Connections then speak
        ``decnet-syslog/2``, whose HELLO tells a listener what is acknowledged elsewhere."""
        return len(self.order) > 1 or self.moved

    def failed(self) -> tuple[Listener, Listener]:
        """An attempt at :attr:`target` failed: ``(from, to)`` for the next attempt."""
        before = self.target
        self.index = (self.index + 1) % len(self.order)
        return before, self.target

    def connected(self) -> bool:
        """An attempt at :attr:`target` succeeded; ``True`` when that is not the preferred
        listener (the caller schedules the return after :attr:`return_after`)."""
        self.connected_to = self.target
        return self.index != 0

    def disconnected(self) -> Listener | None:
        """A working connection ended: the next attempt begins with the preferred listener.

        Returns the listener it was connected to (``None`` if none was)."""
        was, self.connected_to = self.connected_to, None
        self.index = 0
        return was
