"""Warnings that may repeat every stack, logged at most once a minute per cause.

A condition checked per stack (the lens outside its compensated temperatures, a camera that
repeats a frame) lasts for many stacks once it starts; in hours of continuous acquisition a
warning per stack buries everything else in the log. :class:`RepeatLimiter` logs the first
occurrence, then at most one line per ``interval_s`` per key, saying how many it left out.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Hashable

#: seconds between two lines for the same cause
INTERVAL_S = 60.0


class RepeatLimiter:
    """Logs ``logger.warning`` for a key at most once per ``interval_s`` (host monotonic time)."""

    def __init__(self, logger: logging.Logger, *, interval_s: float = INTERVAL_S) -> None:
        self._logger = logger
        self.interval_s = float(interval_s)
        self._last_s: dict[Hashable, float] = {}
        self._left_out: dict[Hashable, int] = {}
        self._lock = threading.Lock()

    def warning(self, key: Hashable, msg: str, *args: object) -> bool:
        """Log ``msg % args`` unless a line for ``key`` went out less than ``interval_s`` ago;
        a line after left-out ones says how many. Returns whether it logged."""
        now = time.monotonic()
        with self._lock:
            last = self._last_s.get(key)
            if last is not None and now - last < self.interval_s:
                self._left_out[key] = self._left_out.get(key, 0) + 1
                return False
            left_out = self._left_out.pop(key, 0)
            self._last_s[key] = now
        if left_out:
            msg += f" (and {left_out} more like it in the last {now - last:.0f} s, not logged)"  # type: ignore[operator]
        self._logger.warning(msg, *args)
        return True
