"""Tests of capture.stack: the FocalStack type and the focal-stack/1 folder format."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from capture import stack as stack_mod
from capture.errors import OutputError, StackFormatError
from capture.stack import FORMAT, FocalStack, read_stack, write_stack

RNG = np.random.default_rng(1234)


def _images(n: int = 4, hw: tuple[int, int] = (12, 16), channels: int = 1, dtype=np.uint8,
            maxval: int | None = None) -> np.ndarray:
    top = maxval if maxval is not None else np.iinfo(dtype).max
    shape = (n, *hw) if channels == 1 else (n, *hw, channels)
    return RNG.integers(0, top + 1, size=shape, dtype=np.int64).astype(dtype)


def _assert_same(a: FocalStack, b: FocalStack) -> None:
    assert a.images.dtype == b.images.dtype
    assert a.images.shape == b.images.shape
    np.testing.assert_array_equal(a.images, b.images)
    if a.has_distances:
        np.testing.assert_array_equal(a.focus_distance_m, b.focus_distance_m)
        assert b.focus_index is None
    else:
        np.testing.assert_array_equal(a.focus_index, b.focus_index)
        assert b.focus_distance_m is None
    assert a.slice_meta == b.slice_meta
    assert a.meta == b.meta
    assert a.image_names == b.image_names


def _write_raw(folder: Path, doc: dict, images: dict[str, np.ndarray]) -> Path:
    """Write a stack folder by hand (to test the reader against arbitrary content)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in images.items():
        assert cv2.imwrite(str(folder / name), image)
    (folder / "stack.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return folder


def _valid_raw(folder: Path, n: int = 3, hw: tuple[int, int] = (8, 10)) -> tuple[dict, dict]:
    names = [f"s{i}.png" for i in range(n)]
    doc = {"format": FORMAT,
           "slices": [{"image": nm, "focus_distance_m": 1.0 + i} for i, nm in enumerate(names)]}
    images = {nm: np.full(hw, 10 * i, np.uint8) for i, nm in enumerate(names)}
    return doc, images


# ---- round trips --------------------------------------------------------------------------

ROUND_TRIPS = {
    "grey_u8": dict(images=_images(), focus_distance_m=[3.0, 2.0, 1.0, 0.5]),
    "rgb_u8": dict(images=_images(channels=3), focus_distance_m=[0.4, 0.8, 1.6, 3.2]),
    "rgba_u16_tiff": dict(images=_images(channels=4, dtype=np.uint16), focus_index=[0, 1, 2, 3],
                          image_names=["a.tif", "b.tiff", "c.tif", "d.tif"]),
    "grey_u16_12bit": dict(images=_images(dtype=np.uint16, maxval=4095), focus_distance_m=[4, 3, 2, 1],
                           meta={"significant_bits": 12}),
    "with_inf": dict(images=_images(n=3), focus_distance_m=[math.inf, 1.5, 0.25]),
    "focus_index": dict(images=_images(n=5, channels=3), focus_index=[4, 0, 3, 1, 2]),
    "metadata": dict(
        images=_images(n=2), focus_distance_m=[np.float64(1.0), np.float32(2.0)],
        slice_meta=[
            {"actuator_value": np.int32(1200), "actuator_unit": "step", "timestamp_s": 0.125,
             "timestamp_source": "camera", "exposure_s": np.float32(0.01), "gain_db": 0.0,
             "lens_temperature_c": 31.5, "alignment": np.eye(2, 3), "vendor_blob": {"k": [1, 2]}},
            {"actuator_value": 1500, "mystery": None},
        ],
        meta={"optics": {"focal_length_mm": 25.0, "f_number": 2.8}, "datum": "thin_lens",
              "capture": {"camera": "sim", "started_utc": "2026-11-26T12:00:00Z"},
              "future_key": {"nested": [1.5, "x"]}},
    ),
}


@pytest.mark.parametrize("case", sorted(ROUND_TRIPS))
def test_round_trip(tmp_path: Path, case: str) -> None:
    stack = FocalStack(**ROUND_TRIPS[case])
    written = stack.write(tmp_path / "st")
    assert written == tmp_path / "st"
    back = FocalStack.read(written)
    _assert_same(stack, back)
    # and once more through the aliases: re-writing keeps everything
    again = read_stack(write_stack(back, tmp_path / "st2"))
    _assert_same(stack, again)


def test_written_yaml_is_plain(tmp_path: Path) -> None:
    stack = FocalStack(**ROUND_TRIPS["metadata"])
    text = (stack.write(tmp_path / "st") / "stack.yaml").read_text()
    doc = yaml.safe_load(text)
    assert doc["format"] == FORMAT
    assert list(doc)[:2] == ["format", "slices"]
    assert list(doc["slices"][0])[:2] == ["image", "focus_distance_m"]
    assert doc["slices"][0]["exposure_s"] == 0.01
    assert "!!python" not in text and "numpy" not in text
    inf = FocalStack(**ROUND_TRIPS["with_inf"]).write(tmp_path / "inf")
    assert "focus_distance_m: .inf" in (inf / "stack.yaml").read_text()


def test_default_image_names() -> None:
    assert FocalStack(_images(n=3), focus_index=[0, 1, 2]).image_names == [
        "slice_00.png", "slice_01.png", "slice_02.png"]
    names = FocalStack(_images(n=101, hw=(2, 2)), focus_index=list(range(101))).image_names
    assert names[0] == "slice_000.png" and names[-1] == "slice_100.png"


def test_unknown_keys_preserved_read_write_read(tmp_path: Path) -> None:
    doc, images = _valid_raw(tmp_path / "in")
    doc["slices"][1]["vendor_focus_code"] = 77
    doc["slices"][2]["notes"] = {"who": "me", "tags": ["a", "b"]}
    doc["rig_extension"] = {"version": 3, "values": [0.5, 1.5]}
    doc["significant_bits"] = 8
    _write_raw(tmp_path / "in", doc, images)
    first = FocalStack.read(tmp_path / "in")
    assert first.slice_meta[1] == {"vendor_focus_code": 77}
    assert first.meta["rig_extension"] == {"version": 3, "values": [0.5, 1.5]}
    second = FocalStack.read(first.write(tmp_path / "out"))
    _assert_same(first, second)
    rewritten = yaml.safe_load((tmp_path / "out" / "stack.yaml").read_text())
    assert rewritten["slices"][2]["notes"] == {"who": "me", "tags": ["a", "b"]}
    assert rewritten["rig_extension"]["version"] == 3


def test_read_keeps_file_order_and_accepts_jpeg(tmp_path: Path) -> None:
    folder = tmp_path / "jp"
    folder.mkdir()
    for i in range(3):
        assert cv2.imwrite(str(folder / f"{i}.jpg"), np.full((8, 8, 3), 60 * i, np.uint8))
    doc = {"format": FORMAT, "slices": [{"image": f"{i}.jpg", "focus_index": i} for i in (2, 0, 1)]}
    (folder / "stack.yaml").write_text(yaml.safe_dump(doc))
    st = FocalStack.read(folder)
    assert st.images.dtype == np.uint8 and st.channels == 3
    assert st.focus_index.tolist() == [2, 0, 1]
    assert not st.is_sorted
    # re-writing never produces JPEG
    out = st.write(tmp_path / "out")
    assert sorted(p.suffix for p in out.iterdir()) == [".png", ".png", ".png", ".yaml"]
    assert FocalStack.read(out).focus_index.tolist() == [2, 0, 1]


def test_non_ascii_path(tmp_path: Path) -> None:
    stack = FocalStack(_images(n=2, channels=3), focus_distance_m=[1.0, 2.0], image_names=["ä.png", "ö.png"])
    back = FocalStack.read(stack.write(tmp_path / "stäck ü"))
    _assert_same(stack, back)


# ---- focus order -----------------------------------------------------------------------------


def test_focus_dpt_and_sorting_distances() -> None:
    st = FocalStack(_images(n=4), focus_distance_m=[0.5, math.inf, 2.0, 1.0],
                    slice_meta=[{"k": i} for i in range(4)])
    np.testing.assert_allclose(st.focus_dpt, [2.0, 0.0, 0.5, 1.0])
    assert st.has_distances and not st.is_sorted
    s = st.sorted_by_focus()
    assert s.is_sorted
    assert s.focus_distance_m.tolist() == [math.inf, 2.0, 1.0, 0.5]
    assert [m["k"] for m in s.slice_meta] == [1, 2, 3, 0]
    np.testing.assert_array_equal(s.images, st.images[[1, 2, 3, 0]])
    assert s.image_names == [st.image_names[i] for i in (1, 2, 3, 0)]


def test_any_slice_order_sorts_to_the_same_stack(tmp_path: Path) -> None:
    n = 6
    imgs = _images(n=n, channels=3)
    dist = np.array([5.0, 3.0, 2.0, 1.0, 0.5, 0.25])  # far to near: already sorted
    ordered = FocalStack(imgs, focus_distance_m=dist, slice_meta=[{"i": i} for i in range(n)],
                         image_names=[f"z{i}.png" for i in range(n)], meta={"datum": "thin_lens"})
    assert ordered.is_sorted
    for seed in range(3):
        perm = np.random.default_rng(seed).permutation(n)
        shuffled = FocalStack(imgs[perm], focus_distance_m=dist[perm],
                              slice_meta=[{"i": int(i)} for i in perm],
                              image_names=[f"z{i}.png" for i in perm], meta={"datum": "thin_lens"})
        _assert_same(ordered, shuffled.sorted_by_focus())
        # and through the folder format: reading keeps the shuffled order, sorting restores it
        back = FocalStack.read(shuffled.write(tmp_path / f"shuf{seed}"))
        assert back.image_names == shuffled.image_names
        _assert_same(ordered, back.sorted_by_focus())


def test_sorting_focus_index_is_stable() -> None:
    st = FocalStack(_images(n=4), focus_index=[3, 1, 1, 0], slice_meta=[{"i": i} for i in range(4)])
    s = st.sorted_by_focus()
    assert s.focus_index.tolist() == [0, 1, 1, 3]
    assert [m["i"] for m in s.slice_meta] == [3, 1, 2, 0]
    assert not st.has_distances
    np.testing.assert_array_equal(st.focus_dpt, [3.0, 1.0, 1.0, 0.0])


# ---- float views ------------------------------------------------------------------------------


def test_as_float_uses_significant_bits() -> None:
    imgs = np.zeros((2, 2, 2), np.uint16)
    imgs[0, 0, 0] = 4095
    imgs[1, 0, 0] = 2048
    f = FocalStack(imgs, focus_index=[0, 1], meta={"significant_bits": 12}).as_float()
    assert f.dtype == np.float32
    assert f[0, 0, 0] == pytest.approx(1.0) and f[1, 0, 0] == pytest.approx(2048 / 4095)
    g = FocalStack(imgs, focus_index=[0, 1]).as_float()
    assert g[0, 0, 0] == pytest.approx(4095 / 65535)


def test_to_grey_float_bt601_ignores_alpha() -> None:
    imgs = np.zeros((2, 1, 3, 4), np.uint8)
    imgs[:, 0, 0] = [255, 0, 0, 0]
    imgs[:, 0, 1] = [0, 255, 0, 255]
    imgs[:, 0, 2] = [0, 0, 255, 17]
    g = FocalStack(imgs, focus_index=[0, 1]).to_grey_float()
    assert g.shape == (2, 1, 3) and g.dtype == np.float32
    np.testing.assert_allclose(g[0, 0], [0.299, 0.587, 0.114], atol=1e-6)
    grey = FocalStack(_images(n=2), focus_index=[0, 1])
    np.testing.assert_allclose(grey.to_grey_float(), grey.images / 255.0, atol=1e-6)


# ---- alignment --------------------------------------------------------------------------------


def test_aligned_applies_translation(tmp_path: Path) -> None:
    h, w = 20, 24
    imgs = np.zeros((2, h, w, 3), np.uint16)
    imgs[:, 5:9, 6:10] = [1000, 2000, 3000]
    tx, ty = 3, -2
    st = FocalStack(imgs, focus_distance_m=[1.0, 2.0])
    st = st.with_alignment([None, np.array([[1, 0, tx], [0, 1, ty]], np.float32)])
    assert st.has_alignment
    assert st.slice_meta[1]["alignment"] == [[1.0, 0.0, 3.0], [0.0, 1.0, -2.0]]
    st = FocalStack.read(st.write(tmp_path / "al"))  # the key survives the folder format
    al = st.aligned()
    assert al.images.dtype == np.uint16
    assert not al.has_alignment and al.meta["aligned"] is True
    np.testing.assert_array_equal(al.images[0], imgs[0])
    expected = np.zeros_like(imgs[1])
    expected[5 + ty:9 + ty, 6 + tx:10 + tx] = [1000, 2000, 3000]
    np.testing.assert_array_equal(al.images[1], expected)
    np.testing.assert_array_equal(st.images, imgs)  # the original is untouched
    assert "alignment" in st.slice_meta[1]


def test_aligned_without_alignment_is_identity() -> None:
    st = FocalStack(_images(n=3), focus_index=[0, 1, 2])
    al = st.aligned()
    np.testing.assert_array_equal(al.images, st.images)
    assert not st.has_alignment


def test_bad_alignment_rejected() -> None:
    st = FocalStack(_images(n=2), focus_index=[0, 1])
    with pytest.raises(StackFormatError, match=r"alignment\[1\]"):
        st.with_alignment([None, np.eye(3)])


# ---- constructor validation ----------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(images=_images(n=1), focus_index=[0]), "at least 2"),
        (dict(images=_images(n=2)), "exactly one"),
        (dict(images=_images(n=2), focus_index=[0, 1], focus_distance_m=[1, 2]), "exactly one"),
        (dict(images=_images(n=3), focus_distance_m=[1, 2]), "2 values for 3"),
        (dict(images=_images(n=2), focus_distance_m=[1, -2]), r"focus_distance_m\[1\]: must be > 0"),
        (dict(images=_images(n=2), focus_distance_m=[0, 1]), r"focus_distance_m\[0\]: must be > 0"),
        (dict(images=_images(n=2), focus_distance_m=[float("nan"), 1]), "must be > 0"),
        (dict(images=_images(n=2), focus_index=[0, 1.5]), r"focus_index\[1\]"),
        (dict(images=_images(n=2).astype(np.float32), focus_index=[0, 1]), "uint8 or uint16"),
        (dict(images=[np.zeros((4, 4), np.uint8), np.zeros((4, 5), np.uint8)], focus_index=[0, 1]), r"images\[1\]"),
        (dict(images=_images(n=2), focus_index=[0, 1], image_names=["a.png", "a.png"]), "duplicate"),
        (dict(images=_images(n=2), focus_index=[0, 1], image_names=["a.png", "../b.png"]), "relative"),
        (dict(images=_images(n=2), focus_index=[0, 1], image_names=["a.png", "b.bmp"]), "unsupported"),
        (dict(images=_images(n=2), focus_index=[0, 1], slice_meta=[{}, {"image": "x"}]), "reserved"),
        (dict(images=_images(n=2), focus_index=[0, 1], meta={"significant_bits": 12}), "significant_bits"),
    ],
)
def test_constructor_rejects(kwargs: dict, match: str) -> None:
    with pytest.raises(StackFormatError, match=match):
        FocalStack(**kwargs)


