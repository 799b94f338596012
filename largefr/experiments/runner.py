"""Run a grid: every setting x seed through the real launcher, then measure it; resumable, failures kept.

Overrides of one run, in order (a later one wins): RUN_DEFAULTS (evaluation and checkpoints only at
the end), the setting's own, the user's ``--set``, then the tool's own keys (train.seed, output,
checkpoint.dir), which the user may not set. A run folder holding result.json is finished and skipped.
A run equal to a finished one of another grid (``--reuse``: same resolved config but for its folders,
measured alike) takes that run's result instead of training again: the paper's tables share settings
(table2's cg+con+ali is table3's cluster_con and table4's adaptive_phi).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from largefr.cli import write_json
from largefr.config import Config, ConfigError, load_config
from largefr.errors import EXPECTED_ERRORS, UserError
from largefr.experiments.grids import Grid, Setting
from largefr.distributed.spawn import free_port
from largefr.train.local_launch import LAUNCH_SCRIPT, deepspeed_local_prefix

__all__ = ["RUN_DEFAULTS", "TOOL_KEYS", "LAUNCHERS", "RunSpec", "PlanError", "plan_runs", "run_grid",
           "RESULT_FILE", "LOG_FILE", "find_equal_run"]

ROOT = Path(__file__).resolve().parents[2]
RESULT_FILE, LOG_FILE = "result.json", "ablate.log"
RUN_DEFAULTS = ("eval.every=0", "checkpoint.every=0")
"""Evaluation and checkpoint only at the end of each run: the tool measures the final checkpoint."""
TOOL_KEYS = ("train.seed", "output", "checkpoint.dir")
"""Set by the tool per run (seed and run folder); a user --set of one is refused."""
LAUNCHERS = ("auto", "deepspeed", "torchrun", "python")
LOG_TAIL_LINES = 20


class PlanError(UserError, ValueError):
    """A grid that must not start: a setting's config is invalid, or a --set names a key the tool sets."""


@dataclass(frozen=True, kw_only=True)
class RunSpec:
    setting: Setting
    seed: int
    folder: Path
    overrides: tuple[str, ...]
    config: Config

    @property
    def label(self) -> str:
        return f"{self.setting.name} seed {self.seed}"


def run_overrides(setting: Setting, user_overrides: Sequence[str], seed: int, folder: Path) -> tuple[str, ...]:
    """Every --set of one run, in the order the module docstring gives."""
    own = (f"train.seed={seed}", f"output={folder}", f"checkpoint.dir={folder / 'checkpoints'}")
    return (*RUN_DEFAULTS, *setting.overrides, *user_overrides, *own)


def _refuse_tool_keys(user_overrides: Sequence[str]) -> None:
    taken = [o for o in user_overrides if o.partition("=")[0].strip() in TOOL_KEYS]
    if taken:
        raise PlanError(f"--set {' '.join(taken)}: {', '.join(TOOL_KEYS)} are set by the tool for each run "
                        "(seeds come from --seeds, folders from --out); remove them")


def plan_runs(grid: Grid, config_path: str, user_overrides: Sequence[str], seeds: Sequence[int], out: Path,
              world_size: int) -> list[RunSpec]:
    """Every run of the grid, each config loaded and checked; all bad settings reported at once."""
    _refuse_tool_keys(user_overrides)
    runs, problems = [], []
    for setting in grid.settings:
        for seed in seeds:
            folder = out / "runs" / setting.name / f"seed{seed}"
            overrides = run_overrides(setting, user_overrides, seed, folder)
            try:
                config = load_config(config_path, overrides, world_size=world_size)
            except ConfigError as error:
                problems.append(f"setting {setting.name!r} (overrides {' '.join(setting.overrides) or 'none'}): "
                                f"{error}")
                break  # the same problem for every seed
            runs.append(RunSpec(setting=setting, seed=seed, folder=folder, overrides=overrides, config=config))
    if problems:
        raise PlanError(f"grid {grid.name}: {len(problems)} setting(s) have a bad config; nothing was run:\n"
                        + "\n".join(problems))
    return runs


def launch_command(launcher: str, ranks: int, config_path: str, overrides: Sequence[str]) -> list[str]:
    """The training command line: deepspeed for ranks > 1 by default ('auto'), plain python for one rank."""
    if launcher == "auto":
        launcher = "deepspeed" if ranks > 1 else "python"
    if launcher == "python" and ranks != 1:
        raise PlanError(f"--launcher python starts one process; --world {ranks} needs deepspeed or torchrun")
    prefix = {
        "python": [sys.executable],
        "deepspeed": deepspeed_local_prefix(ranks),
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                     "--master_port", str(free_port())],
    }[launcher]
    return [*prefix, str(LAUNCH_SCRIPT), "--config", config_path, "--set", *overrides]


def _log_tail(path: Path) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    return "\n".join(lines[-LOG_TAIL_LINES:])


