"""Write a grid PNG of a config's training images before and after data.augment: look before training.

    python tools/preview_augment.py --config configs/quickstart.json --out grid.png [--augment config|arcface_torch]
                                    [--rows 4] [--columns 8] [--zoom 3] [--loader dali|torch] [--set KEY=VALUE ...]

Prepares the config's data as training does (the quickstart's synthetic set is generated on first
use), then for each of --rows spread-out parts of the data writes a row of images as stored and
below it the same images as the training loader yields them (data.augment, data.random_flip).
--augment arcface_torch previews insightface arcface_torch's dali_aug set
(largefr.data.augment.ARCFACE_TORCH_LIKE) instead of the config's data.augment.
"""
from __future__ import annotations

import argparse
import sys

from largefr.choices import RECORD_LOADER_KINDS
from largefr.config import load_config
from largefr.data.prepare import LOCAL_CPU_PROCESS, prepare_data
from largefr.data.preview import augment_of, grid_image, preview_rows, with_row_labels


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="training config (JSON or YAML)")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--augment", choices=("config", "arcface_torch"), default="config",
                        help="the config's data.augment (default) or arcface_torch's dali_aug set")
    parser.add_argument("--rows", type=int, default=4, help="pairs of rows (original, augmented); default 4")
    parser.add_argument("--columns", type=int, default=8, help="images per row; default 8")
    parser.add_argument("--zoom", type=int, default=0, help="pixel zoom; default: cells of at least 96 pixels")
    parser.add_argument("--loader", choices=RECORD_LOADER_KINDS, default=None, help="default: data.loader")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    args = parser.parse_args(argv)
    if args.rows < 1 or args.columns < 1 or args.zoom < 0:
        parser.error("--rows and --columns must be >= 1, --zoom >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    from PIL import Image

    args = parse_args(argv)
    prepared = prepare_data(load_config(args.config, args.set), LOCAL_CPU_PROCESS)
    config, folder = prepared.config, prepared.folder
    augment = augment_of(config, args.augment)
    if not augment.enabled:
        print(f"{args.config}: data.augment is all off: the augmented rows only show data.random_flip; pass "
              "--augment arcface_torch or --set data.augment.<name>_prob=...", file=sys.stderr)
    loader = args.loader or ("torch" if config.data.loader == "synthetic" else config.data.loader)
    rows = preview_rows(prepared, augment=augment, rows=args.rows, columns=args.columns, kind=loader)
    zoom = args.zoom or max(1, -(-96 // config.data.image_size))
    labels = [label for shard in range(args.rows) for label in (f"{shard}: stored", f"{shard}: trained")]
    grid = with_row_labels(grid_image(rows, zoom=zoom), labels, row_height=config.data.image_size * zoom)
    Image.fromarray(grid).save(args.out)
    on = [name for name, value in vars(augment).items() if name.endswith("_prob") and value > 0]
    print(f"{args.out}: {args.rows} x 2 rows (labelled: as stored, as trained) of {args.columns} images ({config.data.image_size} px, zoom {zoom}) from "
          f"{folder} through the {loader} loader; augmentation on: {', '.join(on) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
