"""Tests of rig.config: loading and validating ``rig.yaml`` (INTERFACES.md, "rig.yaml")."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import yaml

from capture.errors import EXIT_BAD_INPUT, ConfigError
from rig.config import (
    CAMERA_DRIVERS,
    FOCUS_DRIVERS,
    RgbdSceneConfig,
    RigConfig,
    SimulatedCameraConfig,
    SimulatedFocusConfig,
    config_to_dict,
    load_config,
    parse_config,
)

ROOT = Path(__file__).resolve().parents[1]
SIM_YAML = ROOT / "configs" / "sim.yaml"

#: the top-level sections INTERFACES.md lists for rig.yaml
SECTIONS = ("mode", "camera", "focus", "sweep", "calibration", "reconstruct", "output", "continuous", "live")


def _write(tmp_path: Path, text: str, name: str = "rig.yaml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _error(path: Path) -> str:
    """Load ``path``, expect a ConfigError and return its message (checked to be one line)."""
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert msg.strip(), "empty error message"
    assert "\n" not in msg and "\r" not in msg, f"not one line: {msg!r}"
    assert str(path) in msg, f"file path {path} not named in {msg!r}"
    assert info.value.exit_code == EXIT_BAD_INPUT
    return msg


# ---- the shipped config ---------------------------------------------------------------------


def test_sim_yaml_loads_with_all_sections() -> None:
    config = load_config(SIM_YAML)
    assert isinstance(config, RigConfig)
    for section in SECTIONS:
        assert hasattr(config, section), section
    assert config.mode == "single"
    assert isinstance(config.camera, SimulatedCameraConfig)
    assert isinstance(config.focus, SimulatedFocusConfig)
    assert config.camera.driver == "simulated"
    assert config.focus.driver == "simulated"
    assert config.reconstruct.method == "dualfocus"
    # what the file says, not the defaults
    raw = yaml.safe_load(SIM_YAML.read_text(encoding="utf-8"))
    assert config.camera.width == raw["camera"]["width"]
    assert config.camera.height == raw["camera"]["height"]
    assert config.sweep.slices == raw["sweep"]["slices"]
    assert config.output.min_free_gb == raw["output"]["min_free_gb"]
    doc = config_to_dict(config)
    for section in SECTIONS:
        assert section in doc, section


def test_sim_yaml_sections_are_interface_sections() -> None:
    raw = yaml.safe_load(SIM_YAML.read_text(encoding="utf-8"))
    assert isinstance(raw, dict)
    assert set(raw) <= set(SECTIONS) | {"name"}, set(raw) - set(SECTIONS)


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    for text in ("", "# only a comment\n", "---\n"):
        config = load_config(_write(tmp_path, text))
        assert config.mode == "single"
        assert config.name == "sim"
        assert isinstance(config.camera, SimulatedCameraConfig)
        assert isinstance(config.focus, SimulatedFocusConfig)
        # INTERFACES.md defaults
        assert config.camera.width == 512 and config.camera.height == 384
        assert config.sweep.style == "stepped"
        assert config.sweep.distances_m is None
        assert tuple(config.sweep.range_m) == (0.4, 2.0)
        assert config.sweep.slices == 10
        assert config.sweep.wait_settled is True
        assert config.sweep.settle_timeout_s == 1.0
        assert config.calibration.file is None
        assert config.reconstruct.method == "dualfocus"
        assert config.reconstruct.model == "dualfocus-s"
        assert config.reconstruct.weights is None
        assert config.reconstruct.backend == "auto"
        assert config.reconstruct.focus_measure == "modified_laplacian"
        assert config.reconstruct.align == "apply"
        assert config.output.dir == Path("runs")
        assert config.output.record_stacks is True
        assert config.output.every_nth == 1
        assert config.output.depth_png16 is True
        assert config.output.point_cloud is False
        assert config.output.ome_tiff is False
        assert config.output.preview is True
        assert config.output.min_free_gb == 1.0
        assert config.continuous.queue_size == 2
        assert config.continuous.when_behind == "drop_oldest"
        assert config.continuous.reconnect_attempts == 3
        assert config.live.rerun is False


def test_parse_config_none_and_empty_mapping_are_defaults() -> None:
    assert config_to_dict(parse_config(None)) == config_to_dict(parse_config({}))


def test_driver_registries_name_simulated() -> None:
    assert "simulated" in CAMERA_DRIVERS
    assert "simulated" in FOCUS_DRIVERS


# ---- errors: one line naming the file and the field ------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    msg = _error(path)
    assert "not found" in msg


def test_folder_instead_of_file(tmp_path: Path) -> None:
    folder = tmp_path / "cfg.yaml"
    folder.mkdir()
    msg = _error(folder)
    assert "folder" in msg


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "rig.yaml"
    path.write_bytes(b"mode: single\ncamera:\n  width: \xff\xfe\n")
    _error(path)


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("mode: single\ncamera: [1\n", 3),
        ("mode: single\ncamera:\n  width: 10\n height: 5\n", 4),
        ("a: b\n c: d\n", 2),
        ("mode: single\n\tcamera: {}\n", 2),
    ],
)
def test_invalid_yaml_names_line(tmp_path: Path, text: str, line: int) -> None:
    msg = _error(_write(tmp_path, text))
    assert "YAML" in msg
    assert f"line {line}" in msg, msg


@pytest.mark.parametrize("text", ["- 1\n- 2\n", "just a string\n", "42\n"])
def test_top_level_not_a_mapping(tmp_path: Path, text: str) -> None:
    msg = _error(_write(tmp_path, text))
    assert "mapping" in msg


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        # unknown keys
        ("cameras: {}\n", "cameras", ["unknown key"]),
        ("camera:\n  optics:\n    focal_lenght_mm: 12\n", "camera.optics.focal_lenght_mm", ["unknown key"]),
        ("focus:\n  nominal:\n    offset_dpt: 0\n    dpt_per_ma: 0.01\n    gain: 1\n", "focus.nominal.gain", ["unknown key"]),
        ("sweep:\n  slice: 10\n", "sweep.slice", ["unknown key"]),
        ("output:\n  directory: x\n", "output.directory", ["unknown key"]),
        # wrong types
        ("sweep:\n  slices: ten\n", "sweep.slices", ["ten"]),
        ("camera:\n  width: wide\n", "camera.width", ["wide"]),
        ("output:\n  record_stacks: maybe\n", "output.record_stacks", []),
        ("camera: [1, 2]\n", "camera", ["mapping"]),
        # out of range
        ("camera:\n  fps: 0\n", "camera.fps", ["0"]),
        ("camera:\n  fps: -5\n", "camera.fps", []),
        ("sweep:\n  slices: 1\n", "sweep.slices", ["2"]),
        ("camera:\n  width: 4\n", "camera.width", []),
        # choices
        ("mode: sometimes\n", "mode", ["sometimes"]),
        ("reconstruct:\n  method: magic\n", "reconstruct.method", ["magic"]),
        ("reconstruct:\n  precision: int4\n", "reconstruct.precision", ["int4"]),
        ("reconstruct:\n  input_scale: 0\n", "reconstruct.input_scale", ["0.1"]),
        ("reconstruct:\n  input_scale: 9\n", "reconstruct.input_scale", ["4"]),
        # drivers
        ("camera:\n  driver: foo\n", "camera.driver", ["foo", "simulated"]),
        ("focus:\n  driver: bar\n", "focus.driver", ["bar", "simulated"]),
        # scenes
        ("camera:\n  scene:\n    kind: rgbd\n    image: a.png\n", "camera.scene", ["depth", "disparity"]),
        ("camera:\n  scene:\n    kind: rgbd\n    image: a.png\n    depth: d.npy\n    disparity: p.npy\n", "camera.scene", ["depth", "disparity"]),
        ("camera:\n  scene:\n    kind: procedural\n    near_m: 2.0\n    far_m: 1.0\n", "camera.scene", ["near_m"]),
        # exposure longer than the frame period
        ("camera:\n  fps: 100\n  exposure_s: 0.02\n", "camera", ["exposure_s", "fps"]),
        ("camera:\n  driver: genicam\n  frame_rate_hz: 100\n  exposure_s: 0.02\n", "camera", ["exposure_s", "frame_rate_hz", "0.01 s"]),
        # sweep distances
        ("sweep:\n  distances_m: [1.0, 0.0, 2.0]\n", "sweep.distances_m", ["> 0"]),
        ("sweep:\n  distances_m: [1.0, -0.5]\n", "sweep.distances_m", ["> 0"]),
        ("sweep:\n  distances_m: [1.0]\n", "sweep.distances_m", ["2"]),
        ("sweep:\n  range_m: [1.0, 1.0]\n", "sweep.range_m", []),
        ("calibration:\n  session:\n    board_views: 4\n", "calibration.session.board_views", ["5"]),
        ("focus:\n  driver: optotune\n  port: emulator\n  temperature_limits_c: [20, 2100]\n", "focus.temperature_limits_c", ["2100"]),
        ("focus:\n  driver: optotune\n  port: emulator\n  temperature_limits_c: [45, 20]\n", "focus.temperature_limits_c", ["lower < upper"]),
        ("focus:\n  driver: optotune\n  port: emulator\n  mode: focal_power\nsweep:\n  style: continuous\n  lag_s: 0.01\n", "sweep.style", ["focus.mode: current"]),
        ("focus:\n  driver: optotune\n  port: emulator\n  temperature_limits_c: [40, .nan]\n", "focus.temperature_limits_c", []),
    ],
)
def test_invalid_field(tmp_path: Path, text: str, field: str, words: list[str]) -> None:
    msg = _error(_write(tmp_path, text))
    assert f": {field}:" in msg or f" {field}:" in msg, f"field path {field!r} not named in {msg!r}"
    for word in words:
        assert word in msg, f"{word!r} not in {msg!r}"


def test_unknown_nested_key_message(tmp_path: Path) -> None:
    path = _write(tmp_path, "camera:\n  optics:\n    focal_lenght_mm: 12.0\n")
    msg = _error(path)
    assert "camera.optics.focal_lenght_mm" in msg
    assert "unknown key" in msg


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("camera:\n  procedural: {seed: 1}\n", "camera.procedural"),
        ("camera:\n  scene:\n    kind: rgbd\n    image: a.png\n    depth: d.png\n    rgbd: true\n", "camera.scene.rgbd"),
    ],
)
def test_unknown_key_named_like_a_scene_kind(tmp_path: Path, text: str, field: str) -> None:
    msg = _error(_write(tmp_path, text))
    assert field in msg, msg


def test_many_errors_still_one_line(tmp_path: Path) -> None:
    text = "camera:\n  width: a\n  height: b\n  fps: c\n  bogus: 1\n"
    msg = _error(_write(tmp_path, text))
    assert "camera." in msg
    assert "more" in msg


def test_unknown_driver_lists_valid_ones(tmp_path: Path) -> None:
    msg = _error(_write(tmp_path, "camera:\n  driver: foo\n"))
    assert "camera.driver" in msg
    assert "simulated" in msg


def test_exposure_equal_to_frame_period_is_fine(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, "camera:\n  fps: 100\n  exposure_s: 0.01\n"))
    assert config.camera.exposure_s == 0.01


# ---- safe loading -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "mode: !!python/object/apply:os.system ['touch {marker}']\n",
        "camera: !!python/object/new:os.system ['touch {marker}']\n",
        "camera: !!python/object:rig.config.SimulatedCameraConfig {{}}\n",
        "name: !!python/name:os.system\n",
    ],
)
def test_python_tags_refused(tmp_path: Path, text: str) -> None:
    marker = tmp_path / "pwned"
    path = _write(tmp_path, text.format(marker=marker))
    msg = _error(path)
    assert "YAML" in msg
    assert not marker.exists(), "a YAML tag ran code"


# ---- relative paths ---------------------------------------------------------------------------


def test_relative_rgbd_paths_resolved_against_config_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg_dir = tmp_path / "configs" / "mine"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    absolute = tmp_path / "abs" / "depth.png"
    text = (
        "camera:\n"
        "  scene:\n"
        "    kind: rgbd\n"
        "    image: scenes/room.png\n"
        f"    depth: {absolute}\n"
        "calibration:\n"
        "  file: ../calibration.yaml\n"
    )
    path = _write(cfg_dir, text)
    monkeypatch.chdir(elsewhere)
    config = load_config(Path("..") / "configs" / "mine" / "rig.yaml")
    scene = config.camera.scene
    assert isinstance(scene, RgbdSceneConfig)
    assert scene.image == (cfg_dir / "scenes" / "room.png").resolve()
    assert scene.image.is_absolute()
    assert scene.depth == absolute
    assert scene.disparity is None
    assert config.calibration.file == (tmp_path / "configs" / "calibration.yaml").resolve()
    assert path.exists()


def test_relative_disparity_path_resolved(tmp_path: Path) -> None:
    text = (
        "camera:\n"
        "  scene:\n"
        "    kind: rgbd\n"
        "    image: img.png\n"
        "    disparity: disp.png\n"
        "    range_m: [0.5, 3.0]\n"
    )
    config = load_config(_write(tmp_path / "c", text))
    scene = config.camera.scene
    assert scene.image == (tmp_path / "c" / "img.png").resolve()
    assert scene.disparity == (tmp_path / "c" / "disp.png").resolve()
    assert scene.depth is None


# ---- config_to_dict round trip ----------------------------------------------------------------


def _round_trip(config: RigConfig) -> None:
    doc = config_to_dict(config)
    text = yaml.safe_dump(doc, sort_keys=False)
    back = yaml.safe_load(text)
    assert back == doc
    again = parse_config(back, source="<round trip>")
    assert config_to_dict(again) == doc


def test_round_trip_sim_yaml() -> None:
    config = load_config(SIM_YAML)
    doc = config_to_dict(config)
    assert math.isinf(doc["camera"]["optics"]["base_focus_m"])
    _round_trip(config)


def test_round_trip_defaults() -> None:
    _round_trip(parse_config({}))


def test_round_trip_rich_config(tmp_path: Path) -> None:
    text = (
        "mode: continuous\n"
        "name: bench-2\n"
        "camera:\n"
        "  width: 64\n"
        "  height: 48\n"
        "  pixel_format: Mono16\n"
        "  seed: null\n"
        "  scene:\n"
        "    kind: rgbd\n"
        "    image: img.png\n"
        "    disparity: disp.png\n"
        "    range_m: [0.5, 3.0]\n"
        "focus:\n"
        "  current_limits_ma: [-100, 100]\n"
        "sweep:\n"
        "  distances_m: [0.5, .inf, 1.25]\n"
        "calibration:\n"
        "  file: cal.yaml\n"
        "reconstruct:\n"
        "  weights: w.safetensors\n"
        "  backend: torch\n"
        "output:\n"
        "  dir: /data/runs\n"
        "  every_nth: 3\n"
        "continuous:\n"
        "  when_behind: block\n"
        "live:\n"
        "  rerun: true\n"
    )
    config = load_config(_write(tmp_path, text))
    doc = config_to_dict(config)
    assert doc["output"]["dir"] == "/data/runs"
    assert doc["sweep"]["distances_m"][1] == math.inf
    assert doc["camera"]["scene"]["range_m"] == [0.5, 3.0]
    _round_trip(config)


def test_run_folder_config_yaml_loads_again(tmp_path: Path) -> None:
    """What the run folder's config.yaml holds can be used as a config again."""
    config = load_config(SIM_YAML)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False), encoding="utf-8")
    assert config_to_dict(load_config(path)) == config_to_dict(config)


