"""One background thread per job of an agent, for work that may be slow (sending to a
channel that hangs, measuring a huge home directory) and so must never run inside the
agent's loop, where enforcement has to keep its pace."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

_registry: dict[tuple[int, str], Worker] = {}
_registry_lock = threading.Lock()


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


def worker_for(owner: object, name: str) -> Worker:
    """The worker `name` of `owner` (an agent), made on first use."""
    key = (id(owner), name)
    with _registry_lock:
        worker = _registry.get(key)
        if worker is None:
            worker = _registry[key] = Worker(name)
        return worker
