"""``python -m reconstruct.train --config configs/train_dualfocus_s.yaml [--resume]``

Trains a DualFocus variant on stacks synthesised on the fly from RGB-D scenes and procedural
scenes, validates on the tuning split every epoch, writes safetensors checkpoints and, for the
best epoch, the weights and a model card (YAML next to them). Runs the same under ``torchrun``
(DDP; gloo on CPU, NCCL on GPU): each process renders its own share of the data.

``max_minutes`` is the budget of one invocation: a run stopped by it and continued with
``--resume`` gets ``max_minutes`` again. The total over all invocations is kept in the
checkpoint's state (``wall_s``) and in the model card (``trained.wall_minutes``). Under DDP the
stop is decided together: when any process's budget is spent, all stop after the same step.

A resumed run continues as the uninterrupted run would have: the checkpoint carries every
process's random generator states (batch sampling: numpy; also torch, numpy's global and
python's), the epoch whose seed rendered the current training pool, and the loss averages.

On disk the checkpoint (``last.safetensors``) is written first, then the best weights and their
card as a pair (both written under temporary names, then renamed); ``--resume`` repairs a pair
that a kill left out of step with the checkpoint, so the card always describes the weights
beside it. Without ``--resume`` an out_dir that already holds a run is refused.
"""

from __future__ import annotations

import base64
import datetime as dt
import gc
import json
import logging
import math
import multiprocessing as mp
import os
import random
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from capture.atomic import fsync_file
from capture.cli import OneLineArgumentParser, one_line_errors
from capture.errors import ConfigError, InputError, RigError, yaml_problem
from capture.signals import sigterm_stops_like_ctrl_c
from capture.yaml_load import load_yaml
from reconstruct.dualfocus.checkpoint import load_checkpoint, load_weights, save_checkpoint, save_weights, sha256_of
from reconstruct.dualfocus.losses import LossWeights, total_loss
from reconstruct.backends.select import cpu_bf16_native
from reconstruct.dualfocus.model import DualFocusNet, DualFocusOutput, to_channels_last
from reconstruct.dualfocus.registry import build_model, count_parameters, model_config
from reconstruct.synth import REPORT_SCENES, RgbdSource, SynthRanges, load_middlebury, render_eval_stack, render_item

logger = logging.getLogger("reconstruct.train")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class DataSection(_Strict):
    rgbd_root: Path | None = Field(None, description="a Middlebury-layout folder (relative to the config file); null = procedural scenes only")
    tuning_scenes: list[str] = Field(default_factory=lambda: ["Aloe", "Flowerpots", "Rocks1"],
                                     description="validation scenes; never a report scene (REPORT_SCENES)")
    pool_size: int = Field(4000, ge=8, description="stacks rendered per refresh (split over processes)")
    refresh_every_epochs: int = Field(0, ge=0, description="render a fresh pool every K epochs (0 = never)")
    render_workers: int = Field(2, ge=1)
    procedural_share: float = Field(0.25, ge=0, le=1)
    val_width: int = Field(256, ge=32)
    crop_px: list[int] | None = Field(None, description="training crop sizes in pixels (default: the synthesis defaults)")


class OptimSection(_Strict):
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    batch_size: int = Field(4, ge=1)
    steps: int = Field(4000, ge=1)
    warmup_steps: int = Field(200, ge=0)
    grad_clip: float = Field(0.5, gt=0)
    steps_per_epoch: int = Field(500, ge=1)


class LossSection(_Strict):
    lambda_sv: float = Field(0.1, ge=0)
    lambda_fv: float = Field(1.0, ge=0)
    tau: float = Field(0.05, gt=0)
    beta: float = Field(0.05, gt=0)


