#!/usr/bin/env python3
"""DualFocus Rig: ``python run_rig.py --config rig.yaml`` (see README and INTERFACES.md)."""

from rig.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
