"""Continuous acquisition on the simulated rig: counting, drop policies, Ctrl-C, a full disk,
a device that fails and comes back (and one that does not)."""

from __future__ import annotations

import contextlib

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from capture.errors import DeviceError, DiskFull
from capture.stack import FocalStack
from capture.sweep import SweepInterrupted
from rig import continuous as cont_mod
from rig.config import parse_config
from rig.continuous import run_continuous

ROOT = Path(__file__).resolve().parents[1]
SIM_YAML = ROOT / "configs" / "sim.yaml"


def _doc(out: Path, **continuous) -> dict:
    doc = yaml.safe_load(SIM_YAML.read_text(encoding="utf-8"))
    doc["camera"].update(width=128, height=96, fps=240, exposure_s=0.002)
    doc["focus"]["time_constant_s"] = 0.003
    doc["sweep"]["slices"] = 5
    doc["reconstruct"] = {"method": "classical"}
    doc["output"] = {"dir": str(out), "preview": False, "min_free_gb": 0.0}
    doc["continuous"] = {"queue_size": 1, **continuous}
    return doc


def _stack_folders(run_dir: Path) -> list[Path]:
    return sorted(p for p in (run_dir / "stacks").iterdir() if p.is_dir() and not p.name.startswith("."))


def test_count_runs_every_stack_through_every_stage(tmp_path: Path) -> None:
    run = run_continuous(parse_config(_doc(tmp_path, when_behind="block")), count=4, show_status=False)
    s = run.summary
    assert run.exit_code == 0 and s["stopped_by"] == "count"
    assert (s["stacks_captured"], s["stacks_written"], s["stacks_dropped"], s["stacks_unaccounted"]) == (4, 4, 0, 0)
    assert [p.name for p in _stack_folders(run.run_dir)] == ["000000", "000001", "000002", "000003"]
    for k in range(4):
        assert FocalStack.read(run.run_dir / "stacks" / f"{k:06d}").n_slices == 5
        assert (run.run_dir / "depth" / f"{k:06d}" / "depth.npy").is_file()
    assert s["latency_s"]["p50"] > 0 and set(s["stages"]) == {"capture", "reconstruct", "write"}
    # the simulator knows the true depth: the summary scores every stack against it
    assert s["accuracy"]["stacks_scored"] == 4 and 0 < s["accuracy"]["abs_rel"] < 0.5 and 0 < s["accuracy"]["delta_1_25"] <= 1
    assert yaml.safe_load((run.run_dir / "summary.yaml").read_text(encoding="utf-8"))["stacks_written"] == 4


def _slow_reconstruction(monkeypatch, seconds: float) -> None:
    real = cont_mod.reconstruct_stack

    def slow(*args, **kwargs):  # noqa: ANN002, ANN003
        time.sleep(seconds)
        return real(*args, **kwargs)

    monkeypatch.setattr(cont_mod, "reconstruct_stack", slow)


def test_drop_oldest_counts_every_drop(tmp_path: Path, monkeypatch, caplog) -> None:
    _slow_reconstruction(monkeypatch, 0.4)
    with caplog.at_level("WARNING", logger="rig.continuous"):
        run = run_continuous(parse_config(_doc(tmp_path, when_behind="drop_oldest")), count=8, show_status=False)
    s = run.summary
    assert s["stacks_captured"] == 8 and s["stacks_dropped"] >= 2
    assert caplog.text.count("dropped stack") == 1  # one line a minute, not one per drop (a run of hours)
    assert s["stacks_written"] + s["stacks_dropped"] == s["stacks_captured"] and s["stacks_unaccounted"] == 0
    assert len(_stack_folders(run.run_dir)) == s["stacks_written"]


def test_block_policy_drops_nothing(tmp_path: Path, monkeypatch) -> None:
    _slow_reconstruction(monkeypatch, 0.2)
    run = run_continuous(parse_config(_doc(tmp_path, when_behind="block")), count=5, show_status=False)
    assert (run.summary["stacks_written"], run.summary["stacks_dropped"]) == (5, 0)


