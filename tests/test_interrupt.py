"""Ctrl-C (or SIGTERM: kill, systemctl stop, docker stop) during a sweep: exit 130, the slices
captured so far kept as .incomplete, nothing under the final stack name."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, sim_config_dict


@pytest.mark.parametrize(("sig", "reason"), [(signal.SIGINT, "interrupted by the user"), (signal.SIGTERM, "stopped by SIGTERM")])
def test_ctrl_c_mid_sweep_keeps_partial_slices(tmp_path: Path, sig: int, reason: str) -> None:
    # a slow camera: 4 fps, so a 10-slice sweep takes about 3 s
    raw = sim_config_dict(tmp_path, camera={"width": 128, "height": 96, "fps": 4.0, "exposure_s": 0.01})
    config = tmp_path / "rig.yaml"
    config.write_text(yaml.safe_dump(raw))
    proc = subprocess.Popen(
        [sys.executable, "run_rig.py", "--config", str(config), "--no-progress"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # a shell that started the tests in the background ignores SIGINT, and children inherit that
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    # wait until the run has started (its folder exists), then let a few slices arrive
    deadline = time.monotonic() + 60
    while not list((tmp_path / "runs").glob("*/config.yaml")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1, err
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1
    stacks = runs[0] / "stacks"
    assert not (stacks / "000000").exists()
    incomplete = stacks / "000000.incomplete"
    assert (incomplete / "reason.txt").is_file()
    assert reason in (incomplete / "reason.txt").read_text()
    assert list(incomplete.glob("slice_*.png")), "the slices captured before Ctrl-C are kept"
    assert "error" in yaml.safe_load((runs[0] / "summary.yaml").read_text())


def test_the_one_line_for_an_interrupt_says_which_signal(capsys) -> None:
    from capture.cli import one_line_errors
    from capture.signals import Terminated

    def ctrl_c() -> int:
        raise KeyboardInterrupt

    def sigterm() -> int:
        raise Terminated("stopped by SIGTERM")

    assert one_line_errors(ctrl_c, debug=False) == 130
    assert capsys.readouterr().err == "error: interrupted by the user\n"
    assert one_line_errors(sigterm, debug=False) == 130
    assert capsys.readouterr().err == "error: stopped by SIGTERM\n"
