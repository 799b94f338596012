"""tools/ablate.py: grids, statistics over seeds, and a tiny grid end to end through the real launcher.

The end-to-end grid: 2 settings x 2 seeds of the trainer's tiny config (16 identities, 32x32, MobileFaceNet
with a 16-d embedding), 1 rank, 3 steps, with a labelled held-out folder of 4 identities.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from largefr.experiments.cli import main as ablate_main
from largefr.experiments.grids import BUILTIN_GRIDS, GridError, load_grid
from largefr.experiments.runner import PlanError, plan_runs
from largefr.experiments.stats import paired_difference, summarize
from tests.test_trainer import tiny_config

ROOT = Path(__file__).resolve().parents[1]
OFF = ["cluster.cg_margin=false", "cluster.contrastive_weight=0", "cluster.aligning_weight=0"]
T_975_DOF_2 = 4.302652729911275  # Student's t, 97.5% quantile, 2 degrees of freedom (printed tables: 4.303)


# ---------------------------------------------------------------------------- statistics

def test_summarize_is_mean_and_sample_std():
    summary = summarize([1.0, 2.0, 4.0])
    assert summary.n == 3 and summary.mean == pytest.approx(7 / 3)
    assert summary.std == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
    one = summarize([0.5, float("nan")])  # a non-finite value is not a seed's result
    assert one.n == 1 and one.mean == 0.5 and one.std is None
    assert summarize([]).mean is None


def test_paired_difference_95_t_interval_by_hand():
    setting, baseline = {0: 1.0, 1: 2.0, 2: 4.0, 7: 9.0}, {0: 0.5, 1: 1.0, 2: 2.0}  # seed 7: no baseline, unpaired
    paired = paired_difference(setting, baseline)
    differences = [0.5, 1.0, 2.0]
    mean = sum(differences) / 3
    std = math.sqrt(sum((d - mean) ** 2 for d in differences) / 2)
    half = T_975_DOF_2 * std / math.sqrt(3)
    assert paired.n == 3 and paired.mean == pytest.approx(mean) and paired.std == pytest.approx(std)
    assert (paired.low, paired.high) == (pytest.approx(mean - half), pytest.approx(mean + half))
    single = paired_difference({0: 1.0}, {0: 0.25, 1: 3.0})
    assert single.n == 1 and single.mean == 0.75 and single.low is None and "n < 2" in single.note


# ---------------------------------------------------------------------------- grids

def test_builtin_grids_follow_the_paper():
    table2 = BUILTIN_GRIDS["table2"]
    assert [s.name for s in table2.settings] == ["arcface", "cg_arcface", "arcface+con", "arcface+ali", "cg+con",
                                                 "cg+ali", "cg+con+ali"]
    assert table2.baseline.overrides == tuple(OFF)
    assert set(table2.settings[-1].overrides) == {"cluster.cg_margin=true", "cluster.contrastive_weight=1.0",
                                                  "cluster.aligning_weight=0.5"}
    assert [s.name for s in BUILTIN_GRIDS["table3"].settings] == ["cluster_con", "center", "triplet"]
    table4 = {s.name: s.overrides for s in BUILTIN_GRIDS["table4"].settings}
    assert "cluster.temperature_mode=learnable" in table4["learnable_tau0"]
    assert not any(o.startswith("cluster.temperature_mode") for o in table4["adaptive_phi"])


@pytest.mark.parametrize("grid", ["table3", "table4", "margins", str(ROOT / "configs" / "grids" / "quickstart_investigation.json")])
def test_every_shipped_grid_plans_on_the_quickstart(tmp_path, grid):
    """Each setting of the built-in grids and of configs/grids/ loads as a valid config (a typo fails here)."""
    loaded = load_grid(grid)
    runs = plan_runs(loaded, str(ROOT / "configs" / "quickstart.json"), [], [0], tmp_path, world_size=2)
    assert [run.setting.name for run in runs] == [s.name for s in loaded.settings]
    if loaded.name == "margins":
        assert [run.config.head.type for run in runs] == ["arcface", "curricularface", "magface", "adaface", "elasticface"]
        assert not any(run.config.cluster.enabled for run in runs)
    if loaded.name == "quickstart_investigation":
        by_name = {run.setting.name: run.config for run in runs}
        assert by_name["warmup_50"].cluster.warmup_steps == 50 and by_name["queue_4096"].cluster.queue_size == 4096
        assert by_name["lambda_0.5_1.5"].cluster.lambda_range == [0.5, 1.5]


def test_table2_configs_load_on_the_quickstart(tmp_path):
    runs = plan_runs(BUILTIN_GRIDS["table2"], str(ROOT / "configs" / "quickstart.json"), ["train.max_steps=10"],
                     [0, 1], tmp_path, world_size=2)
    assert len(runs) == 14 and not (tmp_path / "runs").exists()
    first = runs[0].config
    assert not first.cluster.cg_margin and first.cluster.contrastive_weight == 0 and first.train.max_steps == 10
    assert runs[1].config.train.seed == 1 and runs[1].config.output == str(tmp_path / "runs" / "arcface" / "seed1")
    assert runs[-1].config.cluster.aligning_weight == 0.5 and runs[-1].config.eval.every == 0
    # order: tool defaults, the setting's overrides, then --set (wins over both)
    later = plan_runs(BUILTIN_GRIDS["table2"], str(ROOT / "configs" / "quickstart.json"),
                      ["cluster.aligning_weight=0.25", "eval.every=50"], [0], tmp_path, world_size=2)
    assert {run.config.cluster.aligning_weight for run in later} == {0.25} and later[0].config.eval.every == 50
    assert later[0].config.checkpoint.every == 0 and later[0].config.checkpoint_dir == tmp_path / "runs" / "arcface" / "seed0" / "checkpoints"


@pytest.mark.parametrize("content, message", [
    ({"setting": {"a": []}}, "exactly one key, \"settings\""),
    ({"settings": {}}, "\"settings\" is empty"),
    ({"settings": {"a": "cluster.cg_margin=false"}}, "setting 'a': expected a list"),
    ({"settings": {"a": ["cluster.cg_margin"]}}, r"setting 'a': \['cluster.cg_margin'\] not of the form key=value"),
    ({"settings": {"x/y": []}}, "setting 'x/y': the name is a folder name"),
])
def test_user_grid_errors_name_the_file_and_the_setting(tmp_path, content, message):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(content))
    with pytest.raises(GridError, match=f"grid file {path}.*{message}"):
        load_grid(str(path))


def test_user_grid_from_yaml_keeps_order_and_refuses_bad_files(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text("settings:\n  zeta: [cluster.cg_margin=false]\n  alpha: []\n")
    grid = load_grid(str(path))
    assert grid.name == "grid" and [s.name for s in grid.settings] == ["zeta", "alpha"]
    assert grid.baseline.overrides == ("cluster.cg_margin=false",)
    path.write_text("settings:\n  a: []\n  a: [x=1]\n")
    with pytest.raises(GridError, match=f"grid file {path}.*a"):
        load_grid(str(path))
    with pytest.raises(GridError, match="no such file"):
        load_grid(str(tmp_path / "absent.json"))
    with pytest.raises(GridError, match="neither a built-in grid .table2, table3, table4, margins."):
        load_grid("table9")


# ---------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory) -> Path:
    from largefr.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("ablate")
    generate_dataset(root / "data", identities=16, images_per_identity=8, pairs=20, image_size=32, seed=1,
                     progress=False, heldout_identities=4, heldout_images_per_identity=3)
    config = tiny_config(str(root / "data"), str(root / "unused"), train={"max_steps": 3, "zero_stage": 0},
                         logging={"every": 1, "tensorboard": False})
    (root / "config.json").write_text(json.dumps(config))
    (root / "grid.json").write_text(json.dumps({"settings": {"arcface": OFF, "cg+con+ali": []}}))
    return root


def _args(root: Path, out: str, grid: str = "grid.json", seeds: str = "0,1") -> list[str]:
    return ["--config", str(root / "config.json"), "--grid", str(root / grid), "--seeds", seeds,
            "--out", str(root / out), "--world", "1"]


@pytest.fixture(scope="module")
def finished_grid(tiny_setup) -> tuple[Path, subprocess.CompletedProcess]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "ablate.py"), *_args(tiny_setup, "out")],
                          cwd=tiny_setup, env=env, capture_output=True, text=True, timeout=300)
    return tiny_setup / "out", done


def _recomputed(out: Path, setting: str, baseline: str, seeds: list[int], metric: str):
    values = {s: json.loads((out / "runs" / setting / f"seed{s}" / "result.json").read_text())["metrics"][metric]
              for s in seeds}
    base = {s: json.loads((out / "runs" / baseline / f"seed{s}" / "result.json").read_text())["metrics"][metric]
            for s in seeds}
    from scipy.stats import t

    differences = np.array([values[s] - base[s] for s in seeds])
    half = t.ppf(0.975, len(seeds) - 1) * differences.std(ddof=1) / np.sqrt(len(seeds))
    return (np.mean(list(values.values())), np.std(list(values.values()), ddof=1), differences.mean(),
            differences.mean() - half, differences.mean() + half)


def test_tiny_grid_end_to_end(finished_grid):
    out, done = finished_grid
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[1/4] arcface seed 0: synth_val" in done.stdout and "[4/4] cg+con+ali seed 1:" in done.stdout
    assert all((out / name).is_file() for name in ("table.md", "table.json", "table.png"))
    table = json.loads((out / "table.json").read_text())
    assert table["baseline"] == "arcface" and table["seeds"] == [0, 1] and len(table["runs"]) == 4
    assert {"synth_val/accuracy", "synth_val/tar", "synth_val/gap", "heldout/kmeans_f", "heldout/kmeans_nmi",
            "heldout/dbscan_f", "heldout/dbscan_nmi", "wall_seconds"} <= set(table["metrics"])
    full = table["settings"][1]
    assert full["name"] == "cg+con+ali" and full["finished"] == 2 and table["settings"][0]["paired"] is None
    for metric in table["metrics"]:
        mean, std, difference, low, high = _recomputed(out, "cg+con+ali", "arcface", [0, 1], metric)
        assert full["stats"][metric]["mean"] == pytest.approx(mean, abs=1e-12), metric
        assert full["stats"][metric]["std"] == pytest.approx(std, abs=1e-12), metric
        paired = full["paired"][metric]
        assert (paired["mean"], paired["low"], paired["high"]) == (
            pytest.approx(difference, abs=1e-12), pytest.approx(low, abs=1e-9), pytest.approx(high, abs=1e-9)), metric
    result = json.loads((out / "runs" / "arcface" / "seed1" / "result.json").read_text())
    assert result["summary"]["steps"] == 3 and result["heldout"]["kmeans"]["identities"] == 4
    assert "train.seed=1" in result["overrides"] and "cluster.cg_margin=false" in result["overrides"]
    assert "| cg+con+ali" in (out / "table.md").read_text()


def test_second_invocation_reruns_nothing_and_gives_the_same_table(finished_grid, tiny_setup, capsys):
    out, done = finished_grid
    assert done.returncode == 0
    before = json.loads((out / "table.json").read_text())
    assert ablate_main(_args(tiny_setup, "out")) == 0
    printed = capsys.readouterr().out
    assert printed.count("skipped (done)") == 4 and "[2/4] arcface seed 1: skipped (done)" in printed
    assert json.loads((out / "table.json").read_text()) == before
    assert ablate_main(_args(tiny_setup, "out") + ["--report-only"]) == 0
    assert json.loads((out / "table.json").read_text()) == before


def test_failing_setting_is_named_and_the_others_still_reported(finished_grid, tiny_setup, capsys):
    out, _ = finished_grid
    (tiny_setup / "failing.json").write_text(json.dumps({"settings": {
        "arcface": OFF, "nan": ["train.debug_inject_nan_steps=[1,2,3]", "train.on_nonfinite=abort"]}}))
    shutil.copytree(out / "runs" / "arcface" / "seed0", tiny_setup / "out_fail" / "runs" / "arcface" / "seed0")
    code = ablate_main(_args(tiny_setup, "out_fail", "failing.json", seeds="0"))
    captured = capsys.readouterr()
    assert code == 1
    assert "[1/2] arcface seed 0: skipped (done)" in captured.out and "[2/2] nan seed 0: FAILED (exit code 1" in captured.out
    assert "1 run(s) failed: nan seed 0 (exit code 1)" in captured.err and "non-finite loss" in captured.err
    table = json.loads((tiny_setup / "out_fail" / "table.json").read_text())
    assert [s["finished"] for s in table["settings"]] == [1, 0]
    assert table["failures"][0]["setting"] == "nan" and table["failures"][0]["exit_code"] == 1
    assert "non-finite loss" in table["failures"][0]["log_tail"]
    assert "- nan seed 0: exit code 1" in (tiny_setup / "out_fail" / "table.md").read_text()


def test_bad_override_is_refused_before_any_run(tiny_setup, capsys):
    (tiny_setup / "typo.json").write_text(json.dumps({"settings": {"arcface": OFF, "typo": ["cluster.cg_margn=true"]}}))
    assert ablate_main(_args(tiny_setup, "out_typo", "typo.json")) == 2
    err = capsys.readouterr().err
    assert "setting 'typo'" in err and "cg_margn" in err and "cg_margin" in err and "nothing was run" in err
    assert not (tiny_setup / "out_typo").exists()
    assert ablate_main(_args(tiny_setup, "out_typo") + ["--set", "train.seed=5"]) == 2
    assert "train.seed, output, checkpoint.dir are set by the tool" in capsys.readouterr().err


def test_finished_run_measured_otherwise_is_not_mixed_in(finished_grid, tiny_setup, capsys):
    out, _ = finished_grid
    before = (out / "table.json").read_text()
    assert ablate_main(_args(tiny_setup, "out") + ["--dbscan-eps", "0.5"]) == 2
    assert "measured with another --heldout or --dbscan-eps" in capsys.readouterr().err
    assert (out / "table.json").read_text() == before


def test_finished_run_of_other_overrides_is_not_reused(finished_grid, tiny_setup):
    from largefr.experiments.runner import check_finished_runs

    out, _ = finished_grid
    with pytest.raises(PlanError, match="used other overrides"):
        check_finished_runs(plan_runs(load_grid(str(tiny_setup / "grid.json")), str(tiny_setup / "config.json"),
                                      ["train.max_steps=2"], [0], out, world_size=1))


def test_equal_run_of_another_grid_is_reused_not_retrained(finished_grid, tiny_setup, capsys):
    out, _ = finished_grid
    # the same full method under another name and with its defaults spelled out, plus a setting never run
    (tiny_setup / "other.json").write_text(json.dumps({"settings": {
        "full": ["cluster.contrastive_type=cluster", "cluster.cg_margin=true"], "half": ["cluster.aligning_weight=0"]}}))
    code = ablate_main(_args(tiny_setup, "out_other", "other.json", seeds="1") + ["--reuse", str(out), "--report-only"])
    assert code == 0 and "reused" not in capsys.readouterr().out  # --report-only runs and reuses nothing
    from largefr.experiments.runner import find_equal_run
    from largefr.experiments.measure import MeasureOptions, measured_with

    runs = plan_runs(load_grid(str(tiny_setup / "other.json")), str(tiny_setup / "config.json"), [], [1],
                     tiny_setup / "out_other", world_size=1)
    done = json.loads((out / "runs" / "cg+con+ali" / "seed1" / "result.json").read_text())
    options = measured_with(MeasureOptions(heldout_dir=done["measured_with"]["heldout"],
                                           dbscan_eps=done["measured_with"]["dbscan_eps"]))
    found = find_equal_run(runs[0], [out], options)
    assert found["reused_from"] == str(out / "runs" / "cg+con+ali" / "seed1")
    assert found["metrics"] == done["metrics"] and found["setting"] == "full"
    assert find_equal_run(runs[1], [out], options) is None  # aligning weight 0: no equal run
    assert find_equal_run(runs[0], [out], {**options, "dbscan_eps": 0.9}) is None  # measured otherwise
