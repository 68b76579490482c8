"""Messages of ``python -m capture.import_images`` and ``python -m reconstruct`` found in a user
walkthrough: each bad input is one ``error:`` line naming what is wrong and where, exit 2, no
traceback and nothing written; the good paths say what they did (INTERFACES.md)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from capture.errors import StackFormatError
from capture.stack import FocalStack

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 120


def _run(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)


def _one_error_line(proc: subprocess.CompletedProcess[str], *names: str | os.PathLike[str]) -> str:
    where = f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 2, where
    assert "Traceback" not in proc.stderr + proc.stdout, where
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), where
    for name in names:
        assert str(name) in lines[0], f"{name!r} not named in: {lines[0]}"
    return lines[0]


def _images(folder: Path, n: int = 4, hw: tuple[int, int] = (32, 48)) -> list[Path]:
    """``n`` textured grey PNGs (img_0.png ...) in ``folder``."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    paths = []
    for i in range(n):
        path = folder / f"img_{i}.png"
        assert cv2.imwrite(str(path), (rng.random(hw) * 255).astype(np.uint8))
        paths.append(path)
    return paths


def _stack(folder: Path, n: int = 4) -> Path:
    """A small valid stack with focus distances (2.0 m ... 0.5 m) at ``folder``."""
    rng = np.random.default_rng(2)
    images = (rng.random((n, 32, 48)) * 255).astype(np.uint8)
    return FocalStack(images, focus_distance_m=np.linspace(2.0, 0.5, n)).write(folder)


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if name in p.name)


# ---- 1. import refuses duplicate focus distances, before writing ------------------------------


def test_import_refuses_duplicate_focus_distances(tmp_path: Path) -> None:
    _images(tmp_path / "in", n=4)
    out = tmp_path / "stack"
    proc = _run("-m", "capture.import_images", tmp_path / "in", "--out", out, "--focus-distances-m", "2", "1", "2", "0.5")
    line = _one_error_line(proc, "--focus-distances-m")
    assert "same" in line and re.search(r"\b2 m\b", line) and "1, 3" in line, line
    assert _leftovers(tmp_path, "stack") == []  # nothing written, not even a temporary sibling


def test_import_refuses_all_equal_focus_distances(tmp_path: Path) -> None:
    _images(tmp_path / "in", n=4)
    out = tmp_path / "stack"
    proc = _run("-m", "capture.import_images", tmp_path / "in", "--out", out, "--focus-distances-m", "2", "2", "2", "2")
    line = _one_error_line(proc, "--focus-distances-m")
    assert "1, 2, 3, 4" in line, line
    assert _leftovers(tmp_path, "stack") == []


def test_import_still_accepts_distinct_distances_with_infinity(tmp_path: Path) -> None:
    _images(tmp_path / "in", n=3)
    out = tmp_path / "stack"
    proc = _run("-m", "capture.import_images", tmp_path / "in", "--out", out, "--focus-distances-m", "inf", "2", "0.5")
    assert proc.returncode == 0, proc.stderr
    assert FocalStack.read(out).focus_distance_m.tolist() == [np.inf, 2.0, 0.5]


# ---- 2. a missing required slice key names the unknown keys beside it -------------------------


def _retype(folder: Path, old: str, new: str) -> Path:
    doc = yaml.safe_load((folder / "stack.yaml").read_text(encoding="utf-8"))
    entry = doc["slices"][1]
    entry[new] = entry.pop(old)
    (folder / "stack.yaml").write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return folder / "stack.yaml"


def test_typo_focus_key_is_named(tmp_path: Path) -> None:
    folder = _stack(tmp_path / "s")
    yaml_file = _retype(folder, "focus_distance_m", "focus_distanse_m")
    with pytest.raises(StackFormatError) as info:
        FocalStack.read(folder)
    msg = str(info.value)
    assert str(yaml_file) in msg and "slices[1]" in msg and "missing focus_distance_m or focus_index" in msg
    assert "unknown key focus_distanse_m" in msg and "\n" not in msg


def test_typo_focus_key_is_named_on_the_command_line(tmp_path: Path) -> None:
    folder = _stack(tmp_path / "s")
    _retype(folder, "focus_distance_m", "focus_distanse_m")
    proc = _run("-m", "reconstruct", folder, "--out", tmp_path / "out", "--method", "classical")
    _one_error_line(proc, folder / "stack.yaml", "slices[1]", "focus_distanse_m")
    assert not (tmp_path / "out").exists()


def test_typo_image_key_is_named(tmp_path: Path) -> None:
    folder = _stack(tmp_path / "s")
    _retype(folder, "image", "imgae")
    with pytest.raises(StackFormatError, match=r"slices\[1\]\.image: missing.*unknown key imgae"):
        FocalStack.read(folder)


