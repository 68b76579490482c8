"""The hardware path end to end without hardware: the real harvesters path on viky.cti with
the Optotune LD4 driver talking to its emulator over a real pseudo-terminal
(configs/dryrun_viky_optotune.yaml), and a lens cable pulled mid-sweep."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

import capture.ld4_protocol as ld4
from capture.emulators.optotune import OptotuneEmulator
from capture.gentl import viky_path
from capture.stack import FocalStack
from rig import load_config, open_rig
from rig.cli import main as run_rig_main
from rig.config import RigConfig, parse_config

ROOT = Path(__file__).resolve().parents[1]
DRYRUN = ROOT / "configs" / "dryrun_viky_optotune.yaml"

pytestmark = [
    pytest.mark.skipif(sys.platform.startswith("win"), reason="the emulators need a pseudo-terminal"),
    pytest.mark.skipif(not viky_path().is_file(), reason=f"viky.cti not found at {viky_path()}"),
]


def _aw_frames(received: list[bytes]) -> list[bytes]:
    return [r for r in received if r.startswith(b"Aw")]


def test_dry_run_sweep_is_real_protocol_exchanges(tmp_path: Path) -> None:
    config = load_config(DRYRUN)
    with open_rig(config) as rig:
        emulator = rig.actuator.emulator
        assert emulator is not None and emulator.port.startswith("/dev/")
        opened = len(emulator.received)
        stack = rig.capture_stack()
        max_ma = rig.actuator.max_current_ma
    assert stack.n_slices == 10
    stack.write(tmp_path / "stack")
    back = FocalStack.read(tmp_path / "stack")
    assert back.n_slices == 10 and back.image_hw == (400, 400)
    assert back.meta["capture"]["camera_identity"]["serial_number"] == "0"
    assert back.meta["capture"]["focus_identity"]["serial_number"] == "EMU00001"
    # every move of the sweep went over the pseudo-terminal as the LD4's own Aw frame, CRC included
    sweep_moves = _aw_frames(emulator.received[opened:])
    expected = [ld4.set_current(ld4.current_to_raw(s["actuator_value"], max_ma)).frame for s in back.slice_meta]
    assert sweep_moves[: len(expected)] == expected
    assert all(ld4.check_frame(f) for f in sweep_moves)
    # closing parked the lens at 0 mA
    assert emulator.received[-1] == ld4.set_current(0).frame
    assert emulator.current_raw == 0


def test_dry_run_config_completes_through_run_rig(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run_rig.py"), "--config", str(DRYRUN), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    run_dir = next(tmp_path.iterdir())
    stack = FocalStack.read(run_dir / "stacks" / "000000")
    assert stack.n_slices == 10
    assert (run_dir / "depth" / "000000" / "depth.npy").is_file()
    assert str(run_dir) in proc.stdout


def _pull_cable_after(emulator: OptotuneEmulator, moves: int) -> threading.Thread:
    def watch() -> None:
        deadline = time.monotonic() + 30
        while len(_aw_frames(emulator.received)) < moves and time.monotonic() < deadline:
            time.sleep(0.002)
        emulator.disconnect()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _config_with_port(tmp_path: Path, port: str) -> Path:
    doc = yaml.safe_load(DRYRUN.read_text(encoding="utf-8"))
    doc["focus"]["port"] = port
    doc["focus"]["timeout_s"] = 0.3
    path = tmp_path / "rig.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def test_port_vanishing_mid_sweep_keeps_the_slices_and_exits_3(tmp_path: Path, capsys) -> None:
    with OptotuneEmulator() as emulator:
        config = _config_with_port(tmp_path, emulator.port)
        watcher = _pull_cable_after(emulator, moves=4)
        t0 = time.monotonic()
        code = run_rig_main(["--config", str(config), "--out", str(tmp_path / "runs"), "--no-progress"])
        elapsed = time.monotonic() - t0
        watcher.join(timeout=5)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3
    assert elapsed < 10
    assert len(err) == 1 or all("WARNING" in line for line in err[:-1])  # one error line (warnings aside)
    line = err[-1]
    assert line.startswith("error: sweep stopped after") and emulator.port in line and "command" in line
    run_dir = next((tmp_path / "runs").iterdir())
    stacks = run_dir / "stacks"
    assert not (stacks / "000000").exists()  # never under the final name
    kept = stacks / "000000.incomplete"
    reason = (kept / "reason.txt").read_text(encoding="utf-8")
    assert emulator.port in reason
    partial = FocalStack.read(kept)
    assert 2 <= partial.n_slices < 10
    summary = yaml.safe_load((run_dir / "summary.yaml").read_text(encoding="utf-8"))
    assert summary["stacks"] == 0 and summary["incomplete"] == [str(kept)]


def test_a_lens_that_stops_answering_is_parked(tmp_path: Path, capsys) -> None:
    """No reply mid-sweep: DeviceTimeout naming the port and command, and the lens is parked
    (the stalled emulator still hears the park frames)."""
    with OptotuneEmulator() as emulator:
        config = _config_with_port(tmp_path, emulator.port)

        def stall_after_moves() -> None:
            deadline = time.monotonic() + 30
            while len(_aw_frames(emulator.received)) < 3 and time.monotonic() < deadline:
                time.sleep(0.002)
            emulator.inject("stall")

        threading.Thread(target=stall_after_moves, daemon=True).start()
        code = run_rig_main(["--config", str(config), "--out", str(tmp_path / "runs"), "--no-progress"])
        line = capsys.readouterr().err.strip().splitlines()[-1]
        deadline = time.monotonic() + 2
        while emulator.received[-1:] != [ld4.set_current(0).frame] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert emulator.current_raw == 0  # parked at 0 mA
    assert code == 3
    assert "no reply" in line.lower() and emulator.port in line
    kept = next((tmp_path / "runs").iterdir()) / "stacks" / "000000.incomplete"
    assert FocalStack.read(kept).n_slices >= 2  # the slices before the stall are a readable stack


@pytest.mark.parametrize("serial, warned", [("OTHER-LENS-7", True), ("EMU00001", False)])
def test_a_calibration_of_another_lens_is_named_at_open(tmp_path: Path, caplog: pytest.LogCaptureFixture, serial: str, warned: bool) -> None:
    """A calibration.yaml made with another lens driver (another serial number) gives wrong
    focus distances without any error: opening the rig warns, naming the file and both
    serial numbers; the same serial number is quiet."""
    cal = tmp_path / "calibration.yaml"
    cal.write_text(yaml.safe_dump({
        "format": 1, "rig": {"name": "other", "focus_identity": {"serial_number": serial}, "camera_identity": {"serial_number": "0"}},
        "focus_model": {"kind": "liquid_lens_linear", "offset_dpt": -0.49, "dpt_per_ma": 0.0166},
    }), encoding="utf-8")
    config = load_config(DRYRUN)
    config.calibration.file = cal
    with caplog.at_level("WARNING", logger="rig.build"), open_rig(config):
        pass
    messages = [r.getMessage() for r in caplog.records if r.name == "rig.build"]
    if warned:
        assert len(messages) == 1
        assert str(cal) in messages[0] and "serial number OTHER-LENS-7" in messages[0] and "serial number EMU00001" in messages[0]
        assert "focus distances" in messages[0]
    else:
        assert messages == []


@pytest.mark.parametrize("rig_doc", [
    {"name": "sim", "camera": "simulated camera", "focus": "simulated liquid lens"},  # a file from before *_driver was recorded
    {"name": "sim", "camera": "simulated camera", "focus": "simulated liquid lens", "camera_driver": "simulated", "focus_driver": "simulated"},
])
def test_a_calibration_made_on_the_simulator_is_named_on_hardware(tmp_path: Path, caplog: pytest.LogCaptureFixture, rig_doc: dict) -> None:
    """The simulator's calibration (no serial numbers to compare) loaded on a real lens without a word."""
    cal = tmp_path / "calibration.yaml"
    cal.write_text(yaml.safe_dump({"format": 1, "rig": rig_doc,
                                   "focus_model": {"kind": "liquid_lens_linear", "offset_dpt": -0.49, "dpt_per_ma": 0.0166}}), encoding="utf-8")
    config = load_config(DRYRUN)
    config.calibration.file = cal
    with caplog.at_level("WARNING", logger="rig.build"), open_rig(config):
        pass
    messages = [r.getMessage() for r in caplog.records if r.name == "rig.build"]
    assert len(messages) == 2, messages
    assert "camera.driver simulated" in messages[0] and "this rig's camera.driver is genicam" in messages[0]
    assert "focus.driver simulated" in messages[1] and "this rig's focus.driver is optotune" in messages[1]
    assert all(str(cal) in m and "recalibrate" in m for m in messages)