class TrainConfig(_Strict):
    model: str = "dualfocus-s"
    model_overrides: dict[str, Any] = Field(default_factory=dict, description="architecture changes, e.g. for ablations")
    name: str | None = Field(None, description="name of the trained weights (default: the model name)")
    out_dir: Path = Path("runs/train")
    seed: int = Field(0, ge=0)
    threads: int = Field(0, ge=0, description="torch threads per process (0 = cores / processes)")
    max_minutes: float | None = Field(None, gt=0, description="stop (with a checkpoint) after this much wall time in this "
                                      "invocation; a --resume gets it again (the total is the card's trained.wall_minutes)")
    init_weights: Path | None = Field(None, description="start from these weights (safetensors; a fine-tune), not from random")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: the forward pass under bfloat16 autocast (fp32 weights, optimiser and losses); "
        "on the CPU only where it computes bfloat16 natively (AVX512-BF16 or AMX), about 2x the steps per minute")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: a CUDA GPU where torch sees one (under torchrun one GPU per process, NCCL), else the CPU (gloo)")
    data: DataSection = Field(default_factory=DataSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    loss: LossSection = Field(default_factory=LossSection)


def load_train_config(path: Path) -> TrainConfig:
    try:
        raw = load_yaml(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: config file not found") from exc
    except IsADirectoryError as exc:
        raise ConfigError(f"{path}: is a folder; --config names a YAML file") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {exc.start}); a training config is YAML text") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML {yaml_problem(exc)}") from exc
    try:
        cfg = TrainConfig.model_validate(raw or {})
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        raise ConfigError(f"{path}: {loc}: {msg}" if loc else f"{path}: the config must be a mapping of sections ({msg})") from exc
    try:
        model_config(cfg.model)  # unknown model names fail here, listing the valid ones
    except RigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    try:
        model_config(cfg.model, **cfg.model_overrides)  # unknown fields and values the network cannot take
    except RigError as exc:
        raise ConfigError(f"{path}: model_overrides.{exc}") from exc
    base = path.parent
    check_scene_lists(cfg, path)
    if cfg.data.rgbd_root is not None and not cfg.data.rgbd_root.is_absolute():
        cfg.data.rgbd_root = (base / cfg.data.rgbd_root).resolve()  # the folder itself is read (and checked) by train()
    if cfg.data.crop_px is not None and (not cfg.data.crop_px or min(cfg.data.crop_px) < 32 or any(c % 4 for c in cfg.data.crop_px)):
        raise ConfigError(f"{path}: data.crop_px: sizes must be multiples of 4 and at least 32, got {cfg.data.crop_px}")
    if cfg.init_weights is not None:
        if not cfg.init_weights.is_absolute():
            cfg.init_weights = (base / cfg.init_weights).resolve()
        if not cfg.init_weights.is_file():
            raise ConfigError(f"{path}: init_weights: no file at {cfg.init_weights}")
    return cfg


#: what a --resume may change: how long and where it runs, not what it trains (the model card
#: describes one run); data.rgbd_root, tuning_scenes and val_width have their own check, and
#: init_weights is read at the start only (the checkpoint keeps what it was)
RESUMABLE_SETTINGS = frozenset({"max_minutes", "optim.steps", "threads", "device", "out_dir", "data.render_workers"})
_NOT_COMPARED = RESUMABLE_SETTINGS | {"init_weights", "data.rgbd_root", "data.tuning_scenes", "data.val_width"}


