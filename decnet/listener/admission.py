"""Who may start a TLS handshake with the listener, and how refusals are logged.

Port 6514 faces the internet, and until its handshake ends a connection is
nobody.  So unauthenticated connections have a budget of their own, apart from
``--max-connections`` (which counts authenticated workers only):

* at most ``per_address`` of them from one source address (an IPv6 address
  counts by its /64, which one host usually holds whole); one more is
  refused, closed before any TLS state exists;
* at most ``limit`` in all.  When that is full, a new connection evicts the
  oldest unauthenticated one: a slowloris's socket goes, and a fresh
  handshake (a worker's takes milliseconds) always gets its turn.  A pending
  connection from an address a worker recently authenticated from is never
  evicted for a stranger;
* each gets ``--handshake-timeout`` seconds for its whole handshake (enforced
  by the protocol, not here).

:class:`PreTLSBudget` decides (pure: no sockets, no clock, opaque handles);
:class:`RefusalLog` says so without letting a flood flood the log.
"""

from __future__ import annotations

import collections
import ipaddress
from collections.abc import Hashable

import attrs
from twisted.logger import Logger

DEFAULT_MAX_UNAUTHENTICATED = 1024
DEFAULT_MAX_UNAUTHENTICATED_PER_ADDRESS = 16
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
# The kernel's accept queue of the default endpoint (Twisted's default is 50): a
# burst of connections must not fill it in front of a worker while the reactor
# is busy (the kernel caps it at net.core.somaxconn).
LISTEN_BACKLOG = 1024
# Addresses remembered as "a worker authenticated from here" (least recently seen forgotten).
REMEMBERED_WORKER_ADDRESSES = 4096
# Refusals logged in full per interval; the rest are summed up in one line per interval.
REFUSAL_LOG_BURST = 5
REFUSAL_LOG_INTERVAL = 10.0
# Distinct addresses a summary counts separately (a botnet's are lumped together beyond it).
_SUMMARY_ADDRESSES = 1024


def address_key(host: str | None) -> str:
    """What the per-address cap counts: the IPv4 address, or the /64 of an IPv6 one."""
    if not host:
        return "?"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


@attrs.frozen
class Admit:
    """Let the connection start its handshake; first drop ``evict`` when it is set."""

    evict: Hashable | None = None


@attrs.frozen
class Refuse:
    """Close the connection before TLS, for ``reason``."""

    reason: str


class PreTLSBudget:
    """The unauthenticated connections: how many, from where, and which is oldest."""

    def __init__(
        self,
        limit: int = DEFAULT_MAX_UNAUTHENTICATED,
        per_address: int = DEFAULT_MAX_UNAUTHENTICATED_PER_ADDRESS,
        *,
        remembered: int = REMEMBERED_WORKER_ADDRESSES,
    ):
        if limit < 1 or per_address < 1:
            raise ValueError("the pre-TLS budget and per-address cap must be at least 1")
        self.limit = limit
        self.per_address = per_address
        self.remembered = remembered
        # Oldest first.  Strangers may be evicted; connections from addresses
        # that workers use may not (by strangers).
        self._strangers: collections.OrderedDict[Hashable, str] = collections.OrderedDict()
        self._known: collections.OrderedDict[Hashable, str] = collections.OrderedDict()
        self._by_address: collections.Counter[str] = collections.Counter()
        self._worker_addresses: collections.OrderedDict[str, None] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._strangers) + len(self._known)

    def __contains__(self, handle: Hashable) -> bool:
        return handle in self._strangers or handle in self._known

    def count(self, address: str) -> int:
        return self._by_address[address]

    def is_worker_address(self, address: str) -> bool:
        return address in self._worker_addresses

    def decide(self, address: str) -> Admit | Refuse:
        """May a new connection from ``address`` (an :func:`address_key`) start a handshake?"""
        held = self._by_address[address]
        if held >= self.per_address:
            return Refuse(
                f"{held} unauthenticated connections from {address} already "
                "(--max-unauthenticated-per-address)"
            )
        if len(self) < self.limit:
            return Admit()
        if self._strangers:
            return Admit(evict=next(iter(self._strangers)))
        return Refuse(
            f"{len(self)} unauthenticated connections open, all from worker addresses "
            "(--max-unauthenticated)"
        )

    def add(self, handle: Hashable, address: str) -> None:
        """Count ``handle`` (admitted by :meth:`decide`) until :meth:`remove`."""
        if handle in self:
            return
        queue = self._known if address in self._worker_addresses else self._strangers
        queue[handle] = address
        self._by_address[address] += 1

    def remove(self, handle: Hashable) -> bool:
        """Stop counting ``handle`` (handshake done, connection gone); ``False`` if it was not."""
        address = self._strangers.pop(handle, None)
        if address is None:
            address = self._known.pop(handle, None)
        if address is None:
            return False
        self._by_address[address] -= 1
        if not self._by_address[address]:
            del self._by_address[address]
        return True

    def worker_seen(self, address: str) -> None:
        """A worker completed a handshake from ``address``: its connections are not evicted."""
        if address not in self._worker_addresses and self._by_address[address]:
            # Its connections still pending are a worker's too, from now on.
            for handle, where in list(self._strangers.items()):
                if where == address:
                    del self._strangers[handle]
                    self._known[handle] = address
        self._worker_addresses.pop(address, None)
        self._worker_addresses[address] = None
        while len(self._worker_addresses) > self.remembered:
            self._worker_addresses.popitem(last=False)


