"""G-code focus stage (GRBL / Marlin) against its emulator, over real pseudo-terminals.

Every exchange goes through pyserial and a pseudo-terminal, so framing, timing and the port
vanishing behave as with a USB-serial adapter. Motion is modelled in time by the emulator,
so settling takes distance / feed.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import serial

from capture.emulators import emulator_class
from capture.emulators.gcode import GcodeEmulator
from capture.errors import DeviceError, DeviceTimeout, InputError, ProtocolError
from capture.gcode import GcodeFocusStage, StageStatus

pytestmark = pytest.mark.skipif(sys.platform.startswith("win"), reason="pseudo-terminals need Linux or macOS")

ROOT = Path(__file__).resolve().parents[1]
FLAVORS = ["grbl", "marlin"]
REALTIME = {b"?", b"!", b"~", b"\x18"}
TIMEOUT_S = 0.3
HOMING_S = 0.05


def mm(flavor: str, value: float) -> float:
    """A rail position ``value`` mm from the home end: stock GRBL's travel is negative
    (``[-max_travel, 0]``), Marlin's positive (``[0, max_travel]``)."""
    return -value if flavor == "grbl" else value


def g1(flavor: str, value: float, feed: int = 600) -> str:
    """The line the driver sends for a move to ``mm(flavor, value)``."""
    return f"G1 Z{mm(flavor, value):.4f} F{feed}"


def lines_sent(emulator: GcodeEmulator) -> list[bytes]:
    """The G-code lines the emulator received, without GRBL's real-time bytes."""
    return [r for r in emulator.received if r not in REALTIME]


@pytest.fixture
def started() -> Iterator[list]:
    """Emulators and stages built by a test; stopped/closed afterwards whatever happened."""
    things: list = []
    yield things
    for thing in reversed(things):
        if isinstance(thing, GcodeFocusStage):
            thing.close()
        else:
            thing.stop()


def make(started: list, flavor: str, *, emulator_kw: dict | None = None, **stage_kw) -> tuple[GcodeEmulator, GcodeFocusStage]:
    emulator = GcodeEmulator(flavor=flavor, homing_time_s=HOMING_S, **(emulator_kw or {})).start()
    started.append(emulator)
    stage_kw.setdefault("timeout_s", TIMEOUT_S)
    stage_kw.setdefault("move_timeout_s", 5.0)
    stage = GcodeFocusStage(emulator.port, flavor=flavor, **stage_kw)
    started.append(stage)
    return emulator, stage


# --------------------------------------------------------------------------------------------
# normal operation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavor", FLAVORS)
def test_open_home_move_settle_position_round_trip(started, flavor: str) -> None:
    emulator, stage = make(started, flavor)
    stage.open()
    # no limits given: the controller's travel, up to the homed position (GRBL homes to -pulloff)
    home = -GcodeEmulator.PULLOFF_MM if flavor == "grbl" else 0.0
    assert stage.is_open and stage.unit == "mm" and stage.limits == ((-50.0, home) if flavor == "grbl" else (0.0, 50.0))
    assert emulator.homed if flavor == "grbl" else "Z" in emulator._homed_axes
    assert stage.target == pytest.approx(home)
    assert stage.firmware.startswith("Grbl 1.1h" if flavor == "grbl" else "Marlin 2.1.2")

    target = home + mm(flavor, 3.0)
    t0 = time.monotonic()
    stage.move_to(target)  # 3 mm at 600 mm/min: 0.3 s
    assert time.monotonic() - t0 < 0.1, "move_to must return once the line is queued"
    assert min(home, target) <= emulator.position_mm[2] <= max(home, target) and emulator.position_mm[2] != pytest.approx(target)
    settled_s = stage.wait_settled(timeout_s=2.0)
    elapsed_s = settled_s - t0
    assert 0.3 - 0.01 <= elapsed_s <= 0.3 + 0.15, elapsed_s
    assert time.monotonic() - t0 >= 0.29
    assert emulator.position_mm[2] == pytest.approx(target)
    assert stage.position() == pytest.approx(target, abs=0.01)
    assert stage.target == pytest.approx(target)
    status = stage.status()
    assert isinstance(status, StageStatus) and status.state == "Idle" and status.position_mm == pytest.approx(target, abs=0.01)
    stage.wait_settled(timeout_s=0.5)  # already settled: returns at once

    move = f"G1 Z{target:.4f} F600".encode()
    if flavor == "grbl":
        expected = [b"$I", b"$H", b"G21", b"G90", b"$$", move, b"G4 P0"]
        # asked whether a move is still running (a reset in motion loses the position), then woken with a soft reset
        assert emulator.received[:2] == [b"?", b"\x18"]
        received = emulator.received
        polls = received[received.index(move) + 1 : received.index(b"G4 P0")]
        assert polls and set(polls) == {b"?"}  # polled the real-time status until Idle, then synced
    else:
        expected = [b"M115", b"G28 Z", b"G21", b"G90", b"M114", b"M211", move, b"M400", b"M114", b"M114"]
    assert lines_sent(emulator) == expected
    stage.close()
    stage.close()  # idempotent
    assert not stage.is_open