def flat_config(cfg: TrainConfig) -> dict[str, Any]:
    """The config as ``{"optim.lr": 0.001, ...}`` (JSON values), as a checkpoint records it."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and (node or not prefix):
            for key, value in node.items():
                walk(value, f"{prefix}{key}" if not prefix else f"{prefix}.{key}")
        else:
            flat[prefix] = node

    walk(json.loads(cfg.model_dump_json()), "")
    return flat


def check_resumed_config(was: dict[str, Any] | None, cfg: TrainConfig, *, config_path: Path, out: Path) -> None:
    """Refuse a --resume whose config changed what the run trains (the learning rate, losses,
    seed, data mix, starting weights, ...): the card would describe a run that never happened.
    A checkpoint from before configs were recorded (``was`` None) is taken as it is."""
    if was is None:
        logger.warning("%s: the checkpoint in %s does not record its config (older code): changes to it cannot be checked", config_path, out)
        return
    now = flat_config(cfg)
    # keys the checkpoint recorded: a field added to the config later (with its default) is not a change
    changed = [k for k in sorted(was) if k not in _NOT_COMPARED and was.get(k) != now.get(k)]
    if changed:
        shown = "; ".join(f"{k} {was.get(k)!r} -> {now.get(k)!r}" for k in changed[:4]) + (f"; {len(changed) - 4} more" if len(changed) > 4 else "")
        raise ConfigError(f"{config_path}: {changed[0]}: the run in {out} was trained with other settings ({shown}); "
                          f"a resume may change only {', '.join(sorted(RESUMABLE_SETTINGS))}: "
                          "restore them, or start a new out_dir")


def check_scene_lists(cfg: TrainConfig, path: Path) -> None:
    """The report scenes (REPORT_SCENES, the 2005 Middlebury scenes) are never tuned or trained
    on: a config that lists one is refused, naming the file and the field."""
    report = {r.lower() for r in REPORT_SCENES}
    named = [s for s in cfg.data.tuning_scenes if s.lower() in report]
    if named:
        raise ConfigError(f"{path}: data.tuning_scenes: {', '.join(named)} {'is a report scene' if len(named) == 1 else 'are report scenes'} "
                          f"({', '.join(REPORT_SCENES)}: never used for tuning or training); choose others")


def synth_ranges(cfg: TrainConfig, *, have_sources: bool) -> SynthRanges:
    """The synthesis ranges a config asks for."""
    extra: dict[str, Any] = {"procedural_share": cfg.data.procedural_share if have_sources else 1.0}
    if cfg.data.crop_px is not None:
        extra["crop_px"] = tuple(cfg.data.crop_px)
    return SynthRanges(**extra)


# ------------------------------------------------------------------------------ data
_WORKER_SOURCES: list[RgbdSource] = []


def _init_worker(sources: list[RgbdSource]) -> None:
    global _WORKER_SOURCES
    _WORKER_SOURCES = sources
    # Ctrl-C reaches the whole process group: the main process stops the run (one line); the
    # workers printed a KeyboardInterrupt traceback each
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import cv2

    cv2.setNumThreads(1)


def _render_one(args: tuple[int, SynthRanges]) -> dict[str, np.ndarray]:
    """One stack; a draw that fails (a degenerate crop) is replaced by another, so a long
    training run does not die on one bad random draw; a second failure is raised."""
    seed, ranges = args
    try:
        return render_item(np.random.default_rng(seed), _WORKER_SOURCES, ranges)
    except Exception:  # noqa: BLE001 - logged, then retried once with another seed
        logger.exception("rendering stack with seed %d failed; drawing another", seed)
        return render_item(np.random.default_rng(seed + 1_000_000_007), _WORKER_SOURCES, ranges)


def render_pool(sources: list[RgbdSource], count: int, *, seed: int, ranges: SynthRanges, workers: int, show: bool) -> list[dict[str, np.ndarray]]:
    seeds = [(seed * 1_000_003 + i, ranges) for i in range(count)]
    bar = tqdm(total=count, desc="render", unit="stack", disable=not show, leave=False)
    pool_items = []
    if workers <= 1:
        _init_worker(sources)
        for s in seeds:
            pool_items.append(_render_one(s))
            bar.update(1)
    else:
        # spawn, not fork: forking a process whose torch/OpenMP threads already run can deadlock
        ctx = mp.get_context("spawn")
        with ctx.Pool(workers, initializer=_init_worker, initargs=(sources,)) as pool:
            # in seed order (not as finished): the batches drawn from the pool must not depend on timing
            for item in pool.imap(_render_one, seeds, chunksize=8):
                pool_items.append(item)
                bar.update(1)
    bar.close()
    return pool_items


def make_batch(items: list[dict[str, np.ndarray]], rng: np.random.Generator, batch_size: int) -> tuple[torch.Tensor, ...]:
    """A batch of same-N, same-size stacks with flips/rotations. Returns stack ``[B, N, 3, S, S]``
    float32, focus ``[B, N]``, target ``[B, S, S]``, mask ``[B, S, S]``."""
    by_key: dict[tuple[int, int], list[int]] = {}
    for i, it in enumerate(items):
        by_key.setdefault((it["stack"].shape[0], it["stack"].shape[1]), []).append(i)
    keys = [k for k, v in by_key.items() if len(v) >= batch_size] or list(by_key)
    key = keys[int(rng.integers(len(keys)))]
    chosen = rng.choice(by_key[key], size=min(batch_size, len(by_key[key])), replace=False)
    stacks, focus, target, mask = [], [], [], []
    for i in chosen:
        it = items[int(i)]
        s, t, m = it["stack"], it["target"], it["mask"]
        k = int(rng.integers(4))
        s, t, m = np.rot90(s, k, axes=(1, 2)), np.rot90(t, k), np.rot90(m, k)
        if rng.random() < 0.5:
            s, t, m = s[:, :, ::-1], t[:, ::-1], m[:, ::-1]
        stacks.append(np.ascontiguousarray(s))
        focus.append(it["focus"])
        target.append(np.ascontiguousarray(t))
        mask.append(np.ascontiguousarray(m))
    st = torch.from_numpy(np.stack(stacks)).permute(0, 1, 4, 2, 3).float().div_(255.0)
    return st, torch.from_numpy(np.stack(focus)), torch.from_numpy(np.stack(target)), torch.from_numpy(np.stack(mask))


# ------------------------------------------------------------------------------ evaluation
def predict_disparity(model: DualFocusNet, stack_u8: np.ndarray, focus: np.ndarray, *, bf16: bool = False) -> np.ndarray:
    """Network prediction in the stack's focus units, ``[H, W]`` (H, W multiples of 4);
    ``bf16``: the network body under bfloat16 autocast (softmax and expectation stay fp32). Runs
    on the model's device (a GPU during GPU training) and returns a CPU array."""
    device = next(model.parameters()).device
    x = torch.from_numpy(stack_u8).permute(0, 3, 1, 2).float().div_(255.0)[None].to(device)
    f = torch.from_numpy(focus.astype(np.float32))[None].to(device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(x, f)
        return DualFocusNet.to_focus_units(out.depth.float(), f)[0].cpu().numpy()


def disparity_metrics(pred_disp: np.ndarray, true_disp: np.ndarray, known: np.ndarray) -> dict[str, float]:
    """AbsRel and delta1 of depth = 1 / disparity (the unknown scale cancels), NaN as errors."""
    t = 1.0 / true_disp[known]
    p = pred_disp[known]
    ok = np.isfinite(p) & (p > 0)
    p = np.where(ok, 1.0 / np.where(ok, p, 1.0), 0.0)
    rel = np.abs(p - t) / t
    ratio = np.where(ok, np.maximum(p / t, t / np.maximum(p, 1e-12)), np.inf)
    return {"abs_rel": float(rel.mean()), "delta1": float((ratio < 1.25).mean())}


def validate(model: DualFocusNet, val: list[dict[str, Any]]) -> dict[str, float]:
    was_training = model.training
    model.eval()
    scores = [disparity_metrics(predict_disparity(model, v["stack"], v["focus"]), v["disparity"], v["known"]) for v in val]
    if was_training:
        model.train()
    return {k: float(np.mean([s[k] for s in scores])) for k in scores[0]} if scores else {}


# ------------------------------------------------------------------------------ training
def _lr_at(step: int, cfg: OptimSection) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _git_commit() -> str:
    """HEAD, with ``+dirty`` when the work tree differs from it."""
    here = Path(__file__).parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=here).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5, cwd=here).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def model_card(*, cfg: TrainConfig, model: DualFocusNet, weights: Path, weights_sha256: str, metrics: dict[str, float], state: dict[str, Any], train_scenes: list[str], config_path: Path) -> dict[str, Any]:
    """The card of ``weights`` (its final name; ``weights_sha256`` of the bytes that will be there)."""
    return {
        "format": "dualfocus-model-card/1",
        "name": cfg.name or cfg.model,
        "variant": cfg.model,
        "architecture": model.cfg.to_dict(),
        "parameters": count_parameters(model),
        "weights": weights.name,
        "weights_sha256": weights_sha256,
        "trained": {
            "steps": state["step"],
            "wall_minutes": round(state.get("wall_s", 0.0) / 60, 2),  # over all invocations (--resume)
            "processes": state.get("world_size", 1),
            "finished_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "commit": _git_commit(),
            "config_file": str(config_path),
        },
        "data": {
            "rgbd_root": str(cfg.data.rgbd_root) if cfg.data.rgbd_root else None,
            "train_scenes": train_scenes,
            "tuning_scenes": cfg.data.tuning_scenes,
            "report_scenes_never_used": list(REPORT_SCENES),
            "procedural_share": cfg.data.procedural_share if train_scenes else 1.0,
            "synthesis": synth_ranges(cfg, have_sources=bool(train_scenes)).__dict__,
        },
        "choices_not_in_the_paper": {
            "depth": "expectation over focus in normalised inverse depth (diopters), converted at the end",
            "poisson": "DCT-II as matrix products, Neumann boundary, zero-mean surfaces",
            "loss": cfg.loss.model_dump(),
            "optimiser": {"name": "AdamW", **cfg.optim.model_dump(), "schedule": "linear warm-up, cosine decay"},
        },
        "initialised_from": _initialised_from(cfg, state),
        "validation": {"split": "tuning", "metrics": metrics, "best_step": state.get("best_step")},
        "config": json.loads(cfg.model_dump_json()),
    }