def test_a_device_that_fails_and_comes_back(tmp_path: Path) -> None:
    calls = {"n": 0}

    def flaky(rig):  # noqa: ANN001
        calls["n"] += 1
        if calls["n"] == 2:
            raise SweepInterrupted("sweep stopped after 1 of 5 slices: cable pulled", cause=DeviceError("lens: port vanished"),
                                   frames=[], distances_m=[], slice_meta=[])
        return rig.capture_stack()

    run = run_continuous(parse_config(_doc(tmp_path, reconnect_attempts=2)), count=4, show_status=False, capture=flaky)
    s = run.summary
    assert run.exit_code == 0 and s["reconnects"] == 1 and s["stacks_failed"] == 1
    # --count counts stacks: the failed sweep is not one of the four
    assert s["stacks_written"] == 4 and s["stopped_by"] == "count" and "cable pulled" in s["errors"][0]
    assert (run.run_dir / "stacks" / "000001.incomplete" / "reason.txt").is_file()


def test_a_device_that_stays_gone_ends_the_run_cleanly(tmp_path: Path, monkeypatch) -> None:
    broken, opened = _stays_gone_after(monkeypatch, 0)
    t0 = time.monotonic()
    with pytest.raises(DeviceError, match="not found"):
        run_continuous(parse_config(_doc(tmp_path, reconnect_attempts=2)), count=3, show_status=False, capture=broken)
    assert time.monotonic() - t0 < 10
    run_dir = next(tmp_path.iterdir())
    summary = yaml.safe_load((run_dir / "summary.yaml").read_text(encoding="utf-8"))
    assert summary["stopped_by"].startswith("error") and summary["stacks_failed"] == 1 and opened["n"] == 3


def test_a_full_disk_stops_recording_without_half_written_stacks(tmp_path: Path, monkeypatch) -> None:
    import shutil

    import rig.runfolder as runfolder

    real = shutil.disk_usage
    calls = {"n": 0}

    def shrinking(path):  # noqa: ANN001
        calls["n"] += 1
        usage = real(path)
        free = usage.free if calls["n"] <= 3 else 10_000_000  # 10 MB left after three checks
        return type(usage)(usage.total, usage.total - free, free)

    monkeypatch.setattr(runfolder.shutil, "disk_usage", shrinking)
    doc = _doc(tmp_path, when_behind="block")
    doc["output"]["min_free_gb"] = 0.5
    with pytest.raises(DiskFull, match="GB free"):
        run_continuous(parse_config(doc), count=20, show_status=False)
    run_dir = next(tmp_path.iterdir())
    folders = _stack_folders(run_dir)
    assert len(folders) < 20
    for folder in folders:
        FocalStack.read(folder)  # every stack under a final name is complete
    summary = yaml.safe_load((run_dir / "summary.yaml").read_text(encoding="utf-8"))
    assert "GB free" in summary["stopped_by"]
    # every captured stack is in a named bucket: those captured after recording stopped, and the one
    # being written then, count as not written (they were lost from the counts before)
    assert summary["stacks_unaccounted"] == 0 and summary["stacks_not_written"] >= 1
    assert summary["stacks_captured"] == summary["stacks_written"] + summary["stacks_dropped"] + summary["stacks_not_written"]


