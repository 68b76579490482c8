"""``python -m capture.emulators optotune|grbl [--fault KIND]``: serve an emulator on a
pseudo-terminal; the first line printed is the port path to put in ``rig.yaml``."""

from __future__ import annotations

import logging
import sys
import time

from capture.cli import OneLineArgumentParser
from capture.emulators import EMULATORS, FAULTS, emulator_class


def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(prog="python -m capture.emulators", description=__doc__)
    parser.add_argument("device", choices=sorted(EMULATORS), help="which device to emulate")
    parser.add_argument("--fault", choices=FAULTS, default=None, help="inject this fault (for tests)")
    parser.add_argument("--fault-after", type=int, default=0, metavar="N", help="start the fault after N requests (default 0)")
    parser.add_argument("--flavor", choices=("grbl", "marlin"), default="grbl", help="G-code firmware to emulate (grbl device only)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cls = emulator_class(args.device)
    kwargs = {"flavor": args.flavor} if args.device == "grbl" else {}
    emulator = cls(fault=args.fault, fault_after=args.fault_after, **kwargs)
    try:
        with emulator:
            print(emulator.port, flush=True)
            print(f"{args.device} emulator serving on {emulator.port}; Ctrl-C stops it", file=sys.stderr, flush=True)
            while emulator._thread is not None and emulator._thread.is_alive():
                time.sleep(0.2)
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