def _write_synced(path: Path, text: str) -> None:
    """``text`` into ``path``, flushed to the disk (removed again if that fails)."""
    try:
        path.write_text(text, encoding="utf-8")
        fsync_file(path)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _pending(out: Path, name: str) -> tuple[Path, Path]:
    """The temporary names of a weights+card pair being written."""
    return out / f".{name}.pending.safetensors", out / f".{name}.pending.yaml"


def write_best(out: Path, name: str, *, cfg: TrainConfig, model: DualFocusNet, metrics: dict[str, float], state: dict[str, Any],
               train_scenes: list[str], config_path: Path) -> Path:
    """The best weights ``out/<name>.safetensors`` and their card ``out/<name>.yaml`` as a pair:
    both are written completely under temporary names (the card with the hash of the new
    weights), then renamed into place one right after the other. Only a kill between those two
    renames leaves a card of other weights, and :func:`repair_best` (on ``--resume``) mends that."""
    weights, card = out / f"{name}.safetensors", out / f"{name}.yaml"
    w_tmp, c_tmp = _pending(out, name)
    try:
        save_weights(model, w_tmp, name=name, extra={"step": str(state["step"]), "val": metrics})
        text = yaml.safe_dump(model_card(cfg=cfg, model=model, weights=weights, weights_sha256=sha256_of(w_tmp), metrics=metrics, state=state,
                                         train_scenes=train_scenes, config_path=config_path), sort_keys=False)
        _write_synced(c_tmp, text)
        os.replace(w_tmp, weights)
        os.replace(c_tmp, card)
    except BaseException:
        w_tmp.unlink(missing_ok=True)
        c_tmp.unlink(missing_ok=True)
        raise
    return weights


def _card_problem(out: Path, name: str, best_step: int) -> str | None:
    """Why the pair in ``out`` is not the best weights of step ``best_step`` with their card (None: it is)."""
    weights, card = out / f"{name}.safetensors", out / f"{name}.yaml"
    if not weights.is_file():
        return f"{weights.name} is missing"
    try:
        with safe_open(str(weights), framework="pt") as fh:
            step = (fh.metadata() or {}).get("step")
    except (SafetensorError, OSError) as exc:
        return f"{weights.name} is unreadable ({exc})"
    if step != str(best_step):
        return f"{weights.name} holds step {step}, the checkpoint's best is step {best_step}"
    try:
        sha = (load_yaml(card.read_text(encoding="utf-8")) or {}).get("weights_sha256")
    except (OSError, yaml.YAMLError, AttributeError):
        return f"{card.name} is missing or unreadable"
    if sha != sha256_of(weights):
        return f"{card.name} describes other weights than {weights.name}"
    return None


