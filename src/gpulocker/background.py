"""A background thread for one job of an agent (each step that needs one owns it), for work that may be slow (sending to a
channel that hangs, measuring a huge home directory) and so must never run inside the
agent's loop, where enforcement has to keep its pace."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class Worker:
    """Runs one call at a time in a daemon thread."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def busy(self) -> bool:
        """True while a call is running."""
        return self._thread is not None and self._thread.is_alive()

    def start(self, func: Callable[..., Any], *args: Any) -> bool:
        """Start `func(*args)` unless a call is still running. True if it started."""
        with self._lock:
            if self.busy:
                return False
            self._thread = threading.Thread(
                target=func, args=args, name=f"gpulocker-{self.name}", daemon=True
            )
            self._thread.start()
            return True

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the running call; True if none is running afterwards."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return not self.busy
