"""Small pieces shared by the project's command lines (a leaf module)."""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable

from capture.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, RigError, interrupt_reason

__all__ = ["OneLineArgumentParser", "one_line_errors", "quiet_opencv"]


class OneLineArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one ``error:`` line and exit code 2
    (INTERFACES.md), instead of a usage block followed by the message."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        # no prefixes of options: --resum must not quietly mean --resume
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"error: {message} (see --help)\n")


def one_line_errors(body: Callable[[], int], *, debug: bool) -> int:
    """Run a command's body; a :class:`RigError` becomes one ``error:`` line on stderr and its
    exit code (2 bad input, 3 device), Ctrl-C becomes 130. ``debug`` prints the traceback
    before that line; the exit code stays (INTERFACES.md: the codes hold everywhere, and a
    script that checks them must not see 1 because someone asked for a traceback)."""
    try:
        return body()
    except RigError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {interrupt_reason(exc)}", file=sys.stderr)
        return EXIT_INTERRUPTED


def quiet_opencv() -> None:
    """Keep OpenCV's own decoder messages (``[ WARN:0@...] ... PNG input buffer is incomplete``)
    off stderr: our commands report each unreadable image once, in their one ``error:`` line."""
    try:
        import cv2.utils.logging as cv_logging

        cv_logging.setLogLevel(cv_logging.LOG_LEVEL_SILENT)
    except (ImportError, AttributeError):  # pragma: no cover - depends on the OpenCV build
        pass