def test_ctrl_c_at_a_calibration_prompt_stops_the_session(tmp_path: Path) -> None:
    """With a GenICam camera open, Ctrl-C at the bench prompt did nothing (harvesters had taken
    SIGINT); pressing Enter then failed as a disconnected camera, exit 3. Now: exit 130."""
    import os
    import select
    import signal

    proc = subprocess.Popen([sys.executable, str(ROOT / "run_rig.py"), "--config", str(DRYRUN), "--mode", "calibrate", "--out", str(tmp_path)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    seen, deadline = b"", time.monotonic() + 60
    try:
        while b"press Enter" not in seen and time.monotonic() < deadline and proc.poll() is None:
            ready, _, _ = select.select([proc.stdout, proc.stderr], [], [], 0.5)
            for stream in ready:
                seen += os.read(stream.fileno(), 4096)
        assert b"press Enter" in seen, seen.decode(errors="replace")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, (seen + out + err).decode(errors="replace")
    assert b"interrupted by the user" in err


def _stage_config(tmp_path: Path, **focus_extra) -> RigConfig:
    """The dry run's viky camera with the GRBL emulator's stage."""
    doc = yaml.safe_load(DRYRUN.read_text(encoding="utf-8"))
    doc["focus"] = {"driver": "gcode", "port": "emulator", "flavor": "grbl", "axis": "Z", "feed_mm_min": 3000, **focus_extra}
    doc["output"] = {"dir": str(tmp_path)}
    return parse_config(doc, source="stage")


@pytest.mark.slow  # CI's 10-minute budget on the slower 2-core VMs; run with: pytest -m slow
def test_a_stage_without_a_nominal_model_calibrates_over_its_whole_travel(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A first calibration of a stage has no focus.nominal (that is what it measures): the
    session warned that it would sweep the whole travel, then refused to open the rig for want
    of focus.nominal 'or calibration.file'. Now it opens and sweeps (viky's images have no focus
    curve, so it stops at the first target, on the sharpness, not on the config)."""
    from capture.errors import CalibrationError
    from rig.calibrate import run_calibration

    config = _stage_config(tmp_path)
    with pytest.raises(CalibrationError, match=r"^target at 2\.000 m: .*(no contrast|no sharpness peak)") as info:
        run_calibration(config, interactive=True, show_progress=False, ask=lambda prompt: "")
    assert "focus.nominal" not in str(info.value)
    state = yaml.safe_load(next(tmp_path.glob("*/calibration_session/session.yaml")).read_text(encoding="utf-8"))
    assert state["curves"] == []  # resumable, nothing measured


def test_a_nominal_model_that_misses_the_travel_is_one_line_naming_it(tmp_path: Path) -> None:
    """It was clipped to the actuator's limits silently: every frame at one position, then
    'the images have no contrast'."""
    from capture.errors import ConfigError
    from rig.calibrate import run_calibration

    config = _stage_config(tmp_path, nominal={"offset_dpt": -1.0, "dpt_per_unit": 0.1})  # 0.25-2 m at +10..+60 mm; travel -50..-1 mm
    with pytest.raises(ConfigError, match=r"^focus\.nominal puts the target distances .* at .* mm, and .*limits are \[-50, -1\] mm: nothing"):
        run_calibration(config, interactive=True, show_progress=False, ask=lambda prompt: "")
    assert list(tmp_path.iterdir()) == []  # no run folder


def test_the_stage_dry_run_config_completes_through_run_rig(tmp_path: Path) -> None:
    """configs/dryrun_viky_grbl.yaml: viky and the GRBL emulator on a pseudo-terminal, homing and
    every move real G-code; the stack records the stage positions in mm."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run_rig.py"), "--config", str(ROOT / "configs" / "dryrun_viky_grbl.yaml"), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    run_dir = next(tmp_path.iterdir())
    stack = FocalStack.read(run_dir / "stacks" / "000000")
    assert stack.n_slices == 8
    assert {e["actuator_unit"] for e in stack.slice_meta} == {"mm"}
    values = [e["actuator_value"] for e in stack.slice_meta]
    assert values == sorted(values) and all(v < 0 for v in values)  # far to near along a GRBL rail's negative travel
    assert (run_dir / "depth" / "000000" / "depth.npy").is_file()


def test_a_stage_plan_beyond_its_limits_is_refused_before_the_stage_opens(tmp_path: Path) -> None:
    """With focus.limits_mm given, the planned positions are known before the stage opens: the
    run homed the stage (a physical move) and made a run folder before refusing the plan."""
    doc = yaml.safe_load((ROOT / "configs" / "dryrun_viky_grbl.yaml").read_text(encoding="utf-8"))
    doc["focus"]["port"] = str(tmp_path / "no-such-port")  # opening it would be a device error, exit 3
    doc["focus"]["limits_mm"] = [-10.0, 0.0]  # the plan needs -40 .. -5 mm
    path = tmp_path / "rig.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    proc = subprocess.run([sys.executable, str(ROOT / "run_rig.py"), "--config", str(path), "--out", str(tmp_path / "runs")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert "sweep.range_m: focus distance 2 m needs the stage at -40 mm, outside focus.limits_mm [-10, 0] mm" in proc.stderr
    assert not (tmp_path / "runs").exists()
