"""Registered DualFocus variants; an unknown name lists the valid ones."""

from __future__ import annotations

from dataclasses import fields

from capture.errors import ReconstructionError
from reconstruct.dualfocus.model import DualFocusConfig, DualFocusNet

__all__ = ["MODELS", "build_model", "model_config", "count_parameters"]

MODELS: dict[str, DualFocusConfig] = {
    # the one we ship: trainable on two CPU cores
    "dualfocus-s": DualFocusConfig(enc_channels=(16, 48, 192), feat_channels=32, surface_channels=2, dec_channels=32, dec_blocks=2),
    # about the paper's size (~27M parameters), for GPU training
    "dualfocus-paper": DualFocusConfig(enc_channels=(64, 160, 608), feat_channels=128, surface_channels=4, dec_channels=112, dec_blocks=4),
    # a tiny instance for tests and CI smoke training
    "dualfocus-tiny": DualFocusConfig(enc_channels=(8, 12, 16), feat_channels=8, surface_channels=1, dec_channels=8, dec_blocks=1),
}


#: the values a string field of :class:`DualFocusConfig` may take
_CHOICES = {"focal_difference": ("augment", "replace"), "upsample": ("bilinear", "convex")}


def _checked_override(key: str, value: object, default: object) -> object:
    """``value`` for architecture field ``key``, checked against the field's type (and, for the
    string fields, its choices); a problem is raised as ``<key>: <what is wrong>``."""
    if key == "enc_channels":
        if (not isinstance(value, (list, tuple)) or len(value) != 3
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)):
            raise ReconstructionError(f"{key}: three positive integers (the encoder stage widths), got {value!r}")
        return tuple(value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ReconstructionError(f"{key}: true or false, got {value!r}")
    elif isinstance(default, int):
        least = 0 if key == "dec_blocks" else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ReconstructionError(f"{key}: an integer of at least {least}, got {value!r}")
    elif key in _CHOICES and value not in _CHOICES[key]:
        raise ReconstructionError(f"{key}: one of {', '.join(_CHOICES[key])}, got {value!r}")
    return value


def model_config(name: str, **overrides: object) -> DualFocusConfig:
    """A registered variant's architecture with ``overrides`` applied; an unknown name, an
    unknown field or a value the network cannot be built with raises a one-line
    :class:`ReconstructionError` (``model: ...`` or ``<field>: ...``)."""
    if name not in MODELS:
        raise ReconstructionError(f"model: unknown model {name!r}; registered: {', '.join(MODELS)}")
    cfg = MODELS[name]
    if overrides:
        known = {f.name: getattr(cfg, f.name) for f in fields(DualFocusConfig)}
        values = dict(known)
        for key, value in overrides.items():
            if key not in known:
                raise ReconstructionError(f"{key}: not an architecture field (fields: {', '.join(known)})")
            values[key] = _checked_override(key, value, known[key])
        cfg = DualFocusConfig(**values)  # type: ignore[arg-type]
    return cfg


def build_model(name: str, **overrides: object) -> DualFocusNet:
    """A fresh (untrained) network of a registered variant, with config overrides (ablations)."""
    return DualFocusNet(model_config(name, **overrides))


def count_parameters(model: DualFocusNet) -> int:
    return sum(p.numel() for p in model.parameters())