# ---- hardware sections ----------------------------------------------------------------------------

RIG_CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if not p.name.startswith("train_"))


@pytest.mark.parametrize("path", RIG_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_rig_config_is_valid(path: Path) -> None:
    config = load_config(path)
    assert config.camera.driver in ("simulated", "genicam")


def _hw(camera: dict, focus: dict) -> dict:
    return {"camera": {"driver": "genicam", "producer": "viky", **camera}, "focus": focus}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (_hw({"serial_number": "0", "index": 1}, {"driver": "optotune", "port": "emulator"}), "camera: give at most one of serial_number, id, index"),
        (_hw({"pixel_format": "YUV8"}, {"driver": "optotune", "port": "emulator"}), "camera.pixel_format: unsupported pixel format"),
        (_hw({"trigger": "sometimes"}, {"driver": "optotune", "port": "emulator"}), "camera.trigger"),
        (_hw({}, {"driver": "optotune"}), "focus.port: missing (required)"),
        (_hw({}, {"driver": "optotune", "port": "emulator", "mode": "voltage"}), "focus.mode"),
        (_hw({}, {"driver": "gcode", "port": "/dev/ttyUSB0", "limits_mm": [5, 1]}), "focus.limits_mm: need [low, high] with low < high"),
        (_hw({}, {"driver": "gcode", "port": "/dev/ttyUSB0", "flavor": "smoothie"}), "focus.flavor"),
        (_hw({}, {"driver": "gcode", "port": "/dev/ttyUSB0", "feed_mm_min": 2e6}), "focus.feed_mm_min"),
        (_hw({}, {"driver": "gcode", "port": "/dev/ttyUSB0", "feed_mm_min": 5e-5}), "focus.feed_mm_min"),
        (_hw({}, {"driver": "lens9000"}), "focus.driver: unknown driver 'lens9000'; valid: gcode, genicam, optotune, simulated"),
    ],
)
def test_hardware_sections_name_the_bad_field(raw: dict, expected: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(expected)):
        parse_config(raw, source="rig.yaml")


