"""Weights and checkpoints, only ever as safetensors (never unpickled).

A weights file holds the model's tensors; its metadata names the variant and carries the
architecture config as JSON, so a file is self-describing. A training checkpoint adds the
optimiser's tensors (``optim.*``) and the training state as JSON metadata.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from capture.atomic import fsync_file
from capture.errors import InputError, OutputError
from reconstruct.dualfocus.model import DualFocusConfig, DualFocusNet

logger = logging.getLogger(__name__)

__all__ = ["check_weights_file", "save_weights", "load_weights", "save_checkpoint", "load_checkpoint", "sha256_of"]


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write to ``.<name>.tmp`` beside ``path``, flush it to the disk, then rename it into place:
    ``path`` is always either the old file or the complete new one. The temporary file is removed
    on any failure, Ctrl-C (KeyboardInterrupt) included."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        fsync_file(tmp)  # the data reach the disk before the rename makes them the file
        os.chmod(tmp, 0o644)  # safetensors creates 0600 files: weights are for colleagues to read too
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OutputError(f"{path}: cannot write weights ({exc.strerror or exc})") from exc
        raise


def save_weights(model: DualFocusNet, path: str | Path, *, name: str, extra: dict[str, Any] | None = None) -> Path:
    """Model tensors + ``{"model": name, "config": json, ...}`` metadata."""
    path = Path(path)
    meta = {"format": "dualfocus-weights/1", "model": name, "config": json.dumps(model.cfg.to_dict())}
    for k, v in (extra or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    _atomic_save(dict(model.state_dict()), path, meta)
    return path


def check_weights_file(path: Path) -> Path:
    """A weights path we may load: a ``.safetensors`` file that exists (never a pickle)."""
    if path.suffix != ".safetensors":
        raise InputError(f"{path}: weights load only from .safetensors files")
    if not path.is_file():
        raise InputError(f"{path}: weights file not found")
    return path


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    check_weights_file(path)
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable safetensors file ({exc})") from exc
    return tensors, meta


def load_weights(path: str | Path) -> tuple[DualFocusNet, dict[str, str]]:
    """A model built from the file's own config, with its weights, in eval mode."""
    path = Path(path)
    tensors, meta = _read(path)
    if "config" not in meta:
        raise InputError(f"{path}: metadata has no 'config' (not a DualFocus weights file)")
    try:
        raw = json.loads(meta["config"])
        raw["enc_channels"] = tuple(raw["enc_channels"])
        model = DualFocusNet(DualFocusConfig(**raw))
    except (ValueError, TypeError, KeyError) as exc:
        raise InputError(f"{path}: metadata 'config' is not a DualFocus architecture ({exc})") from exc
    state = {k: v for k, v in tensors.items() if not k.startswith("optim.")}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        # torch's message is a heading line, then one indented line per tensor: keep the first of those
        details = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = details[1] if len(details) > 1 else details[0] if details else type(exc).__name__
        more = f"; {len(details) - 2} more" if len(details) > 2 else ""
        raise InputError(f"{path}: weights do not fit the architecture in its metadata ({detail}{more})") from exc
    if missing or unexpected:
        raise InputError(f"{path}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.eval()
    return model, meta


def save_checkpoint(model: DualFocusNet, optimizer: torch.optim.Optimizer, path: str | Path, *, name: str, state: dict[str, Any]) -> Path:
    """Model + optimiser tensors; ``state`` (step, schedule, rng, ...) as JSON metadata."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = dict(model.state_dict())
    opt = optimizer.state_dict()
    for pid, pstate in opt["state"].items():
        for key, value in pstate.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"optim.{pid}.{key}"] = t
    meta = {
        "format": "dualfocus-checkpoint/1",
        "model": name,
        "config": json.dumps(model.cfg.to_dict()),
        "param_groups": json.dumps(opt["param_groups"]),
        "state": json.dumps(state),
    }
    _atomic_save(tensors, path, meta)
    return path


def _architecture_difference(meta: dict[str, str], cfg: DualFocusConfig) -> str:
    """``field A in the checkpoint, B in the model; ...`` for the architecture fields that differ
    between a file's ``config`` metadata and ``cfg`` ("" when they agree or the metadata is unreadable)."""
    try:
        raw = json.loads(meta["config"])
        raw["enc_channels"] = tuple(raw["enc_channels"])
        theirs = DualFocusConfig(**raw).to_dict()  # fills fields older files lack (upsample)
    except (KeyError, ValueError, TypeError):
        return ""
    ours = cfg.to_dict()
    return "; ".join(f"{k} {theirs[k]!r} in the checkpoint, {ours[k]!r} in the model" for k in ours if theirs.get(k) != ours[k])


def load_checkpoint(path: str | Path, model: DualFocusNet, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model and optimiser in place; returns the training state. A checkpoint of another
    architecture (the config's model or model_overrides changed since) raises one
    :class:`InputError` naming the file, the differing fields and the first mismatching tensor,
    before anything is copied."""
    path = Path(path)
    tensors, meta = _read(path)
    theirs = {k: v for k, v in tensors.items() if not k.startswith("optim.")}
    ours = model.state_dict()
    problems = [f"tensor {k} is missing from the checkpoint" for k in ours if k not in theirs]
    problems += [f"tensor {k} is {list(theirs[k].shape)} in the checkpoint, {list(v.shape)} in the model"
                 for k, v in ours.items() if k in theirs and theirs[k].shape != v.shape]
    problems += [f"tensor {k} of the checkpoint is not in the model" for k in theirs if k not in ours]
    fields = _architecture_difference(meta, model.cfg)
    if problems or fields:
        what = "; ".join(p for p in (fields, problems[0] if problems else "") if p)
        raise InputError(f"{path}: written for another architecture ({what}); resume with the model and "
                         "model_overrides it was trained with, or train into another out_dir")
    try:
        model.load_state_dict(theirs)
        opt_state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, pid, name = key.split(".", 2)
                opt_state.setdefault(int(pid), {})[name] = value
        optimizer.load_state_dict({"state": opt_state, "param_groups": json.loads(meta["param_groups"])})
        return json.loads(meta["state"])
    except (KeyError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: not a training checkpoint this model can resume from ({first})") from exc