def test_unknown_slice_keys_are_still_accepted_and_kept(tmp_path: Path) -> None:
    folder = _stack(tmp_path / "s")
    doc = yaml.safe_load((folder / "stack.yaml").read_text(encoding="utf-8"))
    doc["slices"][0]["my_note"] = "kept"
    (folder / "stack.yaml").write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    assert FocalStack.read(folder).slice_meta[0]["my_note"] == "kept"


# ---- 3./7. a stack.yaml path is its folder; the summary gives total and stage times -----------


def test_reconstruct_accepts_stack_yaml(tmp_path: Path) -> None:
    folder = _stack(tmp_path / "s")
    out = tmp_path / "out"
    proc = _run("-m", "reconstruct", folder / "stack.yaml", "--out", out, "--method", "classical")
    assert proc.returncode == 0, proc.stderr
    assert (out / "result.yaml").is_file() and (out / "depth.npy").is_file()
    assert str(out) in proc.stdout


def test_reconstruct_prints_total_and_stage_times(tmp_path: Path) -> None:
    folder = _stack(tmp_path / "s")
    proc = _run("-m", "reconstruct", folder, "--out", tmp_path / "out", "--method", "classical")
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip().splitlines()[-1]
    m = re.search(r"([\d.]+) s \(read ([\d.]+), align ([\d.]+), infer ([\d.]+), write ([\d.]+) s\)", line)
    assert m, line
    total, *stages = map(float, m.groups())
    assert total >= max(stages)


def test_reconstruct_refuses_another_file_naming_it(tmp_path: Path) -> None:
    other = tmp_path / "notes.txt"
    other.write_text("x", encoding="utf-8")
    line = _one_error_line(_run("-m", "reconstruct", other, "--out", tmp_path / "out"), other)
    assert "not a focal-stack folder" in line and "no such" not in line
    assert not (tmp_path / "out").exists()


# ---- 4. a folder of plain images points at the import tool ------------------------------------


def test_reconstruct_on_a_folder_of_images_hints_the_import(tmp_path: Path) -> None:
    _images(tmp_path / "photos")
    proc = _run("-m", "reconstruct", tmp_path / "photos", "--out", tmp_path / "out")
    line = _one_error_line(proc, tmp_path / "photos" / "stack.yaml")
    assert f"python -m capture.import_images {tmp_path / 'photos'} --out STACK_DIR" in line, line
    assert "--focus-distances-m" in line and "--order" in line
    assert not (tmp_path / "out").exists()


# ---- 5. precision refused on the CPU names this command's flag --------------------------------


def test_reconstruct_fp16_on_the_cpu_names_the_flag(tmp_path: Path) -> None:
    # conftest hides any GPU from this process and its subprocesses
    folder = _stack(tmp_path / "s")
    proc = _run("-m", "reconstruct", folder, "--out", tmp_path / "out", "--precision", "fp16")
    line = _one_error_line(proc, "--precision", "fp16")
    assert "reconstruct.precision" not in line and "CPU" in line, line
    assert not (tmp_path / "out").exists()


def test_shared_precision_message_keeps_the_rig_yaml_key() -> None:
    """run_rig's wording (rig.yaml keys) is unchanged: only the command line rephrases it."""
    from capture.errors import ReconstructionError
    from reconstruct.backends import BackendChoice
    from reconstruct.dualfocus.infer import resolve_precision

    with pytest.raises(ReconstructionError, match=r"set reconstruct\.precision to auto or fp32"):
        resolve_precision("fp16", BackendChoice("torch", "cpu", "test"))


# ---- 6. a focus measure with the network is a warning -----------------------------------------


def test_focus_measure_with_dualfocus_warns(tmp_path: Path) -> None:
    folder = _stack(tmp_path / "s")
    proc = _run("-m", "reconstruct", folder, "--out", tmp_path / "out", "--method", "dualfocus",
                "--focus-measure", "tenengrad")
    assert proc.returncode == 0, proc.stderr
    warnings = [ln for ln in proc.stderr.splitlines() if "--focus-measure" in ln]
    assert len(warnings) == 1 and "--method classical only" in warnings[0], proc.stderr


def test_focus_measure_with_classical_does_not_warn(tmp_path: Path) -> None:
    folder = _stack(tmp_path / "s")
    proc = _run("-m", "reconstruct", folder, "--out", tmp_path / "out", "--method", "classical",
                "--focus-measure", "tenengrad")
    assert proc.returncode == 0, proc.stderr
    assert "--focus-measure" not in proc.stderr
    assert yaml.safe_load((tmp_path / "out" / "result.yaml").read_text())["focus_measure"] == "tenengrad"


def test_network_flags_with_classical_warn_once_naming_them(tmp_path: Path) -> None:
    """--model, --precision etc. with --method classical were silently ignored (the focus
    measure with the network already warned)."""
    folder = _stack(tmp_path / "s")
    proc = _run("-m", "reconstruct", folder, "--out", tmp_path / "out", "--method", "classical",
                "--precision", "int8", "--backend", "torch", "--no-preview")
    assert proc.returncode == 0, proc.stderr
    warnings = [ln for ln in proc.stderr.splitlines() if "--method dualfocus only" in ln]
    assert len(warnings) == 1 and "--backend, --precision apply" in warnings[0], proc.stderr
    proc = _run("-m", "reconstruct", folder, "--out", tmp_path / "out2", "--method", "classical", "--no-preview")
    assert proc.returncode == 0 and "dualfocus only" not in proc.stderr, proc.stderr


