"""``rig.yaml``: its sections (INTERFACES.md), validated on load with pydantic v2.

Unknown keys are rejected; each ``driver:`` has its own model, looked up in a registry so
an unknown driver lists the valid ones. Every error becomes one :class:`ConfigError` line
naming the file, the field path and what was expected.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from capture.errors import ConfigError, yaml_problem
from capture.yaml_load import load_yaml

logger = logging.getLogger(__name__)

__all__ = ["RigConfig", "load_config", "parse_config", "check_calibration_file", "CAMERA_DRIVERS", "FOCUS_DRIVERS"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


# ----------------------------------------------------------------------------- camera
class LensInfoConfig(_Strict):
    """What the lens is (recorded in stacks; ``base_focus_m`` also enters the nominal focus map)."""

    focal_length_mm: float = Field(12.0, gt=0)
    f_number: float = Field(2.0, gt=0)
    pixel_pitch_um: float = Field(7.0, gt=0)
    base_focus_m: float = Field(math.inf, gt=0, description="focus of the camera lens with the liquid lens at 0 dpt")


class OpticsConfig(LensInfoConfig):
    breathing_per_dpt: float = Field(0.004, ge=-0.1, le=0.1, description="relative magnification change per diopter")
    breathing_reference_dpt: float = 1.5


class NoiseConfig(_Strict):
    enabled: bool = True
    full_well_e: float = Field(10_000.0, gt=0)
    read_noise_e: float = Field(3.0, ge=0)
    electrons_per_s: float = Field(800_000.0, gt=0, description="photo-electrons per second at radiance 1")
    adc_bits: int = Field(12, ge=8, le=16)


class ProceduralSceneConfig(_Strict):
    kind: Literal["procedural"] = "procedural"
    seed: int = 0
    near_m: float = Field(0.4, gt=0)
    far_m: float = Field(2.0, gt=0)

    @model_validator(mode="after")
    def _order(self) -> ProceduralSceneConfig:
        if not self.near_m < self.far_m:
            raise ValueError(f"near_m ({self.near_m}) must be less than far_m ({self.far_m})")
        return self


class RgbdSceneConfig(_Strict):
    kind: Literal["rgbd"]
    image: Path
    depth: Path | None = None
    depth_unit_m: float = Field(1.0, gt=0, description="metres per stored depth unit (0.001 for millimetres)")
    disparity: Path | None = None
    disparity_divisor: float = Field(1.0, gt=0)
    range_m: tuple[float, float] | None = Field(None, description="map the scene's inverse depth onto [near, far] metres")

    @model_validator(mode="after")
    def _one_source(self) -> RgbdSceneConfig:
        if (self.depth is None) == (self.disparity is None):
            raise ValueError("give exactly one of depth or disparity")
        if self.disparity is not None and self.range_m is None:
            raise ValueError("a disparity map needs range_m: [near, far] to become metric")
        return self


class SimulatedCameraConfig(_Strict):
    driver: Literal["simulated"] = "simulated"
    width: int = Field(512, ge=16, le=8192)
    height: int = Field(384, ge=16, le=8192)
    fps: float = Field(30.0, gt=0, le=1000)
    exposure_s: float = Field(0.01, gt=0)
    gain_db: float = Field(0.0, ge=0, le=48)
    pixel_format: Literal["Mono8", "Mono16", "RGB8"] = "RGB8"
    seed: int | None = 0
    scene: ProceduralSceneConfig | RgbdSceneConfig = Field(default_factory=ProceduralSceneConfig, discriminator="kind")
    optics: OpticsConfig = Field(default_factory=OpticsConfig)
    noise: NoiseConfig = Field(default_factory=NoiseConfig)

    @model_validator(mode="after")
    def _exposure_fits(self) -> SimulatedCameraConfig:
        if self.exposure_s > 1.0 / self.fps:
            raise ValueError(f"exposure_s ({self.exposure_s} s) must not exceed the frame period 1/fps ({1.0 / self.fps:.4g} s)")
        return self


class RoiConfig(_Strict):
    x: int = Field(0, ge=0)
    y: int = Field(0, ge=0)
    width: int = Field(..., ge=1)
    height: int = Field(..., ge=1)


class GenicamCameraConfig(_Strict):
    driver: Literal["genicam"]
    producer: str | None = Field(None, description="a .cti path, 'viky', or null to search GENICAM_GENTL64_PATH")
    serial_number: str | None = None
    id: str | None = None
    index: int | None = Field(None, ge=0)
    pixel_format: str | None = None
    exposure_s: float | None = Field(None, gt=0, le=60)
    gain_db: float | None = Field(None, ge=0, le=48)
    roi: RoiConfig | None = None
    trigger: Literal["software", "hardware", "free_run"] = "software"
    trigger_source: str = "Line0"
    frame_rate_hz: float | None = Field(None, gt=0, le=10_000)
    fetch_timeout_s: float = Field(2.0, gt=0, le=60)
    num_buffers: int = Field(4, ge=1, le=64)
    optics: LensInfoConfig | None = None

    @field_validator("serial_number", "id", mode="before")
    @classmethod
    def _as_text(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) else v  # serial_number: 0 in YAML means "0"

    @field_validator("pixel_format")
    @classmethod
    def _known_format(cls, v: str | None) -> str | None:
        from capture.pixel_formats import SUPPORTED_FORMATS

        if v is not None and v not in SUPPORTED_FORMATS:
            raise ValueError(f"unsupported pixel format; valid: {', '.join(SUPPORTED_FORMATS)}")
        return v

    @model_validator(mode="after")
    def _one_selector(self) -> GenicamCameraConfig:
        given = [k for k in ("serial_number", "id", "index") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of serial_number, id, index (got {', '.join(given)})")
        return self

    @model_validator(mode="after")
    def _exposure_fits(self) -> GenicamCameraConfig:
        # a camera cannot expose longer than its frame period: it would lower the frame rate
        # (or refuse one of the two) behind the config's back
        if self.exposure_s is not None and self.frame_rate_hz is not None and self.exposure_s > 1.0 / self.frame_rate_hz:
            raise ValueError(f"exposure_s ({self.exposure_s} s) must not exceed the frame period 1/frame_rate_hz "
                             f"({1.0 / self.frame_rate_hz:.4g} s); lower one of them")
        return self


# ----------------------------------------------------------------------------- focus
class LensModelConfig(_Strict):
    offset_dpt: float
    dpt_per_ma: float

    @field_validator("dpt_per_ma")
    @classmethod
    def _nonzero(cls, v: float) -> float:
        if v == 0 or not math.isfinite(v):
            raise ValueError("must be finite and non-zero")
        return v


class TrueLensConfig(LensModelConfig):
    drift_dpt_per_c: float = -0.003
    temperature_c: float = 27.0


class SimulatedFocusConfig(_Strict):
    driver: Literal["simulated"] = "simulated"
    nominal: LensModelConfig = Field(default_factory=lambda: LensModelConfig(offset_dpt=-0.49, dpt_per_ma=0.0166))
    actual: TrueLensConfig = Field(default_factory=lambda: TrueLensConfig(offset_dpt=-0.5, dpt_per_ma=0.0165), description="the simulator's true lens ('true' is a YAML boolean, hence the name)")
    time_constant_s: float = Field(0.015, ge=0, le=10)
    settle_tolerance_ma: float = Field(0.05, gt=0)
    current_limits_ma: tuple[float, float] = (-290.0, 290.0)
    park_current_ma: float = 0.0


class LinearFocusModelConfig(_Strict):
    """A nominal map for hardware without a calibration file: ``P = offset_dpt + dpt_per_unit * value``."""

    offset_dpt: float = 0.0
    dpt_per_unit: float

    @field_validator("dpt_per_unit")
    @classmethod
    def _nonzero(cls, v: float) -> float:
        if v == 0 or not math.isfinite(v):
            raise ValueError("must be finite and non-zero")
        return v


class OptotuneFocusConfig(_Strict):
    driver: Literal["optotune"]
    port: str = Field(..., min_length=1, description="a serial device (/dev/ttyACM0, COM3), or 'emulator'")
    mode: Literal["current", "focal_power"] = "current"
    park_current_ma: float = Field(0.0, ge=-300, le=300)
    timeout_s: float = Field(0.5, gt=0, le=30)
    retries: int = Field(2, ge=0, le=10)
    settle_time_s: float = Field(0.025, ge=0, le=5)
    temperature_limits_c: tuple[float, float] = Field(
        (20.0, 45.0), description="focal-power mode: the lens temperatures the driver compensates over (lower, upper), C")
    nominal: LensModelConfig | None = Field(None, description="current mode: mA -> dpt, used when calibration.file is null")

    @field_validator("temperature_limits_c")
    @classmethod
    def _temperature_limits(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        # the LD4 takes them as int16 in 1/16 C (|t| < 2048 C); a liquid lens works from about -20 to 85 C
        if not (math.isfinite(lo) and math.isfinite(hi) and -40.0 <= lo < hi <= 125.0):
            raise ValueError(f"expected [lower, upper] in C with -40 <= lower < upper <= 125, got [{lo}, {hi}]")
        return v


class GcodeFocusConfig(_Strict):
    driver: Literal["gcode"]
    port: str = Field(..., min_length=1, description="a serial device, or 'emulator'")
    flavor: Literal["grbl", "marlin"] = "grbl"
    axis: Literal["X", "Y", "Z"] = "Z"
    home_on_start: bool = True
    limits_mm: tuple[float, float] | None = Field(
        None, description="soft limits in work coordinates, mm; null: the controller's travel ($13x on GRBL, M211 on Marlin)")
    feed_mm_min: float = Field(600.0, ge=0.01, le=100000, description="feed rate of every move")
    baudrate: int = Field(115200, gt=0, description="serial speed: 115200 for GRBL 1.1 and most boards, 250000 for stock Marlin")
    timeout_s: float = Field(2.0, gt=0, le=60)
    move_timeout_s: float = Field(30.0, gt=0, le=600)
    nominal: LinearFocusModelConfig | None = Field(None, description="mm -> dpt, used when calibration.file is null")

    @field_validator("limits_mm")
    @classmethod
    def _limits(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not v[0] < v[1]:
            raise ValueError(f"need [low, high] with low < high, got {list(v)}")
        return v


class GenicamFocusConfig(_Strict):
    driver: Literal["genicam"]
    controller: str = "OpticController0"
    feature: Literal["auto", "FocalPower", "FocusStepper"] = "auto"
    settle_time_s: float = Field(0.05, ge=0, le=5)
    nominal: LinearFocusModelConfig | None = Field(None, description="value -> dpt; FocalPower needs none (it is in dpt)")


#: driver name -> config model
CAMERA_DRIVERS: dict[str, type[_Strict]] = {"simulated": SimulatedCameraConfig, "genicam": GenicamCameraConfig}
FOCUS_DRIVERS: dict[str, type[_Strict]] = {
    "simulated": SimulatedFocusConfig, "optotune": OptotuneFocusConfig, "gcode": GcodeFocusConfig, "genicam": GenicamFocusConfig,
}


# ----------------------------------------------------------------------------- the rest
class SweepConfig(_Strict):
    style: Literal["stepped", "continuous"] = "stepped"
    distances_m: list[float] | None = None
    range_m: tuple[float, float] = (0.4, 2.0)
    slices: int = Field(10, ge=2, le=256)
    wait_settled: bool = True
    settle_timeout_s: float = Field(1.0, gt=0, le=60)
    frequency_hz: float = Field(2.0, gt=0, le=100, description="continuous style: triangle sweep frequency (two stacks per period)")
    lag_s: float | None = Field(None, ge=0, le=1, description="continuous style: lens lag behind the command; null: the actuator's own estimate")

    @field_validator("distances_m")
    @classmethod
    def _distances(cls, v: list[float] | None) -> list[float] | None:
        if v is None:
            return v
        if len(v) < 2:
            raise ValueError(f"need at least 2 distances, got {len(v)}")
        bad = [d for d in v if not d > 0]
        if bad:
            raise ValueError(f"every distance must be > 0 m, got {bad[0]}")
        if len(set(v)) != len(v):
            raise ValueError("distances must be distinct")
        return v

    @field_validator("range_m")
    @classmethod
    def _range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not (v[0] > 0 and v[1] > 0) or v[0] == v[1]:
            raise ValueError(f"need two different distances > 0 m, got {list(v)}")
        return v


class BoardConfig(_Strict):
    cols: int = Field(9, ge=3, le=40, description="inner corners per row")
    rows: int = Field(6, ge=3, le=40, description="inner corners per column")
    square_mm: float = Field(25.0, gt=0)


class CalibrationSessionConfig(_Strict):
    """What ``--mode calibrate`` measures."""

    distances_m: list[float] | None = Field(None, description="target distances; null: 7 even in diopters over sweep.range_m")
    coarse_steps: int = Field(25, ge=7, le=400)
    fine_steps: int = Field(15, ge=5, le=400)
    roi_fraction: float = Field(0.5, gt=0.05, le=1.0)
    degree: Literal[1, 2] = 1
    breathing: bool = True
    breathing_steps: int = Field(9, ge=3, le=100)
    intrinsics: bool = True
    board: BoardConfig = Field(default_factory=BoardConfig)
    board_views: int = Field(10, ge=5, le=100, description="chessboard views; the intrinsics fit needs the board found in at least 5")
    keep_sweeps: bool = Field(True, description="keep each target's raw focus sweep (and the breathing sweep) as a focal-stack "
                              "folder under calibration_session/sweeps/")

    @field_validator("distances_m")
    @classmethod
    def _distances(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (any(not d > 0 for d in v) or len(set(v)) != len(v)):
            raise ValueError("distances must be positive and distinct")
        return v

    @model_validator(mode="after")
    def _enough_distances(self) -> CalibrationSessionConfig:
        # the fit needs one distance more than its parameters (a residual, a leave-one-out
        # error): refused here, not after every target has been measured
        need = self.degree + 2
        if self.distances_m is not None and len(self.distances_m) < need:
            raise ValueError(f"distances_m: {len(self.distances_m)} distances are too few for a degree-{self.degree} focus model; "
                             f"give at least {need}, spread over the range")
        return self


class CalibrationConfig(_Strict):
    file: Path | None = None
    session: CalibrationSessionConfig = Field(default_factory=CalibrationSessionConfig)


class ReconstructConfig(_Strict):
    method: Literal["dualfocus", "classical"] = "dualfocus"
    model: str = "dualfocus-s"
    weights: Path | None = None
    backend: Literal["auto", "torch", "onnxruntime", "tensorrt"] = "auto"
    precision: Literal["auto", "fp32", "fp16", "bf16", "int8"] = "auto"  # auto: fp16 on a GPU; bf16 on a CPU with native bfloat16, else fp32; int8: ONNX Runtime on the CPU
    focus_measure: Literal["modified_laplacian", "variance_of_laplacian", "tenengrad"] = "modified_laplacian"
    align: Literal["apply", "estimate", "none"] = "apply"
    # dualfocus: slices resized by this before the network (1.5: finer, ~2.25x slower); auto: 1 up to 768 px on the
    # long side, larger frames scaled down to it (the network learnt from small crops; a full frame's blur is wider)
    input_scale: Literal["auto"] | float = "auto"

    @field_validator("input_scale", mode="before")
    @classmethod
    def _input_scale(cls, v: object) -> str | float:
        if isinstance(v, str) and v.strip().lower() == "auto":
            return "auto"
        number = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else float("nan")
        if not 0.1 <= number <= 4.0:
            raise ValueError("must be auto or a number from 0.1 to 4.0")
        return number


class OutputConfig(_Strict):
    dir: Path = Path("runs")
    record_stacks: bool = True
    every_nth: int = Field(1, ge=1)
    depth_png16: bool = True
    point_cloud: bool = False
    ome_tiff: bool = False
    preview: bool = True
    min_free_gb: float = Field(1.0, ge=0)


class ContinuousConfig(_Strict):
    queue_size: int = Field(2, ge=1)
    when_behind: Literal["drop_oldest", "block"] = "drop_oldest"
    reconnect_attempts: int = Field(3, ge=0)


class LiveConfig(_Strict):
    rerun: bool = False


class RigConfig(_Strict):
    """The whole ``rig.yaml``. ``camera`` and ``focus`` hold the model of their driver."""

    mode: Literal["single", "continuous", "calibrate"] = "single"
    name: str = Field("sim", pattern=r"^[A-Za-z0-9_.-]{1,40}$", description="rig name, used in run-folder names")
    camera: Any = None
    focus: Any = None
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    reconstruct: ReconstructConfig = Field(default_factory=ReconstructConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    continuous: ContinuousConfig = Field(default_factory=ContinuousConfig)
    live: LiveConfig = Field(default_factory=LiveConfig)


_SECTIONS = ("sweep", "calibration", "reconstruct", "output", "continuous", "live")


def _describe(err: dict[str, Any], prefix: tuple[str | int, ...]) -> str:
    raw_loc = [str(p) for p in (*prefix, *err.get("loc", ()))]
    # pydantic puts the union tag right after 'scene' (camera.scene.rgbd.image): drop it there only
    loc = [p for i, p in enumerate(raw_loc) if not (i > 0 and raw_loc[i - 1] == "scene" and p in ("procedural", "rgbd"))]
    loc = [p for p in loc if not p.startswith("function-")]
    where = ".".join(loc) if loc else "(top level)"
    msg = err.get("msg", "invalid")
    msg = msg.removeprefix("Value error, ")
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        msg = "unknown key"
    elif kind == "missing":
        msg = "missing (required)"
    got = err.get("input")
    shown = "" if kind in ("missing", "extra_forbidden") or isinstance(got, (dict, list)) else f" (got {got!r})"
    return f"{where}: {msg}{shown}"


def _validate(model: type[BaseModel], data: Any, *, source: str, prefix: tuple[str, ...]) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        # an unknown key first: a typo ('prot') also makes its field missing ('port'), and the
        # typo is what the user has to see
        first = next((e for e in errors if e.get("type") == "extra_forbidden"), errors[0])
        more = len(errors) - 1
        tail = f" (and {more} more)" if more else ""
        raise ConfigError(f"{source}: {_describe(first, prefix)}{tail}") from exc


def _driver_section(raw: dict[str, Any], section: str, registry: dict[str, type[_Strict]], source: str) -> BaseModel:
    data = raw.get(section)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {section}: expected a mapping with a 'driver' key, got {type(data).__name__}")
    driver = data.get("driver", "simulated")
    if driver not in registry:
        raise ConfigError(f"{source}: {section}.driver: unknown driver {driver!r}; valid: {', '.join(sorted(registry))}")
    return _validate(registry[driver], data, source=source, prefix=(section,))


def parse_config(raw: Any, *, source: str = "<config>") -> RigConfig:
    """Validate an already-loaded mapping (``source`` names it in errors)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    camera = _driver_section(raw, "camera", CAMERA_DRIVERS, source)
    focus = _driver_section(raw, "focus", FOCUS_DRIVERS, source)
    # a section left empty (all keys commented out) means its defaults
    rest = {k: ({} if v is None and k in _SECTIONS else v) for k, v in raw.items() if k not in ("camera", "focus")}
    config = _validate(RigConfig, rest, source=source, prefix=())
    config.camera, config.focus = camera, focus
    if config.sweep.style == "continuous" and getattr(focus, "driver", None) == "optotune" and getattr(focus, "mode", None) == "focal_power":
        # the LD4's signal generator sweeps the current: found only once the devices were open
        raise ConfigError(f"{source}: sweep.style: continuous sweeps run the LD4's signal generator, which drives the current: "
                          "it needs focus.mode: current (or sweep.style: stepped)")
    if config.sweep.style == "continuous" and getattr(focus, "driver", None) in ("gcode", "genicam"):
        # found only after the devices were open (a stage homed first), as a lag_s complaint
        raise ConfigError(f"{source}: sweep.style: continuous needs an actuator with a triangle signal generator (an Optotune "
                          f"LD4 in current mode, or the simulated lens); focus.driver {focus.driver} moves step by step: "
                          "use sweep.style: stepped")
    return config  # type: ignore[return-value]


