"""Interval boundaries aligned to the wall clock in the site's time zone.

A 15-minute interval in ``Asia/Kolkata`` ends at :00, :15, :30 and :45 local time; an
hourly one at the full local hour (which is half past in UTC). Boundaries are computed
from local midnight so that they stay aligned across daylight-saving changes in zones
that have them.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo


def next_boundary_ms(now_ms: int, interval_s: int, tz: ZoneInfo) -> int:
    """Return the first interval boundary strictly after ``now_ms`` (UTC ms).

    ``interval_s`` must divide a day (86 400 s) so that every local day starts on a
    boundary.
    """
    if interval_s <= 0 or 86_400 % interval_s:
        raise ValueError(f"interval of {interval_s} s does not divide a day")
    local = datetime.fromtimestamp(now_ms / 1000, tz)
    midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
    elapsed_ms = now_ms - int(midnight.timestamp() * 1000)
    step_ms = interval_s * 1000
    index = elapsed_ms // step_ms + 1
    candidate = midnight + timedelta(milliseconds=index * step_ms)
    return int(candidate.timestamp() * 1000)


def slot_start_ms(t_ms: int, interval_s: int, tz: ZoneInfo) -> int:
    """Return the boundary at or before ``t_ms`` (UTC ms): the start of its slot."""
    nxt = next_boundary_ms(t_ms, interval_s, tz)
    return nxt - interval_s * 1000
