"""Tests of ``python -m capture.import_images`` (and the capture.imageio helpers it uses)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from capture.errors import InputError, OutputError
from capture.imageio import IMAGE_SUFFIXES, read_image, write_image
from capture.import_images import build_stack, collect_inputs, main
from capture.stack import FocalStack

REPO = Path(__file__).resolve().parents[1]
LEVELS = (30, 110, 190)  # mean grey level of each test image: identifies it after JPEG


def _jpegs(folder: Path, levels=LEVELS, hw=(24, 32), names=None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, level in enumerate(levels):
        img = np.full((*hw, 3), level, np.uint8)
        img[..., 2] = 255 - level  # BGR in cv2: red = 255 - level, to check the channel order
        path = folder / (names[i] if names else f"shot_{i}.jpg")
        assert cv2.imwrite(str(path), img)
        paths.append(path)
    return paths


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "capture.import_images", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


def _levels(stack: FocalStack) -> list[int]:
    """Per slice, the level of the image it came from (its blue channel; red is 255 - level)."""
    return [int(round(float(stack.images[i, ..., 2].mean()))) for i in range(stack.n_slices)]


# ---- success paths ---------------------------------------------------------------------------


def test_jpeg_far_to_near_default_subprocess(tmp_path: Path) -> None:
    paths = _jpegs(tmp_path / "in")
    out = tmp_path / "stack"
    proc = _run(*paths, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    # one line saying which file is which end (a wrong name sort scrambles depth silently)
    assert proc.stderr == ("imported 3 slices, farthest focus first: shot_0.jpg, shot_1.jpg, shot_2.jpg "
                           "(if that is the wrong way round: --order near-to-far)\n")
    st = FocalStack.read(out)
    assert sorted(p.name for p in out.iterdir()) == ["slice_00.png", "slice_01.png", "slice_02.png", "stack.yaml"]
    assert st.images.dtype == np.uint8 and st.channels == 3 and st.image_hw == (24, 32)
    assert not st.has_distances
    assert st.focus_index.tolist() == [0, 1, 2]  # first given = farthest
    for got, want in zip(_levels(st), LEVELS):
        assert abs(got - want) <= 3  # JPEG is lossy; order and RGB channel order are what matter
    assert abs(int(st.images[0, ..., 0].mean()) - (255 - LEVELS[0])) <= 3  # RGB in memory
    cap = st.meta["capture"]
    assert cap["imported_from"] == ["shot_0.jpg", "shot_1.jpg", "shot_2.jpg"]
    assert cap["imported_utc"].endswith("Z") and "T" in cap["imported_utc"]


def test_near_to_far_reverses_focus_index(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = _jpegs(tmp_path / "in")
    out = tmp_path / "stack"
    assert main([*map(str, paths), "--out", str(out), "--order", "near-to-far"]) == 0
    st = FocalStack.read(out)
    assert st.focus_index.tolist() == [2, 1, 0]  # first given = nearest = highest index
    # far to near after sorting: the last image given comes first
    levels = _levels(st.sorted_by_focus())
    assert [abs(a - b) <= 3 for a, b in zip(levels, LEVELS[::-1])] == [True] * 3
    assert capsys.readouterr().out.strip() == str(out)


def test_focus_distances(tmp_path: Path) -> None:
    paths = _jpegs(tmp_path / "in")
    out = tmp_path / "stack"
    assert main([*map(str, paths), "--out", str(out), "--focus-distances-m", "inf", "1.5", "0.3"]) == 0
    st = FocalStack.read(out)
    assert st.has_distances and st.focus_index is None
    assert st.focus_distance_m.tolist() == [math.inf, 1.5, 0.3]
    assert st.is_sorted


def test_folder_argument_sorted_by_name(tmp_path: Path) -> None:
    names = ["IMG_10.jpg", "IMG_9.jpg", "IMG_2.JPG"]  # natural order: 2, 9, 10
    _jpegs(tmp_path / "in", levels=(190, 110, 30), names=names)
    (tmp_path / "in" / "notes.txt").write_text("ignored")
    out = tmp_path / "stack"
    assert main([str(tmp_path / "in"), "--out", str(out)]) == 0
    st = FocalStack.read(out)
    assert st.meta["capture"]["imported_from"] == ["IMG_2.JPG", "IMG_9.jpg", "IMG_10.jpg"]
    assert [abs(a - b) <= 3 for a, b in zip(_levels(st), LEVELS)] == [True] * 3


def test_sixteen_bit_png_and_overwrite(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    imgs = [np.full((10, 12), v, np.uint16) for v in (1000, 40000)]
    for i, img in enumerate(imgs):
        write_image(folder / f"{i}.png", img)
    out = tmp_path / "stack"
    _jpegs(tmp_path / "other")
    assert main([str(tmp_path / "other"), "--out", str(out)]) == 0
    assert main([str(folder), "--out", str(out)]) == 2  # exists
    assert main([str(folder), "--out", str(out), "--overwrite"]) == 0
    st = FocalStack.read(out)
    assert st.images.dtype == np.uint16
    np.testing.assert_array_equal(st.images, np.stack(imgs))


# ---- bad inputs: exit 2, one stderr line, no output ------------------------------------------


def _bad_case(case: str, tmp_path: Path) -> list[str | Path]:
    paths = _jpegs(tmp_path / "in")
    out = tmp_path / "stack"
    if case == "missing_file":
        return [paths[0], tmp_path / "in" / "nope.jpg", "--out", out]
    if case == "unreadable_image":
        bad = tmp_path / "in" / "broken.png"
        bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        return [paths[0], bad, "--out", out]
    if case == "mismatched_size":
        odd = _jpegs(tmp_path / "odd", levels=(50,), hw=(25, 32))[0]
        return [*paths, odd, "--out", out]
    if case == "mismatched_channels":
        grey = tmp_path / "in" / "grey.png"
        cv2.imwrite(str(grey), np.zeros((24, 32), np.uint8))
        return [paths[0], grey, "--out", out]
    if case == "wrong_distance_count":
        return [*paths, "--out", out, "--focus-distances-m", "1", "2"]
    if case == "non_positive_distance":
        return [*paths, "--out", out, "--focus-distances-m", "2", "0", "-1"]
    if case == "not_a_number_distance":
        return [*paths, "--out", out, "--focus-distances-m", "2", "one", "3"]
    if case == "single_image":
        return [paths[0], "--out", out]
    if case == "missing_out":
        return [*paths]
    if case == "unwritable_out":
        blocker = tmp_path / "plain_file"
        blocker.write_text("x")
        return [*paths, "--out", blocker / "stack"]
    if case == "unsupported_suffix":
        txt = tmp_path / "in" / "a.txt"
        txt.write_text("x")
        return [paths[0], txt, "--out", out]
    raise AssertionError(case)


BAD = ["missing_file", "unreadable_image", "mismatched_size", "mismatched_channels",
       "wrong_distance_count", "non_positive_distance", "not_a_number_distance", "single_image",
       "missing_out", "unwritable_out", "unsupported_suffix"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_exits_2_with_one_line(tmp_path: Path, case: str) -> None:
    proc = _run(*_bad_case(case, tmp_path))
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert not (tmp_path / "stack").exists()
    assert not [p for p in tmp_path.rglob(".*") if ".tmp-" in p.name]


def test_bad_input_messages_name_the_file(tmp_path: Path) -> None:
    args = _bad_case("mismatched_size", tmp_path)
    proc = _run(*args)
    assert "shot_0.jpg" in proc.stderr  # the odd file is named (from the odd folder)
    assert str(tmp_path / "odd") in proc.stderr
    proc = _run(*_bad_case("missing_file", tmp_path))
    assert "nope.jpg" in proc.stderr


def test_existing_output_is_left_alone(tmp_path: Path) -> None:
    paths = _jpegs(tmp_path / "in")
    out = tmp_path / "stack"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    proc = _run(*paths, "--out", out)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1
    assert "--overwrite" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    # even with --overwrite a folder that is not a stack is not replaced
    proc = _run(*paths, "--out", out, "--overwrite")
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1
    assert (out / "mine.txt").read_text() == "keep"


def test_debug_shows_traceback(tmp_path: Path) -> None:
    proc = _run(tmp_path / "a.jpg", tmp_path / "b.jpg", "--out", tmp_path / "s", "--debug")
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and "error: " in proc.stderr


# ---- imageio ---------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".png", ".tif", ".tiff"])
@pytest.mark.parametrize("shape, dtype", [((5, 7), np.uint8), ((5, 7, 3), np.uint16), ((5, 7, 4), np.uint8)])
def test_imageio_round_trip_rgb_order(tmp_path: Path, suffix: str, shape, dtype) -> None:
    img = np.random.default_rng(0).integers(0, np.iinfo(dtype).max, size=shape).astype(dtype)
    path = tmp_path / f"ï{suffix}"
    write_image(path, img)
    back = read_image(path)
    assert back.dtype == dtype
    np.testing.assert_array_equal(back, img)
    if len(shape) == 3:  # the file holds BGR(A) as OpenCV writes it: red must be in channel 2
        raw = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(raw[..., 2], img[..., 0])


def test_imageio_jpeg(tmp_path: Path) -> None:
    img = np.zeros((8, 8, 3), np.uint8)
    img[..., 0] = 200  # red
    write_image(tmp_path / "r.jpg", img)
    back = read_image(tmp_path / "r.jpg")
    assert back.dtype == np.uint8 and back.shape == (8, 8, 3)
    assert back[..., 0].mean() > 180 and back[..., 2].mean() < 20
    write_image(tmp_path / "g.jpeg", np.full((8, 8), 90, np.uint8))
    assert read_image(tmp_path / "g.jpeg").shape == (8, 8)
    with pytest.raises(OutputError, match="JPEG"):
        write_image(tmp_path / "deep.jpg", np.zeros((8, 8), np.uint16))
    assert ".jpg" in IMAGE_SUFFIXES


def test_imageio_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="missing.png"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "junk.tif").write_bytes(b"II*\x00junk")
    with pytest.raises(InputError, match="junk.tif"):
        read_image(tmp_path / "junk.tif")
    with pytest.raises(OutputError, match="nowhere"):
        write_image(tmp_path / "nowhere" / "x.png", np.zeros((2, 2), np.uint8))
    with pytest.raises(OutputError, match="x.bmp"):
        write_image(tmp_path / "x.bmp", np.zeros((2, 2), np.uint8))
    with pytest.raises(OutputError, match="float32"):
        write_image(tmp_path / "f.png", np.zeros((2, 2), np.float32))


def test_written_yaml_has_no_jpeg(tmp_path: Path) -> None:
    paths = _jpegs(tmp_path / "in")
    assert main([*map(str, paths), "--out", str(tmp_path / "s")]) == 0
    doc = yaml.safe_load((tmp_path / "s" / "stack.yaml").read_text())
    assert all(s["image"].endswith(".png") for s in doc["slices"])


def test_a_folder_sorts_signed_and_decimal_positions_as_numbers(tmp_path: Path, caplog) -> None:
    folder = tmp_path / "z"
    folder.mkdir()
    names = ["z_-10um.png", "z_-5um.png", "z_0um.png", "z_5um.png", "z_10um.png"]
    for i, name in enumerate(reversed(names)):  # written in another order than the names sort
        write_image(folder / name, np.full((8, 8), 10 * i, np.uint8))
    assert [p.name for p in collect_inputs([str(folder)])] == names
    assert not [r for r in caplog.records if "numbered series" in r.getMessage()]  # signs are part of the numbers
    for name in ("f1.5.png", "f1.25.png", "f2.png"):
        write_image(tmp_path / name, np.zeros((8, 8), np.uint8))
    sub = tmp_path / "dec"
    sub.mkdir()
    for name in ("f1.5.png", "f1.25.png", "f2.png"):
        (tmp_path / name).rename(sub / name)
    assert [p.name for p in collect_inputs([str(sub)])] == ["f1.25.png", "f1.5.png", "f2.png"]
    stamps = tmp_path / "stamps"  # 17-digit time stamps: exact, not rounded to floats that tie
    stamps.mkdir()
    for name in ("cam_20241128123456002.png", "cam_20241128123456001.png"):
        write_image(stamps / name, np.zeros((8, 8), np.uint8))
    assert [p.name for p in collect_inputs([str(stamps)])] == ["cam_20241128123456001.png", "cam_20241128123456002.png"]


def test_a_folder_reads_bmp_and_webp_and_names_what_it_leaves_out_or_doubts(tmp_path: Path, caplog) -> None:
    import cv2

    folder = tmp_path / "mixed"
    folder.mkdir()
    for i, suffix in enumerate((".png", ".bmp", ".png", ".webp")):
        cv2.imwrite(str(folder / f"s{i}{suffix}"), np.full((8, 8, 3), 40 * i, np.uint8), [cv2.IMWRITE_WEBP_QUALITY, 101])
    (folder / "s9.cr2").write_bytes(b"raw")  # a camera raw: cannot be read
    cv2.imwrite(str(folder / "expected.png"), np.zeros((8, 8, 3), np.uint8))  # a fused reference left among the slices
    with caplog.at_level("WARNING", logger="capture.import_images"):
        paths = collect_inputs([str(folder)])
    assert [p.name for p in paths] == ["expected.png", "s0.png", "s1.bmp", "s2.png", "s3.webp"]
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "left out 1 file(s) that are not PNG, TIFF, JPEG, BMP or WebP: s9.cr2" in messages
    assert "expected.png do(es) not fit the numbered series of the other 4 files" in messages
    stack = build_stack(paths)
    assert stack.n_slices == 5 and int(stack.images[2].mean()) == 40  # the BMP, read


def test_a_multi_page_tiff_z_stack_is_imported_page_by_page(tmp_path: Path) -> None:
    """Fiji's and Micro-Manager's usual export: one TIFF, one page per focus. It was refused as
    "got 1" image (one file), and several such files gave their first pages only."""
    import tifffile

    planes = np.stack([np.full((12, 16), 20 * (i + 1), np.uint16) for i in range(5)])
    tifffile.imwrite(tmp_path / "zstack.tif", planes, imagej=True, metadata={"axes": "ZYX"})
    out = tmp_path / "stack"
    proc = _run(tmp_path / "zstack.tif", "--out", out)
    assert proc.returncode == 0, proc.stderr
    st = FocalStack.read(out)
    assert st.n_slices == 5 and st.images.dtype == np.uint16 and st.image_hw == (12, 16)
    assert [int(st.images[i].mean()) for i in range(5)] == [20, 40, 60, 80, 100]  # page order = far to near
    assert "zstack.tif (page 1), zstack.tif (page 2)" in proc.stderr
    tifffile.imwrite(tmp_path / "czyx.tif", np.zeros((3, 2, 12, 16), np.uint8), imagej=True, metadata={"axes": "ZCYX"})
    proc = _run(tmp_path / "czyx.tif", "--out", tmp_path / "other")
    assert proc.returncode == 2 and "a TIFF with axes ZCYX" in proc.stderr and "split its channels" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1


def test_a_tiff_whose_pages_differ_in_size_is_refused_not_cut_short(tmp_path: Path) -> None:
    """tifffile puts pages of one shape in a series: a page of another size was left out of the
    stack without a word, and the recorded page names were off by one after it."""
    import tifffile

    path = tmp_path / "mixed.tif"
    with tifffile.TiffWriter(path) as tif:
        for i in range(5):
            tif.write(np.full((50, 40) if i == 3 else (40, 50), 10 * i, np.uint8))
    with pytest.raises(InputError, match=r"mixed.tif: its pages differ in size or kind \(.*page 4: 50x40"):
        build_stack([path])


@pytest.mark.parametrize("focus", ["distances", "indices"])
def test_our_own_ome_tiff_comes_back_with_its_focus_values(tmp_path: Path, focus: str) -> None:
    """The continuous mode's OME-TIFF writes planes nearest first with the focus values in its
    annotation; re-imported, it took page order as far-to-near and reversed the stack."""
    from rig.sinks import OmeTiffSink

    images = [np.full((12, 16), 30 * (i + 1), np.uint8) for i in range(4)]
    if focus == "distances":
        stack = FocalStack(images, focus_distance_m=[2.0, 0.5, 1.0, 0.4])
    else:
        stack = FocalStack(images, focus_index=[0, 3, 1, 2])
    sink = OmeTiffSink(tmp_path)
    sink.write(0, stack, None)
    sink.close()
    (ome,) = (tmp_path / "stacks").glob("*.ome.tif")
    back = build_stack([ome])
    assert back.meta["capture"]["focus_values_from"].startswith("the file's own annotation")
    if focus == "distances":
        assert back.focus_distance_m is not None
        pairs = sorted(zip(back.focus_distance_m.tolist(), (int(im.mean()) for im in back.images)))
        assert pairs == [(0.4, 120), (0.5, 60), (1.0, 90), (2.0, 30)]
    else:
        assert back.focus_index is not None
        pairs = sorted(zip(back.focus_index.tolist(), (int(im.mean()) for im in back.images)))
        assert pairs == [(0, 30), (1, 90), (2, 120), (3, 60)]


def _grey_alpha_png(path: Path, grey: np.ndarray) -> None:
    """A grey + alpha (colour type 4) 8-bit PNG, written by hand: OpenCV cannot write one."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    h, w = grey.shape
    rows = b"".join(b"\x00" + np.stack([grey[y], np.full(w, 255, np.uint8)], axis=1).tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 4, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_a_grey_and_alpha_png_is_read_as_grey(tmp_path: Path) -> None:
    """OpenCV expands grey + alpha to four channels: such slices became an RGBA stack (and an RGBA
    all-in-focus image) although the format knows grey and colour only."""
    grey = np.tile(np.arange(12, dtype=np.uint8) * 20, (10, 1))
    _grey_alpha_png(tmp_path / "s0.png", grey)
    image = read_image(tmp_path / "s0.png")
    assert image.shape == (10, 12) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, grey)
    _grey_alpha_png(tmp_path / "s1.png", grey // 2)
    stack = build_stack([tmp_path / "s0.png", tmp_path / "s1.png"])
    assert stack.channels == 1
