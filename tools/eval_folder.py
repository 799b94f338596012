"""Evaluate a backbone on your own labelled faces: seeded balanced pairs (1:1) and a probe/gallery split (1:N).

    python tools/eval_folder.py --weights model.pt|--checkpoint DIR (--images DIR | --rec DIR) \
        [--out pairs.txt] [--pairs pairs.txt] [--num-pairs 6000] [--seed 0] [--nonmated-fraction 0.2] \
        [--allow-singletons] [--batch-size 64] [--json out.json]

--images: aligned crops in identity sub-folders (DIR/<identity>/<image>); --rec: a folder holding
train.rec/train.idx (identities = class labels). The pair list drawn from --seed is written to --out
(default <data>_pairs.txt in the working folder) so it can be shared and passed back with --pairs.
Definitions: largefr/eval/own_data.py, largefr/eval/identification.py.
"""
from __future__ import annotations

import argparse
import os
import sys

from largefr.cli import run_tool, write_json
from largefr.eval.embed import ImageFolderError
from largefr.eval.labelled_images import load_labelled_images
from largefr.eval.own_data import (DEFAULT_PAIRS, DEFAULT_SEED, NONMATED_FRACTION, evaluate_own_data,
                                   format_own_data_report, make_pairs, read_pairs, write_pairs)
from largefr.eval.pairs import image_size_of
from largefr.eval.weights import add_model_arguments, load_backbone_from_args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--images", help="folder of identity sub-folders of aligned face crops")
    data.add_argument("--rec", help="folder holding train.rec and train.idx (identities = labels)")
    parser.add_argument("--out", default=None, help="where to write the drawn pair list (default <data>_pairs.txt)")
    parser.add_argument("--pairs", default=None, help="reuse this pair list instead of drawing one")
    parser.add_argument("--num-pairs", type=int, default=DEFAULT_PAIRS,
                        help=f"pairs to draw, half positive (default {DEFAULT_PAIRS})")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the pairs and of the 1:N split")
    parser.add_argument("--nonmated-fraction", type=float, default=NONMATED_FRACTION,
                        help=f"share of identities kept out of the 1:N gallery (default {NONMATED_FRACTION})")
    parser.add_argument("--allow-singletons", action="store_true",
                        help="accept identities with one image (impostors and non-mated probes only)")
    parser.add_argument("--no-flip", action="store_true", help="embed the image only, not image + mirror image")
    parser.add_argument("--json", help="also write the results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        data = args.images or args.rec
        if not os.path.exists(data):
            raise ImageFolderError(f"{'--images' if args.images else '--rec'} {data}: no such file or directory")
        images = load_labelled_images(data, allow_singletons=args.allow_singletons)
        if args.pairs:
            pair_list = read_pairs(args.pairs, images.names)
            pairs_path = args.pairs
        else:
            pair_list = make_pairs(images.labels, num_pairs=args.num_pairs, seed=args.seed)
            pairs_path = args.out or f"{os.path.basename(os.path.normpath(data))}_pairs.txt"
            write_pairs(pairs_path, images.names, pair_list, note=f"seed {args.seed}, drawn from {data}")
        print(f"pairs: {pairs_path} ({int(pair_list.issame.sum())} positive, {int((~pair_list.issame).sum())} "
              "negative)")
        loaded = load_backbone_from_args(args)
        print(f"model: {loaded.network}, embedding {loaded.embedding_size}, from {loaded.source}")
        report = evaluate_own_data(loaded.model, images, pair_list, batch_size=args.batch_size,
                                   image_size=image_size_of(loaded.model), seed=args.seed,
                                   nonmated_fraction=args.nonmated_fraction, device=loaded.device,
                                   flip=not args.no_flip)
        print(format_own_data_report(report))
        if args.json:
            write_json(args.json, {"model": loaded.summary(), "pairs_file": pairs_path, "seed": args.seed,
                                   "result": report.as_dict()})
        return 0

    return run_tool("eval_folder", body)


if __name__ == "__main__":
    sys.exit(main())
