"""The project's one exception tree (a leaf module: imports nothing of the project).

Every error a user can trigger derives from :class:`RigError` and names the offending
file, field, port or device in its message, so an entry point can print ``str(err)`` as
one line and exit with :attr:`RigError.exit_code`.
"""

from __future__ import annotations

__all__ = [
    "RigError",
    "ConfigError",
    "InputError",
    "StackFormatError",
    "OutputError",
    "DiskFull",
    "DeviceError",
    "DeviceTimeout",
    "ProtocolError",
    "CalibrationError",
    "ReconstructionError",
    "reworded",
    "EXIT_OK",
    "EXIT_BAD_INPUT",
    "EXIT_DEVICE",
    "EXIT_INTERRUPTED",
]

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_DEVICE = 3
EXIT_INTERRUPTED = 130


class RigError(Exception):
    """Base of every error the project raises on purpose."""

    exit_code: int = EXIT_BAD_INPUT


def reworded(exc: RigError, message: str) -> RigError:
    """An error of ``exc``'s class and exit code with another message (naming the file or
    field a caller knows and the raiser did not); raise it ``from exc``."""
    new = type(exc)(message)
    new.exit_code = exc.exit_code
    return new


def yaml_problem(exc: Exception) -> str:
    """One line for a PyYAML parse error: ``at line L, column C: <problem>`` (PyYAML's own
    message spans several lines, with a copy of the offending text)."""
    mark = getattr(exc, "problem_mark", None)
    where = f"at line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(exc, "problem", None) or " ".join(str(exc).split()) or "invalid YAML"
    return where + problem


class ConfigError(RigError):
    """A config file is missing, unreadable or invalid (names file and field path)."""


class InputError(RigError):
    """A command-line argument or input file is unusable (names it)."""


class StackFormatError(InputError):
    """A focal-stack folder breaks FOCAL_STACK_FORMAT.md (names the file and key)."""


class OutputError(InputError):
    """An output folder or file cannot be written (names the path)."""


class DiskFull(OutputError):
    """The output disk has less free space than ``output.min_free_gb`` (or ENOSPC): recording stops."""


class ReconstructionError(InputError):
    """A stack cannot be reconstructed with the requested method (names why)."""


class CalibrationError(RigError):
    """A calibration cannot be fitted or applied (says what to do)."""


class DeviceError(RigError):
    """A device failed (names the device, port and command)."""

    exit_code = EXIT_DEVICE


class DeviceTimeout(DeviceError):
    """A device did not answer or settle within its finite timeout."""


class ProtocolError(DeviceError):
    """A device answered with something the protocol does not allow (bad CRC, error reply)."""


def interrupt_reason(exc: KeyboardInterrupt) -> str:
    """What stopped the run, for messages: a KeyboardInterrupt's own text where a signal handler
    gave it one (``stopped by SIGTERM``), else Ctrl-C's."""
    return str(exc) or "interrupted by the user"
