#!/usr/bin/env python3
"""Planning tools without the rest of the CLI: `python tools/plan.py compute|hparams|fertility|layout ...`
(the same as `megasmol plan ...`)."""

import sys

from megasmol.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["plan", *sys.argv[1:]]))
