"""Protocol-faithful device emulators on pseudo-terminals (``python -m capture.emulators``).

``EMULATORS`` maps a name to ``"module:Class"``; the classes import lazily so that listing
them does not import every protocol.
"""

from __future__ import annotations

import importlib

from capture.emulators.pty_server import FAULTS, PtyEmulator

__all__ = ["EMULATORS", "FAULTS", "PtyEmulator", "emulator_class"]

EMULATORS: dict[str, str] = {
    "optotune": "capture.emulators.optotune:OptotuneEmulator",
    "grbl": "capture.emulators.gcode:GcodeEmulator",
}


def emulator_class(name: str) -> type[PtyEmulator]:
    """The emulator class registered under ``name`` (KeyError lists the valid names)."""
    try:
        module_name, cls_name = EMULATORS[name].split(":")
    except KeyError:
        raise KeyError(f"unknown emulator {name!r}; valid: {', '.join(EMULATORS)}") from None
    return getattr(importlib.import_module(module_name), cls_name)
