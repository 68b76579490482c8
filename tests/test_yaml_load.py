"""The strict YAML loader: safe loading that refuses a repeated mapping key."""

from __future__ import annotations

import pytest
import yaml

from capture.errors import yaml_problem
from capture.yaml_load import load_yaml


def test_plain_documents_load_as_with_safe_load() -> None:
    text = "a: 1\nb: {c: [1, 2, 2]}\nbase: &b {k: 1, j: 0}\nm:\n  <<: *b\n  k: 5\n"
    assert load_yaml(text) == yaml.safe_load(text) == {"a": 1, "b": {"c": [1, 2, 2]}, "base": {"k": 1, "j": 0}, "m": {"k": 5, "j": 0}}
    assert load_yaml("") is None


@pytest.mark.parametrize(
    ("text", "key", "line", "first"),
    [
        ("reconstruct:\n  method: dualfocus\n  focus_measure: tenengrad\n  focus_measure: modified_laplacian\n", "focus_measure", 4, 3),
        ("reconstruct:\n  method: classical\nsweep: {slices: 5}\nreconstruct:\n  model: dualfocus-s\n", "reconstruct", 4, 1),
        ("slices:\n  - {focus_distance_m: 1.0, focus_distance_m: 2.0}\n", "focus_distance_m", 2, 2),
    ],
)
def test_a_repeated_key_is_an_error_naming_it_and_both_lines(text: str, key: str, line: int, first: int) -> None:
    with pytest.raises(yaml.YAMLError) as info:
        load_yaml(text)
    assert yaml.safe_load(text) is not None  # what PyYAML alone does: keeps the last one silently
    msg = yaml_problem(info.value)
    assert msg.startswith(f"at line {line}, column ")
    assert f"duplicate key {key!r} (first at line {first}" in msg


def test_python_tags_stay_refused() -> None:
    with pytest.raises(yaml.YAMLError):
        load_yaml("evil: !!python/object/apply:os.system ['true']\n")


def test_training_config_and_calibration_file_with_a_repeated_key_are_one_error_naming_the_file(tmp_path) -> None:
    from calibration.focus_model import load_focus_model
    from capture.errors import ConfigError
    from reconstruct.train import load_train_config

    train = tmp_path / "train.yaml"
    train.write_text("model: dualfocus-tiny\noptim:\n  lr: 0.001\n  lr: 0.01\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"^{train}: not valid YAML at line 4, .*duplicate key 'lr'"):
        load_train_config(train)
    cal = tmp_path / "calibration.yaml"
    cal.write_text("focus_model:\n  kind: liquid_lens_linear\n  offset_dpt: 0.1\n  offset_dpt: 0.2\n  dpt_per_ma: 0.01\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"^{cal}: not valid YAML at line 4, .*duplicate key 'offset_dpt'"):
        load_focus_model(cal)