@pytest.mark.parametrize("flavor", FLAVORS)
def test_settle_time_follows_distance_and_feed(started, flavor: str) -> None:
    emulator, stage = make(started, flavor, feed_mm_min=1200.0, home_on_start=False)
    emulator.BUSY_INTERVAL_S = 0.03  # Marlin: "echo:busy: processing" keepalives during M400 are ignored
    stage.open()
    for target_mm, expected_s in ((mm(flavor, 2.0), 0.1), (mm(flavor, 6.0), 0.2)):  # 20 mm/s
        t0 = time.monotonic()
        stage.move_to(target_mm)
        elapsed_s = stage.wait_settled(timeout_s=2.0) - t0
        assert expected_s - 0.01 <= elapsed_s <= expected_s + 0.12, (target_mm, elapsed_s)
        assert emulator.position_mm[2] == pytest.approx(target_mm)
    assert g1(flavor, 6.0, 1200).encode() in lines_sent(emulator)
    assert not any(line in (b"$H", b"G28 Z") for line in lines_sent(emulator))


@pytest.mark.parametrize("flavor", FLAVORS)
def test_wait_settled_timeout_then_the_pending_sync_is_honoured(started, flavor: str) -> None:
    emulator, stage = make(started, flavor, home_on_start=False)
    stage.open()
    t0 = time.monotonic()
    stage.move_to(mm(flavor, 5.0))  # 0.5 s
    with pytest.raises(DeviceTimeout, match="not settled") as info:
        stage.wait_settled(timeout_s=0.1)
    assert time.monotonic() - t0 < 0.1 + 0.1
    # one line naming the device, its port, the command not yet answered, and what to change
    msg = str(info.value)
    assert emulator.port in msg and "focus.move_timeout_s" in msg and "\n" not in msg
    assert ("'?'" in msg or "'G4 P0'" in msg) if flavor == "grbl" else "'M400'" in msg
    settled_s = stage.wait_settled(timeout_s=2.0)
    assert 0.5 - 0.01 <= settled_s - t0 <= 0.5 + 0.15
    assert stage.position() == pytest.approx(mm(flavor, 5.0), abs=0.01)
    sync = b"G4 P0" if flavor == "grbl" else b"M400"
    assert lines_sent(emulator).count(sync) == 1  # the outstanding sync line was awaited, not re-sent
    stage.move_to(mm(flavor, 6.0))  # the stream is still in step: the next line gets its own ok
    stage.wait_settled(timeout_s=2.0)
    assert emulator.position_mm[2] == pytest.approx(mm(flavor, 6.0))


def test_port_emulator_starts_and_stops_an_in_process_emulator(started) -> None:
    stage = GcodeFocusStage("emulator", flavor="marlin", feed_mm_min=1200.0)
    started.append(stage)
    with stage:
        assert stage.emulator is not None and stage.port_path.startswith("/dev/")
        stage.move_to(1.0)
        stage.wait_settled(timeout_s=2.0)
        assert stage.position() == pytest.approx(1.0, abs=0.01)
        thread = stage.emulator._thread
    assert thread is not None and not thread.is_alive()


# --------------------------------------------------------------------------------------------
# limits, errors, alarms
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavor", FLAVORS)
def test_soft_limit_is_refused_before_anything_is_sent(started, flavor: str) -> None:
    limits = tuple(sorted((mm(flavor, 0.0), mm(flavor, 40.0))))
    emulator, stage = make(started, flavor, limits_mm=limits, home_on_start=False)
    stage.open()
    before = list(emulator.received)
    for bad in (limits[1] + 0.5, limits[0] - 0.1, float("nan")):
        with pytest.raises(InputError, match="outside the device limits"):
            stage.move_to(bad)
    assert emulator.received == before


