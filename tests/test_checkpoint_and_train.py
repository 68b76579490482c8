"""Weights and checkpoints (reconstruct/dualfocus/checkpoint.py) and the training entry point
(reconstruct/train.py) as a subprocess: smoke training, model card, resume, bad config, DDP."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from capture.errors import InputError
from reconstruct.backends.select import cpu_bf16_native
from reconstruct.dualfocus.checkpoint import load_checkpoint, load_weights, save_checkpoint, save_weights, sha256_of
from reconstruct.dualfocus.registry import MODELS, build_model, count_parameters

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
MIDDLEBURY = ROOT.parent / "shared" / "data" / "middlebury_2001_2006"
HAVE_MIDDLEBURY = (MIDDLEBURY / "manifest.csv").is_file()
TUNING = ["Aloe", "Flowerpots", "Rocks1"]
SUBPROCESS_TIMEOUT_S = 180


# ------------------------------------------------------------------------------ weights
def _trained_tiny(seed: int = 0) -> torch.nn.Module:
    """A tiny model whose BatchNorm statistics are not the defaults (so buffers must round-trip)."""
    torch.manual_seed(seed)
    model = build_model("dualfocus-tiny").train()
    with torch.no_grad():
        model(torch.rand(2, 3, 3, 32, 48), torch.rand(2, 3))
    return model.eval()


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return torch.rand(1, 4, 3, 32, 48, generator=g), torch.tensor([[1.0, 0.2, 2.5, 0.7]])


def test_weights_round_trip(tmp_path: Path) -> None:
    model = _trained_tiny()
    path = save_weights(model, tmp_path / "w.safetensors", name="my-tiny", extra={"step": "12", "val": {"abs_rel": 0.1}})
    assert path.is_file()
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left nothing behind
    loaded, meta = load_weights(path)
    assert not loaded.training
    assert loaded.cfg == model.cfg
    assert meta["model"] == "my-tiny" and meta["format"] == "dualfocus-weights/1"
    assert meta["step"] == "12" and json.loads(meta["val"]) == {"abs_rel": 0.1}
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x, f = _inputs()
    with torch.no_grad():
        a, b = model(x, f), loaded(x, f)
    assert torch.equal(a.depth, b.depth)
    assert torch.equal(a.prob, b.prob)
    assert torch.equal(a.confidence, b.confidence)


def test_weights_round_trip_keeps_architecture_overrides(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("dualfocus-tiny", spatial=False, focal_difference="replace").eval()
    loaded, _ = load_weights(save_weights(model, tmp_path / "ablation.safetensors", name="ablation"))
    assert loaded.cfg.spatial is False and loaded.cfg.focal_difference == "replace"
    x, f = _inputs()
    with torch.no_grad():
        assert torch.equal(model(x, f).depth, loaded(x, f).depth)


def test_load_weights_refuses_pt_file(tmp_path: Path) -> None:
    model = _trained_tiny()
    good = save_weights(model, tmp_path / "w.safetensors", name="t")
    pt = tmp_path / "model.pt"
    pt.write_bytes(good.read_bytes())  # even a valid safetensors payload: the suffix decides
    with pytest.raises(InputError, match=re.escape(str(pt))):
        load_weights(pt)
    pickled = tmp_path / "pickled.pt"
    torch.save(model.state_dict(), pickled)
    with pytest.raises(InputError, match=re.escape(str(pickled))):
        load_weights(pickled)


def test_load_weights_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.safetensors"
    with pytest.raises(InputError, match=re.escape(str(path))):
        load_weights(path)


@pytest.mark.parametrize("kind", ["empty", "garbage", "truncated", "text", "bad-header-json"])
def test_load_weights_refuses_corrupt_file(tmp_path: Path, kind: str) -> None:
    good = save_weights(_trained_tiny(), tmp_path / "good.safetensors", name="t").read_bytes()
    payload = {
        "empty": b"",
        "garbage": bytes(range(256)) * 8,
        "truncated": good[: len(good) // 2],
        "text": b"this is not a safetensors file\n",
        "bad-header-json": (6).to_bytes(8, "little") + b"{{{{{{",
    }[kind]
    path = tmp_path / f"{kind}.safetensors"
    path.write_bytes(payload)
    with pytest.raises(InputError, match=re.escape(str(path))):
        load_weights(path)


@pytest.mark.parametrize("upsample", ["bilinear", "convex"])
def test_weights_round_trip_keeps_the_upsampler(tmp_path: Path, upsample: str) -> None:
    torch.manual_seed(0)
    model = build_model("dualfocus-tiny", upsample=upsample).eval()
    if upsample == "convex":
        torch.nn.init.normal_(model.upsampler.head[2].weight, 0.0, 0.5)
    loaded, _ = load_weights(save_weights(model, tmp_path / "w.safetensors", name="w"))
    assert loaded.cfg.upsample == upsample
    x, f = _inputs()
    with torch.no_grad():
        assert torch.equal(model(x, f).depth, loaded(x, f).depth)


def test_weights_from_before_the_upsampler_option_load_as_bilinear(tmp_path: Path) -> None:
    """Files written before ``upsample`` existed carry no such key: they mean bilinear."""
    model = _trained_tiny()
    raw = model.cfg.to_dict()
    del raw["upsample"]
    path = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata={"model": "dualfocus-tiny", "config": json.dumps(raw)})
    loaded, _ = load_weights(path)
    assert loaded.cfg.upsample == "bilinear" and not hasattr(loaded, "upsampler")


def test_load_weights_refuses_file_without_config(tmp_path: Path) -> None:
    model = _trained_tiny()
    path = tmp_path / "foreign.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata={"model": "x"})
    with pytest.raises(InputError, match=re.escape(str(path))):
        load_weights(path)


def _corrupt_metadata_file(tmp_path: Path, kind: str) -> Path:
    model = _trained_tiny()
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    config = json.dumps(model.cfg.to_dict())
    if kind == "config-not-json":
        meta = {"config": config[:-7]}
    elif kind == "config-unknown-field":
        meta = {"config": json.dumps({**model.cfg.to_dict(), "bogus": 1})}
    else:  # tensors of another architecture under this config
        other = build_model("dualfocus-tiny", dec_channels=12)
        tensors = {k: v.contiguous() for k, v in other.state_dict().items()}
        meta = {"config": config}
    path = tmp_path / f"{kind}.safetensors"
    save_file(tensors, str(path), metadata={"format": "dualfocus-weights/1", "model": "t", **meta})
    return path


_META_BUG = (
    "checkpoint.py:80-84: load_weights only guards the safetensors read; a readable .safetensors file "
    "whose 'config' metadata is not JSON (json.loads, line 80: JSONDecodeError), names an unknown field "
    "(DualFocusConfig(**raw), line 82: TypeError) or whose tensors have other shapes "
    "(load_state_dict(strict=False), line 84: RuntimeError 'size mismatch') escapes as a raw exception "
    "instead of an InputError naming the file"
)


@pytest.mark.parametrize(
    "kind",
    [
        "config-not-json",
        "config-unknown-field",
        "tensor-shapes-do-not-fit",
    ],
)
def test_load_weights_refuses_corrupt_metadata(tmp_path: Path, kind: str) -> None:
    path = _corrupt_metadata_file(tmp_path, kind)
    with pytest.raises(InputError, match=re.escape(str(path))):
        load_weights(path)


def test_a_shape_mismatch_names_the_first_tensor_that_does_not_fit(tmp_path: Path) -> None:
    """torch's message starts with a heading line; the one-line error carried only that."""
    path = _corrupt_metadata_file(tmp_path, "tensor-shapes-do-not-fit")
    with pytest.raises(InputError, match=r"\(size mismatch for [\w.]+: copying a param with shape .*; \d+ more\)"):
        load_weights(path)