@pytest.mark.skipif(sys.platform.startswith("win"), reason="SIGINT to a child process")
def test_ctrl_c_finishes_the_stack_in_flight_and_writes_the_summary(tmp_path: Path) -> None:
    doc = _doc(tmp_path / "runs", when_behind="block")
    path = tmp_path / "rig.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    out_path, err_path = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(out_path, "w") as out_f, open(err_path, "w") as err_f:  # files, not pipes: a full pipe would block the child
        proc = subprocess.Popen([sys.executable, str(ROOT / "run_rig.py"), "--config", str(path), "--mode", "continuous", "-v"],
                                cwd=ROOT, stdout=out_f, stderr=err_f, text=True,
                                # a shell that started the tests in the background ignores SIGINT and
                                # its children inherit that: give the child the default, as a terminal would
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not list((tmp_path / "runs").glob("*/stacks/000001")):
                assert proc.poll() is None, err_path.read_text()
                time.sleep(0.1)
            assert list((tmp_path / "runs").glob("*/stacks/000001")), "no second stack within 120 s:\n" + err_path.read_text()[-3000:]
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
                pytest.fail("run_rig.py did not stop after Ctrl-C:\n" + err_path.read_text()[-3000:])
    out, err = out_path.read_text(), err_path.read_text()
    assert proc.returncode == 130, err
    run_dir = next((tmp_path / "runs").iterdir())
    summary = yaml.safe_load((run_dir / "summary.yaml").read_text(encoding="utf-8"))
    assert summary["stopped_by"] == "user (Ctrl-C)"
    assert summary["stacks_written"] >= 2 and summary["stacks_unaccounted"] == 0
    for folder in _stack_folders(run_dir):
        FocalStack.read(folder)
    assert "Traceback" not in err
    assert str(run_dir) in out
    assert os.path.isdir(run_dir / "depth" / "000000")


def test_continuous_sweep_style_through_the_pipeline(tmp_path: Path) -> None:
    doc = _doc(tmp_path, when_behind="block")
    doc["camera"].update(fps=120, exposure_s=0.008)
    doc["focus"]["time_constant_s"] = 0.015
    doc["sweep"].update(style="continuous", frequency_hz=2.0, slices=6)
    run = run_continuous(parse_config(doc), count=3, show_status=False)
    assert run.summary["stacks_written"] == 3
    stack = FocalStack.read(run.run_dir / "stacks" / "000002")
    assert stack.meta["sweep"]["style"] == "continuous" and stack.n_slices == 6
    assert run.summary["stacks_per_s"] > 1.0  # one ramp (0.25 s) per stack, well above a stepped sweep


def _stays_gone_after(monkeypatch, good: int):  # noqa: ANN202
    """A capture function that gives ``good`` stacks, then loses the lens for good (reopening
    fails), and the count of rig openings."""
    real_open = cont_mod.open_rig
    opened = {"n": 0}

    def open_once(config):  # noqa: ANN001
        opened["n"] += 1
        if opened["n"] > 1:
            raise DeviceError("lens: /dev/ttyACM0 not found")
        return real_open(config)

    monkeypatch.setattr(cont_mod, "open_rig", open_once)
    calls = {"n": 0}

    def capture(rig):  # noqa: ANN001
        calls["n"] += 1
        if calls["n"] > good:
            raise SweepInterrupted("sweep stopped: cable pulled", cause=DeviceError("lens: port vanished"), frames=[], distances_m=[], slice_meta=[])
        return rig.capture_stack()

    return capture, opened


@pytest.mark.parametrize("when_behind", ["block", "drop_oldest"])
def test_stacks_queued_when_the_device_is_lost_for_good_are_still_written(tmp_path: Path, monkeypatch, when_behind) -> None:
    _slow_reconstruction(monkeypatch, 0.3)  # stacks wait in the queues when the cable is pulled
    doc = _doc(tmp_path, when_behind=when_behind, reconnect_attempts=1)
    doc["continuous"]["queue_size"] = 2
    with pytest.raises(DeviceError, match="not found"):
        run_continuous(parse_config(doc), count=20, show_status=False, capture=_stays_gone_after(monkeypatch, 5)[0])
    run_dir = next(tmp_path.iterdir())
    s = yaml.safe_load((run_dir / "summary.yaml").read_text(encoding="utf-8"))
    assert s["stacks_captured"] == 5 and s["stacks_unaccounted"] == 0
    assert s["stacks_written"] + s["stacks_dropped"] == 5 and s["stacks_written_without_depth"] == 0
    written = [p.name for p in _stack_folders(run_dir) if not p.name.endswith(".incomplete")]
    assert len(written) == s["stacks_written"] and written == sorted(p.name for p in (run_dir / "depth").iterdir())
    if when_behind == "block":
        assert written == [f"{k:06d}" for k in range(5)]


def test_a_failed_reconstruction_ends_the_run_but_keeps_every_captured_stack(tmp_path: Path, monkeypatch) -> None:
    real = cont_mod.reconstruct_stack
    calls = {"n": 0}

    def flaky(*args, **kwargs):  # noqa: ANN002, ANN003
        calls["n"] += 1
        time.sleep(0.2)
        if calls["n"] == 3:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(cont_mod, "reconstruct_stack", flaky)
    doc = _doc(tmp_path, when_behind="block")
    doc["continuous"]["queue_size"] = 2
    with pytest.raises(Exception, match="RuntimeError: CUDA out of memory") as info:
        run_continuous(parse_config(doc), count=20, show_status=False)
    assert info.value.exit_code == 3  # not 2, which says bad input or config
    run_dir = next(tmp_path.iterdir())
    s = yaml.safe_load((run_dir / "summary.yaml").read_text(encoding="utf-8"))
    assert s["stacks_unaccounted"] == 0 and s["stacks_written"] == s["stacks_captured"] >= 3
    assert s["stacks_written_without_depth"] == s["stacks_captured"] - 2  # the failed one and those queued behind it
    assert [p.name for p in _stack_folders(run_dir)] == [f"{k:06d}" for k in range(s["stacks_captured"])]
    for folder in _stack_folders(run_dir):
        FocalStack.read(folder)  # raw stacks are whole stacks, to reconstruct later
    assert sorted(p.name for p in (run_dir / "depth").iterdir()) == ["000000", "000001"]


def test_a_lens_error_when_the_triangle_restarts_is_reconnected(tmp_path: Path, monkeypatch) -> None:
    from capture.simulated import SimulatedLiquidLens

    real_start = SimulatedLiquidLens.start_triangle
    starts = {"n": 0}

    def flaky_start(self, *args):  # noqa: ANN001, ANN002
        starts["n"] += 1
        if starts["n"] == 2:  # the first command after a reconnect
            raise DeviceError("lens: serial write failed (I/O error)")
        return real_start(self, *args)

    monkeypatch.setattr(SimulatedLiquidLens, "start_triangle", flaky_start)
    calls = {"n": 0}

    def capture(rig):  # noqa: ANN001
        calls["n"] += 1
        if calls["n"] == 2:
            raise SweepInterrupted("cable pulled", cause=DeviceError("lens: port vanished"), frames=[], distances_m=[], slice_meta=[])
        return rig.capture_stack()

    doc = _doc(tmp_path, when_behind="block", reconnect_attempts=3)
    doc["camera"].update(fps=120, exposure_s=0.008)
    doc["focus"]["time_constant_s"] = 0.015
    doc["sweep"].update(style="continuous", frequency_hz=2.0, slices=6)
    run = run_continuous(parse_config(doc), count=5, show_status=False, capture=capture)
    s = run.summary
    assert run.exit_code == 0 and s["stopped_by"] == "count"
    assert s["reconnects"] == 2 and s["stacks_failed"] == 2 and s["stacks_written"] == 5


def test_stopped_by_names_the_limit_that_stopped_the_run(tmp_path: Path) -> None:
    run = run_continuous(parse_config(_doc(tmp_path, when_behind="block")), count=10_000, duration_s=1.0, show_status=False)
    assert run.summary["stopped_by"] == "duration" and run.summary["stacks_written"] < 10_000


@contextlib.contextmanager
def _child_rig(tmp_path: Path, doc: dict, source: str, *, what: str):  # noqa: ANN202
    """run_rig.py --mode continuous in a child process that runs ``source`` (a script with a
    ``{root}`` field); yields (process, stderr path); a child still running at the end is
    killed and the test fails, saying it did not stop ``what``."""
    path = tmp_path / "rig.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    child = tmp_path / "child.py"
    child.write_text(source.format(root=str(ROOT)), encoding="utf-8")
    err_path = tmp_path / "stderr.txt"
    with open(tmp_path / "stdout.txt", "w") as out_f, open(err_path, "w") as err_f:
        # a shell that started the tests in the background ignores SIGINT, and children inherit that
        proc = subprocess.Popen([sys.executable, str(child), "--config", str(path), "--mode", "continuous"], cwd=ROOT, stdout=out_f,
                                stderr=err_f, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            yield proc, err_path
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
                pytest.fail(f"run_rig.py did not stop {what}:\n" + err_path.read_text()[-3000:])


_SLOW_CHILD = """
import sys, time
sys.path.insert(0, {root!r})
from rig import continuous
real = continuous.reconstruct_stack
def slow(*a, **k):
    time.sleep(1.0)  # reconstruction as slow as the network on a small CPU
    return real(*a, **k)
continuous.reconstruct_stack = slow
from rig.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(sys.platform.startswith("win"), reason="POSIX signals to a child process")
@pytest.mark.parametrize("signals", [("SIGTERM",), ("SIGINT", "SIGINT")])
def test_sigterm_and_a_second_ctrl_c_still_write_every_stack_and_the_summary(tmp_path: Path, signals) -> None:
    doc = _doc(tmp_path / "runs", when_behind="block")
    doc["continuous"]["queue_size"] = 2
    with _child_rig(tmp_path, doc, _SLOW_CHILD, what=f"at {', '.join(signals)}") as (proc, err_path):
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not list((tmp_path / "runs").glob("*/depth/000001")):
            assert proc.poll() is None, err_path.read_text()
            time.sleep(0.05)
        for k, name in enumerate(signals):
            if k:
                time.sleep(0.5)
            proc.send_signal(getattr(signal, name))
        proc.wait(timeout=120)
    err = err_path.read_text()
    assert proc.returncode == 130 and "Traceback" not in err, err
    run_dir = next((tmp_path / "runs").iterdir())
    s = yaml.safe_load((run_dir / "summary.yaml").read_text(encoding="utf-8"))
    assert s["stopped_by"] == ("SIGTERM" if signals == ("SIGTERM",) else "user (Ctrl-C)")
    assert s["stacks_unaccounted"] == 0 and s["stacks_written"] == s["stacks_captured"]
    assert [p.name for p in _stack_folders(run_dir)] == [f"{k:06d}" for k in range(s["stacks_captured"])]
    if len(signals) == 2:  # hurried: the queued stacks went out without depth
        assert s["stacks_written_without_depth"] >= 1 and "Ctrl-C again" in err
    else:
        assert s["stacks_written_without_depth"] == 0


def test_the_continuous_sweep_restarts_its_triangle_to_resynchronise_the_phase(tmp_path: Path, monkeypatch) -> None:
    import rig.build as build_mod
    from capture.simulated import SimulatedLiquidLens

    starts = {"n": 0}
    real_start = SimulatedLiquidLens.start_triangle

    def counting(self, *args):  # noqa: ANN001, ANN002
        starts["n"] += 1
        return real_start(self, *args)

    monkeypatch.setattr(SimulatedLiquidLens, "start_triangle", counting)
    monkeypatch.setattr(build_mod, "TRIANGLE_RESTART_S", 0.6)  # the real interval is a minute
    doc = _doc(tmp_path, when_behind="block")
    doc["camera"].update(fps=120, exposure_s=0.008)
    doc["focus"]["time_constant_s"] = 0.015
    doc["sweep"].update(style="continuous", frequency_hz=2.0, slices=6)
    run = run_continuous(parse_config(doc), count=8, show_status=False)
    assert run.summary["stacks_written"] == 8 and run.summary["stacks_failed"] == 0
    assert starts["n"] >= 2  # restarted at least once over ~2 s of ramps
    for k in range(8):
        assert FocalStack.read(run.run_dir / "stacks" / f"{k:06d}").n_slices == 6


def test_a_failing_accuracy_score_never_costs_a_stack(tmp_path: Path, monkeypatch) -> None:
    def broken(*args, **kwargs):  # noqa: ANN002, ANN003
        raise ValueError("prediction (96, 128) and truth (48, 64) differ in shape")

    monkeypatch.setattr(cont_mod, "depth_metrics", broken)
    run = run_continuous(parse_config(_doc(tmp_path, when_behind="block")), count=3, show_status=False)
    assert run.summary["stacks_written"] == 3 and run.summary["stacks_unaccounted"] == 0 and "accuracy" not in run.summary


def _record_network_calls(monkeypatch) -> list[tuple]:
    """Log the backend openings (with the stack shape) and the stack reconstructions, in order."""
    from reconstruct.dualfocus import infer

    events: list[tuple] = []
    real_open, real_reconstruct = infer.open_backend, cont_mod.reconstruct_stack

    def open_backend(*args, **kwargs):  # noqa: ANN002, ANN003
        events.append(("open", tuple(kwargs["shape"])))
        return real_open(*args, **kwargs)

    def reconstruct(stack, **kwargs):  # noqa: ANN001, ANN003
        events.append(("stack", stack.n_slices, *stack.image_hw))
        return real_reconstruct(stack, **kwargs)

    monkeypatch.setattr(infer, "open_backend", open_backend)
    monkeypatch.setattr(cont_mod, "reconstruct_stack", reconstruct)
    return events


def test_the_network_opens_for_the_stack_shape_before_the_first_stack(tmp_path: Path, monkeypatch, isolated_cache: Path) -> None:
    """The first stack used to wait for the backend to open (CUDA start-up and cuDNN's kernel
    search: 1.4 s on an H100 against 0.1 s for the next stacks; an ONNX export and int8
    quantisation: seconds): the run now opens it while the first stack is captured."""
    events = _record_network_calls(monkeypatch)
    doc = _doc(tmp_path, when_behind="block")
    doc["reconstruct"] = {"method": "dualfocus"}
    run = run_continuous(parse_config(doc), count=2, show_status=False)
    s = run.summary
    assert run.exit_code == 0 and s["stacks_written"] == 2 and s["stacks_reconstructed"] == 2
    assert events[0] == ("open", (5, 96, 128))  # the network's shape: 5 slices of 96x128
    first_stack = events.index(("stack", 5, 96, 128))
    assert first_stack > 0 and {e for e in events if e[0] == "open"} == {("open", (5, 96, 128))}
    # auto on a CPU: torch, or onnxruntime in bf16 where its OpenVINO build is installed
    assert s["network_warm_up_s"] > 0 and s["network"] in ("torch on cpu (fp32)", "torch on cpu (bf16)", "onnxruntime on cpu (bf16)")
    assert yaml.safe_load((run.run_dir / "summary.yaml").read_text(encoding="utf-8"))["network"] == s["network"]


def test_the_command_line_says_where_the_network_ran(tmp_path: Path, capsys, isolated_cache: Path) -> None:
    from rig.cli import main as rig_main

    doc = _doc(tmp_path, when_behind="block")
    doc["reconstruct"] = {"method": "dualfocus"}
    path = tmp_path / "rig.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    assert rig_main(["--config", str(path), "--mode", "continuous", "--count", "1", "--no-progress", "-q"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("network:"))
    assert re.fullmatch(r"  network:  (torch on cpu \((fp32|bf16)\)|onnxruntime on cpu \(bf16\)), opened in \d+\.\d\d s while the first stack was captured", line)


def test_a_failed_warm_up_is_a_warning_and_the_stacks_still_get_depth(tmp_path: Path, monkeypatch, caplog, isolated_cache: Path) -> None:
    def broken(*args, **kwargs):  # noqa: ANN002, ANN003
        raise RuntimeError("no warm-up today")

    monkeypatch.setattr(cont_mod, "warm_up_network", broken)
    doc = _doc(tmp_path, when_behind="block")
    doc["reconstruct"] = {"method": "dualfocus"}
    with caplog.at_level("WARNING", logger="rig.continuous"):
        run = run_continuous(parse_config(doc), count=2, show_status=False)
    assert run.exit_code == 0 and run.summary["stacks_reconstructed"] == 2 and "network_warm_up_s" not in run.summary
    assert "warming up the network failed (no warm-up today)" in caplog.text


def test_a_stop_never_waits_for_the_warm_up(tmp_path: Path, monkeypatch) -> None:
    """A device error on the first sweep ended the run only once the warm-up was done (an int8
    quantisation: ~37 s on two cores); the warm-up runs beside the stages."""
    release = threading.Event()

    def slow_warm_up(*args, **kwargs):  # noqa: ANN002, ANN003
        release.wait(30)
        return "cpu (torch)"

    def lost(rig):  # noqa: ANN001
        raise SweepInterrupted("camera: fetch timed out", cause=DeviceError("camera: fetch timed out"), frames=[], distances_m=[], slice_meta=[])

    monkeypatch.setattr(cont_mod, "warm_up_network", slow_warm_up)
    doc = _doc(tmp_path, when_behind="block", reconnect_attempts=0)
    doc["reconstruct"] = {"method": "dualfocus"}
    t0 = time.monotonic()
    try:
        with pytest.raises(SweepInterrupted, match="fetch timed out"):
            run_continuous(parse_config(doc), count=3, show_status=False, capture=lost)
        assert time.monotonic() - t0 < 10
    finally:
        release.set()


def test_the_classical_method_has_no_network_to_warm_up(tmp_path: Path, monkeypatch) -> None:
    called: list[int] = []
    monkeypatch.setattr(cont_mod, "warm_up_network", lambda *a, **k: called.append(1))
    run = run_continuous(parse_config(_doc(tmp_path, when_behind="block")), count=1, show_status=False)
    assert run.exit_code == 0 and not called and "network" not in run.summary and "network_warm_up_s" not in run.summary


def _viky_without_optics(out: Path) -> dict:
    """A GenICam camera (viky) and the Optotune emulator: no optics section, so no focal length."""
    return {
        "name": "noopt",
        "camera": {"driver": "genicam", "producer": "viky", "serial_number": "0", "pixel_format": "Mono8"},
        "focus": {"driver": "optotune", "port": "emulator", "nominal": {"offset_dpt": -0.49, "dpt_per_ma": 0.0166}},
        "sweep": {"range_m": [0.4, 2.0], "slices": 3},
        "reconstruct": {"method": "classical"},
        "output": {"dir": str(out), "point_cloud": True, "min_free_gb": 0.0},
    }


@pytest.mark.parametrize("case", ["point_cloud_without_optics", "rerun_not_installed"])
def test_a_sink_config_error_leaves_no_run_folder(tmp_path: Path, monkeypatch, capsys, case: str) -> None:
    """The sink checks are config checks: they run before the run folder is made, so a bad config
    leaves nothing behind and no run folder is printed; one line, exit code 2."""
    from rig.cli import main as rig_main

    out = tmp_path / "runs"
    if case == "point_cloud_without_optics":
        doc, field = _viky_without_optics(out), "output.point_cloud"
    else:
        doc, field = _doc(out), "live.rerun"
        doc["live"] = {"rerun": True}
        monkeypatch.setitem(sys.modules, "rerun", None)  # import rerun raises ImportError, installed or not
    path = tmp_path / "rig.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    rc = rig_main(["--config", str(path), "--mode", "continuous", "--count", "2", "--no-progress", "-q"])
    captured = capsys.readouterr()
    assert rc == 2
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {path}: {field}: ")
    assert "run folder" not in captured.out + captured.err
    assert not out.exists()


_STUCK_CHILD = """
import sys
sys.path.insert(0, {root!r})
import capture.simulated as sim
moves = {{"n": 0}}
real_move, real_settled = sim.SimulatedLiquidLens._do_move, sim.SimulatedLiquidLens._do_is_settled
def move(self, value):
    moves["n"] += 1
    return real_move(self, value)
def settled(self):  # the first 3 moves settle, then the actuator never does (a stage held, a jammed axis)
    return moves["n"] <= 3 and real_settled(self)
sim.SimulatedLiquidLens._do_move, sim.SimulatedLiquidLens._do_is_settled = move, settled
from rig.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(sys.platform.startswith("win"), reason="POSIX signals to a child process")
def test_a_second_ctrl_c_ends_a_wait_for_an_actuator_that_never_settles(tmp_path: Path) -> None:
    """Continuous mode captures on a thread that Ctrl-C does not interrupt: a stage stuck in a
    feed hold kept the run going for the whole settle wait (up to focus.move_timeout_s, 600 s)."""
    doc = _doc(tmp_path / "runs", when_behind="block")
    doc["sweep"]["settle_timeout_s"] = 60
    with _child_rig(tmp_path, doc, _STUCK_CHILD, what="at the second Ctrl-C") as (proc, err_path):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not list((tmp_path / "runs").glob("*/config.yaml")):
            assert proc.poll() is None, err_path.read_text()
            time.sleep(0.05)
        time.sleep(2.0)  # three slices, then the wait that never ends
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=20)
        stopped_s = time.monotonic() - t0
    err = err_path.read_text()
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert stopped_s < 10, stopped_s
    run_dir = next((tmp_path / "runs").iterdir())
    s = yaml.safe_load((run_dir / "summary.yaml").read_text(encoding="utf-8"))
    assert s["stopped_by"] == "user (Ctrl-C)" and s["stacks_unaccounted"] == 0
    incomplete = run_dir / "stacks" / "000000.incomplete"
    assert len(list(incomplete.glob("slice_*.png"))) == 3, list(incomplete.iterdir()) if incomplete.exists() else "no .incomplete"


def test_a_ctrl_c_while_waiting_to_reconnect_is_a_users_stop(tmp_path: Path, monkeypatch) -> None:
    """The reconnect back-off (0.5, 1, 2 s ...) widened the window in which a Ctrl-C ended the run
    as the device error it was recovering from (exit 3, stopped_by 'error: ...')."""
    import _thread

    capture, opened = _stays_gone_after(monkeypatch, 1)

    def ctrl_c_when_reconnecting() -> None:
        deadline = time.monotonic() + 30
        while opened["n"] < 2 and time.monotonic() < deadline:  # the first reopening failed: now in the 1 s back-off
            time.sleep(0.01)
        time.sleep(0.3)
        _thread.interrupt_main()

    threading.Thread(target=ctrl_c_when_reconnecting, daemon=True).start()
    run = run_continuous(parse_config(_doc(tmp_path, reconnect_attempts=4)), count=10, show_status=False, capture=capture)
    assert run.exit_code == 130 and run.summary["stopped_by"] == "user (Ctrl-C)"
    assert run.summary["stacks_unaccounted"] == 0