# ---- reader validation: every error names the file and the key ------------------------------


def test_read_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(StackFormatError, match="nope"):
        FocalStack.read(tmp_path / "nope")


def test_read_missing_stack_yaml(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(StackFormatError) as info:
        FocalStack.read(tmp_path / "empty")
    assert str(tmp_path / "empty" / "stack.yaml") in str(info.value)


def _mutate(case: str, doc: dict, images: dict, folder: Path) -> tuple[str, str]:
    """Break a valid stack in one way; return (file named, key named) expected in the error."""
    yaml_file = str(folder / "stack.yaml")
    if case == "format":
        doc["format"] = "focal-stack/2"
        return yaml_file, "format"
    if case == "no_format":
        del doc["format"]
        return yaml_file, "format"
    if case == "missing_image_file":
        del images["s1.png"]
        return str(folder / "s1.png"), "slices[1].image"
    if case == "undecodable_image":
        images["s2.png"] = None
        return str(folder / "s2.png"), "slices[2].image"
    if case == "mismatched_size":
        images["s2.png"] = np.zeros((9, 10), np.uint8)
        return str(folder / "s2.png"), "slices[2].image"
    if case == "mismatched_channels":
        images["s1.png"] = np.zeros((8, 10, 3), np.uint8)
        return str(folder / "s1.png"), "slices[1].image"
    if case == "mismatched_depth":
        images["s1.png"] = np.zeros((8, 10), np.uint16)
        return str(folder / "s1.png"), "slices[1].image"
    if case == "mixed_focus_keys":
        doc["slices"][2] = {"image": "s2.png", "focus_index": 2}
        return yaml_file, "slices[2].focus_index"
    if case == "both_focus_keys":
        doc["slices"][0]["focus_index"] = 0
        return yaml_file, "slices[0]"
    if case == "negative_distance":
        doc["slices"][1]["focus_distance_m"] = -1
        return yaml_file, "slices[1].focus_distance_m: must be > 0, got -1.0"
    if case == "zero_distance":
        doc["slices"][0]["focus_distance_m"] = 0.0
        return yaml_file, "slices[0].focus_distance_m"
    if case == "text_distance":
        doc["slices"][0]["focus_distance_m"] = "far"
        return yaml_file, "slices[0].focus_distance_m"
    if case == "one_slice":
        doc["slices"] = doc["slices"][:1]
        return yaml_file, "slices"
    if case == "no_slices":
        del doc["slices"]
        return yaml_file, "slices"
    if case == "missing_image_key":
        del doc["slices"][1]["image"]
        return yaml_file, "slices[1].image"
    if case == "missing_focus_key":
        del doc["slices"][2]["focus_distance_m"]
        return yaml_file, "slices[2]"
    if case == "bad_alignment":
        doc["slices"][0]["alignment"] = [[1, 0], [0, 1]]
        return yaml_file, "slices[0].alignment"
    if case == "bad_significant_bits":
        doc["significant_bits"] = 12  # 8-bit images
        return yaml_file, "significant_bits"
    if case == "huge_focus_index":  # was an OverflowError traceback (int64)
        doc["slices"] = [{"image": sl["image"], "focus_index": i} for i, sl in enumerate(doc["slices"])]
        doc["slices"][1]["focus_index"] = 10**23
        return yaml_file, "slices[1].focus_index: 100000000000000000000000 is out of range"
    if case == "absolute_image":
        doc["slices"][0]["image"] = "/etc/passwd.png"
        return yaml_file, "slices[0].image"
    raise AssertionError(case)


READ_ERRORS = [
    "format", "no_format", "missing_image_file", "undecodable_image", "mismatched_size",
    "mismatched_channels", "mismatched_depth", "mixed_focus_keys", "both_focus_keys",
    "negative_distance", "zero_distance", "text_distance", "one_slice", "no_slices",
    "missing_image_key", "missing_focus_key", "bad_alignment", "bad_significant_bits",
    "absolute_image", "huge_focus_index",
]


@pytest.mark.parametrize("case", READ_ERRORS)
def test_read_errors_name_file_and_key(tmp_path: Path, case: str) -> None:
    folder = tmp_path / "st"
    doc, images = _valid_raw(folder)
    _write_raw(folder, doc, {k: v for k, v in images.items()})
    FocalStack.read(folder)  # valid before the mutation
    file_named, key_named = _mutate(case, doc, images, folder)
    for p in folder.iterdir():
        p.unlink()
    _write_raw(folder, doc, {k: v for k, v in images.items() if v is not None})
    if any(v is None for v in images.values()):
        for k, v in images.items():
            if v is None:
                (folder / k).write_bytes(b"not a png at all")
    with pytest.raises(StackFormatError) as info:
        FocalStack.read(folder)
    msg = str(info.value)
    assert file_named in msg, msg
    assert key_named in msg, msg
    assert "\n" not in msg


def test_read_negative_distance_message_exact(tmp_path: Path) -> None:
    folder = tmp_path / "x"
    doc, images = _valid_raw(folder, n=4)
    doc["slices"][3]["focus_distance_m"] = -1
    _write_raw(folder, doc, images)
    with pytest.raises(StackFormatError) as info:
        FocalStack.read(folder)
    assert str(info.value) == f"{folder / 'stack.yaml'}: slices[3].focus_distance_m: must be > 0, got -1.0"


def test_read_invalid_yaml(tmp_path: Path) -> None:
    folder = tmp_path / "y"
    folder.mkdir()
    (folder / "stack.yaml").write_text("format: [unclosed\n  - x: :\n")
    with pytest.raises(StackFormatError, match="not valid YAML"):
        FocalStack.read(folder)


@pytest.mark.parametrize(("appended", "match"), [
    ("format: dualfocus-stack/9\n", "not valid YAML at line .*duplicate key 'format'"),  # safe_load kept the last one
    ("evil: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
])
def test_read_refuses_repeated_keys_and_python_tags(tmp_path: Path, appended: str, match: str) -> None:
    folder = tmp_path / "z"
    doc, images = _valid_raw(folder)
    _write_raw(folder, doc, images)
    (folder / "stack.yaml").write_text((folder / "stack.yaml").read_text() + appended)
    with pytest.raises(StackFormatError, match=match):
        FocalStack.read(folder)


# ---- atomic writing ---------------------------------------------------------------------------


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_failure_mid_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = stack_mod._write_image
    calls = {"n": 0}

    def flaky(path: Path, image: np.ndarray) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        real(path, image)

    monkeypatch.setattr(stack_mod, "_write_image", flaky)
    st = FocalStack(_images(n=5), focus_index=list(range(5)))
    with pytest.raises(OutputError, match="No space left"):
        st.write(tmp_path / "out")
    assert calls["n"] == 3
    assert not (tmp_path / "out").exists()
    assert _leftovers(tmp_path) == []


def test_failure_mid_overwrite_keeps_old_stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = FocalStack(_images(n=2), focus_index=[0, 1])
    old.write(tmp_path / "out")

    def broken(path: Path, image: np.ndarray) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(stack_mod, "_write_image", broken)
    with pytest.raises(KeyboardInterrupt):
        FocalStack(_images(n=3), focus_index=[0, 1, 2]).write(tmp_path / "out", overwrite=True)
    _assert_same(old, FocalStack.read(tmp_path / "out"))
    assert _leftovers(tmp_path) == []


def test_existing_folder_needs_overwrite(tmp_path: Path) -> None:
    first = FocalStack(_images(n=2), focus_index=[0, 1])
    first.write(tmp_path / "out")
    second = FocalStack(_images(n=3, channels=3), focus_distance_m=[1, 2, 3])
    with pytest.raises(OutputError, match="already exists"):
        second.write(tmp_path / "out")
    _assert_same(first, FocalStack.read(tmp_path / "out"))
    second.write(tmp_path / "out", overwrite=True)
    _assert_same(second, FocalStack.read(tmp_path / "out"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "slice_00.png", "slice_01.png", "slice_02.png", "stack.yaml"]
    assert _leftovers(tmp_path) == []


def test_overwrite_refuses_a_folder_that_is_not_a_stack(tmp_path: Path) -> None:
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "precious.txt").write_text("keep me")
    with pytest.raises(OutputError, match="not a focal stack"):
        FocalStack(_images(n=2), focus_index=[0, 1]).write(tmp_path / "home", overwrite=True)
    assert (tmp_path / "home" / "precious.txt").read_text() == "keep me"


def test_unwritable_parent(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    target = blocker / "sub" / "stack"
    with pytest.raises(OutputError) as info:
        FocalStack(_images(n=2), focus_index=[0, 1]).write(target)
    assert str(blocker) in str(info.value)
    assert _leftovers(tmp_path) == []


def test_write_creates_missing_parents(tmp_path: Path) -> None:
    st = FocalStack(_images(n=2), focus_index=[0, 1])
    out = st.write(tmp_path / "deep" / "er" / "st")
    _assert_same(st, FocalStack.read(out))


def test_files_hold_colour_in_file_order(tmp_path: Path) -> None:
    """RGB in memory, BGR as OpenCV stores it: a red slice must be red for any other reader."""
    imgs = np.zeros((2, 4, 5, 3), np.uint16)
    imgs[..., 0] = 50000  # red
    out = FocalStack(imgs, focus_index=[0, 1]).write(tmp_path / "rgb")
    raw = cv2.imread(str(out / "slice_00.png"), cv2.IMREAD_UNCHANGED)
    assert raw.dtype == np.uint16
    assert raw[..., 2].min() == 50000 and raw[..., 0].max() == 0  # cv2 gives BGR
    np.testing.assert_array_equal(FocalStack.read(out).images, imgs)


def test_an_unquoted_iso_timestamp_keeps_its_text_through_a_rewrite(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    img = np.random.default_rng(0).integers(0, 255, (8, 8), dtype=np.uint8)
    cv2.imwrite(str(src / "a.png"), img)
    cv2.imwrite(str(src / "b.png"), img)
    (src / "stack.yaml").write_text(
        "format: focal-stack/1\n"
        "slices:\n- {image: a.png, focus_distance_m: 1.0}\n- {image: b.png, focus_distance_m: 2.0}\n"
        "capture:\n  started_utc: 2026-11-26T12:00:00Z\n  local: 2026-11-26T13:00:00+01:00\n", encoding="utf-8")
    FocalStack.read(src).write(tmp_path / "out")
    capture = yaml.safe_load((tmp_path / "out" / "stack.yaml").read_text(encoding="utf-8"))["capture"]
    assert capture["started_utc"] == "2026-11-26T12:00:00Z" and capture["local"] == "2026-11-26T13:00:00+01:00"


@pytest.mark.parametrize(("second", "says"), [("a.png", "listed twice"), ("A.png", "only in case")])
def test_a_slice_image_named_twice_is_refused_with_the_reason(tmp_path: Path, second: str, says: str) -> None:
    src = tmp_path / "in"
    src.mkdir()
    cv2.imwrite(str(src / "a.png"), np.zeros((8, 8), np.uint8))
    (src / "stack.yaml").write_text(
        f"format: focal-stack/1\nslices:\n- {{image: a.png, focus_distance_m: 1.0}}\n- {{image: {second}, focus_distance_m: 2.0}}\n",
        encoding="utf-8")
    with pytest.raises(StackFormatError, match=rf"slices\[1\]\.image: .*{says}"):
        FocalStack.read(src)


def test_big_endian_uint16_is_taken_in_native_order() -> None:
    """'>u2' frames (raw cameras, FITS) were refused as 'dtype must be uint8 or uint16, got >u2'."""
    images = (np.arange(2 * 4 * 6, dtype=np.uint16).reshape(2, 4, 6) * 1000).astype(">u2")
    stack = FocalStack(images, focus_distance_m=[1.0, 0.5])
    assert stack.images.dtype == np.uint16 and stack.images.dtype.isnative
    assert np.array_equal(stack.images, images.astype(np.uint16))


def test_slice_stream_writer_writes_a_stack_one_slice_at_a_time(tmp_path: Path) -> None:
    from capture.stack import SliceStreamWriter

    images = [np.full((8, 10), 10 * i, np.uint8) for i in range(3)]
    writer = SliceStreamWriter(tmp_path / "s")
    for i, image in enumerate(images):
        writer.add(image, {"actuator_value": float(i), "sharpness": 0.5})
    assert not (tmp_path / "s").exists()  # nothing under the final name before finish
    writer.finish(meta={"capture": {"kind": "test"}}, focus_index=[2, 1, 0])
    stack = FocalStack.read(tmp_path / "s")
    assert stack.focus_index.tolist() == [2, 1, 0] and stack.meta["capture"]["kind"] == "test"
    assert [m["actuator_value"] for m in stack.slice_meta] == [0.0, 1.0, 2.0]
    np.testing.assert_array_equal(stack.images[1], images[1])
    # a slice of another size is refused naming it; an aborted writer leaves nothing
    with pytest.raises(OutputError, match=r"slice 1 is uint8 \[4, 4\], the first was uint8 \[8, 10\]"):
        with SliceStreamWriter(tmp_path / "t") as other:
            other.add(images[0], {})
            other.add(np.zeros((4, 4), np.uint8), {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]



def test_a_temporary_folder_is_made_even_if_its_parent_just_went_away(tmp_path: Path) -> None:
    """Two runs under a new batch/ folder: one's writability probe removes the empty batch/ it
    thinks it made, just after the other made sure it exists; the other then found no parent."""
    from capture.atomic import make_sibling, probe_writable

    probe_writable(tmp_path / "batch" / "a")
    assert not (tmp_path / "batch").exists()  # the probe leaves nothing behind
    tmp = make_sibling(tmp_path / "batch" / "b", "tmp")  # its parent is gone: made again
    assert tmp.is_dir() and tmp.parent == tmp_path / "batch"