def load_config(path: str | Path) -> RigConfig:
    """Read and validate a ``rig.yaml`` (safe YAML loading only).

    Raises:
        ConfigError: one line naming the file and the field.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: config file not found") from exc
    except IsADirectoryError as exc:
        raise ConfigError(f"{path}: is a folder, expected a YAML file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read ({exc})") from exc
    try:
        raw = load_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML {yaml_problem(exc)}") from exc
    config = parse_config(raw, source=str(path))
    # relative file paths in a config are relative to the config file's folder
    base = path.parent
    if config.calibration.file is not None and not config.calibration.file.is_absolute():
        config.calibration.file = (base / config.calibration.file).resolve()
    weights = config.reconstruct.weights
    if weights is not None and not weights.expanduser().is_absolute():  # as calibration.file (it was the working directory's)
        config.reconstruct.weights = (base / weights).resolve()
    producer = getattr(config.camera, "producer", None)
    if producer not in (None, "viky") and not Path(producer).expanduser().is_absolute():
        config.camera.producer = str((base / producer).resolve())
    scene = getattr(config.camera, "scene", None)
    if isinstance(scene, RgbdSceneConfig):
        for key in ("image", "depth", "disparity"):
            value = getattr(scene, key)
            if value is not None and not value.is_absolute():
                setattr(scene, key, (base / value).resolve())
    return config


def check_calibration_file(config: RigConfig) -> None:
    """``calibration.file`` exists where the config names one: asked before a single or
    continuous run makes its run folder (a calibration session does not need it)."""
    path = config.calibration.file
    if path is not None and not path.is_file():
        raise ConfigError(f"calibration.file: {path} not found (a relative path is taken from the config file's folder)")


def config_to_dict(config: RigConfig) -> dict[str, Any]:
    """The resolved config as plain YAML-able data (for the run folder's ``config.yaml``)."""
    doc = config.model_dump()
    doc["camera"] = config.camera.model_dump()
    doc["focus"] = config.focus.model_dump()
    return _plain(doc)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