class RefusalLog:
    """One warning per refusal, until a flood: then one summary line per interval.

    The first ``burst`` refusals of an interval are logged in full (peer and
    reason); the rest are counted, and when the interval ends one line says
    how many there were, of which kinds, from how many addresses and which
    address sent the most.
    """

    log = Logger()

    def __init__(
        self,
        clock,
        *,
        burst: int = REFUSAL_LOG_BURST,
        interval: float = REFUSAL_LOG_INTERVAL,
        each: str = "Closing unauthenticated connection from {peer}: {reason}",
        more: str = "Closed {count} more unauthenticated connections",
    ):
        self.clock = clock
        self.burst = burst
        self.interval = interval
        # What one refusal and the summary say (twisted.logger formats, fields as below).
        self.each = each
        self.more = more
        self.total = 0
        self._window_end: float | None = None
        self._logged = 0
        self._kinds: collections.Counter[str] = collections.Counter()
        self._addresses: collections.Counter[str] = collections.Counter()
        self._summary_call = None

    def refused(self, kind: str, address: str, peer: str, reason: str) -> None:
        """Record one connection closed before it authenticated (``kind``: a short label)."""
        self.total += 1
        now = self.clock.seconds()
        if self._window_end is None or now >= self._window_end:
            self.flush()
            self._window_end = now + self.interval
            self._logged = 0
        if self._logged < self.burst:
            self._logged += 1
            self.log.warn(
                self.each,
                peer=peer,
                reason=reason,
                address=address,
                kind=kind,
            )
            return
        self._kinds[kind] += 1
        if address in self._addresses or len(self._addresses) < _SUMMARY_ADDRESSES:
            self._addresses[address] += 1
        else:
            self._addresses["(other addresses)"] += 1
        if self._summary_call is None:
            self._summary_call = self.clock.callLater(self._window_end - now, self.flush)

    def flush(self) -> None:
        """Log the summary of what was not logged in full (if anything); called by the timer."""
        if self._summary_call is not None:
            if self._summary_call.active():
                self._summary_call.cancel()
            self._summary_call = None
        count = sum(self._kinds.values())
        if not count:
            return
        top, top_count = self._addresses.most_common(1)[0]
        self.log.warn(
            self.more + " in {interval:g}s "
            "({kinds}; from {addresses} addresses, most from {top}: {top_count})",
            count=count,
            interval=self.interval,
            kinds=", ".join(f"{k}: {n}" for k, n in sorted(self._kinds.items())),
            addresses=len(self._addresses),
            top=top,
            top_count=top_count,
        )
        self._kinds.clear()
        self._addresses.clear()
