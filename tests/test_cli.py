"""End-to-end tests of the command lines (INTERFACES.md): ``run_rig.py`` and ``python -m reconstruct``.

Each command runs as a subprocess on a small, fast simulated rig (128x96, 5 slices).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from reconstruct.backends.select import cpu_bf16_native, openvino_available

ROOT = Path(__file__).resolve().parents[1]
SIM_YAML = ROOT / "configs" / "sim.yaml"
TIMEOUT_S = 120
H, W, SLICES = 96, 128, 5
OUTPUTS = ("depth.npy", "confidence.npy", "all_in_focus.png", "depth_preview.png", "result.yaml")


# ---- helpers --------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )


def rig(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    return _run("run_rig.py", *args)


def reconstruct(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    return _run("-m", "reconstruct", *args)


def _fast_config(folder: Path, **sections: dict) -> Path:
    """sim.yaml's content, shrunk for speed, written to ``folder/rig.yaml``."""
    doc = yaml.safe_load(SIM_YAML.read_text(encoding="utf-8"))
    doc["camera"].update(width=W, height=H, fps=200, exposure_s=0.004)
    doc["sweep"]["slices"] = SLICES
    doc["output"]["dir"] = str(folder / "runs")
    doc["reconstruct"]["method"] = "classical"  # the CLI contracts; the network has its own test below
    for name, values in sections.items():
        doc.setdefault(name, {}).update(values)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "rig.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def _assert_bad_input(proc: subprocess.CompletedProcess[str], *names: str | os.PathLike[str]) -> str:
    """Exit 2, stderr exactly one line 'error: ...' naming ``names``, no traceback; returns the line."""
    where = f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 2, where
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, where
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, f"stderr is not one line:\n{where}"
    line = lines[0]
    assert line.startswith("error:") and line.removeprefix("error:").strip(), where
    for name in names:
        assert str(name) in line, f"{name!r} not named in {line!r}"
    return line


def _no_leftovers(folder: Path) -> None:
    """``folder`` holds nothing (temporary siblings included)."""
    if folder.exists():
        left = sorted(p.name for p in folder.iterdir())
        assert not left, f"left behind in {folder}: {left}"


def _copy_stack(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_stack_yaml(folder: Path, edit) -> None:  # noqa: ANN001 (callable(doc) -> doc)
    path = folder / "stack.yaml"
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    doc = edit(doc) or doc
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")


# ---- one successful run, shared ------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("rig")
    config = _fast_config(base)
    proc = rig("--config", config)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    runs = base / "runs"
    folders = [p for p in runs.iterdir() if p.is_dir()]
    assert len(folders) == 1, folders
    return {"base": base, "config": config, "proc": proc, "run_dir": folders[0]}


@pytest.fixture()
def stack_dir(run: dict) -> Path:
    return run["run_dir"] / "stacks" / "000000"


# ---- run_rig.py: success ---------------------------------------------------------------------------


def test_rig_success_prints_run_folder(run: dict) -> None:
    proc, run_dir = run["proc"], run["run_dir"]
    assert "Traceback" not in proc.stderr
    assert str(run_dir) in proc.stdout
    assert f"run folder: {run_dir}" in proc.stdout.splitlines()[0]


def test_rig_run_folder_layout(run: dict) -> None:
    run_dir = run["run_dir"]
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "summary.yaml").is_file()
    assert (run_dir / "stacks" / "000000" / "stack.yaml").is_file()
    depth_dir = run_dir / "depth" / "000000"
    for name in (*OUTPUTS, "depth.png"):
        assert (depth_dir / name).is_file(), name
    # nothing temporary left anywhere
    hidden = [p for p in run_dir.rglob(".*")]
    assert not hidden, hidden
    assert not list(run_dir.rglob("*.incomplete"))


def test_rig_config_yaml_is_the_resolved_config(run: dict) -> None:
    from rig.config import config_to_dict, load_config

    doc = yaml.safe_load((run["run_dir"] / "config.yaml").read_text(encoding="utf-8"))
    assert doc["camera"]["width"] == W and doc["camera"]["height"] == H
    assert doc["sweep"]["slices"] == SLICES
    assert doc == config_to_dict(load_config(run["config"]))


