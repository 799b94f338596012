"""Soak test: `world` ranks x `steps` quickstart-sized steps; reports the resident-memory slope of each rank.

    python tools/soak.py --steps 2000 --world 2 [--config configs/quickstart.json] [--out runs/soak]

Starts the ranks itself (plain `python launch/train.py` with RANK/WORLD_SIZE/MASTER_* set, so their
pids are known), samples each rank's VmRSS from /proc every `--interval` seconds together with the
step rank 0 last logged, and fits RSS = a + b * step by least squares over the samples after the
first `--skip-fraction` of the run (allocator warm-up). Prints one JSON line per rank and writes
`soak.json` in the output folder. A slope near 0 MB / 1000 steps means no leak. Not part of CI.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

from largefr.cli import add_option

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP_LINE = re.compile(r"step (\d+)/\d+")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "quickstart.json"))
    add_option(parser, "--out", renamed_from=("--output",), default=os.path.join(ROOT, "runs", "soak"),
               help="the run folder (default runs/soak)")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between RSS samples")
    parser.add_argument("--skip-fraction", type=float, default=0.1, help="leading part of the run left out of the fit")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra config overrides")
    return parser.parse_args(argv)


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def last_logged_step(log_path: str) -> int | None:
    try:
        with open(log_path) as log:
            steps = STEP_LINE.findall(log.read())
    except OSError:
        return None
    return int(steps[-1]) if steps else None


def slope_per_1000(samples: list[tuple[int, float]]) -> float:
    """Least-squares slope of RSS (MB) against step, in MB per 1000 steps (nan with < 2 distinct steps)."""
    n = len(samples)
    if n < 2 or len({s for s, _ in samples}) < 2:
        return float("nan")
    mean_s = sum(s for s, _ in samples) / n
    mean_r = sum(r for _, r in samples) / n
    cov = sum((s - mean_s) * (r - mean_r) for s, r in samples)
    var = sum((s - mean_s) ** 2 for s, _ in samples)
    return 1000.0 * cov / var


def start_ranks(args: argparse.Namespace, overrides: list[str]) -> list[subprocess.Popen]:
    from largefr.distributed.spawn import free_port

    port = str(free_port())
    procs = []
    for rank in range(args.world):
        env = dict(os.environ, PYTHONPATH=ROOT, RANK=str(rank), WORLD_SIZE=str(args.world), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(args.world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        log = open(os.path.join(args.out, f"rank{rank}.out"), "w")
        procs.append(subprocess.Popen([sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config",
                                       args.config, "--overwrite", "--set", *overrides], cwd=ROOT, env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
    return procs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    # long schedule so max_steps ends the run; no periodic eval (its memory is not the step's)
    overrides = [f"train.max_steps={args.steps}", "schedule.epochs=1000", "eval.every=0", "logging.every=10",
                 f"output={args.out}", "checkpoint.every=0", *args.set]
    procs = start_ranks(args, overrides)
    log_path = os.path.join(args.out, "train.log")
    samples: list[list[tuple[int, float]]] = [[] for _ in procs]
    started = time.monotonic()
    while any(p.poll() is None for p in procs):
        time.sleep(args.interval)
        step = last_logged_step(log_path)
        for rank, proc in enumerate(procs):
            rss = rss_mb(proc.pid) if proc.poll() is None else None
            if step is not None and rss is not None:
                samples[rank].append((step, rss))
    codes = [p.returncode for p in procs]
    report = {"command": " ".join(sys.argv), "steps": args.steps, "world": args.world, "exit_codes": codes,
              "wall_seconds": round(time.monotonic() - started, 1), "ranks": []}
    for rank, rank_samples in enumerate(samples):
        fit = [s for s in rank_samples if s[0] >= args.skip_fraction * args.steps]
        entry = {"rank": rank, "samples": len(fit), "slope_mb_per_1000_steps": round(slope_per_1000(fit), 3),
                 "rss_first_mb": round(fit[0][1], 1) if fit else None,
                 "rss_last_mb": round(fit[-1][1], 1) if fit else None,
                 "rss_max_mb": round(max(r for _, r in rank_samples), 1) if rank_samples else None}
        report["ranks"].append(entry)
        print(json.dumps(entry), flush=True)
    with open(os.path.join(args.out, "soak.json"), "w") as out:
        json.dump({**report, "samples": samples}, out)
    return 0 if all(code == 0 for code in codes) else 1


if __name__ == "__main__":
    sys.exit(main())
