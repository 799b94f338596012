"""Loader throughput with data.augment on against off, for the DALI and torch loaders, in one run.

    python tools/bench_loader.py --config configs/quickstart.json [--loaders dali,torch] [--augment arcface_torch]
                                 [--batches 40] [--warmup 3] [--rounds 3] [--batch-size B] [--workers N]
                                 [--json PATH] [--set KEY=VALUE ...]

One process, the CPU (DALI's CPU pipeline; the torch loader's --workers worker processes,
default data.num_workers). Prepares the config's data as training does, then in each round and
for each loader builds the training loader twice, augmentation off and on, and times --batches
batches after --warmup untimed ones (the pipeline build and the first prefetch are not timed).
Off and on run back to back in every round, so their ratio stays fair on a shared, drifting
machine; the table gives the median images/s over rounds and the median of the per-round ratios.
--augment arcface_torch (default) times insightface arcface_torch's dali_aug set
(largefr.data.augment.ARCFACE_TORCH_LIKE), --augment config the config's data.augment.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import statistics
import sys
import time

from largefr.choices import RECORD_LOADER_KINDS
from largefr.cli import add_option, write_json
from largefr.config import AugmentConfig, load_config
from largefr.data.prepare import LOCAL_CPU_PROCESS, PreparedData, prepare_data
from largefr.data.preview import augment_of, config_loader


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="training config (JSON or YAML)")
    parser.add_argument("--loaders", default=",".join(RECORD_LOADER_KINDS),
                        help=f"comma-separated: {', '.join(RECORD_LOADER_KINDS)} (default all)")
    parser.add_argument("--augment", choices=("arcface_torch", "config"), default="arcface_torch",
                        help="the 'on' set: arcface_torch's dali_aug (default) or the config's data.augment")
    parser.add_argument("--batches", type=int, default=40, help="timed batches per measurement (default 40)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches first (default 3)")
    parser.add_argument("--rounds", type=int, default=3, help="off/on pairs per loader (default 3)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per batch, per process (default: "
                                                                       "train.batch_size)")
    add_option(parser, "--workers", renamed_from=("--num-workers",), type=int, default=None,
               help="loader worker threads per process (default: data.num_workers)")
    parser.add_argument("--json", default=None, help="write every measurement here")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    args = parser.parse_args(argv)
    args.loaders = [name.strip() for name in args.loaders.split(",") if name.strip()]
    if not args.loaders or any(name not in RECORD_LOADER_KINDS for name in args.loaders):
        parser.error(f"--loaders must name some of {', '.join(RECORD_LOADER_KINDS)}, got {args.loaders}")
    if min(args.batches, args.rounds) < 1 or args.warmup < 0:
        parser.error("--batches and --rounds must be >= 1, --warmup >= 0")
    return args


def images_per_second(prepared: PreparedData, *, kind: str, augment: AugmentConfig | None, batches: int,
                      warmup: int, epoch: int) -> float:
    """Images/s of `batches` batches of the training loader, after `warmup` untimed ones."""
    loader = config_loader(prepared, augment=augment, kind=kind)
    if len(loader) < warmup + batches:
        raise SystemExit(f"{prepared.folder}: an epoch has {len(loader)} batches, fewer than --warmup + --batches "
                         f"({warmup + batches}); lower them or --batch-size")
    loader.set_epoch(epoch)
    iterator = iter(loader)
    for _ in range(warmup):
        next(iterator)
    started, images = time.perf_counter(), 0
    for _ in range(batches):
        images += len(next(iterator)[0])
    seconds = time.perf_counter() - started
    close = getattr(iterator, "close", None)
    if close is not None:
        close()
    return images / seconds


def main(argv: list[str] | None = None) -> int:
    from largefr.perf.head_bench import machine_description

    args = parse_args(argv)
    prepared = prepare_data(load_config(args.config, args.set), LOCAL_CPU_PROCESS)
    config = prepared.config
    data = dataclasses.replace(config.data, num_workers=args.workers if args.workers is not None
                               else config.data.num_workers)
    config = dataclasses.replace(config, data=data,
                                 train=dataclasses.replace(config.train, batch_size=args.batch_size
                                                           or config.train.batch_size))
    prepared = dataclasses.replace(prepared, config=config)
    augment = augment_of(config, args.augment)
    runs: dict[str, dict[str, list[float]]] = {kind: {"off": [], "on": []} for kind in args.loaders}
    for round_index in range(args.rounds):
        for kind in args.loaders:
            for setting, chosen in (("off", None), ("on", augment)):
                rate = images_per_second(prepared, kind=kind, augment=chosen, batches=args.batches,
                                         warmup=args.warmup, epoch=round_index)
                runs[kind][setting].append(rate)
                print(f"round {round_index + 1}/{args.rounds} {kind:5s} augment {setting:3s}: {rate:8.1f} images/s",
                      file=sys.stderr, flush=True)
    machine = machine_description(1)
    print(f"{machine}; batch {config.train.batch_size}, {config.data.image_size} px, num_workers "
          f"{config.data.num_workers}, {args.batches} batches x {args.rounds} rounds; on = {args.augment}")
    print(f"{'loader':8s} {'off img/s':>10s} {'on img/s':>10s} {'on/off':>8s}")
    for kind, rates in runs.items():
        ratio = statistics.median(on / off for on, off in zip(rates["on"], rates["off"]))
        print(f"{kind:8s} {statistics.median(rates['off']):10.1f} {statistics.median(rates['on']):10.1f} {ratio:8.2f}")
    if args.json:
        write_json(args.json, {"config": args.config, "overrides": args.set, "machine": machine,
                               "augment": args.augment, "augment_fields": dataclasses.asdict(augment),
                               "batch_size": config.train.batch_size, "num_workers": config.data.num_workers,
                               "batches": args.batches, "rounds": args.rounds, "images_per_second": runs,
                               "date": datetime.date.today().isoformat()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
