"""Histograms of positive and negative pair cosine similarity on a .bin, with their means and gap (paper Fig. 2).

    python tools/plot_similarity.py --weights model.pt|--checkpoint DIR [--network r100] \
        --bins cfp_fp.bin --out sim.png [--title "CFP-FP"] [--json out.json]

Similarity: cosine of the L2-normalized flip-sum embeddings of a pair's two images.
"""
from __future__ import annotations

import argparse
import os
import sys

from largefr.cli import add_option, run_tool, write_json
from largefr.eval.pairs import embed_bin
from largefr.eval.plots import plot_similarity
from largefr.eval.collapse import collapse_warning, mean_pairwise_cosine
from largefr.eval.weights import add_model_arguments, load_backbone_from_args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    add_option(parser, "--bins", renamed_from=("--bin",), nargs=1, required=True, metavar="BIN",
               help="the verification .bin file to plot")
    parser.add_argument("--out", required=True, help="output PNG")
    parser.add_argument("--title", default=None, help="plot title (default: the .bin name and the network)")
    parser.add_argument("--json", help="also write the means and gap here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    (bin_path,) = args.bins

    def body() -> int:
        if not os.path.isfile(bin_path):
            raise FileNotFoundError(f"--bins {bin_path}: no such file")
        loaded = load_backbone_from_args(args)
        pairs = embed_bin(loaded.model, bin_path, batch_size=args.batch_size, device=loaded.device)
        name = os.path.splitext(os.path.basename(bin_path))[0]
        stats = plot_similarity(pairs.cosines(), pairs.issame, args.out, title=args.title or f"{name} - {loaded.network}")
        print(f"{args.out}: {name}, {stats.positive_pairs} positive pairs mean {stats.positive_mean:.3f}, "
              f"{stats.negative_pairs} negative pairs mean {stats.negative_mean:.3f}, gap {stats.gap:.3f}")
        warning = collapse_warning(name, mean_pairwise_cosine(pairs.embeddings), len(pairs.embeddings))
        if warning:
            print(warning)
        if args.json:
            write_json(args.json, {"model": loaded.summary(), "bin": bin_path, **stats.as_dict()})
        return 0

    return run_tool("plot_similarity", body)


if __name__ == "__main__":
    sys.exit(main())
