"""The reconstruction output folder (FOCAL_STACK_FORMAT.md, "Reconstruction output"): channel
order of all_in_focus.png, depth.png's millimetres and what it cannot hold, result.yaml's
device, and --overwrite replacing only a result folder."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import yaml

from capture.errors import OutputError
from reconstruct.result import DepthResult, png16_millimetres, write_result

H, W = 12, 16


def _result(depth_m: np.ndarray | None = None, *, aif: np.ndarray | None = None) -> DepthResult:
    depth = np.linspace(0.5, 2.0, H * W, dtype=np.float32).reshape(H, W) if depth_m is None else depth_m
    return DepthResult(
        depth=depth.astype(np.float32),
        confidence=np.full((H, W), 0.9, np.float32),
        all_in_focus=np.zeros((H, W, 3), np.uint8) if aif is None else aif,
        depth_unit="metre",
        method="classical",
        backend="numpy",
        device="cpu",
        slices=4,
        aligned=False,
    )


@pytest.mark.parametrize("channels", [3, 4])
def test_all_in_focus_png_keeps_rgb_order_with_and_without_alpha(tmp_path, channels):
    aif = np.zeros((H, W, channels), np.uint8)
    aif[..., 0], aif[..., 2] = 200, 10  # red high, blue low
    if channels == 4:
        aif[..., 3] = 255
    out = write_result(_result(aif=aif), tmp_path / "r")
    back = cv2.imread(str(out / "all_in_focus.png"), cv2.IMREAD_UNCHANGED)  # OpenCV reads BGR(A)
    assert back.shape == (H, W, channels)
    assert back[0, 0, 2] == 200 and back[0, 0, 0] == 10


def test_depth_png_writes_unrepresentable_depth_as_no_depth_and_counts_it(tmp_path):
    depth = np.full((H, W), 1.25, np.float32)
    depth[0, :4] = np.inf  # a slice focused at infinity answered here
    depth[1, :3] = 100.0  # beyond 65.535 m
    depth[2, :2] = np.nan  # no answer
    depth[4, :5] = 0.0004  # 0.4 mm: rounds to 0 mm, which reads as no depth
    mm, beyond, below = png16_millimetres(depth)
    assert beyond == 7 and below == 5
    assert (mm[0, :4] == 0).all() and (mm[1, :3] == 0).all() and (mm[2, :2] == 0).all() and (mm[4, :5] == 0).all()
    assert (mm[3] == 1250).all() and (mm[4, 5:] == 1250).all() and (mm[5:] == 1250).all()
    out = write_result(_result(depth), tmp_path / "r")
    png = cv2.imread(str(out / "depth.png"), cv2.IMREAD_UNCHANGED)
    assert png.dtype == np.uint16 and (png == mm).all()
    doc = yaml.safe_load((out / "result.yaml").read_text())
    assert doc["png16_beyond_range_pixels"] == 7 and doc["png16_below_range_pixels"] == 5 and doc["png16_scale_m"] == 0.001
    npy = np.load(out / "depth.npy")
    assert np.isinf(npy[0, :4]).all() and (npy[1, :3] == 100.0).all()  # depth.npy keeps the values
    # the count is this write's, not the result's: written again without depth.png, it is gone
    result = _result(depth)
    write_result(result, tmp_path / "a")
    assert "png16_beyond_range_pixels" not in result.extra
    again = yaml.safe_load((write_result(result, tmp_path / "b", png16=False) / "result.yaml").read_text())
    assert "png16_beyond_range_pixels" not in again and "png16_scale_m" not in again


def test_result_yaml_device_is_the_device_alone(tmp_path):
    doc = yaml.safe_load((write_result(_result(), tmp_path / "r") / "result.yaml").read_text())
    assert doc["device"] == "cpu" and doc["backend"] == "numpy"


def test_overwrite_replaces_a_result_but_refuses_any_other_folder(tmp_path):
    out = write_result(_result(), tmp_path / "r")
    with pytest.raises(OutputError, match="already exists"):
        write_result(_result(), out)
    write_result(_result(np.full((H, W), 3.0, np.float32)), out, overwrite=True)
    assert float(np.load(out / "depth.npy")[0, 0]) == 3.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # no temporary or old folder left

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("lab notebook")
    with pytest.raises(OutputError, match="not a reconstruction result"):
        write_result(_result(), notes, overwrite=True)
    assert (notes / "notes.txt").read_text() == "lab notebook"
    (tmp_path / "empty").mkdir()
    write_result(_result(), tmp_path / "empty", overwrite=True)  # an empty folder is fine
    assert (tmp_path / "empty" / "result.yaml").is_file()


def test_a_failed_overwrite_keeps_the_old_result(tmp_path, monkeypatch):
    out = write_result(_result(), tmp_path / "r")
    import reconstruct.result as result_mod

    def full_disk(path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(result_mod, "fsync_file", full_disk)
    with pytest.raises(OutputError, match="No space left"):
        write_result(_result(np.full((H, W), 3.0, np.float32)), out, overwrite=True)
    assert float(np.load(out / "depth.npy")[0, 0]) == 0.5  # the old result, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_the_preview_shows_infinity_as_far_and_only_nan_as_no_depth() -> None:
    """Depth +inf (a slice focused at infinity) was painted grey and counted as 'no depth'."""
    from reconstruct.preview import depth_preview

    depth = np.full((40, 60), 1.0, np.float32)
    depth[:, 40:] = 3.0
    depth[:10, :20] = np.inf
    depth[30:, :20] = np.nan
    img = depth_preview(depth)[:40]
    grey = (img == 128).all(axis=-1)
    assert grey[30:, :20].all() and not grey[:10, :20].any()
    assert (img[5, 5] == img[5, 50]).all()  # infinity in the far colour


def test_depth_is_also_written_as_a_float32_tiff_for_image_tools(tmp_path) -> None:
    """depth.png holds whole millimetres (the format's contract): a 0.8 mm relief at 50 mm is two
    grey levels there; depth.tif keeps every value, NaN included, and Fiji opens it."""
    import tifffile

    from reconstruct.result import DepthResult, write_result

    depth = np.linspace(0.0500, 0.0508, 12, dtype=np.float32).reshape(3, 4)
    depth[0, 0] = np.nan
    res = DepthResult(depth=depth, confidence=np.ones((3, 4), np.float32), all_in_focus=np.zeros((3, 4), np.uint8),
                      depth_unit="metre", method="classical", backend="numpy", device="cpu", slices=5, aligned=False)
    out = write_result(res, tmp_path / "r", png16=True)
    tif = tifffile.imread(out / "depth.tif")
    assert tif.dtype == np.float32 and tif.shape == (3, 4)
    np.testing.assert_array_equal(tif, depth)  # NaN where NaN, every value kept
    assert len(np.unique(cv2.imread(str(out / "depth.png"), cv2.IMREAD_UNCHANGED)[np.isfinite(depth)])) <= 2


def test_the_preview_colours_the_near_end_red_with_or_without_focus_distances() -> None:
    """Metric depth is small near; a focus index is large near (it grows toward the near end):
    the same scene came out with reversed colours depending on whether distances were given."""
    from reconstruct.preview import depth_preview

    ramp_m = np.tile(np.linspace(0.5, 2.0, 64, dtype=np.float32), (16, 1))  # near on the left
    ramp_index = np.tile(np.linspace(9.0, 0.0, 64, dtype=np.float32), (16, 1))  # near (high index) on the left
    for depth, unit in ((ramp_m, "m"), (ramp_index, "focus index")):
        rgb = depth_preview(depth, unit=unit)
        left, right = rgb[8, 2].astype(int), rgb[8, 61].astype(int)
        assert left[0] > left[2] and right[2] > right[0], (unit, left, right)  # red near, blue far


def test_the_preview_invents_no_range_where_nothing_has_a_depth() -> None:
    """An all-NaN depth was labelled '0 m' and '1 m' (an invented range), and on a narrow
    picture the labels overprinted each other."""
    from reconstruct.preview import depth_preview

    img = depth_preview(np.full((60, 200), np.nan, np.float32))
    bar = img[60:]
    assert not (bar == 255).all(axis=-1).any()  # no white range labels, only the grey note
    assert (bar == 200).all(axis=-1).any()
    for width in (50, 12):  # narrow pictures: drawn without error, labels dropped rather than overlapping
        depth = np.tile(np.linspace(0.5, 2.0, width, dtype=np.float32), (30, 1))
        assert depth_preview(depth).shape == (30 + 28, width, 3)


def test_the_preview_says_when_the_colours_are_clipped(monkeypatch) -> None:
    """The colours span the 1st-99th percentile: with depths beyond, the ends read '<=' / '>='."""
    from reconstruct import preview

    drawn: list[str] = []
    real = preview.cv2.putText
    monkeypatch.setattr(preview.cv2, "putText", lambda img, text, *a, **k: (drawn.append(text), real(img, text, *a, **k))[1])
    depth = np.tile(np.linspace(0.5, 2.0, 400, dtype=np.float32), (40, 1))
    preview.depth_preview(depth)
    assert drawn[0].startswith("<=") and drawn[1].startswith(">=")
    drawn.clear()
    preview.depth_preview(np.where(depth < 1.0, 0.6, 1.8).astype(np.float32))  # two values: nothing beyond them
    assert not drawn[0].startswith("<") and not drawn[1].startswith(">")


def test_the_preview_of_a_depth_all_at_infinity_shows_no_invented_range(monkeypatch) -> None:
    from reconstruct import preview

    drawn: list[str] = []
    real = preview.cv2.putText
    monkeypatch.setattr(preview.cv2, "putText", lambda img, text, *a, **k: (drawn.append(text), real(img, text, *a, **k))[1])
    preview.depth_preview(np.full((40, 300), np.inf, np.float32))
    assert drawn == ["all at infinity"]
