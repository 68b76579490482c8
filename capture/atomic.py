"""Atomic folders and durable renames: write into a hidden sibling, rename it into place.

Used by every writer of a folder that outside tools read (focal stacks, reconstruction
results, the continuous mode's records), so that a crash or a full disk never leaves half a
folder under its final name.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from pathlib import Path

from capture.errors import OutputError

logger = logging.getLogger(__name__)

__all__ = ["fsync_dir", "fsync_file", "make_sibling", "move_into_place", "write_text_atomic"]


def fsync_dir(path: Path) -> None:
    """Best effort: make a rename in ``path`` durable (not possible on every platform)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush ``path``'s data to disk (OSError if the disk refuses, e.g. when full)."""
    fd = os.open(path, os.O_RDWR)  # Windows flushes only through a handle that may write
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """``text`` into ``path`` through a hidden sibling that is fsynced and renamed over it: ``path``
    is always the old file or the whole new one. The sibling is removed on any failure (Ctrl-C
    included); an OSError (a full disk) is raised as it is."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        tmp.write_text(text, encoding="utf-8")
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def make_sibling(final: Path, tag: str) -> Path:
    """A fresh hidden sibling of ``final``: ``tag='tmp'`` creates it as a folder, any other tag
    only names it (for moving the old ``final`` aside)."""
    for _ in range(100):
        candidate = final.parent / f".{final.name}.{tag}-{secrets.token_hex(4)}"
        if tag != "tmp":
            if not os.path.lexists(candidate):
                return candidate
            continue
        try:
            os.mkdir(candidate)  # honours the umask, unlike tempfile.mkdtemp's 0700
            return candidate
        except FileExistsError:
            continue
        except FileNotFoundError as err:
            # the parent went away: another process's writability probe may have removed the empty
            # folder it thought it had made (probe_writable); make it again, once
            try:
                final.parent.mkdir(parents=True, exist_ok=True)
                os.mkdir(candidate)
                return candidate
            except OSError:
                raise OutputError(f"{final.parent}: cannot create a folder there ({err.strerror or err})") from err
        except OSError as err:
            raise OutputError(f"{final.parent}: cannot create a folder there ({err.strerror or err})") from err
    raise OutputError(f"{final.parent}: cannot find a free temporary name")


def move_into_place(tmp: Path, final: Path, *, overwrite: bool, what: str) -> None:
    """Rename the finished folder ``tmp`` to ``final``; with ``overwrite``, the old ``final`` is
    moved aside first and removed only once the new one is in place (if the rename fails, the
    old one is put back). ``what`` names the content in errors (``stack``, ``result``)."""
    aside: Path | None = None
    if overwrite and os.path.lexists(final):
        aside = make_sibling(final, "old")
        try:
            os.rename(final, aside)
        except OSError as err:
            raise OutputError(f"{final}: cannot move the old {what} aside ({err.strerror or err})") from err
    try:
        os.rename(tmp, final)
    except OSError as err:
        if aside is not None:
            try:
                os.rename(aside, final)
            except OSError:
                logger.error("%s: the previous %s was left at %s", final, what, aside)
        if os.path.lexists(final) and aside is None:
            raise OutputError(f"{final}: already exists (created meanwhile)") from err
        raise OutputError(f"{final}: cannot rename the new {what} into place ({err.strerror or err})") from err
    fsync_dir(final.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def probe_writable(final: Path) -> None:
    """Fail before the work rather than after it: create ``final``'s parent folder and a
    temporary sibling there, then remove both again (the parent folders only where this call
    created them: a run that fails later on bad input leaves nothing behind). Raises
    :class:`OutputError` naming the folder (read-only, no permission, a file in the way)."""
    final = Path(final)
    created: list[Path] = []
    folder = final.parent
    while not os.path.lexists(folder) and folder != folder.parent:
        created.append(folder)
        folder = folder.parent
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        _remove_empty(created)
        raise OutputError(f"{final.parent}: cannot create the output folder ({err.strerror or err})") from err
    try:
        probe = make_sibling(final, "tmp")
        try:
            os.rmdir(probe)
        except OSError:
            pass
    finally:
        _remove_empty(created)


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first), each only if empty; errors ignored."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            pass
