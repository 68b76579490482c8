"""Finding GenTL producers (``.cti`` files) and the cameras they offer.

A producer is named in ``rig.yaml`` as a path, as ``viky`` (the simulator bundled with the
``genicam`` wheel), or left out, in which case the directories of ``GENICAM_GENTL64_PATH``
(``GENICAM_GENTL32_PATH`` on 32-bit Python) are searched, as the GenTL standard says.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from capture.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["CameraInfo", "viky_path", "gentl_env_var", "search_paths", "find_producers", "resolve_producers", "list_cameras", "info_field"]


@dataclass(frozen=True)
class CameraInfo:
    """One camera a producer offers."""

    index: int
    id: str
    serial_number: str
    model: str
    vendor: str
    producer: str


def viky_path() -> Path:
    """Path of ``viky.cti``, the GenTL simulator shipped in the ``genicam`` wheel."""
    try:
        import genicam
    except ImportError as exc:
        raise ConfigError("camera.producer: 'viky' needs the genicam package (pip install genicam)") from exc
    return Path(genicam.__file__).resolve().parent / "viky.cti"


def gentl_env_var() -> str:
    return "GENICAM_GENTL64_PATH" if struct.calcsize("P") == 8 else "GENICAM_GENTL32_PATH"


def search_paths() -> list[Path]:
    """Directories named by the GenTL environment variable, in order."""
    value = os.environ.get(gentl_env_var(), "")
    return [Path(p) for p in value.split(os.pathsep) if p.strip()]


def find_producers() -> tuple[list[Path], list[Path]]:
    """``(producers found, places searched)``: every ``.cti`` in the environment's directories
    (a path in the variable that is itself a ``.cti`` counts too)."""
    found: list[Path] = []
    searched = search_paths()
    for place in searched:
        if place.is_file() and place.suffix.lower() == ".cti":
            found.append(place)
        elif place.is_dir():
            found.extend(sorted(p for p in place.iterdir() if p.suffix.lower() == ".cti" and p.is_file()))
    return found, searched


def resolve_producers(producer: str | Path | None) -> list[Path]:
    """The producer file(s) a config names.

    Raises:
        ConfigError: naming ``camera.producer`` and every path searched.
    """
    if producer is None:
        found, searched = find_producers()
        if not found:
            where = ", ".join(str(p) for p in searched) or f"nothing: {gentl_env_var()} is not set"
            raise ConfigError(
                f"camera.producer: no GenTL producer (.cti) found; searched {gentl_env_var()}: {where}. "
                "Name one with camera.producer (a .cti path, or 'viky' for the bundled simulator)"
            )
        return found
    if str(producer) == "viky":
        path = viky_path()
        if not path.is_file():
            raise ConfigError(f"camera.producer: viky.cti not found at {path} (is the genicam wheel complete?)")
        return [path]
    path = Path(producer).expanduser()
    if path.is_file():
        return [path]
    candidates = [path] + [place / path.name for place in search_paths()]
    raise ConfigError(
        f"camera.producer: {producer} not found; searched {', '.join(str(p) for p in candidates)}"
    )


def list_cameras(producers: list[Path]) -> list[CameraInfo]:
    """Every camera the producers offer (opens and closes a Harvester)."""
    from harvesters.core import Harvester

    cameras: list[CameraInfo] = []
    with Harvester() as h:
        for p in producers:
            h.add_file(str(p), check_existence=True)
        h.update()
        for i, info in enumerate(h.device_info_list):
            cameras.append(CameraInfo(
                index=i, id=str(info_field(info, "id_")), serial_number=str(info_field(info, "serial_number")),
                model=str(info_field(info, "model")), vendor=str(info_field(info, "vendor")),
                producer=", ".join(p.name for p in producers),
            ))
    return cameras


def info_field(info: object, attribute: str) -> object:
    """A device-info field, or '?' where the producer does not provide it."""
    try:
        return getattr(info, attribute)
    except Exception:  # GenTL raises NotAvailableException for fields a producer lacks
        return "?"