def test_a_serial_number_written_as_a_number_is_text() -> None:
    config = parse_config(_hw({"serial_number": 12345}, {"driver": "optotune", "port": "emulator"}))
    assert config.camera.serial_number == "12345"


def test_a_relative_producer_path_is_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "rig.yaml").write_text(yaml.safe_dump(_hw({"producer": "gentl/x.cti"}, {"driver": "optotune", "port": "emulator"})), encoding="utf-8")
    config = load_config(tmp_path / "rig.yaml")
    assert config.camera.producer == str((tmp_path / "gentl" / "x.cti").resolve())


@pytest.mark.parametrize(
    ("focus", "expected"),
    [
        ({"driver": "optotune", "port": "emulator"}, "focus.nominal: the optotune lens in current mode needs a nominal model"),
        ({"driver": "gcode", "port": "emulator"}, "focus.nominal: the gcode focus needs a nominal model"),
    ],
)
def test_hardware_without_a_focus_map_is_refused_before_opening(focus: dict, expected: str) -> None:
    from rig import open_rig

    with pytest.raises(ConfigError, match=re.escape(expected)):
        open_rig(parse_config(_hw({}, focus)))


def test_simulated_camera_refuses_a_hardware_lens() -> None:
    from rig import open_rig

    raw = {"focus": {"driver": "optotune", "port": "emulator", "nominal": {"offset_dpt": 0, "dpt_per_ma": 0.01}}}
    with pytest.raises(ConfigError, match="focus.driver: the simulated camera needs the simulated focus"):
        open_rig(parse_config(raw))


