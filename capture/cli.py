"""Small pieces shared by the project's command lines (a leaf module)."""

from __future__ import annotations

import argparse

from capture.errors import EXIT_BAD_INPUT

__all__ = ["OneLineArgumentParser"]


class OneLineArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one ``error:`` line and exit code 2
    (INTERFACES.md), instead of a usage block followed by the message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"error: {message} (see --help)\n")