def train_run(run: RunSpec, command: list[str]) -> tuple[int, float]:
    """(exit code, wall seconds) of one training run in a fresh folder, its output in <run>/ablate.log."""
    shutil.rmtree(run.folder, ignore_errors=True)  # an unfinished run starts over
    run.folder.mkdir(parents=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    started = time.perf_counter()
    with open(run.folder / LOG_FILE, "w") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    return code, time.perf_counter() - started


def _compared(overrides: Sequence[str]) -> list[str]:
    """The overrides that decide what a run computes (the tool's per-run keys name folders and the seed)."""
    return [o for o in overrides if o.partition("=")[0].strip() not in TOOL_KEYS]


def read_result(run: RunSpec) -> dict[str, Any] | None:
    path = run.folder / RESULT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def check_finished_runs(runs: Sequence[RunSpec]) -> None:
    """Refuse to reuse a result.json made with other overrides (another grid or --set in the same --out)."""
    stale = [f"{run.folder}: was run with {' '.join(_compared(done['overrides']))}"
             for run in runs if (done := read_result(run)) is not None
             and _compared(done["overrides"]) != _compared(run.overrides)]
    if stale:
        raise PlanError(f"{len(stale)} finished run(s) used other overrides than this grid and --set give them:\n"
                        + "\n".join(stale) + "\nuse another --out, or delete those run folders to rerun them")


def _computes(config: dict[str, Any]) -> Config:
    """A resolved config without the folders it writes to: what decides a run's numbers."""
    data = json.loads(json.dumps(config))
    data["output"], data["checkpoint"]["dir"] = "<run folder>", None
    data.get("train", {}).pop("world", None)  # a note on the intended ranks; the launcher decides the real ones
    return Config.from_dict(data)


def find_equal_run(run: RunSpec, roots: Sequence[Path], measured_with: dict[str, Any]) -> dict[str, Any] | None:
    """A finished run under <root>/runs/*/seed<seed>/ of `roots` whose resolved config equals `run`'s, measured alike."""
    wanted = _computes(run.config.to_dict())
    for root in roots:
        for result_path in sorted(Path(root).glob(f"runs/*/seed{run.seed}/{RESULT_FILE}")):
            config_path = result_path.parent / "config.json"  # the trainer writes its resolved config there
            if result_path.parent == run.folder or not config_path.is_file():
                continue
            result = json.loads(result_path.read_text())
            if result.get("measured_with") == measured_with and _computes(json.loads(config_path.read_text())) == wanted:
                return {**result, "setting": run.setting.name, "overrides": list(run.overrides),
                        "reused_from": str(result_path.parent)}
    return None


def _finish(run: RunSpec, code: int, wall: float, measure: Callable[[RunSpec], dict]) -> dict[str, Any]:
    """result.json of a run that trained, or a failure record of one that did not."""
    summary_path = run.folder / "summary.json"
    failure = {"setting": run.setting.name, "seed": run.seed, "exit_code": code, "folder": str(run.folder)}
    if code != 0 or not summary_path.is_file():
        reason = f"exit code {code}" if code != 0 else "no summary.json written"
        return {**failure, "reason": reason, "log_tail": _log_tail(run.folder / LOG_FILE)}
    summary = json.loads(summary_path.read_text())
    if summary.get("interrupted"):  # stopped by a signal: its checkpoint is not the end of the run
        return {**failure, "reason": "interrupted before its last step", "log_tail": _log_tail(run.folder / LOG_FILE)}
    try:
        measured = measure(run)
    except EXPECTED_ERRORS as error:  # no checkpoint, a .bin gone, a missing extra
        return {**failure, "reason": f"measuring failed: {type(error).__name__}: {error}", "log_tail": ""}
    from largefr.experiments.measure import flat_metrics

    result = {"setting": run.setting.name, "seed": run.seed, "overrides": list(run.overrides),
              "wall_seconds": wall, "train_seconds": summary.get("wall_seconds"), "summary": summary,
              **measured, "metrics": flat_metrics(measured, wall)}
    write_json(str(run.folder / RESULT_FILE), result)
    return result


def _headline(result: dict[str, Any]) -> str:
    accuracy = [(k, v) for k, v in result["metrics"].items() if k.endswith("/accuracy")]
    shown = f"{accuracy[0][0].split('/')[0]} {100 * accuracy[0][1]:.1f}%" if accuracy else "done"
    return f"{shown} ({result['wall_seconds']:.0f} s)"


def run_grid(runs: list[RunSpec], *, command_for: Callable[[RunSpec], list[str]],
             measure: Callable[[RunSpec], dict], echo: Callable[[str], None] = print,
             equal_run: Callable[[RunSpec], dict | None] = lambda run: None) -> tuple[list[dict], list[dict]]:
    """(results, failures) of every run, in order; finished runs are read back, not rerun.

    `equal_run(run)`: the result of an equal finished run elsewhere (see `find_equal_run`), or None.
    """
    results, failures, durations = [], [], []
    for index, run in enumerate(runs, 1):
        prefix = f"[{index}/{len(runs)}] {run.label}:"
        done = read_result(run)
        if done is not None:
            results.append(done)
            echo(f"{prefix} skipped (done)")
            continue
        reused = equal_run(run)
        if reused is not None:
            run.folder.mkdir(parents=True, exist_ok=True)
            write_json(str(run.folder / RESULT_FILE), reused)
            results.append(reused)
            echo(f"{prefix} reused {reused['reused_from']} (same resolved config)")
            continue
        started = time.perf_counter()
        code, wall = train_run(run, command_for(run))
        outcome = _finish(run, code, wall, measure)
        durations.append(time.perf_counter() - started)  # training and measuring: what the ETA is made of
        remaining = sum(read_result(r) is None for r in runs[index:])
        eta = f", ETA {remaining * sum(durations) / len(durations) / 60:.0f} min" if remaining else ""
        if "metrics" in outcome:
            results.append(outcome)
            echo(f"{prefix} {_headline(outcome)}{eta}")
        else:
            failures.append(outcome)
            echo(f"{prefix} FAILED ({outcome['reason']}, log {run.folder / LOG_FILE}){eta}")
    return results, failures
