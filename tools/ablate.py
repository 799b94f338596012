"""Run an experiment grid (the paper's Tables 2-4, or a user grid) and write table.md/.json/.png.

    python tools/ablate.py --config configs/quickstart.json --grid table2 --seeds 0,1,2 --out runs/ablation \
        [--set train.max_steps=100 ...] [--world 2] [--launcher auto|deepspeed|torchrun|python] \
        [--heldout DIR] [--dbscan-eps 0.2] [--report-only]

`--help` lists everything: the order overrides apply in, what is measured, resuming, exit codes.
"""
from __future__ import annotations

import sys

from largefr.experiments.cli import main

if __name__ == "__main__":
    sys.exit(main())
