"""IJB-B / IJB-C 1:1 template verification (insightface's protocol): TAR at FAR 1e-6 .. 1e-1 and a ROC plot;
with --protocol 1:N, identification: CMC rank-1/5/10 and TPIR at FPIR 1e-1/1e-2 per gallery, and a plot.

    python tools/eval_ijb.py --weights model.pt|--checkpoint DIR [--network r100] \
        --ijb-root IJBC --target IJBC [--batch-size 128] [--workers 8] [--roc ijbc_roc.png] \
        [--scores ijbc_scores.npy] [--json out.json]
    python tools/eval_ijb.py ... --protocol 1:N [--png ijbc_1n.png] [--json out.json]

--ijb-root is the folder holding meta/ (ijbc_face_tid_mid.txt, ijbc_template_pair_label.txt,
ijbc_name_5pts_score.txt) and loose_crop/, as in insightface's IJB evaluation pack; 1:N also reads
meta/ijbc_1N_gallery_G1.csv, ijbc_1N_gallery_G2.csv and ijbc_1N_probe_mixed.csv (largefr/eval/ijb_1n.py).
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from largefr.cli import run_tool, write_json
from largefr.eval.identification import format_identification_table
from largefr.eval.ijb import IJB_TARGETS, evaluate_ijb, find_ijb_root, format_ijb_table
from largefr.eval.ijb_1n import evaluate_ijb_1n
from largefr.eval.plots import plot_identification, plot_roc
from largefr.eval.roc import roc_curve
from largefr.eval.weights import add_model_arguments, load_backbone_from_args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--ijb-root", required=True, help="folder holding meta/ and loose_crop/")
    parser.add_argument("--target", required=True, choices=IJB_TARGETS)
    parser.add_argument("--workers", type=int, default=4, help="threads reading and aligning crops (default 4)")
    parser.add_argument("--no-flip", action="store_true", help="embed the image only, not image + mirror image")
    parser.add_argument("--no-detector-score", action="store_true",
                        help="do not weight image embeddings by the detector score")
    parser.add_argument("--roc", default=None, help="ROC plot PNG (default <target>_roc.png)")
    parser.add_argument("--scores", default=None, help="also save the pair scores (.npy), in pair-file order")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--protocol", choices=("1:1", "1:N"), default="1:1",
                        help="1:1 template verification (default) or 1:N identification against galleries G1, G2")
    parser.add_argument("--png", default=None, help="1:N: CMC and TPIR plot PNG (default <target>_1n.png)")
    return parser.parse_args(argv)


def one_to_n(args: argparse.Namespace, loaded) -> int:
    """The 1:N protocol: table, plot and JSON."""
    results, seconds = evaluate_ijb_1n(loaded.model, args.ijb_root, args.target, batch_size=args.batch_size,
                                       device=loaded.device, workers=args.workers, flip=not args.no_flip,
                                       use_detector_score=not args.no_detector_score)
    print(f"{args.target} 1:N identification ({seconds:.1f} s); CMC and TPIR in %")
    print(format_identification_table(results))
    png = args.png or f"{args.target.lower()}_1n.png"
    plot_identification(results[:2] + results[3:], png, title=f"{args.target} 1:N")
    print(f"CMC / TPIR plot: {png}")
    if args.json:
        write_json(args.json, {"model": loaded.summary(), "protocol": "1:N", "seconds": seconds,
                               "results": [r.as_dict() for r in results], "png": png})
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        find_ijb_root(args.ijb_root, args.target)  # fail before loading a large model
        loaded = load_backbone_from_args(args)
        print(f"model: {loaded.network}, embedding {loaded.embedding_size}, from {loaded.source}")
        if args.protocol == "1:N":
            return one_to_n(args, loaded)
        result, scores, labels = evaluate_ijb(loaded.model, args.ijb_root, args.target, batch_size=args.batch_size,
                                              device=loaded.device, workers=args.workers, flip=not args.no_flip,
                                              use_detector_score=not args.no_detector_score)
        print(format_ijb_table(result))
        roc_path = args.roc or f"{args.target.lower()}_roc.png"
        fpr, tpr, _ = roc_curve(scores, labels)
        plot_roc({f"{loaded.network} (AUC {100 * result.auc:.2f}%)": (fpr, tpr)}, roc_path,
                 title=f"ROC on {args.target}")
        print(f"ROC plot: {roc_path}")
        if args.scores:
            np.save(args.scores, scores)
        if args.json:
            write_json(args.json, {"model": loaded.summary(), "result": result.as_dict(), "roc_png": roc_path})
        return 0

    return run_tool("eval_ijb", body)


if __name__ == "__main__":
    sys.exit(main())