def _adamw_after_steps(model: torch.nn.Module, steps: int) -> torch.optim.AdamW:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4, betas=(0.8, 0.99))
    x, f = _inputs()
    for _ in range(steps):
        out = model(x, f)
        (out.depth.mean() + out.prob.std()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return opt


def test_checkpoint_restores_model_and_optimizer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("dualfocus-tiny").train()
    opt = _adamw_after_steps(model, 3)
    state = {"step": 3, "wall_s": 1.5, "best_abs_rel": None, "history": [{"step": 3}]}
    path = save_checkpoint(model, opt, tmp_path / "last.safetensors", name="tiny", state=state)

    torch.manual_seed(1)
    model2 = build_model("dualfocus-tiny").train()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.5)
    got = load_checkpoint(path, model2, opt2)
    assert got == state
    for k, v in model.state_dict().items():
        assert torch.equal(model2.state_dict()[k], v), k
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert set(s1["state"]) == set(s2["state"]) and len(s1["state"]) == len(list(model.parameters()))
    for pid, st in s1["state"].items():
        assert torch.equal(st["exp_avg"], s2["state"][pid]["exp_avg"]), pid
        assert torch.equal(st["exp_avg_sq"], s2["state"][pid]["exp_avg_sq"]), pid
        assert float(st["step"]) == float(s2["state"][pid]["step"]) == 3.0
    g1, g2 = s1["param_groups"][0], s2["param_groups"][0]
    assert g2["lr"] == g1["lr"] == 1e-3 and tuple(g2["betas"]) == (0.8, 0.99) and g2["weight_decay"] == 1e-4
    # the next step is the same for both
    x, f = _inputs()
    for m, o in ((model, opt), (model2, opt2)):
        m(x, f).depth.mean().backward()
        o.step()
    for p1, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p1, p2)


