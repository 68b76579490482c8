"""``python run_rig.py --list-devices``: what a lab needs to fill in ``rig.yaml``.

Lists the GenTL producers searched and found (plus the bundled ``viky`` simulator), the
cameras each producer offers, and the serial ports with their descriptions (an Optotune
Lens Driver shows up as a USB CDC device with "Optotune" in its description).
"""

from __future__ import annotations

import logging
from pathlib import Path

from capture.gentl import find_producers, gentl_env_var, list_cameras, viky_path

logger = logging.getLogger(__name__)

__all__ = ["device_report"]


def _cameras_lines(producer: Path) -> list[str]:
    try:
        cameras = list_cameras([producer])
    except Exception as exc:  # a broken producer must not hide the others
        return [f"    (could not load: {type(exc).__name__}: {exc})"]
    if not cameras:
        return ["    no cameras"]
    return [f"    [{c.index}] {c.vendor} {c.model}  serial_number: {c.serial_number!r}  id: {c.id!r}" for c in cameras]


def device_report(*, include_viky: bool = True) -> str:
    """The whole report as text (the CLI prints it)."""
    found, searched = find_producers()
    lines = [f"GenTL producers ({gentl_env_var()}):"]
    if not searched:
        lines.append(f"  {gentl_env_var()} is not set; camera.producer must name a .cti file")
    for place in searched:
        mark = "" if place.exists() else "  (missing)"
        lines.append(f"  searched {place}{mark}")
    for producer in found:
        lines.append(f"  producer {producer}")
        lines.extend(_cameras_lines(producer))
    if include_viky:
        try:
            viky = viky_path()
        except Exception as exc:
            lines.append(f"  viky simulator: unavailable ({exc})")
        else:
            lines.append(f"  producer viky (simulator, camera.producer: viky) at {viky}")
            lines.extend(_cameras_lines(viky))
    lines.append("Serial ports:")
    from serial.tools import list_ports

    ports = sorted(list_ports.comports(), key=lambda p: p.device)
    if not ports:
        lines.append("  none found (USB serial devices appear as /dev/ttyACM*, /dev/ttyUSB*, COM*)")
    for port in ports:
        ids = f"  [{port.vid:04X}:{port.pid:04X}]" if port.vid is not None and port.pid is not None else ""
        hint = "  <- looks like an Optotune lens driver (focus.driver: optotune)" if "optotune" in f"{port.description} {port.manufacturer}".lower() else ""
        lines.append(f"  {port.device}: {port.description}{ids}{hint}")
    lines.append("Emulators (no hardware): focus.port: emulator, or python -m capture.emulators optotune|grbl")
    return "\n".join(lines)
