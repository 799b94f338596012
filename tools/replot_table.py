"""Redraw an ablation figure (table.png) from a markdown means table, where the runs themselves are gone.

    python tools/replot_table.py --md docs/EXPERIMENTS.md --after "## Table 2" --grid table2 --seeds 0,1,2 \
        --png docs/img/ablation_table2.png

Reads the first '| setting | seeds | ... |' table (cells 'mean +- std', as tools/ablate.py writes table.md)
after the line containing --after, and draws it as tools/ablate.py draws table.png (bars from zero, the
title saying what a bar averages). With the runs at hand, `tools/ablate.py ... --report-only` is the source.
"""
from __future__ import annotations

import argparse
import sys

from largefr.experiments.report import draw_table, table_from_markdown


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--md", required=True, help="markdown file holding the table")
    parser.add_argument("--after", required=True, help="text of a line before the table (e.g. its heading)")
    parser.add_argument("--grid", required=True, help="grid name for the title")
    parser.add_argument("--seeds", default="0,1,2", help="the seeds the table's means are over (default 0,1,2)")
    parser.add_argument("--png", required=True, help="output PNG")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with open(args.md, encoding="utf-8") as handle:
        table = table_from_markdown(handle.read(), args.after, grid=args.grid,
                                    seeds=[int(seed) for seed in args.seeds.split(",")])
    figure = draw_table(table)
    figure.savefig(args.png, dpi=110)
    print(f"{args.png}: {len(table['settings'])} settings x {len(table['headline_metrics'])} metrics from {args.md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
