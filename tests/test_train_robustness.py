"""reconstruct/train.py when things go wrong: max_minutes under DDP and across --resume, a resumed
run equal to an uninterrupted one, kills between the files a save writes, config mistakes as one
line before anything is written, an out_dir that holds a run, and interrupted checkpoint writes.

Most runs here are in-process (procedural scenes, no tuning scenes, 64 px crops: about a
second each); the clock is a fake where a test needs time to pass."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from capture.errors import ConfigError, InputError
from reconstruct import train as T
from reconstruct.dualfocus import checkpoint as C
from reconstruct.dualfocus.checkpoint import load_checkpoint, save_checkpoint, sha256_of
from reconstruct.dualfocus.registry import build_model

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
NAME = "dualfocus-tiny"


class Killed(BaseException):
    """Stands in for a kill -9 at a chosen point (BaseException: nothing in train.py catches it)."""


@pytest.fixture(autouse=True)
def _single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)


def _config(path: Path, out_dir: Path, *, steps: int, **top: Any) -> Path:
    data = {"rgbd_root": None, "tuning_scenes": [], "pool_size": 8, "render_workers": 1, "val_width": 64, "crop_px": [64]}
    data.update(top.pop("data", {}))
    cfg = {"model": NAME, "out_dir": str(out_dir), "seed": 0, "threads": 1, "data": data,
           "optim": {"batch_size": 2, "steps": steps, "steps_per_epoch": 2, "warmup_steps": 1}, **top}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def _train(config: Path, *, resume: bool = False) -> dict[str, Any]:
    return T.train(T.load_train_config(config), config_path=config, resume=resume, show_progress=False)


def _state(path: Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as fh:
        return json.loads(fh.metadata()["state"])


def _card_matches_weights(out: Path) -> tuple[bool, int, str]:
    """(card hash == weights hash, the card's step, the weights file's step)"""
    card = yaml.safe_load((out / f"{NAME}.yaml").read_text(encoding="utf-8"))
    with safe_open(str(out / f"{NAME}.safetensors"), framework="pt") as fh:
        wstep = fh.metadata()["step"]
    return card["weights_sha256"] == sha256_of(out / f"{NAME}.safetensors"), card["trained"]["steps"], wstep


def _train_killed_at_the_second_card_rename(config: Path, out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Train ``config`` and 'kill' it as it renames its second card into place (step 4's, after
    step 2's): the checkpoint and weights of step 4 are written, the card still says step 2."""
    real_replace = os.replace
    card_renames = itertools.count(1)

    def replace(src: Any, dst: Any) -> None:
        if Path(dst) == out / f"{NAME}.yaml" and next(card_renames) == 2:
            raise Killed
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Killed):
        _train(config)
    monkeypatch.setattr(os, "replace", real_replace)


