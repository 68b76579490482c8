"""capture.repeat_log: a per-stack warning logged at most once per interval, per cause."""

from __future__ import annotations

import logging

from capture import repeat_log
from capture.repeat_log import RepeatLimiter


def test_a_repeating_warning_is_logged_once_per_interval_with_a_count(caplog, monkeypatch) -> None:
    now = [100.0]
    monkeypatch.setattr(repeat_log.time, "monotonic", lambda: now[0])
    log = logging.getLogger("test.repeat")
    limiter = RepeatLimiter(log, interval_s=60.0)
    with caplog.at_level(logging.WARNING, logger="test.repeat"):
        assert limiter.warning("hot", "lens at %d C", 50)
        for t in (101.0, 120.0, 159.0):  # within the minute: counted, not logged
            now[0] = t
            assert not limiter.warning("hot", "lens at %d C", 51)
        assert limiter.warning("other", "another cause")  # keys are independent
        now[0] = 161.0
        assert limiter.warning("hot", "lens at %d C", 52)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["lens at 50 C", "another cause", "lens at 52 C (and 3 more like it in the last 61 s, not logged)"]


def test_continuous_sweeps_of_a_hot_lens_warn_once_a_minute(caplog) -> None:
    """The sweep's temperature warning, over many stacks in a row, through the sweep itself."""
    import capture.sweep as sweep_mod

    class _HotLens:
        name = "lens"

        def compensated_temperature_c(self):
            return (20.0, 45.0)

    lens, meta = _HotLens(), [{"lens_temperature_c": 50.0}, {"lens_temperature_c": 50.5}]
    with caplog.at_level(logging.WARNING, logger="capture.sweep"):
        for _ in range(100):
            sweep_mod._warn_temperature(lens, meta)
    lines = [r.getMessage() for r in caplog.records if "outside focus.temperature_limits_c" in r.getMessage()]
    assert len(lines) == 1 and "lens at 50.0-50.5 C in 2 of 2 slices" in lines[0]
