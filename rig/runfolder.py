"""The run folder (INTERFACES.md): one per ``run_rig.py`` invocation."""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from capture.atomic import write_text_atomic
from capture.errors import DiskFull, OutputError

logger = logging.getLogger(__name__)

__all__ = ["create_run_folder", "write_yaml_atomic", "check_free_space", "free_bytes"]


def check_free_space(path: str | os.PathLike[str], min_free_gb: float) -> float:
    """Free space (GB, 1e9 bytes) on the filesystem that holds ``path``.

    ``path`` need not exist yet: its nearest existing parent is asked.

    Raises:
        DiskFull: less than ``min_free_gb`` is free (the message names the path, the free
            and the required space).
        OutputError: the free space cannot be queried.
    """
    target = Path(path)
    try:
        free_gb = free_bytes(target) / 1e9
    except OSError as exc:
        raise OutputError(f"{target}: cannot query the free space ({exc.strerror or exc})") from exc
    if free_gb < min_free_gb:
        # three significant figures: "0.50 GB free, requires 0.5 GB" read as enough
        raise DiskFull(
            f"{target}: disk full: {free_gb:.3g} GB free, output.min_free_gb requires {min_free_gb:g} GB "
            "(free some space or lower output.min_free_gb)"
        )
    return free_gb


def free_bytes(path: str | os.PathLike[str]) -> int:
    """Free bytes on the filesystem that holds ``path`` (or its nearest existing parent).
    Raises ``OSError`` where that cannot be asked."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def create_run_folder(base: Path, rig_name: str, *, min_free_gb: float, now: dt.datetime | None = None) -> Path:
    """Create ``base/<UTC time>_<rig name>/`` (with a suffix if it exists) and return it.

    Raises:
        OutputError: the folder cannot be created or written, or the disk is too full.
    """
    now = now or dt.datetime.now(dt.timezone.utc)
    stamp = now.strftime("%Y-%m-%dT%H-%M-%SZ")
    if base.exists() and not base.is_dir():
        raise OutputError(f"output.dir: {base} exists and is not a folder")
    check_free_space(base, min_free_gb=min_free_gb)
    for attempt in range(1, 100):
        name = f"{stamp}_{rig_name}" if attempt == 1 else f"{stamp}_{rig_name}_{attempt}"
        run = base / name
        try:
            run.mkdir(parents=True, exist_ok=False)
        except FileExistsError:
            continue
        except OSError as exc:
            raise OutputError(f"output.dir: cannot create {run} ({exc.strerror})") from exc
        if not os.access(run, os.W_OK):
            raise OutputError(f"output.dir: {run} is not writable")
        return run
    raise OutputError(f"output.dir: too many runs named {stamp}_{rig_name} in {base}")


def write_yaml_atomic(path: Path, doc: Any) -> None:
    """Write YAML to ``path`` atomically and durably (:func:`capture.atomic.write_text_atomic`)."""
    try:
        write_text_atomic(path, yaml.safe_dump(doc, sort_keys=False))
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror})") from exc
