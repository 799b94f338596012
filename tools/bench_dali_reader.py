"""DALI's mxnet reader with the .rec memory-mapped against plain file I/O (`dont_use_mmap`), in one run.

    python tools/bench_dali_reader.py --rec DATA_DIR [--batch-size 64] [--workers 1] [--batches 60] [--rounds 3]
                                      [--json PATH]

largefr's DALI loader reads with plain file I/O, so that a .rec truncated under the job gives an error
instead of SIGBUS (docs/RELIABILITY.md, 'Data changed under the job'). This measures what that costs: for
the reader alone and for the reader with CPU decoding, each round times both settings back to back
(--batches batches after 5 untimed ones) and the table gives the median images/s and their ratio.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from largefr.cli import write_json

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

WARMUP_BATCHES = 5


def images_per_second(index, *, plain_io: bool, decode: bool, batch_size: int, workers: int, batches: int) -> float:
    from largefr.data.dali_loader import import_dali

    dali, fn, types, _ = import_dali()

    def graph():
        encoded, labels = fn.readers.mxnet(path=list(index.rec_paths), index_path=[index.dali_index()],
                                           random_shuffle=True, initial_fill=1024, dont_use_mmap=plain_io)
        return (fn.decoders.image(encoded, device="cpu", output_type=types.RGB) if decode else encoded), labels

    pipe = dali.pipeline_def(graph)(batch_size=batch_size, num_threads=workers, device_id=None, seed=1)
    pipe.build()
    for _ in range(WARMUP_BATCHES):
        pipe.run()
    started = time.perf_counter()
    for _ in range(batches):
        pipe.run()
    return batches * batch_size / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rec", required=True, help="a .rec file or folder of shards (insightface layout)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch, per process (the one pipeline)")
    parser.add_argument("--workers", type=int, default=1, help="DALI threads of the pipeline (default 1)")
    parser.add_argument("--batches", type=int, default=60, help="timed batches per measurement (default 60)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of both settings back to back (default 3)")
    parser.add_argument("--json", default=None, help="write the medians and ratios here")
    args = parser.parse_args(argv)
    from largefr.data.image_index import prepare_image_index

    index = prepare_image_index(args.rec)
    report = {}
    for decode in (False, True):
        rates: dict[str, list[float]] = {"mmap": [], "plain_io": []}
        for round_number in range(args.rounds):
            for name in rates:
                rates[name].append(images_per_second(index, plain_io=name == "plain_io", decode=decode,
                                                     batch_size=args.batch_size, workers=args.workers,
                                                     batches=args.batches))
            print(f"round {round_number + 1}/{args.rounds}, decode={decode}: done", file=sys.stderr, flush=True)
        medians = {name: statistics.median(values) for name, values in rates.items()}
        label = "reader + CPU decode" if decode else "reader alone"
        report[label] = {**medians, "ratio_plain_io_to_mmap": medians["plain_io"] / medians["mmap"]}
        print(f"{label:20s} mmap {medians['mmap']:10,.0f} img/s   plain I/O {medians['plain_io']:10,.0f} img/s   "
              f"ratio {medians['plain_io'] / medians['mmap']:.2f}x")
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