def test_grbl_limits_outside_the_travel_are_refused_at_open(started) -> None:
    # stock GRBL's travel is [-max_travel, 0]: limits written for a positive rail would drive past the home switch
    emulator, stage = make(started, "grbl", limits_mm=(0.0, 40.0))
    with pytest.raises(InputError, match=r"limits_mm \[0, 40\] lie outside the controller's Z travel \[-50, 0\] mm") as info:
        stage.open()
    assert emulator.port in str(info.value) and not stage.is_open
    assert not any(line.startswith(b"G1") for line in lines_sent(emulator))


def test_grbl_travel_follows_a_work_offset_and_a_forced_origin() -> None:
    stage = GcodeFocusStage("/dev/null", axis="Z", limits_mm=(5.0, 45.0))
    stage._parse_grbl_status("<Idle|MPos:0.000,0.000,-49.000|FS:0,0|WCO:0.000,0.000,-50.000>")  # work Z = machine Z + 50
    assert stage._checked_limits((0.0, 50.0), homed=True) == (5.0, 45.0)
    with pytest.raises(InputError, match="outside the controller's Z travel"):
        stage._checked_limits((0.0, 40.0), homed=True)
    free = GcodeFocusStage("/dev/null", axis="Z")
    free._target_mm = 0.0  # homed toward negative with the origin forced: the switch is at the low end
    assert free._checked_limits((0.0, 50.0), homed=True) == (0.0, 50.0)
    free._target_mm = -1.0  # stock: homed at -pulloff, the switch beyond the high end
    assert free._checked_limits((-50.0, 0.0), homed=True) == (-50.0, -1.0)
    with pytest.raises(InputError, match="set limits_mm"):
        free._checked_limits(None, homed=False)


def test_grbl_startup_blocks_echoed_after_homing_are_accepted(started) -> None:
    emulator, stage = make(started, "grbl")
    emulator.startup_echo = b">G54:ok\r\n"  # a user's $N0=G54, run after reset and after $H
    stage.open()
    assert stage.is_open and emulator.homed


def test_grbl_soft_limit_alarm_is_a_device_error_then_locked(started) -> None:
    emulator, stage = make(started, "grbl", limits_mm=(-100.0, 0.0), emulator_kw={"max_travel_mm": 50.0}, home_on_start=False)
    stage.limits_given = None  # past the open-time check, as on a controller that reports no travel
    stage.open()
    stage._limits = (-100.0, 0.0)
    with pytest.raises(DeviceError, match="soft limit") as info:
        stage.move_to(-60.0)  # inside the driver's limits, outside the machine's travel
    assert "ALARM:2" in str(info.value) and emulator.port in str(info.value) and "G1 Z-60.0000 F600" in str(info.value)
    assert not isinstance(info.value, ProtocolError)
    assert stage.status().state == "Alarm"
    with pytest.raises(ProtocolError, match=r"'G1 Z-10.0000 F600' refused with error:9 \(G-code locked out during an alarm") as info:
        stage.move_to(-10.0)
    assert emulator.port in str(info.value)
    stage.unlock()
    assert lines_sent(emulator)[-1] == b"$X"
    stage.move_to(-1.0)
    stage.wait_settled(timeout_s=2.0)
    assert stage.position() == pytest.approx(-1.0)


def test_marlin_soft_endstops_clamp_silently(started) -> None:
    _, stage = make(started, "marlin", limits_mm=(0.0, 1.0), feed_mm_min=1200.0, emulator_kw={"max_travel_mm": 2.0})
    stage.open()
    stage._limits = (0.0, 100.0)  # wider than the travel M211 reported (the open refuses that)
    stage.move_to(3.0)  # Marlin clamps to its travel and says ok (documented: the driver's limits protect)
    stage.wait_settled(timeout_s=2.0)
    assert stage.position() == pytest.approx(2.0, abs=0.01)


