"""Image formation, once: thin-lens defocus, layered occlusion-aware rendering, focus
breathing and sensor noise.

A leaf module (numpy, OpenCV and ``capture.errors`` only). It serves the simulated camera
and, later, the synthesis of training stacks, so both see the same physics.

Conventions
-----------
* Distances in metres, optical power and focus in diopters (``dpt = 1 / m``; 0 = infinity).
* A thin lens of aperture diameter ``A`` with the sensor at distance ``v`` behind it images a
  point at ``D`` diopters, while focused at ``D_f``, as a disc of diameter
  ``c = A * v * |D_f - D|`` on the sensor (exact for a thin lens whose sensor stays put while
  the lens power changes, as with a liquid lens; where the sensor moves to focus, ``v`` is that
  of the focused state, a few per cent apart at close range). Defocus blur is therefore linear in diopters, which is
  why every part of the project sorts and interpolates focus in diopters.
* Radiance images are linear light, float32, ``[H, W, C]`` in ``[0, 1]``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from capture.errors import InputError

logger = logging.getLogger(__name__)

__all__ = [
    "ThinLens",
    "coc_diameter_px",
    "disc_kernel",
    "LayeredScene",
    "breathing_scale",
    "apply_breathing",
    "SensorModel",
]


def _dpt(distance_m: np.ndarray | float) -> np.ndarray | float:
    """Diopters of a distance in metres (inf -> 0)."""
    return 1.0 / np.asarray(distance_m, dtype=np.float64)


@dataclass(frozen=True)
class ThinLens:
    """A thin-lens camera: focal length, f-number, pixel pitch and the lens-to-sensor distance.

    ``base_focus_m`` is the distance the lens is focused at with no added optical power (a
    liquid lens at 0 dpt, a stage at its datum); it fixes the sensor distance
    ``v = 1 / (1/f - 1/base_focus_m)``. ``math.inf`` (the default) puts the sensor at ``f``.

    >>> lens = ThinLens(focal_length_mm=12.0, f_number=2.0, pixel_pitch_um=7.0)
    >>> round(lens.blur_px_per_dpt, 2)
    10.29
    """

    focal_length_mm: float
    f_number: float
    pixel_pitch_um: float
    base_focus_m: float = math.inf

    def __post_init__(self) -> None:
        for name in ("focal_length_mm", "f_number", "pixel_pitch_um", "base_focus_m"):
            value = getattr(self, name)
            if not value > 0:
                raise InputError(f"optics.{name}: must be > 0, got {value!r}")
        if self.base_focus_m * 1e3 <= self.focal_length_mm:
            raise InputError(
                f"optics.base_focus_m: must be beyond the focal length "
                f"({self.focal_length_mm} mm), got {self.base_focus_m} m"
            )

    @property
    def focal_length_m(self) -> float:
        return self.focal_length_mm * 1e-3

    @property
    def aperture_m(self) -> float:
        """Entrance-pupil diameter A = f / N, metres."""
        return self.focal_length_m / self.f_number

    @property
    def sensor_distance_m(self) -> float:
        """Lens-to-sensor distance v, metres."""
        return 1.0 / (1.0 / self.focal_length_m - 1.0 / self.base_focus_m)

    @property
    def blur_px_per_dpt(self) -> float:
        """Blur-disc diameter in pixels per diopter of defocus: ``A * v / pitch``."""
        return self.aperture_m * self.sensor_distance_m / (self.pixel_pitch_um * 1e-6)

    @property
    def focal_length_px(self) -> float:
        """Focal length in pixels (for intrinsics): ``v / pitch`` (the pinhole distance)."""
        return self.sensor_distance_m / (self.pixel_pitch_um * 1e-6)


def coc_diameter_px(
    object_dpt: np.ndarray | float, focus_dpt: float, *, blur_px_per_dpt: float
) -> np.ndarray | float:
    """Circle-of-confusion diameter in pixels, ``k * |D_f - D|``.

    Args:
        object_dpt: object distance(s) in diopters, any shape.
        focus_dpt: the focus setting in diopters.
        blur_px_per_dpt: ``ThinLens.blur_px_per_dpt``.
    """
    return blur_px_per_dpt * np.abs(focus_dpt - np.asarray(object_dpt))


@lru_cache(maxsize=512)
def _disc_kernel_cached(diameter_q: int) -> np.ndarray:
    diameter_px = diameter_q / 100.0
    radius = diameter_px / 2.0
    half = int(math.ceil(radius - 0.5 + 1e-9)) if radius > 0.5 else 0
    if half == 0:
        kernel = np.ones((1, 1), np.float32)
    else:
        yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float32)
        dist = np.sqrt(xx * xx + yy * yy)
        # area-style anti-aliasing: a pixel counts fully inside, linearly across the rim
        kernel = np.clip(radius + 0.5 - dist, 0.0, 1.0).astype(np.float32)
        kernel /= kernel.sum()
    kernel.setflags(write=False)
    return kernel


def disc_kernel(diameter_px: float) -> np.ndarray:
    """A normalised, anti-aliased disc PSF of the given diameter, float32 ``[K, K]`` (K odd).

    Diameters below one pixel give the identity (a 1x1 kernel).
    """
    return _disc_kernel_cached(int(round(max(0.0, float(diameter_px)) * 100)))


def breathing_scale(focus_dpt: float, *, breathing_per_dpt: float, reference_dpt: float) -> float:
    """Image magnification relative to the reference focus: ``1 + b * (D_f - D_ref)``.

    A phenomenological model of focus breathing (a liquid lens in front of a fixed lens, or
    a lens moved on a stage, changes the image scale with focus); ``b`` is per diopter.
    """
    return 1.0 + breathing_per_dpt * (focus_dpt - reference_dpt)


def apply_breathing(image: np.ndarray, scale: float) -> np.ndarray:
    """Scale an image about its centre by ``scale`` (focus breathing), same shape and dtype.

    Args:
        image: ``[H, W]`` or ``[H, W, C]``.
    """
    if abs(scale - 1.0) < 1e-7:
        return image
    h, w = image.shape[:2]
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    affine = np.array([[scale, 0.0, cx * (1 - scale)], [0.0, scale, cy * (1 - scale)]], np.float64)
    return cv2.warpAffine(image, affine, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


class LayeredScene:
    """A scene prepared for layered, occlusion-aware defocus rendering.

    The depth range is cut into layers evenly spaced in diopters (at most ``max_layer_dpt``
    apart); each pixel's colour is split linearly between its two neighbouring layers, so
    blur varies smoothly with depth. Each layer carries premultiplied colour, coverage, and
    an occlusion mask (the pixel's farther layer of the pair occludes what lies behind; the
    nearer one only adds colour, so a surface split between two layers stays opaque).

    Behind every nearer surface, each layer is extended by ``occlusion_margin_px`` with its
    own colours filled in (a surface usually continues behind what hides it): a blurred near
    edge then shows part of the hidden background through its rim, as through a real lens,
    instead of a sharp step.

    Rendering blurs every layer with a disc PSF, composites far to near ("over"), and
    divides by the composited coverage.

    Args:
        radiance: float32 ``[H, W, C]`` linear radiance in [0, 1] (C <= 3).
        depth_m: ``[H, W]`` z-depth in metres (> 0, finite).
        max_layer_dpt: largest spacing between layers, diopters.
        occlusion_margin_px: how far layers continue behind nearer surfaces (at least the
            largest blur radius you will render).
    """

    def __init__(
        self, radiance: np.ndarray, depth_m: np.ndarray, *, max_layer_dpt: float = 0.05, occlusion_margin_px: int = 16
    ) -> None:
        if radiance.ndim == 2:
            radiance = radiance[..., None]
        if radiance.shape[:2] != depth_m.shape:
            raise InputError(f"scene: image {radiance.shape[:2]} and depth {depth_m.shape} differ in size")
        if radiance.shape[2] > 3:
            raise InputError(f"scene: at most 3 colour channels, got {radiance.shape[2]}")
        if not np.all(np.isfinite(depth_m)) or np.any(depth_m <= 0):
            raise InputError("scene: depth must be finite and > 0 everywhere")
        self.height, self.width, self.channels = radiance.shape
        h, w, c = radiance.shape
        obj_dpt = (1.0 / depth_m.astype(np.float64)).astype(np.float32)
        lo, hi = float(obj_dpt.min()), float(obj_dpt.max())
        n_layers = max(2, int(math.ceil((hi - lo) / max_layer_dpt)) + 1)
        self.layer_dpt = np.linspace(lo, hi, n_layers) if hi > lo else np.array([lo, lo + 1e-6])
        pos = (obj_dpt - self.layer_dpt[0]) / max(self.layer_dpt[1] - self.layer_dpt[0], 1e-12)
        idx = np.clip(np.floor(pos).astype(np.int64), 0, len(self.layer_dpt) - 2)
        frac = np.clip(pos - idx, 0.0, 1.0).astype(np.float32)
        # the layer that occludes for a pixel: the farther of its pair, unless all weight is nearer
        occluder = idx + (frac >= 1.0 - 1e-6)
        radiance = radiance.astype(np.float32)
        margin = self.occlusion_margin_px = max(0, int(occlusion_margin_px))
        grow = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * margin + 1, 2 * margin + 1)) if margin else None
        # channels per layer: C premultiplied colour, coverage, occlusion
        self._layers: list[tuple[float, tuple[int, int, int, int], np.ndarray]] = []
        for layer in range(len(self.layer_dpt)):
            weight = (np.where(idx == layer, 1.0 - frac, 0.0) + np.where(idx == layer - 1, frac, 0.0)).astype(np.float32)
            occludes = occluder == layer
            own = (weight > 1e-6) | occludes
            if not own.any():
                continue
            planes = np.zeros((h, w, c + 2), np.float32)
            planes[..., :c] = radiance * weight[..., None]
            planes[..., c] = weight
            planes[..., c + 1] = occludes
            if grow is not None:
                hidden = (occluder > layer) & ~own  # nearer surfaces that may hide this layer
                extend = hidden & (cv2.dilate(own.astype(np.uint8), grow) > 0)
                if extend.any():
                    fill = _fill_from(radiance, weight)
                    planes[extend, :c] = fill[extend]
                    planes[extend, c] = 1.0
                    planes[extend, c + 1] = 1.0
                support = own | extend
            else:
                support = own
            ys, xs = np.nonzero(support)
            y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
            self._layers.append((float(self.layer_dpt[layer]), (y0, y1, x0, x1), np.ascontiguousarray(planes[y0:y1, x0:x1])))
        logger.debug("layered scene: %d layers with content of %d", len(self._layers), len(self.layer_dpt))

    @property
    def n_layers(self) -> int:
        return len(self._layers)

    def render(self, focus_dpt: float, *, blur_px_per_dpt: float) -> np.ndarray:
        """Render the scene as seen through the lens focused at ``focus_dpt``.

        Returns:
            float32 ``[H, W, C]`` linear radiance.
        """
        h, w, c = self.height, self.width, self.channels
        acc = np.zeros((h, w, c + 1), np.float32)  # premultiplied colour + coverage
        for layer_dpt, (y0, y1, x0, x1), planes in self._layers:  # far (low dpt) to near
            kernel = disc_kernel(blur_px_per_dpt * abs(focus_dpt - layer_dpt))
            r = kernel.shape[0] // 2
            if r == 0:
                blurred, (by0, by1, bx0, bx1) = planes, (y0, y1, x0, x1)
            else:
                by0, by1, bx0, bx1 = max(0, y0 - r), min(h, y1 + r), max(0, x0 - r), min(w, x1 + r)
                padded = np.zeros((by1 - by0, bx1 - bx0, c + 2), np.float32)
                padded[y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0] = planes
                blurred = _filter_channels(padded, kernel)
            region = acc[by0:by1, bx0:bx1]
            region *= 1.0 - np.clip(blurred[..., c + 1 : c + 2], 0.0, 1.0)
            region += blurred[..., : c + 1]
        coverage = acc[..., c : c + 1]
        out = acc[..., :c] / np.maximum(coverage, 1e-6)
        return np.clip(out, 0.0, None)


def _fill_from(radiance: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Colours everywhere, each from the nearest pixels where ``weight`` > 0 (push-pull
    normalised convolution). ``radiance`` ``[H, W, C]``, ``weight`` ``[H, W]``."""
    num = radiance * weight[..., None]
    levels = [(num, weight)]
    while min(levels[-1][1].shape) > 4:
        n, d = levels[-1]
        levels.append((_as3(cv2.pyrDown(n)), cv2.pyrDown(d)))
    n_up, d_up = levels[-1]
    v_up = n_up / np.maximum(d_up, 1e-6)[..., None]
    if not (d_up > 0).all():
        mean = n_up.reshape(-1, n_up.shape[2]).sum(0) / max(float(d_up.sum()), 1e-6)
        v_up = np.where((d_up > 0)[..., None], v_up, mean)
    for n, d in reversed(levels[:-1]):
        v_up = _as3(cv2.resize(v_up, (n.shape[1], n.shape[0]), interpolation=cv2.INTER_LINEAR))
        a = np.clip(d * 4.0, 0.0, 1.0)[..., None]
        v_up = a * (n / np.maximum(d, 1e-6)[..., None]) + (1 - a) * v_up
    return v_up.astype(np.float32)


