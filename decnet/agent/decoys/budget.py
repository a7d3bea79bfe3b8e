"""Agent-wide budgets that keep decoy traffic from starving the agent itself.

* :class:`ConnectionBudget`: how many sockets all decoys together may hold
  (their listeners and their connections).  Its default leaves a reserve of
  file descriptors below ``RLIMIT_NOFILE`` for the API, the event log and the
  daemon's own files (:func:`default_connection_budget`), so a flood of decoy
  connections is refused by the decoys instead of making ``accept()`` fail
  with ``EMFILE`` everywhere, the API included.
* :class:`TurnBudget`: how much of one reactor turn decoy parsing may use.
  Decoys parse item by item (a line, a packet, a command); past the turn's
  slice a connection stops reading and waits its turn, so the API's requests
  are served in every reactor turn whatever the attackers send.
* :class:`RefusalReport`: refusals are logged once per burst, then as a
  periodic summary, never once per connection.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.protocols.policies import WrappingFactory

# File descriptors kept for everything that is not a decoy socket: the API's
# listener and connections, the event log, the state and key files, stdio,
# the reactor's own descriptors.  One eighth of RLIMIT_NOFILE, at least 32 and
# at most 512.
FD_RESERVE_MIN = 32
FD_RESERVE_MAX = 512
FD_RESERVE_FRACTION = 8

# Decoy parsing per reactor turn: at most this much time in total, and at most
# this many items per connection before it yields to the others.
TURN_SLICE = 0.002
TURN_ITEMS = 32
# ... and while the API has a connection open (a request on its way).
API_TURN_SLICE = 0.0005

REFUSAL_SUMMARY_INTERVAL = 10.0


def fd_reserve(nofile: int) -> int:
    """Descriptors :func:`default_connection_budget` keeps out of the decoys' reach."""
    return min(FD_RESERVE_MAX, max(FD_RESERVE_MIN, nofile // FD_RESERVE_FRACTION))


def default_connection_budget(nofile: int) -> int:
    """The decoys' socket budget for a soft ``RLIMIT_NOFILE`` of ``nofile`` (at least 1).

    ``nofile - clamp(nofile // 8, 32, 512)``: 1024 gives 896, 65536 gives 65024.
    """
    return max(1, nofile - fd_reserve(nofile))


def nofile_limit() -> int:
    """The process's soft ``RLIMIT_NOFILE`` (``RLIM_INFINITY`` read as 2**20)."""
    import resource

    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 2**20 if soft == resource.RLIM_INFINITY else soft


class RefusalReport:
    """Logs refused decoy connections once per burst, then a summary per ``interval``.

    The first refusal of a burst logs one warning; while refusals continue, one
    summary line per ``interval`` gives their count by reason; the first
    ``interval`` without a refusal ends the burst.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, interval: float = REFUSAL_SUMMARY_INTERVAL):
        self.clock = clock
        self.interval = interval
        self.total = 0
        self._counts: Counter = Counter()
        self._call: IDelayedCall | None = None

    def refused(self, reason: str) -> None:
        self.total += 1
        if self._call is None:
            self.log.warn(
                "Refusing decoy connections: {reason}; further refusals are summarised "
                "every {interval:g} s",
                reason=reason,
                interval=self.interval,
            )
            self._call = self.clock.callLater(self.interval, self._summarise)
            return
        self._counts[reason] += 1

    def _summarise(self) -> None:
        if not self._counts:
            self._call = None
            return
        count = sum(self._counts.values())
        reasons = "; ".join(f"{n} {why}" for why, n in self._counts.most_common())
        self._counts.clear()
        self.log.warn(
            "Refused {count} more decoy connections in the last {interval:g} s ({reasons})",
            count=count,
            interval=self.interval,
            reasons=reasons,
        )
        self._call = self.clock.callLater(self.interval, self._summarise)

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


class ConnectionBudget:
    """The sockets all decoys may hold at once: listeners plus live connections."""

    log = Logger()

    def __init__(self, limit: int, clock: IReactorTime, *, report: RefusalReport | None = None):
        if limit < 1:
            raise ValueError("the decoy connection budget must be at least 1")
        self.limit = limit
        self.listeners = 0
        self.connections = 0
        self.report = report if report is not None else RefusalReport(clock)

    @property
    def in_use(self) -> int:
        return self.listeners + self.connections

    def add_listener(self) -> None:
        self.listeners += 1

    def remove_listener(self) -> None:
        self.listeners = max(0, self.listeners - 1)

    def acquire(self) -> bool:
        """Take one connection slot; ``False`` (and the refusal reported) when full."""
        if self.in_use >= self.limit:
            self.report.refused(
                f"the agent-wide decoy budget of {self.limit} sockets is in use "
                "(--max-decoy-connections)"
            )
            return False
        self.connections += 1
        return True

    def release(self) -> None:
        self.connections = max(0, self.connections - 1)


class APIPriority(WrappingFactory):
    """Wraps the API's factory: tells the :class:`TurnBudget` while API connections are open."""

    noisy = False

    def __init__(self, wrapped, turns: TurnBudget):
        super().__init__(wrapped)
        self.turns = turns

    def registerProtocol(self, p):
        super().registerProtocol(p)
        self.turns.api_opened()

    def unregisterProtocol(self, p):
        super().unregisterProtocol(p)
        self.turns.api_closed()


class TurnBudget:
    """The share of each reactor turn that decoy connections may spend parsing.

    A connection asks before each item it parses and charges the time the
    item took; once the turn's ``slice`` is spent, or the connection has
    parsed ``items`` items in this turn, it pauses its transport and waits
    (:meth:`wait`).  Each new turn (a ``callLater(0)`` on the injected clock)
    resets the slice and resumes waiting connections in FIFO order.  While an
    API connection is open (:class:`APIPriority`) the slice shrinks to
    ``api_slice``: a TLS handshake and a request take a few turns, and each
    of them then waits behind less decoy work.  ``timer`` measures work, not
    scheduling; tests inject a fake one.
    """

    def __init__(
        self,
        clock,
        *,
        slice: float = TURN_SLICE,
        api_slice: float = API_TURN_SLICE,
        items: int = TURN_ITEMS,
        timer: Callable[[], float] = time.perf_counter,
    ):
        self.clock = clock
        self.normal_slice = slice
        self.api_slice = api_slice
        self.api_connections = 0
        self.items = items
        self.timer = timer
        self.spent = 0.0
        self.turns = 0
        self.waits = 0
        self._waiting: deque = deque()
        self._call = None

    @property
    def slice(self) -> float:
        """This turn's time for decoys: less while the API is serving someone."""
        return self.api_slice if self.api_connections else self.normal_slice

    def api_opened(self) -> None:
        self.api_connections += 1

    def api_closed(self) -> None:
        self.api_connections = max(0, self.api_connections - 1)

    def allows(self, done: int) -> bool:
        """May a connection that parsed ``done`` items in this turn parse one more?"""
        return done < self.items and self.spent < self.slice

    def charge(self, seconds: float) -> None:
        self.spent += seconds
        self._arm()

    def wait(self, waiter) -> None:
        """Queue ``waiter``; its ``resume_turn()`` is called in a later turn."""
        self.waits += 1
        self._waiting.append(waiter)
        self._arm()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _arm(self) -> None:
        if self._call is None:
            self._call = self.clock.callLater(0, self._next_turn)

    def _next_turn(self) -> None:
        self._call = None
        self.spent = 0.0
        self.turns += 1
        # Only those already waiting: a connection that waits again goes to
        # the back of the queue for the next turn.
        for _ in range(len(self._waiting)):
            if self.spent >= self.slice:
                break
            self._waiting.popleft().resume_turn()
        if self._waiting:
            self._arm()

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._waiting.clear()
