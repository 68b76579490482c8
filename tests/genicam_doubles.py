"""Stand-ins for a GenApi node map, for the features viky.cti lacks (trigger, exposure, SFNC
optic control). Used where nothing real can run here: real cameras with those features are
hardware-marked. They behave like GenApi nodes: ``value`` (enumerations check their entries,
numbers their min/max), ``min``/``max``/``inc``, ``execute()`` for commands, ``has_node``."""

from __future__ import annotations

import time
from typing import Any


class FakeNode:
    def __init__(self, value: Any = None, *, min: float | None = None, max: float | None = None, inc: int = 1,
                 symbolics: tuple[str, ...] | None = None, on_execute=None, on_write=None) -> None:
        self._value = value
        self.min, self.max, self.inc = min, max, inc
        self.symbolics = symbolics
        self._on_execute, self._on_write = on_execute, on_write
        self.writes: list[Any] = []
        self.executed = 0

    @property
    def value(self) -> Any:
        return self._value() if callable(self._value) else self._value

    @value.setter
    def value(self, v: Any) -> None:
        if self.symbolics is not None and v not in self.symbolics:
            raise ValueError(f"{v!r} not in {self.symbolics}")
        if self.min is not None and not (self.min <= v <= self.max):
            raise ValueError(f"{v!r} outside [{self.min}, {self.max}]")
        self.writes.append(v)
        if self._on_write is not None:
            self._on_write(v)
        else:
            self._value = v

    def execute(self) -> None:
        self.executed += 1
        if self._on_execute is not None:
            self._on_execute()


class FakeNodeMap:
    def __init__(self, **nodes: FakeNode) -> None:
        self._nodes = dict(nodes)

    def has_node(self, name: str) -> bool:
        return name in self._nodes

    def __getattr__(self, name: str) -> FakeNode:
        try:
            return self.__dict__["_nodes"][name]
        except KeyError:
            raise AttributeError(name) from None


class FakeLens:
    """A camera's lens controller: FocalPower or FocusStepper, busy for ``busy_s`` after a write."""

    def __init__(self, feature: str = "FocalPower", *, busy_s: float = 0.02, status: bool = True, initialized: bool = True) -> None:
        self.busy_s = busy_s
        self.moved_at = -1e9
        self.initialized = initialized
        self.error = False
        lo, hi = (-2.0, 10.0) if feature == "FocalPower" else (0, 1000)
        start = 0.0 if feature == "FocalPower" else 0
        focus = FakeNode(start, min=lo, max=hi, on_write=self._write)
        self._focus = focus
        nodes: dict[str, FakeNode] = {
            "OpticControllerSelector": FakeNode("OpticController0", symbolics=("OpticController0",)),
            feature: focus,
            "OpticControllerTemperature": FakeNode(36.5),
            "FocusInitialize": FakeNode(on_execute=self._init),
        }
        if status:
            nodes["FocusStatus"] = FakeNode(self._status)
        self.node_map = FakeNodeMap(**nodes)

    def _write(self, v: Any) -> None:
        self._focus._value = v
        self.moved_at = time.monotonic()

    def _init(self) -> None:
        self.initialized = True

    def _status(self) -> str:
        if self.error:
            return "Error"
        if not self.initialized:
            return "NotInitialized"
        return "Busy" if time.monotonic() - self.moved_at < self.busy_s else "Ready"
