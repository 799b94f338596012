"""Cluster face embeddings with k-means or DBSCAN and score BCubed precision/recall/F and NMI (paper Table 5).

    python tools/eval_clustering.py --embeddings X.npy --labels y.npy --method kmeans|dbscan \
        [--k K] [--eps 0.5] [--min-samples 2] [--seed 0] [--json out.json]

X.npy: N x d embeddings (normalized here); y.npy: N identity labels (e.g. from tools/embed.py
--labels-out). k-means uses k = number of identities unless --k; DBSCAN's eps is a cosine distance
(1 - cos) and its noise points count as singleton clusters.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from largefr.cli import run_tool, write_json
from largefr.errors import UsageError
from largefr.eval.clustering import (CLUSTERING_METHODS, DBSCAN_EPS, DBSCAN_MIN_SAMPLES, evaluate_clustering,
                                     format_clustering)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--embeddings", required=True, help="N x d .npy")
    parser.add_argument("--labels", required=True, help="N labels .npy")
    parser.add_argument("--method", required=True, choices=CLUSTERING_METHODS)
    parser.add_argument("--k", type=int, default=None, help="k-means clusters (default: number of identities)")
    parser.add_argument("--eps", type=float, default=DBSCAN_EPS,
                        help=f"DBSCAN radius, cosine distance (default {DBSCAN_EPS}: docs/EXPERIMENTS.md)")
    parser.add_argument("--min-samples", type=int, default=DBSCAN_MIN_SAMPLES,
                        help=f"DBSCAN core-point neighbours (default {DBSCAN_MIN_SAMPLES})")
    parser.add_argument("--seed", type=int, default=0, help="k-means random state (default 0)")
    parser.add_argument("--json", help="also write the result here")
    return parser.parse_args(argv)


def load_array(path: str, what: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--{what} {path}: no such file")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as error:
        raise UsageError(f"--{what} {path}: not a plain .npy array ({error})") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        embeddings, labels = load_array(args.embeddings, "embeddings"), load_array(args.labels, "labels")
        if embeddings.ndim != 2 or labels.reshape(-1).shape[0] != embeddings.shape[0]:
            raise UsageError(f"--embeddings {args.embeddings} has shape {list(embeddings.shape)} but --labels "
                             f"{args.labels} has {labels.size} labels; expected N x d and N")
        result = evaluate_clustering(embeddings, labels, args.method, num_clusters=args.k, eps=args.eps,
                                     min_samples=args.min_samples, seed=args.seed)
        print(format_clustering(result))
        if args.json:
            write_json(args.json, result.as_dict())
        return 0

    return run_tool("eval_clustering", body)


if __name__ == "__main__":
    sys.exit(main())
