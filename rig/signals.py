"""SIGTERM stops a run as Ctrl-C does (``kill``, ``systemctl stop``, ``docker stop``)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread: the run stops as on Ctrl-C."""


def sigterm_as_ctrl_c() -> tuple[bool, Any]:
    """Make SIGTERM raise :class:`Terminated` in the main thread, so a run parks its devices and
    keeps what it captured as on Ctrl-C. Returns (installed, the previous handler); not installed
    where this is not the main thread, which alone may set handlers."""
    if threading.current_thread() is not threading.main_thread():
        return False, None

    def handler(signum: int, frame: Any) -> None:
        raise Terminated("stopped by SIGTERM")

    return True, signal.signal(signal.SIGTERM, handler)


def restore_sigterm(installed: bool, previous: Any) -> None:
    """Undo :func:`sigterm_as_ctrl_c` (None: a handler set outside Python; the default is the
    nearest thing to it)."""
    if installed:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


@contextmanager
def sigterm_stops_like_ctrl_c() -> Iterator[None]:
    """:func:`sigterm_as_ctrl_c` for the ``with`` block."""
    installed, previous = sigterm_as_ctrl_c()
    try:
        yield
    finally:
        restore_sigterm(installed, previous)