def test_rig_summary(run: dict) -> None:
    summary = yaml.safe_load((run["run_dir"] / "summary.yaml").read_text(encoding="utf-8"))
    assert summary["stacks"] == 1
    assert summary["slices"] == SLICES
    assert summary["image_hw"] == [H, W]
    # INTERFACES.md: counts, rates, latencies, drops, errors
    assert summary["mode"] == "single" and summary["stacks_dropped"] == 0 and summary["errors"] == []
    assert summary["latency_s"]["p50"] >= summary["seconds"]["capture"] > 0  # as continuous mode's, a mapping
    assert "calibration" not in summary  # the fast config has no calibration file
    acc = summary["accuracy"]
    assert isinstance(acc["abs_rel"], float)
    assert 0.0 <= acc["abs_rel"] < 1.0


def test_rig_stack_yaml(run: dict, stack_dir: Path) -> None:
    doc = yaml.safe_load((stack_dir / "stack.yaml").read_text(encoding="utf-8"))
    assert doc["format"] == "focal-stack/1"
    assert len(doc["slices"]) == SLICES
    for entry in doc["slices"]:
        assert (stack_dir / entry["image"]).is_file()
        assert entry["focus_distance_m"] > 0
    # FOCAL_STACK_FORMAT.md's provenance: start time (UTC ISO 8601) and the resolved config's hash,
    # which an outside tool can check against the run's config.yaml
    import datetime
    import hashlib

    capture = doc["capture"]
    assert capture["rig"] and datetime.datetime.strptime(capture["started_utc"], "%Y-%m-%dT%H:%M:%S.%fZ")
    config_text = yaml.safe_dump(yaml.safe_load((run["run_dir"] / "config.yaml").read_text(encoding="utf-8")), sort_keys=True, allow_unicode=True)
    assert capture["config_sha256"] == hashlib.sha256(config_text.encode("utf-8")).hexdigest()


def test_rig_result_yaml(run: dict) -> None:
    doc = yaml.safe_load((run["run_dir"] / "depth" / "000000" / "result.yaml").read_text(encoding="utf-8"))
    assert doc["format"] == "depth-result/1"
    assert doc["depth_unit"] == "metre"
    assert doc["depth_kind"] == "z"
    assert doc["method"] == "classical"
    assert "model" not in doc
    assert doc["backend"] == "numpy"
    assert doc["device"] == "cpu"
    assert doc["image_hw"] == [H, W]
    assert doc["slices"] == SLICES
    assert 0.0 <= doc["valid_fraction"] <= 1.0
    # FOCAL_STACK_FORMAT.md's four stages (a rig's stack is handed over in memory: read 0)
    assert list(doc["seconds"]) == ["read", "align", "infer", "write"] and doc["seconds"]["read"] == 0.0
    assert doc["png16_scale_m"] == 0.001


def test_rig_depth_arrays(run: dict) -> None:
    depth_dir = run["run_dir"] / "depth" / "000000"
    depth = np.load(depth_dir / "depth.npy")
    assert depth.dtype == np.float32 and depth.shape == (H, W)
    finite = np.isfinite(depth)
    assert finite.any()
    assert np.all(depth[finite] > 0)
    result = yaml.safe_load((depth_dir / "result.yaml").read_text(encoding="utf-8"))
    assert result["valid_fraction"] == pytest.approx(finite.mean(), abs=1e-6)
    confidence = np.load(depth_dir / "confidence.npy")
    assert confidence.dtype == np.float32 and confidence.shape == (H, W)
    assert np.all((confidence >= 0) & (confidence <= 1))
    aif = cv2.imread(str(depth_dir / "all_in_focus.png"), cv2.IMREAD_UNCHANGED)
    assert aif is not None and aif.shape[:2] == (H, W)
    png = cv2.imread(str(depth_dir / "depth.png"), cv2.IMREAD_UNCHANGED)
    assert png is not None and png.dtype == np.uint16 and png.shape == (H, W)
    # millimetres: round(depth * 1000); the writer works in float32, so an exact half-millimetre
    # tie (0.6485 m as float32 is 648.50003 mm) may round either way
    mm = depth[finite].astype(np.float64) * 1000
    got = png[finite].astype(np.int64)
    expected = np.round(mm).astype(np.int64)
    tie = np.abs(mm - np.floor(mm) - 0.5) < 1e-4
    np.testing.assert_array_equal(got[~tie], expected[~tie])
    assert np.all(np.abs(got[tie] - mm[tie]) <= 0.5 + 1e-4)
    assert np.all(png[~finite] == 0)


# ---- run_rig.py: bad input ------------------------------------------------------------------------