@pytest.mark.parametrize(("flavor", "line", "pattern"), [
    ("grbl", "G99", r"'G99' refused with error:20 \(unsupported or invalid G-code command\)"),
    ("grbl", "G1 Zabc", r"'G1 Zabc' refused with error:2 \(bad number format"),
    ("grbl", "$Q", r"'\$Q' refused with error:3"),
    ("marlin", "M9999", r"Marlin refused 'M9999': echo:Unknown command: \"M9999\""),
])
def test_error_reply_is_a_protocol_error_naming_the_line(started, flavor: str, line: str, pattern: str) -> None:
    emulator, stage = make(started, flavor, home_on_start=False, feed_mm_min=1200.0)
    stage.open()
    with pytest.raises(ProtocolError, match=pattern) as info:
        stage.command(line)
    assert emulator.port in str(info.value)
    stage.move_to(mm(flavor, 1.0))  # the exchange stays in step after a refusal
    stage.wait_settled(timeout_s=2.0)
    assert stage.position() == pytest.approx(mm(flavor, 1.0), abs=0.01)


def test_raw_command_returns_the_lines_before_ok(started) -> None:
    _, stage = make(started, "grbl", home_on_start=False)
    stage.open()
    settings = stage.command("$$")
    assert "$132=50.000" in settings and "$100=800.000" in settings
    with pytest.raises(InputError):
        stage.command("G0 Z1\nG0 Z2")


def test_grbl_homing_required_alarm_at_open_has_a_clear_message(started) -> None:
    emulator, stage = make(started, "grbl", home_on_start=False, emulator_kw={"needs_homing": True})
    with pytest.raises(DeviceError, match="alarm state") as info:
        stage.open()
    message = str(info.value)
    assert "focus.home_on_start: true" in message and "$H" in message and emulator.port in message
    assert not stage.is_open
    assert not any(line.startswith(b"G") for line in lines_sent(emulator))  # no motion G-code sent to a locked machine
    stage.close()  # harmless after a failed open
    homing = GcodeFocusStage(emulator.port, flavor="grbl", timeout_s=TIMEOUT_S)  # the default: home on start
    started.append(homing)
    homing.open()
    assert emulator.homed and emulator.state == "Idle"


def test_marlin_homing_required_is_reported_at_the_first_move(started) -> None:
    emulator, stage = make(started, "marlin", home_on_start=False, emulator_kw={"needs_homing": True})
    stage.open()
    with pytest.raises(DeviceError, match="homing required") as info:
        stage.move_to(5.0)
    assert "G1 Z5.0000 F600" in str(info.value) and emulator.port in str(info.value)
    stage.home()
    stage.move_to(0.5)
    stage.wait_settled(timeout_s=2.0)
    assert stage.position() == pytest.approx(0.5, abs=0.01)


# --------------------------------------------------------------------------------------------
# faults: silence, garbage, cable pulled, wrong port
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavor", FLAVORS)
def test_stall_is_a_timeout_naming_port_and_line(started, flavor: str) -> None:
    emulator, stage = make(started, flavor, home_on_start=False)
    stage.open()
    emulator.inject("stall")
    t0 = time.monotonic()
    with pytest.raises(DeviceTimeout) as info:
        stage.move_to(mm(flavor, 5.0))
    elapsed_s = time.monotonic() - t0
    assert TIMEOUT_S - 0.01 <= elapsed_s <= TIMEOUT_S + 0.25, elapsed_s
    assert emulator.port in str(info.value) and f"'{g1(flavor, 5.0)}'" in str(info.value)
    t0 = time.monotonic()
    stage.close()
    assert time.monotonic() - t0 < 0.5


@pytest.mark.parametrize("flavor", FLAVORS)
def test_garbled_reply_is_a_protocol_error(started, flavor: str) -> None:
    emulator, stage = make(started, flavor, home_on_start=False)
    stage.open()
    emulator.inject("corrupt_crc")
    with pytest.raises(ProtocolError, match=rf"unparseable reply 'nk' to '{g1(flavor, 5.0)}'") as info:
        stage.move_to(mm(flavor, 5.0))
    assert emulator.port in str(info.value)


def test_garbled_status_report_is_a_protocol_error(started) -> None:
    emulator, stage = make(started, "grbl", home_on_start=False)
    stage.open()
    emulator.inject("corrupt_crc")
    with pytest.raises(ProtocolError, match=r"unparseable reply '=Idle\|MPos"):
        stage.position()


@pytest.mark.parametrize("flavor", FLAVORS)
def test_disconnect_mid_move_is_a_device_error_without_hanging(started, flavor: str) -> None:
    emulator, stage = make(started, flavor, home_on_start=False)
    stage.open()
    stage.move_to(mm(flavor, 20.0))  # 2 s of motion
    time.sleep(0.05)
    emulator.disconnect()
    t0 = time.monotonic()
    with pytest.raises(DeviceError) as info:
        stage.wait_settled(timeout_s=5.0)
    assert time.monotonic() - t0 < 1.0
    assert not isinstance(info.value, DeviceTimeout)
    assert emulator.port in str(info.value)
    t0 = time.monotonic()
    stage.close()
    stage.close()
    assert time.monotonic() - t0 < 0.5 and not stage.is_open


