"""Safe YAML loading that refuses a mapping with a repeated key.

PyYAML's ``safe_load`` keeps the last of two equal keys without a word, so a hand-edited
``rig.yaml`` with ``focus_measure`` twice, or a second ``reconstruct:`` section, runs with
whichever came last. YAML itself says the keys of a mapping are unique; this loader holds to
that and reports the key and both lines (as a :class:`yaml.YAMLError`, so callers' existing
"not valid YAML at line L, column C: ..." handling names the file).
"""

from __future__ import annotations

from typing import Any

import yaml

__all__ = ["load_yaml"]


class _UniqueKeySafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with duplicate mapping keys as an error."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Node] = {}
            for key_node, _value in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # keys merged in with << may be overridden: that is what merging is for
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None,
                        f"duplicate key {key!r} (first at line {first.start_mark.line + 1}; "
                        "YAML keys must be unique, and only one of the two would be used)",
                        key_node.start_mark,
                    )
                seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """Parse ``text`` with safe loading; a repeated mapping key raises ``yaml.YAMLError``
    (its ``problem_mark`` is the second occurrence)."""
    return yaml.load(text, Loader=_UniqueKeySafeLoader)  # noqa: S506 (a SafeLoader subclass)
