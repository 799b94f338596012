"""Large-gallery identification (MegaFace's measures): exact top-k search streamed in blocks, sharded over ranks.

    python tools/eval_search.py --probes p.npy --probe-labels pl.npy --gallery g.npy --gallery-labels gl.npy \
        [--distractors 1000000] [--distractor-file d.npy] [--world 2] [--device cpu|cuda] \
        [--block-rows 65536] [--probe-rows 1024] [--check-probes 100] [--progress-every 10] [--json out.json]
    python tools/eval_search.py --weights model.pt (--images DIR | --rec DIR) [--seed 0] [--nonmated-fraction 0.2] \
        [--distractors 1000000] [--world 2]
    python tools/eval_search.py --synthetic-identities 1000 --embedding-size 512 --distractors 1000000 --world 2

Embeddings: .npy matrices (e.g. from tools/embed.py, with --labels-out for the labels); labels are
integers, a probe is mated when some gallery row has its label. With --weights (or --checkpoint) and
--images or --rec, the labelled faces are embedded (flip-sum, L2-normalized) and split into probes
and gallery exactly as tools/eval_folder.py splits them. --distractors appends that many
random unit vectors (seeded by --seed; no identity) after the gallery. Reports rank-1/5/10 with the
distractors, TPIR at FPIR when some probes are non-mated, TAR at FAR 1e-6 .. 1e-3 over every
probe x gallery pair, the time and each rank's peak memory. --check-probes N re-ranks the first N
probes by a plain float64 sort of the whole gallery and counts identical candidate lists.
--embedding-size is the size of the synthetic set (default 512), or a check of the model's.
--device: the search runs on cuda (nccl, one GPU a rank) when it names cuda, else on cpu (gloo).
Definitions: largefr/eval/identification.py; the search: largefr/eval/search.py.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

from largefr.cli import run_tool, write_json
from largefr.errors import UsageError
from largefr.eval.labelled_images import load_labelled_images
from largefr.eval.own_data import NONMATED_FRACTION, embed_labelled_images, split_gallery
from largefr.eval.pairs import image_size_of
from largefr.eval.search import format_search_report
from largefr.eval.search_job import SearchJob, brute_force_check, job_summary, run_search
from largefr.eval.weights import add_model_arguments, default_device, load_backbone_from_args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser, required=False)
    faces = parser.add_mutually_exclusive_group()
    faces.add_argument("--images", help="with a model: identity sub-folders of aligned crops, split as eval_folder")
    faces.add_argument("--rec", help="with a model: a folder holding train.rec/train.idx, split as eval_folder")
    parser.add_argument("--nonmated-fraction", type=float, default=NONMATED_FRACTION,
                        help=f"with --images/--rec: share of identities kept out of the gallery ({NONMATED_FRACTION})")
    for name, what in (("probes", "probe embeddings"), ("probe-labels", "probe identity labels"),
                       ("gallery", "gallery embeddings"), ("gallery-labels", "gallery identity labels")):
        parser.add_argument(f"--{name}", default=None, help=f"{what} (.npy)")
    parser.add_argument("--synthetic-identities", type=int, default=0,
                        help="instead of files: this many random identities, one gallery and one probe vector each")
    parser.add_argument("--synthetic-nonmated", type=int, default=None,
                        help="synthetic probes of identities absent from the gallery (default identities / 10)")
    parser.add_argument("--noise", type=float, default=1.0, help="synthetic spread around each identity centre")
    parser.add_argument("--distractors", type=int, default=0, help="random unit distractors added to the gallery")
    parser.add_argument("--distractor-file", default=None, help="distractor embeddings (.npy) added to the gallery")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic set and random distractors")
    parser.add_argument("--world", type=int, default=1, help="ranks sharing the gallery (spawned on this machine)")
    parser.add_argument("--block-rows", type=int, default=65536, help="gallery rows scored at a time, per rank")
    parser.add_argument("--probe-rows", type=int, default=1024, help="probes scored at a time, per rank")
    parser.add_argument("--k", type=int, default=10, help="candidates listed per probe (>= 10 for rank-10)")
    parser.add_argument("--check-probes", type=int, default=0, help="brute-force check of the first N probes")
    parser.add_argument("--progress-every", type=float, default=10.0, help="seconds between progress lines")
    parser.add_argument("--json", help="also write the results here")
    return parser.parse_args(argv)


def embed_faces(args: argparse.Namespace, folder: str) -> dict[str, str]:
    """Embed --images/--rec, split it as eval_folder does, save probes and gallery under `folder`."""
    loaded = load_backbone_from_args(args)
    images = load_labelled_images(args.images or args.rec)
    embeddings = embed_labelled_images(loaded.model, images, batch_size=args.batch_size,
                                       image_size=image_size_of(loaded.model), device=loaded.device)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True).clip(min=1e-12)
    split = split_gallery(images.labels, seed=args.seed, nonmated_fraction=args.nonmated_fraction)
    paths = {}
    for name, rows in (("probes", split.probes), ("gallery", split.gallery)):
        paths[name], paths[f"{name}_labels"] = (os.path.join(folder, f"{name}{suffix}.npy")
                                                for suffix in ("", "_labels"))
        np.save(paths[name], embeddings[rows])
        np.save(paths[f"{name}_labels"], images.labels[rows])
    print(f"{loaded.network}: {len(split.probes)} probes, {len(split.gallery)} gallery images from {images.source}")
    return {"probes": paths["probes"], "probe_labels": paths["probes_labels"], "gallery": paths["gallery"],
            "gallery_labels": paths["gallery_labels"]}


def job_from_args(args: argparse.Namespace, embedded: dict[str, str] | None = None) -> SearchJob:
    if embedded:
        args = argparse.Namespace(**{**vars(args), **embedded})
    files = [args.probes, args.probe_labels, args.gallery, args.gallery_labels]
    if bool(args.synthetic_identities) == any(files) or not (args.synthetic_identities or all(files)):
        raise UsageError("give --probes, --probe-labels, --gallery and --gallery-labels, or --synthetic-identities, "
                         "or a model (--weights/--checkpoint) with --images or --rec")
    for flag, value in (("--world", args.world), ("--block-rows", args.block_rows), ("--probe-rows", args.probe_rows),
                        ("--k", args.k)):
        if value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    nonmated = args.synthetic_identities // 10 if args.synthetic_nonmated is None else args.synthetic_nonmated
    return SearchJob(probes=args.probes, probe_labels=args.probe_labels, gallery=args.gallery,
                     gallery_labels=args.gallery_labels, synthetic_identities=args.synthetic_identities,
                     synthetic_nonmated=nonmated, noise=args.noise, distractors=args.distractors,
                     distractor_file=args.distractor_file, embedding_size=args.embedding_size or 512, seed=args.seed,
                     k=args.k, block_rows=args.block_rows, probe_rows=args.probe_rows,
                     device="cuda" if (args.device or default_device()).startswith("cuda") else "cpu",
                     progress_every=args.progress_every)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        if bool(args.weights or args.checkpoint) != bool(args.images or args.rec):
            raise UsageError("--images/--rec and a model (--weights or --checkpoint) go together")
        with tempfile.TemporaryDirectory(prefix="eval_search-") as folder:
            embedded = embed_faces(args, folder) if args.images or args.rec else None
            return search(job_from_args(args, embedded))

    def search(job: SearchJob) -> int:
        started = time.perf_counter()
        answer, memory = run_search(job, args.world)
        wall = time.perf_counter() - started
        report = answer["report"]
        print(format_search_report(report))
        print(f"gallery {report.gallery_rows} rows on {args.world} rank(s): search {report.seconds:.1f} s, "
              f"{wall:.1f} s with start-up")
        for rank in memory:
            print(f"rank {rank['rank']}: rows [{rank['share'][0]}, {rank['share'][1]}), peak memory "
                  f"{rank['peak_rss_mib']:.0f} MiB ({rank['peak_rss_mib_before_search']:.0f} MiB before the search)")
        check = None
        if args.check_probes:
            check = brute_force_check(job, answer["result"].indices, args.check_probes)
            print(f"brute force: {check['lists_equal']}/{check['probes_checked']} candidate lists equal to a float64 "
                  f"sort of all {report.gallery_rows} rows ({check['seconds']:.1f} s)")
        if args.json:
            write_json(args.json, {"job": job_summary(job), "world": args.world, "wall_seconds": wall,
                                   "report": report.as_dict(), "memory": memory, "check": check})
        return 0 if check is None or check["lists_equal"] == check["probes_checked"] else 1

    return run_tool("eval_search", body)


if __name__ == "__main__":
    sys.exit(main())
