"""Composition root: reads the config, builds the devices it names, runs the modes.

Public API (the same job as ``python run_rig.py``, from a script or notebook)::

    from rig import load_config, open_rig
    from reconstruct import reconstruct_stack, write_result

    config = load_config("configs/sim.yaml")
    with open_rig(config) as rig:
        stack = rig.capture_stack()
    stack.write("my_stack")
    write_result(reconstruct_stack(stack, method="classical"), "my_depth")
"""

from rig.build import Rig, open_rig
from rig.config import RigConfig, load_config, parse_config

__all__ = ["Rig", "RigConfig", "load_config", "open_rig", "parse_config"]