def repair_best(out: Path, name: str, *, cfg: TrainConfig, model: DualFocusNet, state: dict[str, Any], train_scenes: list[str], config_path: Path) -> None:
    """On ``--resume``: remove what a killed pair write left, and where the pair beside the
    checkpoint is not the checkpoint's best weights with their card, write it again. That happens
    only after a kill between the checkpoint and the pair (or between the pair's two renames),
    and then the checkpoint holds the best weights itself (the best step is its step)."""
    for tmp in _pending(out, name):
        tmp.unlink(missing_ok=True)
    best = state.get("best_step")
    if best is None:
        return
    problem = _card_problem(out, name, best)
    if problem is None:
        return
    if best == state["step"]:
        logger.warning("%s; writing the best weights and their card again from %s", problem, out / "last.safetensors")
        write_best(out, name, cfg=cfg, model=model, metrics=state.get("best_metrics") or {}, state=state,
                   train_scenes=train_scenes, config_path=config_path)
    else:
        logger.warning("%s; the checkpoint (step %s) cannot restore the weights of step %s: the pair is rewritten at the next "
                       "improvement of the tuning score", problem, state["step"], best)


def init_from_weights(model: DualFocusNet, path: Path) -> None:
    """Copy the tensors of a weights file into ``model``. The architectures must match, except
    that a convex-upsampling model may start from bilinear weights (its upsampler starts fresh)."""
    src, _ = load_weights(path)
    adds_upsampler = src.cfg.upsample == "bilinear" and model.cfg.upsample == "convex"
    if src.cfg != model.cfg and not (adds_upsampler and replace(src.cfg, upsample="convex") == model.cfg):
        raise ConfigError(f"init_weights: {path} holds a different architecture ({src.cfg.to_dict()}) than this config's model ({model.cfg.to_dict()})")
    # the configs differ at most by the added upsampler, so its tensors are the only ones missing
    missing, _ = model.load_state_dict(src.state_dict(), strict=not adds_upsampler)
    logger.info("initialised from %s%s", path, f"; the convex upsampler starts fresh ({len(missing)} tensors)" if adds_upsampler else "")


def _initialised_from(cfg: TrainConfig, state: dict[str, Any]) -> dict[str, Any] | None:
    """The card's ``initialised_from``: the record the run took at its start (checkpoints from
    2026-11-28 on), else the config's ``init_weights`` file as it is now (older checkpoints)."""
    record = state["init_record"] if "init_record" in state else _init_record(cfg.init_weights)
    return None if record is None else {**record, "tuning_metrics": state.get("init_metrics")}


def _init_record(path: Path | None) -> dict[str, Any] | None:
    """What a fine-tune started from: the weights file, its hash, and its own card's training record."""
    if path is None:
        return None
    shown = path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path
    record: dict[str, Any] = {"weights": str(shown), "weights_sha256": sha256_of(path)}
    card = path.with_suffix(".yaml")
    if card.is_file():
        try:
            record["trained"] = (load_yaml(card.read_text(encoding="utf-8")) or {}).get("trained")
        except yaml.YAMLError:
            record["trained"] = "unreadable model card"
    return record


def _as_float32(out: DualFocusOutput) -> DualFocusOutput:
    """The network's outputs in float32, so that the losses are computed in fp32 after a
    bf16-autocast forward pass (a no-op in fp32)."""
    return DualFocusOutput(**{k: (v.float() if torch.is_tensor(v) else v) for k, v in vars(out).items()})


def _holds_run(out: Path, name: str) -> list[str]:
    """The files of an earlier training run in ``out``."""
    return [f for f in ("last.safetensors", f"{name}.safetensors", f"{name}.yaml") if (out / f).exists()]


def _pool_seed(cfg: TrainConfig, rank: int, epoch: int) -> int:
    """The seed of the training pool rendered at ``epoch`` by process ``rank``."""
    return cfg.seed * 7919 + rank * 104729 + epoch


def _rng_snapshot(rng: np.random.Generator, device: torch.device) -> dict[str, Any]:
    """This process's random generator states, as JSON: the batch generator, numpy's global,
    torch's (and CUDA's) and python's."""
    legacy = np.random.get_state()
    py = random.getstate()
    snap: dict[str, Any] = {
        "batch": rng.bit_generator.state,
        "numpy": [legacy[0], legacy[1].tolist(), *legacy[2:]],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii"),
        "python": [py[0], list(py[1]), py[2]],
    }
    if device.type == "cuda":
        snap["cuda"] = base64.b64encode(torch.cuda.get_rng_state(device).numpy().tobytes()).decode("ascii")
    return snap


