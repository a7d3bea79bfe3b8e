"""The EXPIRES column of ``hosts`` and the expiry warning of ``check``: one place for both.

A host enrolled before expiry dates were recorded shows ``unknown`` (``renew``
records it).  Kept apart from the tables' other columns so each table adds it
with one call.
"""

from __future__ import annotations

from decnet import config
from decnet.master.registry import Host
from decnet.master.renewal import days_left


def expires_cell(host: Host, now: float) -> str:
    """``2027-01-01 (397d)``; ``renewing`` while a renewal is pending; ``unknown``."""
    left = days_left(host, now)
    if host.expires_at is None or left is None:
        return "unknown"
    text = (
        f"{host.expires_at[:10]} ({int(left)}d)" if left >= 0 else f"{host.expires_at[:10]} EXPIRED"
    )
    return f"{text} renewing" if host.renewing else text


def expiry_warning(host: Host, now: float) -> str | None:
    """A sentence for a certificate with fewer than :data:`config.RENEW_BEFORE_DAYS` days left."""
    left = days_left(host, now)
    if left is None or left >= config.RENEW_BEFORE_DAYS or host.decommissioned:
        return None
    when = "expired" if left < 0 else f"expires in {int(left)} days ({host.expires_at})"
    return f"{host.name}: its certificate {when}; run `decnet-admin renew {host.name}`"


def expiry_fields(host: Host, now: float) -> dict[str, object]:
    """The same for ``--json``."""
    left = days_left(host, now)
    return {
        "expires_at": host.expires_at,
        "days_left": None if left is None else round(left, 2),
        "expiry_warning": expiry_warning(host, now),
    }
