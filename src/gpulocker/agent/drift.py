"""Drift events, coalesced: a loop of chmods must not write events for ever (SPEC §12).

The agent always undoes drift at once; only the record of it is limited: the first
correction of a file writes an event, later ones within `window` seconds are counted and
the next event after the window says how many there were. The reconciler keys it by file
and by what was changed, so the same reset over and over is one record a minute while a
different change to the same file (someone's `setfacl`) is recorded in its own right.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

WINDOW_SECONDS = 60.0
MAX_KEYS = 4096  # beyond this, keys whose window is over and that hold no count are dropped


@dataclass
class DriftLimiter:
    """One drift event per device file per window, with the count of those coalesced."""

    window: float = WINDOW_SECONDS
    _last: dict[str, float] = field(default_factory=dict)
    _held: dict[str, int] = field(default_factory=dict)

    def admit(self, path: str) -> int | None:
        """None: count this correction, write no event. Else: write one now, and the number
        of corrections of `path` coalesced since the previous event is returned."""
        now = time.time()  # wall clock (time_machine moves it); a step back admits at once
        last = self._last.get(path)
        if last is not None and last <= now < last + self.window:
            self._held[path] = self._held.get(path, 0) + 1
            return None
        if len(self._last) >= MAX_KEYS:
            for key, at in list(self._last.items()):
                if not at <= now < at + self.window and key not in self._held:
                    del self._last[key]
        self._last[path] = now
        return self._held.pop(path, 0)