def test_missing_port_is_a_device_error_naming_it() -> None:
    path = "/dev/does-not-exist-gcode-stage"
    stage = GcodeFocusStage(path)
    with pytest.raises(DeviceError, match="does-not-exist-gcode-stage") as info:
        stage.open()
    assert "dialout" in str(info.value) and not stage.is_open


def test_wrong_flavor_times_out_with_a_hint(started) -> None:
    emulator = GcodeEmulator(flavor="marlin").start()
    started.append(emulator)
    stage = GcodeFocusStage(emulator.port, flavor="grbl", timeout_s=0.15)
    started.append(stage)
    t0 = time.monotonic()
    with pytest.raises(DeviceTimeout, match="focus.flavor: marlin"):
        stage.open()
    assert time.monotonic() - t0 < 2 * 0.15 + 0.3


def test_constructor_validates_arguments() -> None:
    assert emulator_class("grbl") is GcodeEmulator
    for kwargs in ({"flavor": "reprap"}, {"axis": "Q"}, {"limits_mm": (5.0, 1.0)}, {"feed_mm_min": 0.0}, {"timeout_s": float("inf")}):
        with pytest.raises(InputError):
            GcodeFocusStage("/dev/null", **kwargs)


def test_status_report_parsing_handles_work_offsets_and_grbl_0_9() -> None:
    stage = GcodeFocusStage("/dev/null", axis="Z")
    s = stage._parse_grbl_status("<Run|MPos:1.000,2.000,13.500|FS:600,0|WCO:0.000,0.000,1.500>")
    assert (s.state, s.position_mm, s.machine_mm) == ("Run", pytest.approx(12.0), (1.0, 2.0, 13.5))
    s = stage._parse_grbl_status("<Idle|WPos:0.000,0.000,12.000|FS:0,0>")  # the offset is remembered
    assert s.position_mm == pytest.approx(12.0) and s.machine_mm[2] == pytest.approx(13.5)
    s = stage._parse_grbl_status("<Idle,MPos:0.000,0.000,4.250,WPos:0.000,0.000,4.250>")
    assert s.state == "Idle" and s.machine_mm == (0.0, 0.0, 4.25)
    with pytest.raises(ProtocolError):
        stage._parse_grbl_status("<Idle|FS:0,0>")


# --------------------------------------------------------------------------------------------
# the emulator on its own
# --------------------------------------------------------------------------------------------


def _exchange(port: serial.Serial, data: bytes, *, until: bytes = b"\n", timeout_s: float = 1.0) -> bytes:
    port.write(data)
    out = b""
    deadline = time.monotonic() + timeout_s
    while not out.endswith(until) and time.monotonic() < deadline:
        out += port.read(port.in_waiting or 1)
    return out


def test_grbl_emulator_models_hold_resume_and_dwell_sync(started) -> None:
    emulator = GcodeEmulator(flavor="grbl").start()
    started.append(emulator)
    with serial.Serial(emulator.port, 115200, timeout=0.01) as port:
        assert _exchange(port, b"G21 G90\n") == b"ok\r\n"
        t0 = time.monotonic()
        assert _exchange(port, b"G1 Z-1 F600\n") == b"ok\r\n"  # 0.1 s of motion
        assert _exchange(port, b"?").startswith(b"<Run|MPos:0.000,0.000,-0.")
        time.sleep(0.03)
        port.write(b"!")
        time.sleep(0.01)
        held = _exchange(port, b"?")
        assert held.startswith(b"<Hold:0|")
        time.sleep(0.1)
        assert _exchange(port, b"?") == held  # frozen while held
        port.write(b"~G4 P0\n")
        reply = _exchange(port, b"", until=b"ok\r\n", timeout_s=1.0)
        elapsed_s = time.monotonic() - t0
        assert reply == b"ok\r\n" and 0.2 <= elapsed_s <= 0.35, elapsed_s  # 0.1 s of motion + ~0.11 s held
        assert _exchange(port, b"?") == b"<Idle|MPos:0.000,0.000,-1.000|FS:0,0>\r\n"
        assert _exchange(port, b"\x18", until=b"help]\r\n") == b"\r\nGrbl 1.1h ['$' for help]\r\n"
        assert _exchange(port, b"G1 Z-2\n") == b"error:22\r\n"  # the reset forgot the feed rate
    assert emulator.requests_served == len(emulator.received) >= 10