def _rng_restore(snap: dict[str, Any], rng: np.random.Generator, device: torch.device) -> None:
    rng.bit_generator.state = snap["batch"]
    legacy = snap["numpy"]
    np.random.set_state((legacy[0], np.array(legacy[1], dtype=np.uint32), *legacy[2:]))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(snap["torch"])), dtype=torch.uint8))
    if device.type == "cuda" and "cuda" in snap:
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(snap["cuda"])), dtype=torch.uint8), device)
    random.setstate((snap["python"][0], tuple(snap["python"][1]), snap["python"][2]))


def training_device(setting: str, *, config_path: Path, distributed: bool) -> torch.device:
    """The device this process trains on, for the config's ``device`` (``auto``, ``cpu``,
    ``cuda``). In a distributed run each process takes the GPU of its ``LOCAL_RANK``, or the
    only GPU it sees (one GPU per process, as SLURM's ``--gpus-per-task=1`` gives); a node with
    fewer GPUs than processes (torchrun's ``LOCAL_WORLD_SIZE``) is one line naming ``device``
    and the counts."""
    cuda = torch.cuda.is_available()
    if setting == "cuda" and not cuda:
        raise ConfigError(f"{config_path}: device: cuda asked for, but torch {torch.__version__} sees no CUDA GPU; use device: cpu or auto")
    if setting == "cpu" or not cuda:
        return torch.device("cpu")
    if not distributed:
        return torch.device("cuda")
    gpus = torch.cuda.device_count()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    per_node = os.environ.get("LOCAL_WORLD_SIZE")
    if per_node is not None and int(per_node) > gpus:
        raise ConfigError(
            f"{config_path}: device: {setting} trains each of the {per_node} processes per node on its own GPU, and torch sees "
            f"{gpus}; run torchrun --nproc-per-node {gpus}, or set device: cpu to train on the CPU (gloo)")
    if local_rank < gpus:
        return torch.device("cuda", local_rank)
    if gpus == 1 and per_node is None:  # the launcher gave this process one GPU of its own
        return torch.device("cuda", 0)
    raise ConfigError(f"{config_path}: device: {setting}: this process's LOCAL_RANK is {local_rank} and torch sees {gpus} GPU(s); "
                      "start as many processes per node as it has GPUs, or set device: cpu to train on the CPU (gloo)")


