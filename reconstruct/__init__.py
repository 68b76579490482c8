"""Depth from focus: the DualFocus network and the classical focus measures. Never opens a device."""

from reconstruct.api import reconstruct_stack
from reconstruct.result import DepthResult, write_result

__all__ = ["DepthResult", "reconstruct_stack", "write_result"]
