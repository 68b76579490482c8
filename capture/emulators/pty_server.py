"""A device emulator served on a pseudo-terminal, with fault injection.

A subclass implements the device's protocol in :meth:`PtyEmulator.handle` (bytes in,
bytes out); this base opens the pseudo-terminal in raw mode, serves it on a background
thread, and applies the injected fault to what the device would have sent:

- ``corrupt_crc``: the protocol's reply is damaged in a way its checksum catches
  (subclasses say how in :meth:`PtyEmulator.corrupt`; the default flips a bit of the last byte
  before the terminator);
- ``drop_bytes``: the last byte of each reply is dropped (a short, fixed-length read);
- ``stall``: requests are read but never answered;
- ``disconnect``: the pseudo-terminal is closed, so the port vanishes under the client.

A fault starts after ``fault_after`` complete requests, so a test can let a sweep begin
normally and then pull the cable. Linux and macOS only (they have pseudo-terminals).
"""

from __future__ import annotations

import logging
import os
import select
import sys
import threading
from typing import ClassVar

logger = logging.getLogger(__name__)

__all__ = ["FAULTS", "PtyEmulator"]

FAULTS = ("corrupt_crc", "drop_bytes", "stall", "disconnect")


class PtyEmulator:
    """Base class of the emulators: a pseudo-terminal plus a protocol handler.

    Use as a context manager, or :meth:`start` / :meth:`stop`. :attr:`port` is the path a
    client opens with pyserial (``/dev/pts/N``).
    """

    #: what ``python -m capture.emulators NAME`` calls it
    device_name: ClassVar[str] = "device"

    def __init__(self, *, fault: str | None = None, fault_after: int = 0) -> None:
        if sys.platform.startswith("win"):
            raise OSError("the emulators need a pseudo-terminal (Linux or macOS)")
        if fault is not None and fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; valid: {', '.join(FAULTS)}")
        self.fault = fault
        self.fault_after = int(fault_after)
        self.requests_served = 0
        self.received: list[bytes] = []  # every complete request, in order (tests read this)
        self._lock = threading.Lock()
        self._master_fd: int | None = None
        self._slave_fd: int | None = None
        self.port = ""
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # ------------------------------------------------------------------ life cycle
    def start(self) -> PtyEmulator:
        import pty
        import tty

        master, slave = pty.openpty()
        tty.setraw(slave)  # no echo, no line discipline: bytes pass unchanged
        tty.setraw(master)
        self._master_fd, self._slave_fd = master, slave
        self.port = os.ttyname(slave)
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, name=f"{self.device_name}-emulator", daemon=True)
        self._thread.start()
        logger.info("%s emulator on %s (fault %s after %d requests)", self.device_name, self.port, self.fault, self.fault_after)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)
        self._close_fds()

    def __enter__(self) -> PtyEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def disconnect(self) -> None:
        """Pull the cable now: close the pseudo-terminal (the client's next I/O fails)."""
        logger.info("%s emulator: disconnecting %s", self.device_name, self.port)
        self._stop.set()
        # Let the serving thread leave select()/read() first: closing its fd under it could
        # let it read from a new file that reuses the same descriptor number.
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)
        self._close_fds()

    def inject(self, fault: str | None, *, after_requests: int = 0) -> None:
        """Change the fault at run time: it starts ``after_requests`` requests from now."""
        if fault is not None and fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; valid: {', '.join(FAULTS)}")
        with self._lock:
            self.fault = fault
            self.fault_after = self.requests_served + int(after_requests)

    def _close_fds(self) -> None:
        with self._lock:
            for fd in (self._master_fd, self._slave_fd):
                if fd is not None:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            self._master_fd = self._slave_fd = None

    # ------------------------------------------------------------------ protocol hooks
    def handle(self, data: bytes) -> list[tuple[bytes, bytes]]:
        """Consume newly received bytes; return ``(request, reply)`` for every complete request
        (reply ``b""`` when the device stays silent). Keep partial requests buffered."""
        raise NotImplementedError

    def poll(self) -> bytes:
        """Bytes the device sends unprompted (called every few ms); default none."""
        return b""

    def corrupt(self, reply: bytes) -> bytes:
        """The reply with its checksum broken; default: flip a bit of the last byte before CRLF."""
        body_end = len(reply) - 2 if reply.endswith(b"\r\n") else len(reply)
        if body_end <= 0:
            return reply
        return reply[: body_end - 1] + bytes([reply[body_end - 1] ^ 0x01]) + reply[body_end:]

    # ------------------------------------------------------------------ serving
    def _active_fault(self) -> str | None:
        with self._lock:
            return self.fault if self.requests_served >= self.fault_after else None

    def _serve(self) -> None:
        while not self._stop.is_set():
            fd = self._master_fd
            if fd is None:
                return
            try:
                ready, _, _ = select.select([fd], [], [], 0.005)
                data = os.read(fd, 4096) if ready else b""
            except (OSError, ValueError):
                return
            out = bytearray()
            if data:
                for request, reply in self.handle(data):
                    fault = self._active_fault()
                    with self._lock:
                        self.received.append(request)
                        self.requests_served += 1
                    if fault == "disconnect":
                        self.disconnect()
                        return
                    if fault == "stall":
                        continue
                    if reply and fault == "corrupt_crc":
                        reply = self.corrupt(reply)
                    elif reply and fault == "drop_bytes":
                        reply = reply[:-1]
                    out += reply
            out += self.poll()
            if out:
                try:
                    os.write(fd, bytes(out))
                except OSError:
                    return