def test_load_weights_reads_a_checkpoint(tmp_path: Path) -> None:
    """A checkpoint is also a weights file (the optimiser tensors are skipped)."""
    model = build_model("dualfocus-tiny").train()
    opt = _adamw_after_steps(model, 1)
    path = save_checkpoint(model.eval(), opt, tmp_path / "last.safetensors", name="tiny", state={"step": 1})
    loaded, meta = load_weights(path)
    assert meta["format"] == "dualfocus-checkpoint/1"
    x, f = _inputs()
    with torch.no_grad():
        assert torch.equal(model(x, f).depth, loaded(x, f).depth)


# ------------------------------------------------------------------------------ training (subprocess)
def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return env


def _write_config(path: Path, out_dir: Path, *, steps: int = 4, **data: Any) -> Path:
    cfg = {
        "model": "dualfocus-tiny",
        "out_dir": str(out_dir),
        "seed": 0,
        "threads": 1,  # stay on one core: a long training run shares this machine
        "data": {
            "rgbd_root": str(MIDDLEBURY) if HAVE_MIDDLEBURY else None,
            "pool_size": 8,
            "render_workers": 1,
            "val_width": 64,
            **data,
        },
        "optim": {"batch_size": 2, "steps": steps, "steps_per_epoch": 2, "warmup_steps": 1},
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def _run(args: list[str], *, timeout: float = SUBPROCESS_TIMEOUT_S) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - t0


def _train(config: Path, *extra: str) -> tuple[subprocess.CompletedProcess, float]:
    return _run(["-m", "reconstruct.train", "--config", str(config), "--no-progress", *extra])


def _explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"


def _checkpoint_state(path: Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as fh:
        return json.loads(fh.metadata()["state"])


def _scenes_of_year(year: str) -> set[str]:
    with (MIDDLEBURY / "manifest.csv").open(newline="") as fh:
        return {row["scene"] for row in csv.DictReader(fh) if row["year"] == year}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One 4-step training run of dualfocus-tiny, shared by the tests that read its outputs."""
    tmp = tmp_path_factory.mktemp("train")
    config = _write_config(tmp / "train.yaml", tmp / "out")
    proc, seconds = _train(config)
    return {"proc": proc, "seconds": seconds, "config": config, "out": tmp / "out"}


def test_train_smoke(smoke_run: dict[str, Any]) -> None:
    proc, out = smoke_run["proc"], smoke_run["out"]
    assert proc.returncode == 0, _explain(proc)
    assert "trained 4 steps" in proc.stdout
    weights, card_path, last = out / "dualfocus-tiny.safetensors", out / "dualfocus-tiny.yaml", out / "last.safetensors"
    assert weights.is_file() and card_path.is_file() and last.is_file()
    assert not list(out.glob(".*.tmp"))
    model, meta = load_weights(weights)
    assert meta["model"] == "dualfocus-tiny"
    assert model.cfg == MODELS["dualfocus-tiny"]
    assert _checkpoint_state(last)["step"] == 4


def test_train_model_card(smoke_run: dict[str, Any]) -> None:
    assert smoke_run["proc"].returncode == 0, _explain(smoke_run["proc"])
    out = smoke_run["out"]
    card = yaml.safe_load((out / "dualfocus-tiny.yaml").read_text(encoding="utf-8"))
    assert card["variant"] == "dualfocus-tiny"
    assert card["name"] == "dualfocus-tiny"
    assert card["parameters"] == count_parameters(build_model("dualfocus-tiny"))
    assert card["weights"] == "dualfocus-tiny.safetensors"
    assert card["weights_sha256"] == sha256_of(out / "dualfocus-tiny.safetensors")
    assert card["architecture"] == MODELS["dualfocus-tiny"].to_dict()
    trained = card["trained"]
    assert trained["steps"] == card["validation"]["best_step"]
    assert trained["processes"] == 1
    if (ROOT / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", str(trained["commit"])), trained["commit"]
    else:
        assert trained["commit"]
    data = card["data"]
    train_scenes = set(data["train_scenes"])
    assert set(data["tuning_scenes"]) == set(TUNING)
    assert set(data["report_scenes_never_used"]) >= {"Art", "Books", "Dolls", "Laundry", "Moebius", "Reindeer"}
    metrics = card["validation"]["metrics"]
    if HAVE_MIDDLEBURY:
        scenes_2005 = _scenes_of_year("2005")
        assert scenes_2005 == {"Art", "Books", "Dolls", "Laundry", "Moebius", "Reindeer"}
        assert train_scenes, "no training scenes"
        assert not train_scenes & scenes_2005, train_scenes & scenes_2005
        assert not train_scenes & set(TUNING), train_scenes & set(TUNING)
        with (MIDDLEBURY / "manifest.csv").open(newline="") as fh:
            every = {row["scene"] for row in csv.DictReader(fh)}
        assert train_scenes == every - scenes_2005 - set(TUNING)
        assert set(metrics) == {"abs_rel", "delta1"}
        assert all(isinstance(v, float) and v == v for v in metrics.values())
        assert 0.0 <= metrics["delta1"] <= 1.0 and metrics["abs_rel"] >= 0.0
        assert trained["steps"] in (2, 4)
    else:
        assert train_scenes == set() and metrics == {}
        assert trained["steps"] == 4


def test_train_resume_continues(tmp_path: Path) -> None:
    """4 steps, then --resume to 6. No tuning scenes here, so a card is written at every epoch
    (with validation scenes it is only rewritten when the tuning AbsRel improves)."""
    config = _write_config(tmp_path / "train.yaml", tmp_path / "out", steps=4, tuning_scenes=[])
    proc, t1 = _train(config)
    assert proc.returncode == 0, _explain(proc)
    card_path, last = tmp_path / "out" / "dualfocus-tiny.yaml", tmp_path / "out" / "last.safetensors"
    assert yaml.safe_load(card_path.read_text())["trained"]["steps"] == 4
    _write_config(tmp_path / "train.yaml", tmp_path / "out", steps=6, tuning_scenes=[])
    proc, t2 = _train(config, "--resume")
    assert proc.returncode == 0, _explain(proc)
    assert "resumed from" in proc.stderr and "at step 4" in proc.stderr
    assert "trained 6 steps" in proc.stdout
    card = yaml.safe_load(card_path.read_text())
    assert card["trained"]["steps"] == 6
    assert card["config"]["optim"]["steps"] == 6
    state = _checkpoint_state(last)
    assert state["step"] == 6
    assert [h["step"] for h in state["history"]] == [2, 4, 6]  # the first run's history carried over
    # CI's budget is guarded by CI's own clock, not here: a timed assert failed whenever a training
    # run shared the cores (the steps above are what keeps this a smoke run)
    print(f"\nresume test: {t1:.1f} + {t2:.1f} s")


def test_train_resume_with_validation(smoke_run: dict[str, Any], tmp_path: Path) -> None:
    """Resuming the smoke run (with tuning scenes when the data are here) to step 6."""
    assert smoke_run["proc"].returncode == 0, _explain(smoke_run["proc"])
    shutil.copytree(smoke_run["out"], tmp_path / "out")
    config = _write_config(tmp_path / "train.yaml", tmp_path / "out", steps=6)
    proc, _ = _train(config, "--resume")
    assert proc.returncode == 0, _explain(proc)
    assert "trained 6 steps" in proc.stdout
    state = _checkpoint_state(tmp_path / "out" / "last.safetensors")
    assert state["step"] == 6
    card = yaml.safe_load((tmp_path / "out" / "dualfocus-tiny.yaml").read_text())
    # the card describes the best weights: step 6 if it improved, else the earlier best
    assert card["trained"]["steps"] == card["validation"]["best_step"] == state["best_step"]


def test_train_resume_without_checkpoint(tmp_path: Path) -> None:
    config = _write_config(tmp_path / "train.yaml", tmp_path / "never")
    proc, _ = _train(config, "--resume")
    assert proc.returncode == 2, _explain(proc)
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error:") and "last.safetensors" in lines[-1]


def test_train_bad_config_key(tmp_path: Path) -> None:
    config = _write_config(tmp_path / "train.yaml", tmp_path / "out")
    raw = yaml.safe_load(config.read_text())
    raw["optim"]["stepz"] = 3
    config.write_text(yaml.safe_dump(raw))
    proc, _ = _train(config)
    assert proc.returncode == 2, _explain(proc)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:") and "optim.stepz" in lines[0] and str(config) in lines[0]
    assert proc.stdout == ""
    assert not (tmp_path / "out").exists()


def test_train_unknown_model(tmp_path: Path) -> None:
    config = _write_config(tmp_path / "train.yaml", tmp_path / "out")
    raw = yaml.safe_load(config.read_text())
    raw["model"] = "dualfocus-huge"
    config.write_text(yaml.safe_dump(raw))
    proc, _ = _train(config)
    assert proc.returncode == 2, _explain(proc)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "dualfocus-s" in lines[0], proc.stderr


# ------------------------------------------------------------------------------ DDP
@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("ddp")
    config = _write_config(tmp / "train.yaml", tmp / "out")
    proc, seconds = _run(
        ["-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
         "-m", "reconstruct.train", "--config", str(config), "--no-progress"]
    )
    return {"proc": proc, "seconds": seconds, "out": tmp / "out"}


def test_train_ddp_two_processes(ddp_run: dict[str, Any]) -> None:
    proc, out = ddp_run["proc"], ddp_run["out"]
    assert proc.returncode == 0, _explain(proc)
    assert proc.stdout.count("trained 4 steps") == 1  # only rank 0 reports
    assert (out / "dualfocus-tiny.safetensors").is_file() and (out / "last.safetensors").is_file()
    assert _checkpoint_state(out / "last.safetensors")["step"] == 4
    load_weights(out / "dualfocus-tiny.safetensors")
    print(f"\nDDP smoke run: {ddp_run['seconds']:.1f} s")  # timed by CI's clock, not asserted (shared cores)


def test_train_ddp_model_card_says_two_processes(ddp_run: dict[str, Any]) -> None:
    assert ddp_run["proc"].returncode == 0, _explain(ddp_run["proc"])
    card = yaml.safe_load((ddp_run["out"] / "dualfocus-tiny.yaml").read_text())
    assert card["trained"]["processes"] == 2


# ------------------------------------------------------------------------------ fine-tuning
def test_init_from_weights_copies_every_tensor(tmp_path: Path) -> None:
    from reconstruct.train import init_from_weights

    src = _trained_tiny(seed=3)
    path = save_weights(src, tmp_path / "w.safetensors", name="dualfocus-tiny")
    fresh = build_model("dualfocus-tiny")
    assert not torch.equal(fresh.state_dict()["encoder.stem.0.0.weight"], src.state_dict()["encoder.stem.0.0.weight"])
    init_from_weights(fresh, path)
    for k, v in src.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_init_from_weights_refuses_other_architecture(tmp_path: Path) -> None:
    from capture.errors import ConfigError
    from reconstruct.train import init_from_weights

    path = save_weights(build_model("dualfocus-tiny", spatial=False), tmp_path / "w.safetensors", name="x")
    with pytest.raises(ConfigError, match="different architecture"):
        init_from_weights(build_model("dualfocus-tiny"), path)


def test_init_from_weights_may_add_a_convex_upsampler(tmp_path: Path) -> None:
    """The one architecture change a fine-tune may make: bilinear weights into a convex-upsampling
    model; every other tensor copied, the upsampler fresh (its last layer at zero)."""
    from reconstruct.train import init_from_weights

    src = _trained_tiny(seed=3)
    path = save_weights(src, tmp_path / "w.safetensors", name="dualfocus-tiny")
    model = build_model("dualfocus-tiny", upsample="convex")
    init_from_weights(model, path)
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert float(model.upsampler.head[2].weight.detach().abs().sum()) == 0.0


@pytest.mark.parametrize(("src_overrides", "dst_overrides"), [
    ({"upsample": "convex"}, {}),  # dropping a trained upsampler
    ({}, {"upsample": "convex", "spatial": False}),  # adding one and changing something else
])
def test_init_from_weights_refuses_other_upsampler_changes(tmp_path: Path, src_overrides: dict, dst_overrides: dict) -> None:
    from capture.errors import ConfigError
    from reconstruct.train import init_from_weights

    path = save_weights(build_model("dualfocus-tiny", **src_overrides), tmp_path / "w.safetensors", name="x")
    with pytest.raises(ConfigError, match="different architecture"):
        init_from_weights(build_model("dualfocus-tiny", **dst_overrides), path)


def test_finetune_run_starts_from_weights_and_records_it(tmp_path: Path) -> None:
    src = _trained_tiny(seed=5)
    init = save_weights(src, tmp_path / "start.safetensors", name="dualfocus-tiny")
    config = _write_config(tmp_path / "ft.yaml", tmp_path / "out", steps=2, crop_px=[64])
    raw = yaml.safe_load(config.read_text())
    raw["init_weights"] = "start.safetensors"  # relative to the config file
    raw["optim"]["lr"] = 1e-9  # two steps at a negligible rate: the result stays next to the start
    config.write_text(yaml.safe_dump(raw))
    proc, _ = _train(config)
    assert proc.returncode == 0, _explain(proc)
    card = yaml.safe_load((tmp_path / "out" / "dualfocus-tiny.yaml").read_text(encoding="utf-8"))
    assert card["initialised_from"]["weights_sha256"] == sha256_of(init)
    # the starting weights scored on the same validation (a fine-tune never said whether it helped)
    start = card["initialised_from"]["tuning_metrics"]
    if card["validation"]["metrics"]:
        assert start["abs_rel"] == pytest.approx(card["validation"]["metrics"]["abs_rel"], rel=1e-2)
    else:  # a checkout without the shared scenes has no tuning split to score on
        assert start is None
    assert card["data"]["synthesis"]["crop_px"] == [64]
    tuned, _ = load_weights(tmp_path / "out" / "dualfocus-tiny.safetensors")
    w = "encoder.stem.0.0.weight"
    assert torch.allclose(tuned.state_dict()[w], src.state_dict()[w], atol=1e-5)
    assert not torch.allclose(build_model("dualfocus-tiny").state_dict()[w], src.state_dict()[w], atol=1e-3)


@pytest.mark.parametrize(("key", "value", "needle"), [
    ("init_weights", "missing.safetensors", "init_weights: no file"),
    ("crop_px", [30], "data.crop_px"),
    ("crop_px", [66], "data.crop_px"),
])
def test_finetune_bad_config_is_one_line(tmp_path: Path, key: str, value: Any, needle: str) -> None:
    config = _write_config(tmp_path / "ft.yaml", tmp_path / "out")
    raw = yaml.safe_load(config.read_text())
    if key == "crop_px":
        raw["data"]["crop_px"] = value
    else:
        raw[key] = value
    config.write_text(yaml.safe_dump(raw))
    proc, _ = _train(config)
    assert proc.returncode == 2, _explain(proc)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and str(config) in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


TRAIN_CONFIGS = sorted([*(ROOT / "configs").glob("train_*.yaml"), *(ROOT / "configs").glob("ablation*/*.yaml"), *(ROOT / "configs" / "tuning").glob("*.yaml")])


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_training_config_is_valid(path: Path, tmp_path: Path) -> None:
    """Every committed recipe loads. A second stage that starts from a first stage's output
    (``init_weights`` under ``runs/``, absent in a fresh clone) must name a folder that a
    committed first-stage recipe writes; it is loaded with a stand-in file there."""
    from reconstruct.train import load_train_config

    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    init = raw.get("init_weights")
    if init is not None and "runs/" in init:
        target = (path.parent / init).resolve()
        stage1 = [p for p in TRAIN_CONFIGS if p != path and (ROOT / yaml.safe_load(p.read_text())["out_dir"]).resolve() == target.parent]
        assert stage1, f"{path.name}: init_weights {init} is written by no committed recipe"
        raw["init_weights"] = str(tmp_path / target.name)
        (tmp_path / target.name).write_bytes(b"stand-in")
        raw["data"]["rgbd_root"] = str((path.parent / raw["data"]["rgbd_root"]).resolve())
        path = tmp_path / path.name
        path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    cfg = load_train_config(path)
    assert cfg.data.rgbd_root is None or cfg.data.rgbd_root.name == "middlebury_2001_2006"
    assert not set(cfg.data.tuning_scenes) & {"Art", "Books", "Dolls", "Laundry", "Moebius", "Reindeer"}


@pytest.mark.skipif(not cpu_bf16_native(), reason="this CPU has no native bfloat16 (AVX512-BF16 or AMX)")
def test_train_bf16_run(tmp_path: Path) -> None:
    """A few bf16-autocast steps: fp32 weights come out, finite, and the card says bf16."""
    config = _write_config(tmp_path / "bf16.yaml", tmp_path / "out", steps=2, crop_px=[64])
    raw = yaml.safe_load(config.read_text())
    raw["precision"] = "bf16"
    config.write_text(yaml.safe_dump(raw))
    proc, _ = _train(config)
    assert proc.returncode == 0, _explain(proc)
    model, _ = load_weights(tmp_path / "out" / "dualfocus-tiny.safetensors")
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())
    card = yaml.safe_load((tmp_path / "out" / "dualfocus-tiny.yaml").read_text(encoding="utf-8"))
    assert card["config"]["precision"] == "bf16"
    state = _checkpoint_state(tmp_path / "out" / "last.safetensors")
    assert state["history"] and all(math.isfinite(h["depth"]) and math.isfinite(h["fv"]) for h in state["history"])


def test_train_bf16_refused_on_a_cpu_without_native_bfloat16(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from capture.errors import ConfigError
    from reconstruct import train as train_mod

    config = _write_config(tmp_path / "bf16.yaml", tmp_path / "out", steps=2)
    raw = yaml.safe_load(config.read_text())
    raw["precision"] = "bf16"
    config.write_text(yaml.safe_dump(raw))
    cfg = train_mod.load_train_config(config)
    monkeypatch.setattr(train_mod, "cpu_bf16_native", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the refusal is for CPU training
    with pytest.raises(ConfigError, match=r"bf16\.yaml: precision: bf16 training on the CPU needs native bfloat16"):
        train_mod.train(cfg, config_path=config, resume=False, show_progress=False)
    assert not (tmp_path / "out").exists()


def test_losses_see_float32_after_a_bf16_forward() -> None:
    from reconstruct.train import _as_float32

    model = build_model("dualfocus-tiny").eval()
    x, f = torch.rand(1, 3, 3, 32, 32), torch.tensor([[0.5, 1.0, 2.0]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, f)
    assert out.surfaces is not None and out.surfaces.dtype == torch.bfloat16  # what the losses would have seen
    fixed = _as_float32(out)
    assert all(getattr(fixed, k).dtype == torch.float32 for k in ("depth", "prob", "logits_low", "surfaces", "confidence"))