def _as3(a: np.ndarray) -> np.ndarray:
    """OpenCV drops a single channel axis: put it back (``[H, W]`` -> ``[H, W, 1]``)."""
    return a[..., None] if a.ndim == 2 else a


def _filter_channels(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Convolve each channel of ``[H, W, C]`` (C <= 4) with ``kernel``, reflecting at the edges.

    Callers pass a crop that extends ``r`` beyond the layer's content on every side that is
    not an image border, so reflection there only mirrors empty margin (exactly zero), while
    at an image border it mirrors the scene, as a real sensor's neighbourhood would.
    """
    return cv2.filter2D(image, cv2.CV_32F, kernel, borderType=cv2.BORDER_REFLECT)


@dataclass(frozen=True)
class SensorModel:
    """Photon shot noise, read noise, gain, full well and bit depth.

    Linear radiance 1.0 collects ``electrons_per_s`` photo-electrons per second; the ADC maps
    ``full_well_e`` to its full scale ``2**adc_bits - 1`` at 0 dB gain.
    """

    full_well_e: float = 10_000.0
    read_noise_e: float = 3.0
    electrons_per_s: float = 800_000.0
    adc_bits: int = 12
    noise: bool = True

    def expose(
        self,
        radiance: np.ndarray,
        *,
        exposure_s: float,
        gain_db: float,
        out_bits: int,
        rng: np.random.Generator,
    ) -> np.ndarray:
        """Turn linear radiance into digital numbers.

        Args:
            radiance: float32 ``[H, W]`` or ``[H, W, C]``.
            out_bits: 8 (uint8) or 16 (uint16 holding ``adc_bits`` LSB-aligned data).

        Returns:
            uint8 or uint16 array of the same shape.
        """
        electrons = radiance.astype(np.float32) * np.float32(self.electrons_per_s * exposure_s)
        if self.noise:
            # Gaussian approximation of Poisson shot noise (var = mean), plus read noise
            sigma = np.sqrt(np.maximum(electrons, 0.0) + np.float32(self.read_noise_e**2))
            electrons += sigma * rng.standard_normal(electrons.shape, dtype=np.float32)
        # the well fills up after the noise: a saturated pixel reads full scale, not full scale plus noise
        np.minimum(electrons, np.float32(self.full_well_e), out=electrons)
        full_scale = 2**self.adc_bits - 1
        dn = electrons * np.float32(full_scale / self.full_well_e * 10 ** (gain_db / 20.0))
        if out_bits == 8:
            dn *= np.float32(255.0 / full_scale)
            return np.clip(np.rint(dn), 0, 255).astype(np.uint8)
        if out_bits == 16:
            return np.clip(np.rint(dn), 0, full_scale).astype(np.uint16)
        raise InputError(f"sensor: out_bits must be 8 or 16, got {out_bits}")
