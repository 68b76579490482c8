"""SIGTERM stops a run as Ctrl-C does (``kill``, ``systemctl stop``, ``docker stop``)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread: the run stops as on Ctrl-C."""


@contextmanager
def sigterm_stops_like_ctrl_c() -> Iterator[None]:
    """Inside the ``with`` block SIGTERM raises :class:`Terminated` in the main thread, so a run
    parks its devices and keeps what it captured as on Ctrl-C; the previous handler comes back
    after it (the default where it was set outside Python). Nothing is installed where this is
    not the main thread, which alone may set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated("stopped by SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