def test_focal_power_mode_with_a_current_mode_nominal_is_one_line(tmp_path: Path) -> None:
    """configs/optotune_genicam.yaml offers `mode: current  # current | focal_power` with a
    current-mode nominal model; switching only the mode was an AttributeError traceback."""
    from rig.build import _focus_map

    text = (Path(__file__).resolve().parents[1] / "configs" / "optotune_genicam.yaml").read_text(encoding="utf-8")
    text = text.replace("  mode: current ", "  mode: focal_power ", 1)
    config = load_config(_write(tmp_path, text))
    with pytest.raises(ConfigError, match=r"^focus.nominal: offset_dpt and dpt_per_ma describe the lens in current mode; in focal_power mode"):
        _focus_map(config)
    config.focus.nominal = None  # without it: the lens is set in diopters
    assert _focus_map(config).unit == "dpt"


def test_a_typo_in_a_required_key_names_the_typo_first(tmp_path: Path) -> None:
    """`focus: {prot: ...}` reported "focus.port: missing (required) (and 1 more)", hiding `prot`."""
    text = (Path(__file__).resolve().parents[1] / "configs" / "optotune_genicam.yaml").read_text(encoding="utf-8")
    text = text.replace("  port: /dev/ttyACM0", "  prot: /dev/ttyACM0", 1)
    with pytest.raises(ConfigError, match=r"focus\.prot: unknown key.* \(and 1 more\)$"):
        load_config(_write(tmp_path, text))


