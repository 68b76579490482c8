"""Registered DualFocus variants; an unknown name lists the valid ones."""

from __future__ import annotations

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


def model_config(name: str, **overrides: object) -> DualFocusConfig:
    if name not in MODELS:
        raise ReconstructionError(f"model: unknown model {name!r}; registered: {', '.join(MODELS)}")
    cfg = MODELS[name]
    if overrides:
        cfg = DualFocusConfig(**{**cfg.to_dict(), **overrides, "enc_channels": tuple(overrides.get("enc_channels", cfg.enc_channels))})  # type: ignore[arg-type]
    return cfg


def build_model(name: str, **overrides: object) -> DualFocusNet:
    """A fresh (untrained) network of a registered variant, with config overrides (ablations)."""
    return DualFocusNet(model_config(name, **overrides))


def count_parameters(model: DualFocusNet) -> int:
    return sum(p.numel() for p in model.parameters())