# ---- from the review of these fixes ----------------------------------------------------------
def test_keys_our_own_sweeps_write_and_other_writers_keys_are_not_called_typos(tmp_path: Path) -> None:
    folder = _stack(tmp_path / "s")
    doc = yaml.safe_load((folder / "stack.yaml").read_text(encoding="utf-8"))
    doc["slices"][1].update(frame_id=7, sweep_phase=0.25, my_lab_note="x")
    doc["slices"][1]["focus_distanse_m"] = doc["slices"][1].pop("focus_distance_m")
    (folder / "stack.yaml").write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    with pytest.raises(StackFormatError) as info:
        FocalStack.read(folder)
    msg = str(info.value)
    assert msg.endswith("; unknown key focus_distanse_m (a typo of focus_distance_m?)"), msg
    assert "frame_id" not in msg and "sweep_phase" not in msg and "my_lab_note" not in msg


def test_flag_names_replace_whole_config_keys_only() -> None:
    from capture.errors import ReconstructionError
    from reconstruct.__main__ import _as_flags

    assert str(_as_flags(ReconstructionError("precision: fp16 needs a CUDA GPU; set reconstruct.precision to auto or fp32"))) == (
        "--precision: fp16 needs a CUDA GPU; set --precision to auto or fp32")
    for untouched in ("backend: failed in reconstruct.backends.base", "weights: runs/reconstruct.precision_sweep/w.safetensors: unreadable"):
        assert str(_as_flags(ReconstructionError(untouched))) == untouched
    # the API's align= argument, as this command's flag
    assert str(_as_flags(ReconstructionError("align: could not estimate the slice alignment (x); use align='apply' with a "
                                             "calibrated alignment, or align='none'"))) == (
        "--align: could not estimate the slice alignment (x); use --align apply with a calibrated alignment, or --align none")


@pytest.mark.skipif(sys.platform.startswith("win"), reason="symbolic links")
def test_a_linked_stack_yaml_reads_the_stack_beside_its_target(tmp_path: Path) -> None:
    folder = _stack(tmp_path / "s")
    (tmp_path / "links").mkdir()
    for name in ("stack.yaml", "mine.yaml"):
        (tmp_path / "links" / name).symlink_to(folder / "stack.yaml")
        proc = _run("-m", "reconstruct", tmp_path / "links" / name, "--out", tmp_path / f"out_{name}", "--method", "classical")
        assert proc.returncode == 0, proc.stderr


def test_a_truncated_slice_is_one_line_without_opencvs_own_warning(tmp_path: Path) -> None:
    """OpenCV printed "[ WARN:0@...] ... PNG input buffer is incomplete" above our error line."""
    stack = _stack(tmp_path / "stack")
    victim = sorted(stack.glob("*.png"))[1]
    victim.write_bytes(victim.read_bytes()[:300])
    out = tmp_path / "out"
    line = _one_error_line(_run("-m", "reconstruct", stack, "--out", out, "--method", "classical"), victim.name)
    assert "cannot decode" in line and not out.exists()


def test_an_output_place_that_cannot_be_written_is_refused_before_the_work(tmp_path, monkeypatch) -> None:
    """A read-only --out was found only after the whole reconstruction (45 s with alignment)."""
    import os
    import subprocess
    import sys

    import numpy as np

    from capture.stack import FocalStack

    if os.geteuid() == 0:
        # root writes anywhere: a file where the parent folder should be stands in for a read-only place
        blocked_parent = tmp_path / "blocked"
        blocked_parent.write_text("a file, not a folder")
    else:
        blocked_parent = tmp_path / "ro"
        blocked_parent.mkdir()
        blocked_parent.chmod(0o555)
    # the inputs are bad too: reading them first would report them, not the output place
    FocalStack(np.random.default_rng(0).integers(0, 255, (3, 16, 16), dtype=np.uint8), focus_distance_m=[2.0, 1.0, 0.5]).write(tmp_path / "st")
    (tmp_path / "st" / "slice_01.png").write_bytes(b"not a png")
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    for cmd in ([sys.executable, "-m", "reconstruct", str(tmp_path / "st"), "--out", str(blocked_parent / "res"), "--method", "classical"],
                [sys.executable, "-m", "capture.import_images", str(tmp_path / "st" / "slice_00.png"), str(tmp_path / "st" / "slice_01.png"),
                 "--out", str(blocked_parent / "imp")]):
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and str(blocked_parent) in proc.stderr, proc.stderr
        assert "depth" not in proc.stdout
