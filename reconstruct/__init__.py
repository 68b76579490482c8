"""Depth from focus: classical methods now, the DualFocus network next. Never opens a device."""

from reconstruct.api import reconstruct_stack
from reconstruct.result import DepthResult, write_result

__all__ = ["DepthResult", "reconstruct_stack", "write_result"]