@pytest.mark.parametrize("flavor", FLAVORS)
def test_emulator_command_line_prints_the_port_first(flavor: str) -> None:
    args = [sys.executable, "-m", "capture.emulators", "grbl"] + (["--flavor", "marlin"] if flavor == "marlin" else [])
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as from a terminal
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 10.0)
        assert ready, "the emulator printed nothing within 10 s"
        port = proc.stdout.readline().strip()
        assert port.startswith("/dev/"), port
        with GcodeFocusStage(port, flavor=flavor, home_on_start=False, timeout_s=1.0, feed_mm_min=1200.0) as stage:
            stage.move_to(mm(flavor, 1.0))
            stage.wait_settled(timeout_s=2.0)
            assert stage.position() == pytest.approx(mm(flavor, 1.0), abs=0.01)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, proc.stderr.read()


def test_marlin_without_inch_support_opens(started) -> None:
    emulator, stage = make(started, "marlin", home_on_start=False)
    emulator.inch_support = False  # Marlin 1.1 without INCH_MODE_SUPPORT: "Unknown command" to G21
    stage.open()
    assert stage.is_open and b"G21" in lines_sent(emulator)


def test_grbl_is_polled_for_status_at_most_ten_times_a_second(started) -> None:
    """GRBL's docs: query '?' at 5-10 Hz (status reports cost the controller's CPU); the settle
    wait sent it every 2 ms (about 370 a second)."""
    emulator, stage = make(started, "grbl", home_on_start=False)
    stage.open()
    n_before = len(emulator.received)
    stage.move_to(mm("grbl", 5.0))  # 0.5 s of motion
    t0 = time.monotonic()
    stage.wait_settled(timeout_s=5.0)
    elapsed_s = time.monotonic() - t0
    polls = sum(1 for r in emulator.received[n_before:] if r == b"?")
    assert elapsed_s >= 0.4 and polls <= 10 * elapsed_s + 2, (polls, elapsed_s)


def test_a_held_grbl_is_named_in_the_settle_timeout(started) -> None:
    emulator, stage = make(started, "grbl", home_on_start=False)
    stage.open()
    stage.move_to(mm("grbl", 5.0))
    time.sleep(0.05)
    emulator._hold_since_s = time.monotonic()  # a feed hold ('!' from the controller's button)
    with pytest.raises(DeviceTimeout) as info:
        stage.wait_settled(timeout_s=0.5)
    message = str(info.value)
    assert "the controller reports Hold:0" in message and "resume with '~'" in message and emulator.port in message
    assert "feed_mm_min" not in message  # not blamed on a slow move


def test_a_controller_that_stops_answering_while_settling_is_not_blamed_on_the_move_timeout(started) -> None:
    emulator, stage = make(started, "grbl", home_on_start=False)
    stage.open()
    stage.move_to(mm("grbl", 5.0))
    emulator.inject("stall")
    t0 = time.monotonic()
    with pytest.raises(DeviceTimeout) as info:
        stage.wait_settled(timeout_s=4.0)
    assert time.monotonic() - t0 < 4.0 - 0.5  # the status query's own timeout, not the settle wait
    assert "no status report to '?'" in str(info.value) and "feed_mm_min" not in str(info.value)


def test_a_stage_left_moving_is_held_at_close_and_waited_for_at_the_next_open(started, caplog) -> None:
    """Ctrl-C or an error mid-move closed the port and the axis ran on unattended; the next
    run's soft reset then hit it in motion (ALARM:3, position lost)."""
    emulator, stage = make(started, "grbl", home_on_start=False)
    stage.open()
    stage.move_to(mm("grbl", 20.0))  # 2 s of motion
    time.sleep(0.2)
    with caplog.at_level("WARNING", logger="capture.gcode"):
        stage.close()  # not settled: as after Ctrl-C
    assert b"!" in emulator.received
    assert emulator.state.startswith("Hold")  # stopped, not running on
    assert any("feed hold sent, now Hold:0" in r.getMessage() for r in caplog.records)
    stopped_at = emulator.position_mm[2]
    time.sleep(0.3)
    assert emulator.position_mm[2] == stopped_at

    # a stage still running from a process that died: the next open waits for it before resetting
    emulator2, stage2 = make(started, "grbl", home_on_start=False)
    with serial.Serial(emulator2.port, 115200, timeout=0.01) as port:
        assert _exchange(port, b"G21 G90\n") == b"ok\r\n"
        assert _exchange(port, b"G1 Z-5 F600\n") == b"ok\r\n"  # 0.5 s of motion, then the process "dies"
    t0 = time.monotonic()
    stage2.open()
    assert time.monotonic() - t0 >= 0.3
    assert emulator2.alarm_code is None or emulator2.alarm_code != 3
    assert stage2.position() == pytest.approx(-5.0, abs=0.01)