def train(cfg: TrainConfig, *, config_path: Path, resume: bool, show_progress: bool = True) -> dict[str, Any]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    distributed = world > 1
    out = cfg.out_dir
    name = cfg.name or cfg.model
    last = out / "last.safetensors"
    # everything a config or the folder can get wrong is checked before anything is written
    check_scene_lists(cfg, config_path)
    if resume and not last.is_file():
        raise ConfigError(f"--resume: no checkpoint at {last}")
    if not resume and (found := _holds_run(out, name)):
        raise ConfigError(f"{config_path}: out_dir: {out} already holds a training run ({', '.join(found)}); "
                          "pass --resume to continue it, or choose another out_dir")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{config_path}: out_dir: {out} is a file, not a folder; choose another out_dir")
    device = training_device(cfg.device, config_path=config_path, distributed=distributed)
    if distributed:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    if cfg.precision == "bf16" and device.type == "cpu" and not cpu_bf16_native():
        raise ConfigError(f"{config_path}: precision: bf16 training on the CPU needs native bfloat16 (AVX512-BF16 or AMX), "
                          "which this CPU lacks; use fp32")
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    main_proc = rank == 0
    show = show_progress and main_proc

    try:
        model = build_model(cfg.model, **cfg.model_overrides).to(device)
    except (RigError, ValueError, TypeError) as exc:  # load_train_config checked these; a config built in code may not be
        raise ConfigError(f"{config_path}: model_overrides: {exc}") from exc
    sources: list[RgbdSource] = []
    val_sources: list[RgbdSource] = []
    if cfg.data.rgbd_root is not None:
        exclude = tuple(REPORT_SCENES) + tuple(cfg.data.tuning_scenes)
        root = cfg.data.rgbd_root  # read before anything is written: a bad folder or scene name is one line
        try:
            sources = load_middlebury(root, exclude=exclude)
        except InputError as exc:
            raise ConfigError(f"{config_path}: data.rgbd_root: {root} (a relative rgbd_root is relative to the config file's folder, "
                              f"{config_path.resolve().parent}): {exc}") from exc
        if not cfg.data.tuning_scenes and main_proc:
            logger.warning("%s: data.tuning_scenes is empty: no validation, so every epoch's weights count as the best and the card "
                           "has no metrics (name tuning scenes, e.g. Aloe, Flowerpots, Rocks1, for a run to keep)", config_path)
        try:
            val_sources = load_middlebury(root, names=cfg.data.tuning_scenes)
        except InputError as exc:
            raise ConfigError(f"{config_path}: data.tuning_scenes: {exc} (scene names are case-sensitive)") from exc
    train_scenes = [s.name for s in sources]
    if cfg.data.rgbd_root is not None and not sources:
        logger.warning("%s: data.rgbd_root %s has no scene left to train on once the tuning scenes (%s) and report scenes are left out: "
                       "training on procedural scenes only", config_path, cfg.data.rgbd_root, ", ".join(cfg.data.tuning_scenes))
    ranges = synth_ranges(cfg, have_sources=bool(sources))

    if device.type == "cpu":
        to_channels_last(model)  # oneDNN's NHWC kernels: ~20 % faster in fp32 on AVX-512, same numbers
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    state: dict[str, Any] = {"step": 0, "wall_s": 0.0, "best_abs_rel": None, "best_step": None, "history": []}
    if cfg.init_weights is not None and not resume:
        try:
            init_from_weights(model, cfg.init_weights)
        except RigError as exc:  # the loader names the file: say which config and field asked for it
            text = str(exc).removeprefix("init_weights: ")
            raise ConfigError(f"{config_path}: init_weights: {text}") from exc
        # what the run started from, kept in the checkpoint: a resume never reads init_weights again,
        # so the card must not describe whatever file that path names later (or null)
        state["init_record"] = _init_record(cfg.init_weights)
    rng = np.random.default_rng([cfg.seed, rank, 0])
    # what the best checkpoint is chosen on: a resumed run must validate as the run it continues
    # the data, not how they are reached: a resolved path (a symlink, the same folder), the scenes as a set
    validation = {"rgbd_root": str(Path(cfg.data.rgbd_root).resolve()) if cfg.data.rgbd_root else None,
                  "tuning_scenes": sorted(cfg.data.tuning_scenes), "val_width": cfg.data.val_width}
    if resume:
        state = load_checkpoint(last, model, optimizer)
        logger.info("resumed from %s at step %d", last, state["step"])
        was = state.get("validation")
        if was is not None and was != validation:
            changed = ", ".join(f"{k} {was.get(k)!r} -> {validation[k]!r}" for k in validation if was.get(k) != validation[k])
            raise ConfigError(f"{config_path}: data: the run in {out} was validated on other data ({changed}): its best checkpoint "
                              "would be chosen across two validations; restore those settings, or start a new out_dir")
        # before anything is written (repair_best below writes the card from this config)
        check_resumed_config(state.get("config"), cfg, config_path=config_path, out=out)
        saved = state.get("rng") or {}
        if saved.get("world_size") == world and len(saved.get("ranks", ())) == world:
            _rng_restore(saved["ranks"][rank], rng, device)
        else:
            rng = np.random.default_rng([cfg.seed, rank, state["step"]])
            if main_proc:
                logger.warning("the checkpoint has no random generator states for %d processes: the batches drawn from here on "
                               "differ from those of an uninterrupted run", world)
        if main_proc:
            repair_best(out, name, cfg=cfg, model=model, state=state, train_scenes=train_scenes, config_path=config_path)
    elif main_proc:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"{config_path}: out_dir: cannot create {out} ({exc.strerror or exc})") from exc
    state["config"] = flat_config(cfg)
    state["world_size"] = world
    state["validation"] = validation
    val = [render_eval_stack(s, width=cfg.data.val_width, seed=i) for i, s in enumerate(val_sources)]
    if cfg.init_weights is not None and not resume and val and main_proc:
        # what a fine-tune starts from, on the same validation: whether it helped is then plain
        start = validate(model, val)
        state["init_metrics"] = {k: round(v, 5) for k, v in start.items()}
        logger.info("starting weights %s: tuning AbsRel %.4f, delta1 %.4f", cfg.init_weights, start["abs_rel"], start["delta1"])
    ddp_model: torch.nn.Module = model
    if distributed:
        ddp_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    weights = LossWeights(lambda_sv=cfg.loss.lambda_sv, lambda_fv=cfg.loss.lambda_fv, tau=cfg.loss.tau, beta=cfg.loss.beta)

    spe, refresh = cfg.optim.steps_per_epoch, cfg.data.refresh_every_epochs
    # the pool in use is the one of the last refresh (epoch 0 when there is none), not the current epoch's
    epoch = state["step"] // spe
    state.setdefault("pool_epoch", (epoch // refresh) * refresh if refresh else 0)
    share = max(cfg.optim.batch_size, cfg.data.pool_size // world)
    pool: list[dict[str, np.ndarray]] = []
    if state["step"] < cfg.optim.steps:
        pool = render_pool(sources, share, seed=_pool_seed(cfg, rank, state["pool_epoch"]), ranges=ranges, workers=cfg.data.render_workers, show=show)
    running: dict[str, float] = dict(state.get("running") or {})  # the loss averages go on where they were
    wall_before = float(state["wall_s"])  # earlier invocations; max_minutes counts this one only
    t_start = time.monotonic()
    bar = tqdm(total=cfg.optim.steps, initial=state["step"], desc=f"train {name}", unit="step", disable=not show)
    model.train()
    stop = False
    while state["step"] < cfg.optim.steps and not stop:
        step = state["step"]
        for g in optimizer.param_groups:
            g["lr"] = _lr_at(step, cfg.optim)
        x, f, t, m = (v.to(device) for v in make_batch(pool, rng, cfg.optim.batch_size))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            out_net = ddp_model(x, f)
        out_net = _as_float32(out_net)
        pos = DualFocusNet.normalise_focus(f)[1]
        loss, parts = total_loss(out_net, pos, t, m, weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # the gradients are averaged over the processes: a non-finite norm is seen by all of them alike
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        if not torch.isfinite(grad_norm) or (not distributed and not torch.isfinite(loss)):
            raise ConfigError(
                f"{config_path}: training diverged at step {step + 1}: the loss is {float(loss.detach()):g}, the gradient norm {float(grad_norm):g} "
                f"(optim.lr {cfg.optim.lr:g}); nothing of this step was applied, "
                + (f"and {last} keeps the last checkpoint: " if last.is_file() else "and no checkpoint was written yet: ")
                + "lower optim.lr, or check the data"
            )
        optimizer.step()
        state["step"] = step + 1
        for k, v in parts.items():
            running[k] = 0.98 * running.get(k, v) + 0.02 * v
        bar.update(1)
        bar.set_postfix({k: f"{v:.4f}" for k, v in running.items()})
        this_run_s = time.monotonic() - t_start
        state["wall_s"] = wall_before + this_run_s
        if cfg.max_minutes is not None:
            over = this_run_s > 60 * cfg.max_minutes
            if distributed:  # one decision for all: a process that stopped alone would leave the others hanging in a collective
                flag = torch.tensor([int(over)], dtype=torch.int32, device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                over = bool(flag.item())
            stop = over
        boundary = state["step"] % spe == 0
        if boundary or state["step"] == cfg.optim.steps or stop:
            epoch = state["step"] // spe
            # a fresh pool for the next epoch; recorded before the checkpoint, so that a run stopped
            # here (max_minutes) resumes with the pool the uninterrupted run would have used
            refresh_now = bool(refresh) and boundary and epoch % refresh == 0 and state["step"] < cfg.optim.steps
            if refresh_now:
                state["pool_epoch"] = epoch
            state["running"] = dict(running)
            snap = _rng_snapshot(rng, device)  # after this step's batch: where the next one is drawn from
            snaps: list[Any] = [snap]
            if distributed:
                snaps = [None] * world
                dist.all_gather_object(snaps, snap)
            metrics = validate(model, val) if (val and main_proc) else {}
            if main_proc:
                state["rng"] = {"world_size": world, "ranks": snaps}
                state["history"].append({"step": state["step"], "wall_min": round(state["wall_s"] / 60, 2), **{k: round(v, 5) for k, v in running.items()}, **{f"val_{k}": round(v, 5) for k, v in metrics.items()}})
                improved = metrics and (state["best_abs_rel"] is None or metrics["abs_rel"] < state["best_abs_rel"])
                if improved or not val:
                    state["best_abs_rel"] = metrics.get("abs_rel")
                    state["best_step"] = state["step"]
                    state["best_metrics"] = metrics
                # the checkpoint first: a kill before the pair below is in place leaves a checkpoint
                # whose model is the best one, from which --resume writes the pair again
                save_checkpoint(model, optimizer, last, name=name, state=state)
                if improved or not val:
                    write_best(out, name, cfg=cfg, model=model, metrics=metrics, state=state, train_scenes=train_scenes, config_path=config_path)
                msg = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                tqdm.write(f"step {state['step']}: {msg or 'no validation scenes'}{' (best)' if improved else ''}")
            if refresh_now and not stop:
                pool = render_pool(sources, share, seed=_pool_seed(cfg, rank, epoch), ranges=ranges, workers=cfg.data.render_workers, show=show)
    bar.close()
    if distributed:
        dist.barrier()
        # DDP's reducer holds the process group: let it go first, so the group's gloo threads are
        # joined by destroy_process_group here, not by a destructor at interpreter exit (once, under
        # a loaded CI machine, rank 1 aborted there with "terminate called without an active exception"
        # after training had finished; gloo's teardown order, pytorch/pytorch PR 179291)
        del ddp_model
        gc.collect()
        dist.destroy_process_group()
    return state


def main(argv: list[str] | None = None) -> int:
    p = OneLineArgumentParser(prog="python -m reconstruct.train", description="Train a DualFocus model on synthesised focal stacks.")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/last.safetensors")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    def run() -> int:
        cfg = load_train_config(args.config)
        # SIGTERM (kill, a scheduler's time limit) stops as Ctrl-C does: checkpoint kept, one line, exit 130
        with sigterm_stops_like_ctrl_c():
            state = train(cfg, config_path=args.config, resume=args.resume, show_progress=not args.no_progress)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"trained {state['step']} steps in {state['wall_s'] / 60:.1f} min; best tuning AbsRel {state['best_abs_rel']} at step {state['best_step']}; weights in {cfg.out_dir}")
        return 0

    return one_line_errors(run, debug=args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
