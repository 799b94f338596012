"""tools/ablate.py's body: plan and check every run, generate the data once, run, measure, report."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from largefr.cli import add_option
from largefr.data.prepare import ensure_synthetic_data, training_folder
from largefr.errors import EXPECTED_ERRORS
from largefr.experiments.grids import BUILTIN_GRIDS, load_grid
from largefr.experiments.measure import DBSCAN_MIN_SAMPLES, DEFAULT_DBSCAN_EPS, MeasureOptions, heldout_identity_count
from largefr.experiments.runner import (LAUNCHERS, RUN_DEFAULTS, TOOL_KEYS, PlanError, RunSpec, check_finished_runs,
                                        find_equal_run, launch_command, plan_runs, read_result, run_grid)

__all__ = ["parse_args", "main"]

EXIT_OK, EXIT_RUN_FAILED, EXIT_USAGE = 0, 1, 2

DESCRIPTION = """Run an experiment grid (the paper's tables) over a base config: every setting x seed
through the real launcher, then measure each final checkpoint and write <out>/table.md, table.json
and table.png (mean +- sample std over seeds, paired difference to the grid's first setting with a
95% t interval)."""

EPILOG = f"""grids: {', '.join(BUILTIN_GRIDS)} (the paper's Tables 2, 3, 4), or a .json/.yaml file
{{"settings": {{"name": ["key=value", ...], ...}}}} (order kept; the first setting is the baseline).

overrides of one run, later ones win: {' '.join(RUN_DEFAULTS)} (evaluation and checkpoint only at
the end; --set eval.every=N restores periodic ones), then the setting's own, then --set, then
{', '.join(TOOL_KEYS)} (the tool's, from --seeds and --out: a --set of these is refused).
A --set of a key the setting varies therefore overrides the setting (the grid then compares less).

runs: <out>/runs/<setting>/seed<seed>/ (the trainer's output, ablate.log, result.json). A run with
result.json is done: rerunning the tool skips it; an unfinished one starts over. A synthetic data
set (data.synthetic) is generated once before the runs. Measured on the final checkpoint: every
verification set of the config (10-fold accuracy, TAR at FAR 1e-3, positive/negative mean cosine
and gap), the held-out folder clustered by k-means (k = identities) and DBSCAN (cosine distance
eps, min_samples {DBSCAN_MIN_SAMPLES}), each BCubed F and NMI; wall time of the run (launch to exit).
Exit status: 0 all runs finished, 1 some run failed (named; the others are still reported), 2 a
usage or config problem (nothing run)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ablate.py", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="base config (JSON or YAML)")
    parser.add_argument("--grid", required=True, help=f"{'|'.join(BUILTIN_GRIDS)} or a grid FILE")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated train.seed values (default 0,1,2); "
                        "the data seed stays, so every run sees the same data and held-out pairs")
    parser.add_argument("--out", required=True, help="output folder (runs/, table.md, table.json, table.png)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides for every run, after the setting's own (e.g. train.max_steps=100)")
    add_option(parser, "--world", renamed_from=("--ranks",), type=int, default=2, help="ranks per run (default 2)")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="auto",
                        help="auto (default): deepspeed for --world > 1, plain python for 1")
    parser.add_argument("--heldout", default=None, help="folder of identity sub-folders to cluster (default: the "
                        "data folder's synth_heldout/ when it exists; else no clustering columns)")
    parser.add_argument("--dbscan-eps", type=float, default=DEFAULT_DBSCAN_EPS,
                        help=f"DBSCAN radius as cosine distance 1 - cos (default {DEFAULT_DBSCAN_EPS}: "
                             f"neighbours above cosine {1 - DEFAULT_DBSCAN_EPS:g}), the same for every run")
    parser.add_argument("--reuse", nargs="*", default=[], metavar="DIR",
                        help="--out folders of earlier grids: a run whose resolved config (all but its folders) "
                             "and measurement equal a finished run there takes that run's result instead of "
                             "training again (table2's cg+con+ali is table3's cluster_con and table4's adaptive_phi)")
    parser.add_argument("--report-only", action="store_true", help="rebuild the tables from finished runs; run nothing")
    return parser.parse_args(argv)


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise PlanError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise PlanError(f"--seeds {text!r}: give distinct integers >= 0, e.g. 0,1,2")
    return seeds


def _prepare_data(runs: list[RunSpec]) -> None:
    """Generate each synthetic data set the runs read, once, here (not concurrently inside the runs)."""
    done = set()
    for run in runs:
        data = run.config.data
        if data.rec is None and data.synthetic is not None and data.loader != "synthetic":
            key = (training_folder(data), repr(data.synthetic), data.image_size)
            if key not in done:
                ensure_synthetic_data(data)
                done.add(key)


def _heldout_dir(args: argparse.Namespace, runs: list[RunSpec]) -> str | None:
    """--heldout, else the baseline data folder's synth_heldout/ when present; checked before any run."""
    from largefr.data.synthetic import HELDOUT_DIR

    folder = args.heldout
    if folder is None:
        data_dir = training_folder(runs[0].config.data)
        default = os.path.join(data_dir, HELDOUT_DIR) if data_dir else None
        folder = default if default and os.path.isdir(default) else None
    if folder is not None:
        heldout_identity_count(folder)
    return folder


def _check_args(args: argparse.Namespace) -> None:
    if args.world < 1:
        raise PlanError(f"--world must be >= 1, got {args.world}")
    if args.dbscan_eps <= 0:
        raise PlanError(f"--dbscan-eps must be > 0 (a cosine distance), got {args.dbscan_eps}")
    if args.heldout is not None and not os.path.isdir(args.heldout):
        raise PlanError(f"--heldout {args.heldout}: no such folder")
    missing = [folder for folder in args.reuse if not os.path.isdir(folder)]
    if missing:
        raise PlanError(f"--reuse {' '.join(missing)}: no such folder (give earlier --out folders of this tool)")


def _refuse_other_measurements(runs: list[RunSpec], options: MeasureOptions) -> None:
    from largefr.experiments.measure import measured_with

    wanted = measured_with(options)
    other = [f"{run.folder}: {done.get('measured_with')}" for run in runs
             if (done := read_result(run)) is not None and done.get("measured_with") != wanted]
    if other:
        raise PlanError(f"{len(other)} finished run(s) were measured with another --heldout or --dbscan-eps than "
                        f"{wanted}:\n" + "\n".join(other) + "\ngive the same options, use another --out, or "
                        "delete those run folders to rerun them")


def _execute(args: argparse.Namespace, runs: list[RunSpec]) -> tuple[list[dict], list[dict]]:
    from largefr.eval.weights import default_device
    from largefr.experiments.measure import measure_run, measured_with

    if args.report_only:
        return [r for r in map(read_result, runs) if r is not None], []
    _prepare_data(runs)
    options = MeasureOptions(heldout_dir=_heldout_dir(args, runs), dbscan_eps=args.dbscan_eps, device=default_device())
    _refuse_other_measurements(runs, options)
    print(f"ablate: {len(runs)} runs, held-out clustering: {options.heldout_dir or 'none (no --heldout folder)'}",
          flush=True)
    launch_command(args.launcher, args.world, args.config, [])  # a launcher that cannot start N ranks: refused now
    return run_grid(runs, command_for=lambda run: launch_command(args.launcher, args.world, args.config, run.overrides),
                    measure=lambda run: measure_run(run.config, options),
                    echo=lambda line: print(line, flush=True),
                    equal_run=lambda run: find_equal_run(run, [Path(d) for d in args.reuse], measured_with(options)))


def main(argv: list[str] | None = None) -> int:
    from largefr.experiments.report import build_table, format_markdown, write_report

    args = parse_args(argv)
    try:
        _check_args(args)
        grid, seeds, out = load_grid(args.grid), _seeds(args.seeds), Path(args.out)
        runs = plan_runs(grid, args.config, args.set, seeds, out, world_size=args.world)
        check_finished_runs(runs)
        results, failures = _execute(args, runs)
    except EXPECTED_ERRORS as error:  # PlanError, GridError, data generation, a missing extra
        print(f"ablate: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    table = build_table(grid, seeds, results, failures)
    out.mkdir(parents=True, exist_ok=True)
    write_report(table, out)
    print(format_markdown(table), end="")
    print(f"ablate: wrote {out / 'table.md'}, {out / 'table.json'}, {out / 'table.png'} "
          f"({len(results)}/{len(runs)} runs finished)")
    if failures:
        named = ", ".join(f"{f['setting']} seed {f['seed']} (exit code {f['exit_code']})" for f in failures)
        print(f"ablate: error: {len(failures)} run(s) failed: {named}; see the log tail below and each run's "
              f"{'ablate.log'}", file=sys.stderr)
        for failure in failures:
            print(f"--- {failure['setting']} seed {failure['seed']}: {failure['reason']}\n{failure['log_tail']}",
                  file=sys.stderr)
        return EXIT_RUN_FAILED
    return EXIT_OK