def test_marlin_opens_after_a_grbl_attempt_left_bytes_in_its_line_buffer(started) -> None:
    """flavor grbl on a Marlin board fails (as it should); the fix the message suggests,
    flavor marlin, then failed too: the GRBL attempt's 0x18 and '?' were still in Marlin's line
    buffer and its M115 came back "Unknown command"."""
    emulator = GcodeEmulator(flavor="marlin", homing_time_s=HOMING_S).start()
    started.append(emulator)
    with serial.Serial(emulator.port, 115200, timeout=0.01) as port:
        port.write(b"?\x18")  # what a GRBL wake-up leaves behind, no newline
        time.sleep(0.05)
    stage = GcodeFocusStage(emulator.port, flavor="marlin", home_on_start=False, timeout_s=TIMEOUT_S)
    started.append(stage)
    stage.open()
    assert stage.is_open and "Marlin" in stage.firmware


def test_a_marlin_that_goes_silent_while_moving_is_caught_without_waiting_out_the_move_timeout(started, monkeypatch) -> None:
    """Marlin answers M400 only when the moves are done, meanwhile sending its busy keepalive:
    nothing at all, well past the move's expected end, is a hung or unplugged controller."""
    monkeypatch.setattr("capture.gcode.MARLIN_SILENCE_S", 0.5)
    emulator, stage = make(started, "marlin", home_on_start=False, move_timeout_s=30.0)
    stage.open()
    stage.move_to(mm("marlin", 1.0))  # 0.1 s of motion at 600 mm/min
    emulator.inject("stall")
    t0 = time.monotonic()
    with pytest.raises(DeviceTimeout) as info:
        stage.wait_settled(timeout_s=30.0)
    assert time.monotonic() - t0 < 0.5 + 0.1 + 1.0
    message = str(info.value)
    assert "no reply and no busy keepalive to 'M400'" in message and emulator.port in message
    assert "move_timeout_s" not in message  # not blamed on a long move


def test_a_marlin_busy_keepalive_keeps_a_long_move_waiting(started, monkeypatch) -> None:
    """The busy keepalive counts as an answer: a move longer than the silence limit settles."""
    monkeypatch.setattr("capture.gcode.MARLIN_SILENCE_S", 0.3)
    emulator, stage = make(started, "marlin", home_on_start=False)
    emulator.BUSY_INTERVAL_S = 0.1
    stage.open()
    stage.move_to(mm("marlin", 10.0))  # 1 s of motion at 600 mm/min
    stage.wait_settled(timeout_s=5.0)
    assert stage.position() == pytest.approx(mm("marlin", 10.0), abs=0.01)


@pytest.mark.parametrize(("feed", "written"), [(2_000_000.0, "F2000000"), (12.5, "F12.5"), (600.0, "F600")])
def test_feed_rates_are_written_without_an_exponent(started, feed: float, written: str) -> None:
    """'{:g}' wrote F2e+06, which GRBL refuses (error:20)."""
    emulator, stage = make(started, "grbl", home_on_start=False, feed_mm_min=feed)
    stage.open()
    stage.move_to(mm("grbl", 0.5))
    assert f"G1 Z{mm('grbl', 0.5):.4f} {written}".encode() in emulator.received


def test_a_port_that_fails_while_reading_says_reading(started) -> None:
    emulator, stage = make(started, "grbl", home_on_start=False)
    stage.open()
    stage.move_to(mm("grbl", 20.0))
    emulator.inject("disconnect")  # the next request is read, then the port goes: its reply never comes
    with pytest.raises(DeviceError, match=r"failed while reading the reply to '\?'"):
        stage.wait_settled(timeout_s=5.0)