def test_a_stage_takes_its_baud_rate_and_refuses_a_continuous_sweep_at_load(tmp_path) -> None:
    from rig.config import parse_config

    doc = {"camera": {"driver": "genicam", "producer": "viky"},
           "focus": {"driver": "gcode", "port": "/dev/ttyUSB0", "flavor": "marlin", "baudrate": 250000}}
    assert parse_config(doc, source="rig.yaml").focus.baudrate == 250000  # stock Marlin
    doc["sweep"] = {"style": "continuous"}
    with pytest.raises(ConfigError, match=r"rig\.yaml: sweep\.style: continuous needs an actuator with a triangle signal generator.*focus\.driver gcode"):
        parse_config(doc, source="rig.yaml")


def test_reconstruct_input_scale_is_auto_by_default_and_checked() -> None:
    from rig.config import parse_config

    base = {"camera": {"driver": "simulated"}, "focus": {"driver": "simulated", "nominal": {"offset_dpt": -0.5, "dpt_per_ma": 0.0165}}}
    assert parse_config(base, source="rig.yaml").reconstruct.input_scale == "auto"
    assert parse_config({**base, "reconstruct": {"input_scale": 1.5}}, source="rig.yaml").reconstruct.input_scale == 1.5
    assert parse_config({**base, "reconstruct": {"input_scale": "AUTO"}}, source="rig.yaml").reconstruct.input_scale == "auto"
    for bad in (5, 0.05, "big", True):
        with pytest.raises(ConfigError, match=r"^rig\.yaml: reconstruct\.input_scale: must be auto or a number from 0\.1 to 4\.0 \(got"):
            parse_config({**base, "reconstruct": {"input_scale": bad}}, source="rig.yaml")
