"""The memory planner's inputs as command-line options, declared once for every tool that plans.

`add_plan_options(parser, ...)` adds one option per `PlanInputs` field (tools/plan_memory.py,
tools/dry_run.py); `plan_inputs(args)` turns the parsed options back into a `PlanInputs`.
`add_head_options` is the subset that describes the head alone (--embedding-size, --sample-rate,
--precision, --weight-dtype, --chunk-size), for tools that choose classes, world sizes and batch their own way
(tools/scale_classes.py). A default of None makes an option required. Renamed options keep their old spelling for one release
(--dim -> --embedding-size, --batch -> --batch-size; largefr.cli) and their old `args` names
(args.dim, args.batch).
"""
from __future__ import annotations

import argparse

from largefr.cli import add_option
from largefr.choices import LOGITS_DTYPES, WEIGHT_DTYPES
from largefr.perf.memory_plan import OPTIMIZERS, PlanInputs


def _default(value: object) -> dict:
    return {"required": True} if value is None else {"default": value}


def add_head_options(parser: argparse.ArgumentParser, *, dim: int | None = None, sample_rate: float = 1.0) -> None:
    """--embedding-size, --sample-rate, --precision, --weight-dtype, --chunk-size: the head as the planner reads it."""
    add_option(parser, "--embedding-size", renamed_from=("--dim",), dest="dim", type=int, metavar="D",
               help="embedding size d", **_default(dim))
    parser.add_argument("--sample-rate", type=float, default=sample_rate, help="Partial FC sample rate in (0, 1]")
    parser.add_argument("--precision", choices=sorted(LOGITS_DTYPES), default="fp32", help="logits GEMM dtype")
    parser.add_argument("--weight-dtype", choices=WEIGHT_DTYPES, default="fp32",
                        help="storage dtype of W, its optimizer state and the bank's centers (head.weight_dtype)")
    parser.add_argument("--chunk-size", type=int, default=0, help="low-memory head block width (0: default head)")


def add_plan_options(parser: argparse.ArgumentParser, *, classes: int | None = None, world: int | None = None,
                     dim: int | None = None, batch: int | None = None, sample_rate: float = 1.0) -> None:
    """One option per `PlanInputs` field; the keyword arguments are the tool's defaults (None: required)."""
    parser.add_argument("--classes", type=int, help="total number of classes K", **_default(classes))
    parser.add_argument("--world", type=int, help="ranks sharing the classes", **_default(world))
    add_option(parser, "--batch-size", renamed_from=("--batch",), dest="batch", type=int, metavar="B",
               help="images per rank B (per process; global B_g = world * B)", **_default(batch))
    add_head_options(parser, dim=dim, sample_rate=sample_rate)
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd", help="head optimizer (state per row)")
    parser.add_argument("--no-bank", action="store_true",
                        help="no cluster bank / feature queue / L_ali (plain Partial FC); default: the full method")
    parser.add_argument("--queue-size", type=int, default=8192, help="feature queue rows (cluster.queue_size)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="where the step runs (sets the head optimizer's row blocks; default a GPU)")


def plan_inputs(args: argparse.Namespace) -> PlanInputs:
    """The `PlanInputs` of options added by `add_plan_options` (ValueError naming each bad value)."""
    return PlanInputs(num_classes=args.classes, world_size=args.world, dim=args.dim, batch=args.batch,
                      sample_rate=args.sample_rate, precision=args.precision, weight_dtype=args.weight_dtype,
                      optimizer=args.optimizer,
                      chunk_size=args.chunk_size, bank=not args.no_bank, queue_size=args.queue_size,
                      device=args.device)