def test_rig_missing_config(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    _assert_bad_input(rig("--config", missing), missing)
    _no_leftovers(tmp_path)


def test_rig_unknown_key(tmp_path: Path) -> None:
    config = _fast_config(tmp_path, camera={"optics": {"focal_lenght_mm": 12.0}})
    line = _assert_bad_input(rig("--config", config), config, "camera.optics.focal_lenght_mm")
    assert "unknown key" in line
    assert not (tmp_path / "runs").exists()


def test_rig_wrong_type(tmp_path: Path) -> None:
    config = _fast_config(tmp_path, sweep={"slices": "ten"})
    _assert_bad_input(rig("--config", config), config, "sweep.slices")
    assert not (tmp_path / "runs").exists()


def test_rig_invalid_yaml(tmp_path: Path) -> None:
    config = tmp_path / "rig.yaml"
    config.write_text("mode: single\ncamera: [1\n", encoding="utf-8")
    line = _assert_bad_input(rig("--config", config), config)
    assert "line" in line


def test_rig_repeated_key_is_refused_naming_it(tmp_path: Path) -> None:
    """PyYAML alone keeps the last of two equal keys: a rig.yaml that sets a field twice would
    run with whichever came last."""
    config = tmp_path / "rig.yaml"
    config.write_text("mode: single\nreconstruct:\n  method: classical\n  method: dualfocus\n", encoding="utf-8")
    line = _assert_bad_input(rig("--config", config), config, "duplicate key 'method'")
    assert "line 4" in line and "first at line 3" in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("mode", [[], ["--mode", "calibrate", "--non-interactive"]])
def test_rig_count_outside_continuous_mode_is_refused(tmp_path: Path, mode: list) -> None:
    config = _fast_config(tmp_path)
    line = _assert_bad_input(rig("--config", config, *mode, "--count", "3"), "--count")
    assert "continuous" in line
    assert not (tmp_path / "runs").exists()


def test_rig_non_interactive_outside_calibrate_mode_is_refused(tmp_path: Path) -> None:
    config = _fast_config(tmp_path)
    line = _assert_bad_input(rig("--config", config, "--non-interactive"), "--non-interactive")
    assert "calibrate" in line
    assert not (tmp_path / "runs").exists()


def test_rig_dualfocus_with_missing_weights_fails_before_capture(tmp_path: Path) -> None:
    config = _fast_config(tmp_path)
    raw = yaml.safe_load(config.read_text())
    raw["reconstruct"]["method"] = "dualfocus"
    raw["reconstruct"]["weights"] = str(tmp_path / "nowhere.safetensors")
    config.write_text(yaml.safe_dump(raw))
    line = _assert_bad_input(rig("--config", config), "nowhere.safetensors")
    assert "not found" in line
    assert not (tmp_path / "runs").exists()


def test_rig_refuses_pickled_weights(tmp_path: Path) -> None:
    config = _fast_config(tmp_path)
    raw = yaml.safe_load(config.read_text())
    raw["reconstruct"]["method"] = "dualfocus"
    (tmp_path / "model.pt").write_bytes(b"not a pickle you should load")
    raw["reconstruct"]["weights"] = str(tmp_path / "model.pt")
    config.write_text(yaml.safe_dump(raw))
    line = _assert_bad_input(rig("--config", config), "model.pt")
    assert "safetensors" in line
    assert not (tmp_path / "runs").exists()


def test_rig_refuses_half_precision_on_the_cpu(tmp_path: Path) -> None:
    """No GPU here: reconstruct.precision fp16 is one line before any capture, not a run that
    fails after its sweep (or one that silently runs fp32)."""
    config = _fast_config(tmp_path, reconstruct={"method": "dualfocus", "precision": "fp16"})
    line = _assert_bad_input(rig("--config", config), "precision", "fp16")
    assert "CPU" in line and "auto or fp32" in line
    assert not (tmp_path / "runs").exists()


def test_rig_output_dir_under_a_file(tmp_path: Path) -> None:
    config = _fast_config(tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder", encoding="utf-8")
    out = blocker / "runs"
    line = _assert_bad_input(rig("--config", config, "--out", out), blocker)
    assert line.startswith("error: --out: "), line  # the flag, not the config file's output.dir, set it
    assert blocker.is_file() and blocker.read_text(encoding="utf-8") == "not a folder"
    assert not (tmp_path / "runs").exists()


def test_rig_output_dir_under_a_file_from_config(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x", encoding="utf-8")
    config = _fast_config(tmp_path, output={"dir": str(blocker / "deeper" / "runs")})
    _assert_bad_input(rig("--config", config), "output.dir", blocker)
    assert blocker.is_file()


def test_rig_output_dir_is_a_file(tmp_path: Path) -> None:
    config = _fast_config(tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("x", encoding="utf-8")
    line = _assert_bad_input(rig("--config", config, "--out", blocker), blocker)
    assert line.startswith("error: --out: ") and "output.dir" not in line, line
    assert blocker.is_file() and blocker.read_text(encoding="utf-8") == "x"


def test_rig_missing_calibration_file_is_refused_before_a_run_folder(tmp_path: Path) -> None:
    """It was found only after the run folder was made, leaving one with 'stacks: 0' per try."""
    config = _fast_config(tmp_path, calibration={"file": "cal/missing.yaml"})
    for mode in ("single", "continuous"):
        line = _assert_bad_input(rig("--config", config, "--mode", mode, "--count" if mode == "continuous" else "--no-progress",
                                     *(["1"] if mode == "continuous" else [])), config, "calibration.file", tmp_path / "cal" / "missing.yaml")
        assert "relative path is taken from the config file's folder" in line
        assert not (tmp_path / "runs").exists()


def test_rig_calibrate_does_not_need_the_calibration_file_it_may_replace(tmp_path: Path) -> None:
    from rig.config import load_config

    config = load_config(_fast_config(tmp_path, calibration={"file": "cal/missing.yaml"}))  # loads: only runs need the file
    assert config.calibration.file == (tmp_path / "cal" / "missing.yaml").resolve()


def test_rig_bad_argument_is_one_line(tmp_path: Path) -> None:
    _assert_bad_input(rig("--mode", "sometimes"), "--mode")
    _assert_bad_input(rig("--no-such-option"), "--no-such-option")


def test_rig_debug_shows_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    proc = rig("--debug", "--config", missing)
    assert proc.returncode == 2  # the exit code stays (it was 1 with --debug)
    assert "Traceback" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {missing}")
    assert "ConfigError" in proc.stderr
    assert str(missing) in proc.stderr


def test_rig_debug_shows_traceback_for_bad_field(tmp_path: Path) -> None:
    config = _fast_config(tmp_path, sweep={"slices": "ten"})
    proc = rig("--debug", "--config", config)
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr
    assert "sweep.slices" in proc.stderr
    assert not (tmp_path / "runs").exists()


# ---- python -m reconstruct: success ----------------------------------------------------------------


def test_reconstruct_default_is_the_shipped_network(stack_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "net"
    proc = reconstruct(stack_dir, "--out", out)
    assert proc.returncode == 0, proc.stderr
    doc = yaml.safe_load((out / "result.yaml").read_text(encoding="utf-8"))
    assert (doc["method"], doc["model"]) == ("dualfocus", "dualfocus-s") and doc["backend"] in ("torch", "onnxruntime")
    assert np.isfinite(np.load(out / "depth.npy")).mean() > 0.9


def test_reconstruct_success(run: dict, stack_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "new" / "out"
    proc = reconstruct(stack_dir, "--out", out, "--method", "classical")
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    assert str(out) in proc.stdout
    for name in (*OUTPUTS, "depth.png"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]  # no temporary siblings
    doc = yaml.safe_load((out / "result.yaml").read_text(encoding="utf-8"))
    assert doc["format"] == "depth-result/1"
    assert doc["depth_unit"] == "metre"
    assert doc["depth_kind"] == "z"
    assert doc["method"] == "classical"
    assert doc["backend"] == "numpy"
    assert doc["device"] == "cpu"
    assert doc["image_hw"] == [H, W]
    assert doc["slices"] == SLICES
    assert doc["png16_scale_m"] == 0.001
    assert {"read", "align", "infer", "write"} <= set(doc["seconds"])
    depth = np.load(out / "depth.npy")
    assert depth.dtype == np.float32 and depth.shape == (H, W)
    # the same stack, read back from disk, gives the depth the rig wrote
    rig_depth = np.load(run["run_dir"] / "depth" / "000000" / "depth.npy")
    np.testing.assert_allclose(depth, rig_depth, equal_nan=True)


def test_reconstruct_records_write_time(stack_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = reconstruct(stack_dir, "--out", out)
    assert proc.returncode == 0, proc.stderr
    doc = yaml.safe_load((out / "result.yaml").read_text(encoding="utf-8"))
    assert doc["seconds"]["write"] > 0


@pytest.mark.parametrize("order", ["reversed", "shuffled"])
def test_reconstruct_slice_order_does_not_matter(stack_dir: Path, tmp_path: Path, order: str) -> None:
    base = tmp_path / "base"
    assert reconstruct(stack_dir, "--out", base).returncode == 0
    moved = _copy_stack(stack_dir, tmp_path / "stack")
    perm = [4, 0, 3, 1, 2] if order == "shuffled" else [4, 3, 2, 1, 0]

    def edit(doc: dict) -> None:
        doc["slices"] = [doc["slices"][i] for i in perm]

    _edit_stack_yaml(moved, edit)
    out = tmp_path / "out"
    proc = reconstruct(moved, "--out", out)
    assert proc.returncode == 0, proc.stderr
    a, b = np.load(base / "depth.npy"), np.load(out / "depth.npy")
    assert np.allclose(a, b, equal_nan=True)
    assert np.allclose(np.load(base / "confidence.npy"), np.load(out / "confidence.npy"), equal_nan=True)


def test_reconstruct_focus_index_stack(stack_dir: Path, tmp_path: Path) -> None:
    moved = _copy_stack(stack_dir, tmp_path / "stack")

    def edit(doc: dict) -> None:
        dists = [s["focus_distance_m"] for s in doc["slices"]]
        rank = np.argsort(np.argsort([1.0 / d for d in dists]))  # larger index = nearer focus
        for entry, r in zip(doc["slices"], rank):
            del entry["focus_distance_m"]
            entry["focus_index"] = int(r)

    _edit_stack_yaml(moved, edit)
    out = tmp_path / "out"
    proc = reconstruct(moved, "--out", out)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    assert not (out / "depth.png").exists()
    doc = yaml.safe_load((out / "result.yaml").read_text(encoding="utf-8"))
    assert doc["depth_unit"] == "focus_index"
    assert "png16_scale_m" not in doc
    depth = np.load(out / "depth.npy")
    assert depth.dtype == np.float32 and depth.shape == (H, W)
    finite = depth[np.isfinite(depth)]
    assert finite.size and finite.min() >= -1e-3 and finite.max() <= SLICES - 1 + 1e-3


# ---- python -m reconstruct: bad input --------------------------------------------------------------


def _assert_no_output(out: Path) -> None:
    assert not out.exists()
    if out.parent.exists():
        stray = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
        assert not stray, stray


def test_reconstruct_missing_stack_folder(tmp_path: Path) -> None:
    missing = tmp_path / "no_stack"
    out = tmp_path / "out"
    _assert_bad_input(reconstruct(missing, "--out", out), missing)
    _assert_no_output(out)


def test_reconstruct_missing_stack_yaml(tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    out = tmp_path / "out"
    _assert_bad_input(reconstruct(folder, "--out", out), "stack.yaml")
    _assert_no_output(out)


def test_reconstruct_missing_image(stack_dir: Path, tmp_path: Path) -> None:
    moved = _copy_stack(stack_dir, tmp_path / "stack")
    (moved / "slice_02.png").unlink()
    out = tmp_path / "out"
    _assert_bad_input(reconstruct(moved, "--out", out), "slice_02.png", "slices[2].image")
    _assert_no_output(out)


def test_reconstruct_slices_of_different_sizes(stack_dir: Path, tmp_path: Path) -> None:
    moved = _copy_stack(stack_dir, tmp_path / "stack")
    small = cv2.imread(str(moved / "slice_01.png"), cv2.IMREAD_UNCHANGED)[: H // 2, : W // 2]
    assert cv2.imwrite(str(moved / "slice_01.png"), small)
    out = tmp_path / "out"
    _assert_bad_input(reconstruct(moved, "--out", out), "slice_01.png", "slices[1]")
    _assert_no_output(out)


@pytest.mark.parametrize("value", [0.0, -1.5])
def test_reconstruct_non_positive_focus_distance(stack_dir: Path, tmp_path: Path, value: float) -> None:
    moved = _copy_stack(stack_dir, tmp_path / "stack")

    def edit(doc: dict) -> None:
        doc["slices"][3]["focus_distance_m"] = value

    _edit_stack_yaml(moved, edit)
    out = tmp_path / "out"
    _assert_bad_input(reconstruct(moved, "--out", out), "stack.yaml", "slices[3].focus_distance_m")
    _assert_no_output(out)


def test_reconstruct_fewer_than_two_slices(stack_dir: Path, tmp_path: Path) -> None:
    moved = _copy_stack(stack_dir, tmp_path / "stack")

    def edit(doc: dict) -> None:
        doc["slices"] = doc["slices"][:1]

    _edit_stack_yaml(moved, edit)
    out = tmp_path / "out"
    line = _assert_bad_input(reconstruct(moved, "--out", out), "stack.yaml", "slices")
    assert "2" in line
    _assert_no_output(out)


def test_reconstruct_out_already_exists(stack_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine", encoding="utf-8")
    _assert_bad_input(reconstruct(stack_dir, "--out", out), out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text(encoding="utf-8") == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_reconstruct_bad_input_leaves_no_output_parent_folders(tmp_path: Path) -> None:
    """The writability probe made --out's parents and left them when the stack then failed."""
    out = tmp_path / "new" / "deeper" / "out"
    _assert_bad_input(reconstruct(tmp_path / "no_stack", "--out", out), "no_stack")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_reconstruct_overwrite_refuses_what_it_cannot_replace_before_the_work(tmp_path: Path) -> None:
    """A folder that is not a result, or a link, is refused first: here the stack does not even
    exist, and the line is about --out (it used to come after the whole reconstruction)."""
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine", encoding="utf-8")
    line = _assert_bad_input(reconstruct(tmp_path / "no_stack", "--out", foreign, "--overwrite"), foreign)
    assert "not a reconstruction result" in line
    assert (foreign / "keep.txt").read_text(encoding="utf-8") == "mine"
    link = tmp_path / "link"
    link.symlink_to(foreign, target_is_directory=True)
    line = _assert_bad_input(reconstruct(tmp_path / "no_stack", "--out", link, "--overwrite"), link)
    assert "is a symbolic link" in line


def test_reconstruct_out_under_a_file(stack_dir: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder", encoding="utf-8")
    out = blocker / "out"
    _assert_bad_input(reconstruct(stack_dir, "--out", out), blocker)
    assert blocker.is_file() and blocker.read_text(encoding="utf-8") == "not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_reconstruct_dualfocus_with_missing_weights(stack_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    line = _assert_bad_input(reconstruct(stack_dir, "--out", out, "--method", "dualfocus", "--weights", tmp_path / "w.safetensors"), "w.safetensors")
    assert "not found" in line
    assert not out.exists()

def test_reconstruct_debug_shows_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "no_stack"
    proc = reconstruct(missing, "--out", tmp_path / "out", "--debug")
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr
    assert str(missing) in proc.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["STACK"],                                   # --out missing
        ["STACK", "--out", "OUT", "--align", "sideways"],
        ["STACK", "--out", "OUT", "--method", "magic"],
        ["STACK", "--out", "OUT", "--input-scale", "nan"],
        ["STACK", "--out", "OUT", "--input-scale", "0"],
        ["STACK", "--out", "OUT", "--precision", "int4"],
    ],
)
def test_reconstruct_bad_argument_is_one_line(stack_dir: Path, tmp_path: Path, args: list[str]) -> None:
    args = [str(stack_dir) if a == "STACK" else str(tmp_path / "out") if a == "OUT" else a for a in args]
    _assert_bad_input(reconstruct(*args))
    _assert_no_output(tmp_path / "out")


def test_reconstruct_names_its_flags_in_the_api_s_messages() -> None:
    from capture.errors import ReconstructionError
    from reconstruct.__main__ import _as_flags

    message = "input_scale: 0.1 makes the 64x80 slices 6x8 px; the network needs at least 8 px a side"
    assert str(_as_flags(ReconstructionError(message))) == "--" + message.replace("input_scale", "input-scale", 1)


def test_rig_with_the_network_records_model_and_backend(tmp_path: Path) -> None:
    config = _fast_config(tmp_path, reconstruct={"method": "dualfocus"})
    proc = rig("--config", config)
    assert proc.returncode == 0, proc.stderr
    (run,) = (tmp_path / "runs").iterdir()
    result = yaml.safe_load((run / "depth" / "000000" / "result.yaml").read_text())
    assert result["method"] == "dualfocus" and result["model"] == "dualfocus-s"
    assert result["backend"] in ("torch", "onnxruntime")
    # bf16 in torch, or in onnxruntime's OpenVINO build, and only where the CPU computes it natively (auto precision)
    # result.yaml's device is the device alone (the contract: cpu | cuda:0 | ...), the precision its own key
    assert result["device"] == "cpu"
    bf16_here = result["backend"] == "torch" or openvino_available()
    assert result["precision"] == ("bf16" if bf16_here and cpu_bf16_native() else "fp32")
    assert len(result["model_sha256"]) == 64
    assert "classical on the same stack" in proc.stdout


def test_rig_calibrate_with_stdin_closed_is_one_line(tmp_path: Path) -> None:
    # the prompt for a person at the bench meets a closed stdin (a script, ssh without a tty, Ctrl-D)
    proc = rig("--config", _fast_config(tmp_path), "--mode", "calibrate", "--no-progress")
    line = _assert_bad_input(proc)
    assert "standard input closed" in line and "--non-interactive" in line
    assert "Place the textured target" in proc.stdout and proc.stdout.endswith("\n")  # the prompt ends its line
    assert "run folder: " in proc.stdout and "the calibration session resumes there when run again" in proc.stdout


@pytest.mark.parametrize("content", ["complete: [\n", "- a\n", "curves:\n- {distance_m: 1.0, values: [1, 2]}\n", "plan: {distances_m: [2.0, 1.2, x]}\nboard_views_done: 1\n"])  # the last: hand-edited, was a KeyError traceback (a session that measured nothing takes the new plan)
def test_rig_calibrate_with_a_corrupt_session_file_names_it(tmp_path: Path, content: str) -> None:
    config = _fast_config(tmp_path)
    state = tmp_path / "runs" / "2026-01-01T00-00-00Z_sim" / "calibration_session" / "session.yaml"
    state.parent.mkdir(parents=True)
    state.write_text(content, encoding="utf-8")
    _assert_bad_input(rig("--config", config, "--mode", "calibrate", "--non-interactive", "--no-progress"), state)


def test_rig_failure_after_the_run_folder_prints_it_and_a_summary(tmp_path: Path) -> None:
    config = _fast_config(tmp_path, focus={"driver": "optotune", "port": str(tmp_path / "ttyNOPE0")})
    doc = yaml.safe_load(config.read_text(encoding="utf-8"))
    doc["camera"] = {"driver": "genicam", "producer": "viky"}
    doc["focus"] = {"driver": "optotune", "port": str(tmp_path / "ttyNOPE0"), "nominal": {"offset_dpt": 0.0, "dpt_per_ma": 0.05}}
    config.write_text(yaml.safe_dump(doc), encoding="utf-8")
    proc = rig("--config", config, "-q")  # -q: the camera's warnings aside, stderr is the error line
    if proc.returncode == 2 and "harvesters" in proc.stderr:
        pytest.skip("harvesters/genicam not installed")
    assert proc.returncode == 3 and len(proc.stderr.splitlines()) == 1 and "ttyNOPE0" in proc.stderr, proc.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert f"run folder: {run_dir}" in proc.stdout
    summary = yaml.safe_load((run_dir / "summary.yaml").read_text(encoding="utf-8"))
    assert summary["stacks"] == 0 and "ttyNOPE0" in summary["error"]


def test_a_simulated_camera_with_a_hardware_lens_leaves_no_run_folder(tmp_path: Path) -> None:
    """A config error found only when the rig opened left a run folder with config.yaml and a
    summary of the error; it is now refused before the folder, like the focus map's errors."""
    config = _fast_config(tmp_path)
    doc = yaml.safe_load(config.read_text(encoding="utf-8"))
    doc["focus"] = {"driver": "optotune", "port": "emulator", "nominal": {"offset_dpt": 0.0, "dpt_per_ma": 0.05}}
    config.write_text(yaml.safe_dump(doc), encoding="utf-8")
    line = _assert_bad_input(rig("--config", config), config)
    assert "focus.driver: the simulated camera needs the simulated focus" in line
    assert not (tmp_path / "runs").exists() or list((tmp_path / "runs").iterdir()) == []


def test_rig_reconstruct_field_errors_name_the_config_file_and_section(tmp_path: Path) -> None:
    config = _fast_config(tmp_path, reconstruct={"method": "dualfocus", "model": "dualfocus-xxl"})
    line = _assert_bad_input(rig("--config", config), config)
    assert f"{config}: reconstruct.model: unknown model 'dualfocus-xxl'" in line


def test_train_invalid_yaml_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "train.yaml"
    bad.write_text("model: dualfocus-s\noptim: {lr: [0.1\n", encoding="utf-8")
    line = _assert_bad_input(_run("-m", "reconstruct.train", "--config", bad), bad)
    assert "line" in line


def test_option_prefixes_are_refused(tmp_path: Path) -> None:
    _assert_bad_input(rig("--config", _fast_config(tmp_path), "--non-inter"))


def test_reconstruct_two_slices_at_one_focus_names_the_file_and_slices(stack_dir: Path, tmp_path: Path) -> None:
    moved = _copy_stack(stack_dir, tmp_path / "stack")

    def edit(doc: dict) -> None:
        doc["slices"][3]["focus_distance_m"] = doc["slices"][1]["focus_distance_m"]

    _edit_stack_yaml(moved, edit)
    line = _assert_bad_input(reconstruct(moved, "--out", tmp_path / "out", "--method", "classical"), moved / "stack.yaml")
    assert "slices[1].focus_distance_m and slices[3].focus_distance_m" in line
    _no_leftovers(tmp_path / "out")


def test_a_relative_weights_path_is_taken_from_the_config_folder_and_named(tmp_path: Path) -> None:
    """reconstruct.weights was resolved from the working directory (calibration.file and the
    scene files from the config's folder), and a missing one named neither file nor field."""
    import shutil

    cfg_dir = tmp_path / "cfg"
    config = _fast_config(cfg_dir, reconstruct={"method": "dualfocus", "weights": "w/mine.safetensors"})
    line = _assert_bad_input(rig("--config", config), config)
    assert f"{config}: reconstruct.weights: {cfg_dir / 'w' / 'mine.safetensors'}: weights file not found" in line
    (cfg_dir / "w").mkdir()
    (cfg_dir / "w" / "mine.safetensors").write_text("garbage", encoding="utf-8")  # damaged: refused before any capture too
    line = _assert_bad_input(rig("--config", config), config)
    assert f"{config}: reconstruct.weights: {cfg_dir / 'w' / 'mine.safetensors'}: not a readable safetensors file" in line
    assert not (cfg_dir / "runs").exists() or list((cfg_dir / "runs").iterdir()) == []
    shutil.copy(ROOT / "reconstruct" / "weights" / "dualfocus-s.safetensors", cfg_dir / "w" / "mine.safetensors")
    from rig import load_config

    assert load_config(config).reconstruct.weights == (cfg_dir / "w" / "mine.safetensors").resolve()


def test_a_calibration_file_in_another_unit_is_refused_before_the_run_folder(tmp_path: Path) -> None:
    """A current-mode (mA) calibration with the lens in focal-power mode (dpt) was refused only
    once both devices were open, leaving a run folder, with a line naming neither the file nor
    the mode and advising a focus.nominal that focal-power mode refuses."""
    cal = tmp_path / "calibration.yaml"
    cal.write_text(yaml.safe_dump({"focus_model": {"kind": "liquid_lens_linear", "offset_dpt": -0.5, "dpt_per_ma": 0.0165}}), encoding="utf-8")
    config = _fast_config(tmp_path)
    doc = yaml.safe_load(config.read_text(encoding="utf-8"))
    doc["camera"] = {"driver": "genicam", "producer": "viky"}
    doc["focus"] = {"driver": "optotune", "port": "emulator", "mode": "focal_power"}
    doc["calibration"] = {"file": str(cal)}
    config.write_text(yaml.safe_dump(doc), encoding="utf-8")
    proc = rig("--config", config)
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert f"{cal}: focus_model is in mA, but focus.driver optotune in focus.mode focal_power moves in dpt" in line
    assert not (tmp_path / "runs").exists() or list((tmp_path / "runs").iterdir()) == []


def test_rig_single_mode_says_which_output_keys_it_ignores(tmp_path: Path) -> None:
    """output.point_cloud and output.ome_tiff are continuous-mode sinks: a single run wrote
    neither and said nothing."""
    config = _fast_config(tmp_path, output={"dir": str(tmp_path / "runs"), "point_cloud": True, "ome_tiff": True},
                          reconstruct={"method": "classical"})
    proc = rig("--config", config)
    assert proc.returncode == 0, proc.stderr
    assert "output.point_cloud, output.ome_tiff: continuous mode only" in proc.stderr