def _main_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    rc = T.main([*argv, "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    return rc, err[0]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """8 uninterrupted steps, the pool refreshed every 2 epochs (at step 4)."""
    tmp = tmp_path_factory.mktemp("reference")
    config = _config(tmp / "ref.yaml", tmp / "out", steps=8, data={"refresh_every_epochs": 2})
    with pytest.MonkeyPatch.context() as mp:
        for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
            mp.delenv(var, raising=False)
        state = _train(config)
    return {"config": config, "out": tmp / "out", "state": state}


# ------------------------------------------------------------------------------ 3: resume == uninterrupted
def test_resumed_run_equals_the_uninterrupted_run(reference_run: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed right after the checkpoint of step 6 (epoch 3, whose pool was rendered at epoch 2's
    refresh), then resumed to 8: every tensor of last.safetensors (model and AdamW) is
    bit-identical to the uninterrupted run's, and so are the loss averages in the history. One
    thread, the same CPU, deterministic kernels: nothing but the saved state differs, so
    bit-identity is the right bar (and it held before the kill too)."""
    config = _config(tmp_path / "b.yaml", tmp_path / "out", steps=8, data={"refresh_every_epochs": 2})
    real_save = T.save_checkpoint

    def save_then_die(*args: Any, **kwargs: Any) -> Path:
        path = real_save(*args, **kwargs)
        if kwargs["state"]["step"] == 6:
            raise Killed
        return path

    monkeypatch.setattr(T, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        _train(config)
    monkeypatch.setattr(T, "save_checkpoint", real_save)
    assert _state(tmp_path / "out" / "last.safetensors")["step"] == 6
    state = _train(config, resume=True)
    assert state["step"] == 8
    want = load_file(str(reference_run["out"] / "last.safetensors"))
    got = load_file(str(tmp_path / "out" / "last.safetensors"))
    assert set(got) == set(want)
    differ = [k for k in want if not torch.equal(want[k], got[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"

    def losses(h: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in e.items() if k != "wall_min"} for e in h]

    assert losses(_state(tmp_path / "out" / "last.safetensors")["history"]) == losses(reference_run["state"]["history"])


# ------------------------------------------------------------------------------ 2: max_minutes per invocation
def _fake_clock(monkeypatch: pytest.MonkeyPatch, seconds_per_step: float) -> None:
    """Each batch drawn advances train.py's clock by ``seconds_per_step``."""
    now = [1000.0]
    real_batch = T.make_batch

    def batch(*args: Any, **kwargs: Any) -> Any:
        now[0] += seconds_per_step
        return real_batch(*args, **kwargs)

    monkeypatch.setattr(T, "make_batch", batch)
    monkeypatch.setattr(T, "time", types.SimpleNamespace(monotonic=lambda: now[0]))


def test_max_minutes_is_the_budget_of_each_invocation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """10 s a step, max_minutes 0.5: each invocation stops after 4 steps (40 s > 30 s), a resumed
    one included; the card keeps the total over both (80 s)."""
    _fake_clock(monkeypatch, 10.0)
    config = _config(tmp_path / "mm.yaml", tmp_path / "out", steps=100, max_minutes=0.5)
    assert _train(config)["step"] == 4
    state = _train(config, resume=True)
    assert state["step"] == 8
    assert state["wall_s"] == pytest.approx(80.0)
    card = yaml.safe_load((tmp_path / "out" / f"{NAME}.yaml").read_text(encoding="utf-8"))
    assert card["trained"]["steps"] == 8 and card["trained"]["wall_minutes"] == pytest.approx(80 / 60, abs=0.01)


# ------------------------------------------------------------------------------ 1: max_minutes under DDP
_FAST_CLOCK_RANK1 = """\
import itertools, os, sys, time, types
import reconstruct.train as T
if os.environ["RANK"] == "1":  # this process's clock runs fast: its budget is spent after its first step
    ticks = itertools.count()
    T.time = types.SimpleNamespace(monotonic=lambda: time.monotonic() + 1000.0 * next(ticks))
sys.exit(T.main(sys.argv[1:]))
"""


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc; torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@pytest.mark.slow  # CI's 10-minute budget on the slower 2-core VMs; run with: pytest -m slow
def test_ddp_max_minutes_stops_every_process_at_the_same_step(tmp_path: Path) -> None:
    """Two gloo processes whose clocks disagree: when one's max_minutes are spent both stop after
    the same step and rank 0 writes the checkpoint (before: the other trained on and both hung
    in mismatched collectives)."""
    script = tmp_path / "fast_clock_rank1.py"
    script.write_text(_FAST_CLOCK_RANK1, encoding="utf-8")
    config = _config(tmp_path / "ddp.yaml", tmp_path / "out", steps=50, max_minutes=5)
    raw = yaml.safe_load(config.read_text())
    raw["optim"]["steps_per_epoch"] = 1000
    config.write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
           str(script), "--config", str(config), "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        for pid in [*_descendants(proc.pid), proc.pid]:  # both ranks wait in a collective for ever: end them
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun hung (one rank stopped, the other trained on)\n{stderr[-2000:]}")
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout.count("trained 1 steps") == 1, stdout
    assert _state(tmp_path / "out" / "last.safetensors")["step"] == 1


# ------------------------------------------------------------------------------ 4: the card describes the weights beside it
def test_a_kill_while_saving_never_leaves_a_card_of_other_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed while the best weights of step 4 are being saved (at the hash the card needs): the
    card beside the weights still describes them; the resume puts step 4's pair in place."""
    config = _config(tmp_path / "c.yaml", tmp_path / "out", steps=4)
    real_sha = T.sha256_of
    calls = itertools.count(1)

    def sha_or_die(path: Any) -> str:
        if next(calls) == 2:  # the weights of step 2, then those of step 4
            raise Killed
        return real_sha(path)

    monkeypatch.setattr(T, "sha256_of", sha_or_die)
    with pytest.raises(Killed):
        _train(config)
    monkeypatch.setattr(T, "sha256_of", real_sha)
    out = tmp_path / "out"
    same, card_step, weights_step = _card_matches_weights(out)
    assert same and str(card_step) == weights_step, (card_step, weights_step)
    _train(config, resume=True)
    assert _card_matches_weights(out) == (True, 4, "4")
    assert not list(out.glob(".*"))  # no temporary files left


def test_resume_repairs_a_card_left_behind_between_the_renames(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed in the one window left, after the new weights are renamed into place and before
    their card is: --resume writes the pair again from the checkpoint (which holds them)."""
    config = _config(tmp_path / "r.yaml", tmp_path / "out", steps=4)
    out = tmp_path / "out"
    _train_killed_at_the_second_card_rename(config, out, monkeypatch)
    assert _card_matches_weights(out)[0] is False  # the window: step 4's weights, step 2's card
    state = _train(config, resume=True)  # already at step 4: only the repair runs
    assert state["step"] == 4
    assert _card_matches_weights(out) == (True, 4, "4")
    assert not list(out.glob(".*"))


# ------------------------------------------------------------------------------ 5, 6, 8: config mistakes
@pytest.mark.parametrize(("edit", "needles"), [
    ({"data": {"tuning_scenes": ["Aloe", "Art"]}}, ["data.tuning_scenes", "Art", "report scene"]),
    ({"data": {"tuning_scenes": ["reindeer"]}}, ["data.tuning_scenes", "reindeer", "report scene"]),
    ({"model_overrides": {"bogus": 1}}, ["model_overrides.bogus"]),
    ({"model_overrides": {"enc_channels": 5}}, ["model_overrides.enc_channels"]),
    ({"model_overrides": {"focal_difference": "agument"}}, ["model_overrides.focal_difference", "augment"]),
    ({"model_overrides": {"dec_channels": 0}}, ["model_overrides.dec_channels"]),
    ({"data": {"rgbd_root": "no_such_data/middlebury"}}, ["data.rgbd_root", "relative to the config file", "no_such_data"]),
    ({"seed": -1}, ["seed", "greater than or equal to 0"]),
    ({"optim": {"lr": float("inf")}}, ["optim.lr", "finite"]),
    ({"max_minutes": float("nan")}, ["max_minutes", "finite"]),
    ({"out_dir": "a_file/out"}, ["out_dir", "a_file"]),
], ids=["report-scene", "report-scene-lowercase", "unknown-field", "enc-channels-int", "bad-choice", "zero-width", "missing-data",
        "negative-seed", "infinite-lr", "nan-minutes", "out-dir-under-a-file"])
def test_config_mistakes_are_one_line_before_anything_is_written(tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: dict, needles: list[str]) -> None:
    (tmp_path / "a_file").write_text("in the way", encoding="utf-8")
    out_dir = tmp_path / edit.pop("out_dir") if "out_dir" in edit else tmp_path / "out"
    config = _config(tmp_path / "bad.yaml", out_dir, steps=2, **edit)
    rc, line = _main_one_line(["--config", str(config)], capsys)
    assert rc == 2 and str(config) in line, line
    for needle in needles:
        assert needle in line, (needle, line)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["folder", "not-utf8", "a-list"])
def test_a_config_file_that_is_no_config_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    path = tmp_path / "c.yaml"
    if kind == "folder":
        path.mkdir()
    elif kind == "not-utf8":
        path.write_bytes(b"model: dualfocus-tiny\nname: caf\xe9\n")
    else:
        path.write_text("- model\n- seed\n", encoding="utf-8")
    rc, line = _main_one_line(["--config", str(path)], capsys)
    assert rc == 2 and str(path) in line and ": :" not in line, line


def test_resume_with_changed_training_settings_is_refused(reference_run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The card describes one run: a resume that changed the learning rate or the seed would
    have trained on under the new values while the card claimed them for the whole run."""
    raw = yaml.safe_load(reference_run["config"].read_text())
    raw["optim"]["lr"] = 0.002
    raw["seed"] = 7
    config = tmp_path / "changed.yaml"
    config.write_text(yaml.safe_dump(raw))
    before = sha256_of(reference_run["out"] / "last.safetensors")
    rc, line = _main_one_line(["--config", str(config), "--resume"], capsys)
    assert rc == 2 and "optim.lr 0.001 -> 0.002" in line and "seed 0 -> 7" in line, line
    assert sha256_of(reference_run["out"] / "last.safetensors") == before


def test_a_diverged_step_stops_the_run_and_keeps_the_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A non-finite loss used to be stepped into the weights and saved as the 'best' pair."""
    config = _config(tmp_path / "c.yaml", tmp_path / "out", steps=6)
    real_loss = T.total_loss
    calls = {"n": 0}

    def loss_going_nan(*args: Any, **kwargs: Any) -> Any:
        loss, parts = real_loss(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 3 else loss), parts

    monkeypatch.setattr(T, "total_loss", loss_going_nan)
    rc, line = _main_one_line(["--config", str(config)], capsys)
    assert rc == 2 and "training diverged at step 3" in line and "optim.lr" in line, line
    state = _state(tmp_path / "out" / "last.safetensors")
    assert state["step"] == 2  # the epoch-1 checkpoint, not overwritten
    weights = load_file(str(tmp_path / "out" / "last.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_resume_with_another_architecture_is_one_line(reference_run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = yaml.safe_load(reference_run["config"].read_text())
    raw["model_overrides"] = {"dec_channels": 12}
    config = tmp_path / "wider.yaml"
    config.write_text(yaml.safe_dump(raw))
    before = sha256_of(reference_run["out"] / "last.safetensors")
    rc, line = _main_one_line(["--config", str(config), "--resume"], capsys)
    assert rc == 2
    assert "last.safetensors" in line and "dec_channels" in line and "tensor " in line, line
    assert sha256_of(reference_run["out"] / "last.safetensors") == before


def test_load_checkpoint_of_another_architecture_names_file_and_tensor(tmp_path: Path) -> None:
    model = build_model(NAME)
    path = save_checkpoint(model, torch.optim.AdamW(model.parameters()), tmp_path / "last.safetensors", name="t", state={"step": 0})
    other = build_model(NAME, spatial=False)
    with pytest.raises(InputError) as exc:
        load_checkpoint(path, other, torch.optim.AdamW(other.parameters()))
    msg = str(exc.value)
    assert str(path) in msg and "spatial True in the checkpoint, False in the model" in msg and "tensor dec_in." in msg and "\n" not in msg, msg


# ------------------------------------------------------------------------------ 7: an out_dir that holds a run
def test_an_out_dir_holding_a_run_needs_resume(reference_run: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    out = reference_run["out"]
    before = {p.name: sha256_of(p) for p in out.iterdir()}
    rc, line = _main_one_line(["--config", str(reference_run["config"])], capsys)
    assert rc == 2 and str(out) in line and "--resume" in line and "out_dir" in line, line
    assert {p.name: sha256_of(p) for p in out.iterdir()} == before


# ------------------------------------------------------------------------------ 9: interrupted checkpoint writes
def test_interrupted_save_leaves_no_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_model(NAME)
    target = tmp_path / "last.safetensors"
    old = save_checkpoint(model, torch.optim.AdamW(model.parameters()), target, name="t", state={"step": 1}).read_bytes()
    real = C.save_file

    def half_then_ctrl_c(tensors: Any, filename: str, metadata: Any = None) -> None:
        real(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(Path(filename).read_bytes()[:100])
        raise KeyboardInterrupt

    monkeypatch.setattr(C, "save_file", half_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(model, torch.optim.AdamW(model.parameters()), target, name="t", state={"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.safetensors"]
    assert target.read_bytes() == old


def test_checkpoint_is_flushed_to_disk_before_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(f"replace {Path(b).name}"), real_replace(a, b))[1])
    model = build_model(NAME)
    save_checkpoint(model, torch.optim.AdamW(model.parameters()), tmp_path / "last.safetensors", name="t", state={})
    assert events == ["fsync", "replace last.safetensors"]


# ---- the training device (a GPU is mocked here: CI has none; the tests hide any GPU, conftest) ----
def _gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.mark.parametrize(("setting", "gpus", "distributed", "env", "expected"), [
    ("auto", 0, False, {}, "cpu"),
    ("auto", 1, False, {}, "cuda"),
    ("cpu", 1, False, {}, "cpu"),
    ("cpu", 1, True, {"LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "cpu"),
    ("auto", 2, True, {"LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "cuda:1"),
    ("cuda", 4, True, {"LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "cuda:0"),
    # a launcher that sets WORLD_SIZE but not LOCAL_WORLD_SIZE (srun, mpirun): 2 nodes x 8 GPUs
    ("auto", 8, True, {"WORLD_SIZE": "16", "LOCAL_RANK": "7"}, "cuda:7"),
    # one GPU per process through CUDA_VISIBLE_DEVICES (SLURM --gpus-per-task=1)
    ("auto", 1, True, {"WORLD_SIZE": "4", "LOCAL_RANK": "3"}, "cuda:0"),
])
def test_training_device(monkeypatch: pytest.MonkeyPatch, setting: str, gpus: int, distributed: bool, env: dict[str, str], expected: str) -> None:
    _gpus(monkeypatch, gpus)
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert str(T.training_device(setting, config_path=Path("t.yaml"), distributed=distributed)) == expected


@pytest.mark.parametrize(("setting", "gpus", "match"), [
    ("cuda", 0, r"t\.yaml: device: cuda asked for, but torch .* sees no CUDA GPU"),
    # two processes on a one-GPU node: NCCL failed in rank 1 with a traceback (seen on an H100)
    ("auto", 1, r"t\.yaml: device: auto trains each of the 2 processes per node on its own GPU, and torch sees 1; "
                r"run torchrun --nproc-per-node 1, or set device: cpu"),
])
def test_training_device_refusals_are_one_line(monkeypatch: pytest.MonkeyPatch, setting: str, gpus: int, match: str) -> None:
    _gpus(monkeypatch, gpus)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(T.ConfigError, match=match):
        T.training_device(setting, config_path=Path("t.yaml"), distributed=True)


def test_training_device_refuses_a_local_rank_beyond_the_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    _gpus(monkeypatch, 2)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(T.ConfigError, match=r"t\.yaml: device: cuda: this process's LOCAL_RANK is 2 and torch sees 2 GPU\(s\)"):
        T.training_device("cuda", config_path=Path("t.yaml"), distributed=True)


def test_training_device_is_a_config_field(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("device: gpu\n")
    with pytest.raises(T.ConfigError, match=r"t\.yaml: device: Input should be 'auto', 'cpu' or 'cuda'"):
        T.load_train_config(path)


def test_saved_weights_are_readable_by_others(tmp_path: Path) -> None:
    """safetensors creates its files 0600: trained weights were unreadable to colleagues."""
    model = build_model(NAME)
    path = save_checkpoint(model, torch.optim.AdamW(model.parameters()), tmp_path / "last.safetensors", name="t", state={"step": 1})
    assert path.stat().st_mode & 0o777 == 0o644


def test_render_workers_leave_ctrl_c_to_the_main_process() -> None:
    """Ctrl-C reaches every process of the group: each spawned render worker printed a
    KeyboardInterrupt traceback under the main process's one line."""
    import signal

    before = signal.getsignal(signal.SIGINT)
    try:
        T._init_worker([])
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_sigterm_stops_training_as_ctrl_c_does(tmp_path: Path) -> None:
    """SIGTERM (kill, a scheduler's time limit) ended the run with no message (status -15)."""
    import signal
    import subprocess
    import sys

    config = _config(tmp_path / "c.yaml", tmp_path / "out", steps=100000)
    proc = subprocess.Popen([sys.executable, "-m", "reconstruct.train", "--config", str(config), "--no-progress"],
                            cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "out").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "error: stopped by SIGTERM"  # not "by the user": a scheduler or kill sent it


def test_resume_with_other_validation_data_is_refused(tmp_path: Path) -> None:
    """A resume with another tuning split (or width) compared tuning scores across two
    validations and declared a 'best' checkpoint across them."""
    config = _config(tmp_path / "a.yaml", tmp_path / "out", steps=4)
    _train(config)
    changed = _config(tmp_path / "b.yaml", tmp_path / "out", steps=8, data={"val_width": 96})
    with pytest.raises(ConfigError, match=r"data: the run in .* was validated on other data \(val_width 64 -> 96\)"):
        _train(changed, resume=True)
    assert _train(_config(tmp_path / "c.yaml", tmp_path / "out", steps=6), resume=True)["step"] == 6  # the same data: resumes



def test_resume_finds_the_same_data_through_another_path_and_scene_order(tmp_path: Path) -> None:
    """The same folder reached through a symlink (or node-local scratch), or the tuning scenes
    listed in another order, is the same validation: the resume goes on."""
    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "middlebury_2001_2006"
    if not (data / "manifest.csv").is_file():
        pytest.skip("the shared Middlebury scenes are not beside the repository")
    link = tmp_path / "mb"
    link.symlink_to(data)
    first = _config(tmp_path / "a.yaml", tmp_path / "out", steps=2, data={"rgbd_root": str(data), "tuning_scenes": ["Rocks1", "Aloe"]})
    _train(first)
    again = _config(tmp_path / "b.yaml", tmp_path / "out", steps=4, data={"rgbd_root": str(link), "tuning_scenes": ["Aloe", "Rocks1"]})
    assert _train(again, resume=True)["step"] == 4


def test_an_out_dir_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("not a folder", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"out_dir: .*out is a file, not a folder"):
        _train(_config(tmp_path / "a.yaml", tmp_path / "out", steps=2))


def test_unusable_init_weights_name_the_config_and_field(tmp_path: Path) -> None:
    """A .pt, truncated or foreign init_weights file was named alone, not the config or field."""
    bad = tmp_path / "old.safetensors"
    bad.write_bytes(b"not a safetensors file")
    config = _config(tmp_path / "a.yaml", tmp_path / "out", steps=2, init_weights=str(bad))
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'a.yaml'}: init_weights: {bad}"):
        _train(config)


def test_a_refused_resume_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed between the checkpoint and the card's rename, then resumed with another learning
    rate: the refusal came after the card repair, which had written the refused settings into it."""
    config = _config(tmp_path / "r.yaml", tmp_path / "out", steps=4)
    out = tmp_path / "out"
    _train_killed_at_the_second_card_rename(config, out, monkeypatch)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    raw = yaml.safe_load(config.read_text())
    raw["optim"]["lr"] = 0.5
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"optim.lr 0.001 -> 0.5"):
        _train(changed, resume=True)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_a_resume_need_not_find_the_starting_weights_again(tmp_path: Path) -> None:
    """init_weights is read at the start only: renamed or set to null afterwards, the resume goes
    on, and the card still names (and hashes) what the run started from."""
    start = tmp_path / "start.safetensors"
    C.save_weights(build_model(NAME), start, name=NAME)
    start_sha = sha256_of(start)
    config = _config(tmp_path / "ft.yaml", tmp_path / "out", steps=2, init_weights=str(start))
    _train(config)
    start.rename(tmp_path / "start_v1.safetensors")
    raw = yaml.safe_load(config.read_text())
    raw["init_weights"] = None
    raw["optim"]["steps"] = 4
    config.write_text(yaml.safe_dump(raw))
    assert _train(config, resume=True)["step"] == 4
    card = yaml.safe_load((tmp_path / "out" / f"{NAME}.yaml").read_text())
    assert card["initialised_from"]["weights_sha256"] == start_sha
