"""tools/bench_bare_loop.py on a tiny model: the report's fields, and both sides training like for like."""
from __future__ import annotations

import json

import pytest

from largefr.perf.bare_loop import PHASES
from tests.eval_fixtures import load_tool

TINY = ["--set", "model.network=mbf", "--image-size", "32", "--classes", "30", "--embedding-size", "32",
        "--batch-size", "3", "--steps", "2", "--repeats", "2", "--warmup", "1", "--profile-steps", "1"]


@pytest.mark.parametrize("sample_rate,variant", [("1.0", []), ("0.3", ["--variant", "train.overlap_reduction=false"])])
def test_tool_reports_both_sides_from_the_same_start(tmp_path, capsys, sample_rate, variant):
    path = tmp_path / "report.json"
    assert load_tool("bench_bare_loop").main([*TINY, "--sample-rate", sample_rate, *variant, "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    setup = report["setup"]
    assert (setup["network"], setup["world"], setup["global_batch"], setup["classes"]) == ("mbf", 2, 6, 30)
    assert setup["sample_rate"] == float(sample_rate)
    assert set(setup["channels_last"]) == set(setup["compile"]) == {"trainer", "bare"}
    assert report["ratio"] == pytest.approx(report["trainer_images_per_sec"] / report["bare_images_per_sec"])
    assert len(report["round_ratios"]) == 2 and all(r > 0 for r in report["round_ratios"])
    assert set(report["phases_ms"]) == set(PHASES)
    assert report["phases_ms"]["backbone_backward"]["bare_ms"] > 0
    assert report["phases_ms"]["optimizer_engine"]["trainer_ms"] > 0
    # Same weights, sampler and batch on step 1; one update of each (SGD, momentum, clipping) before step 2:
    # the DeepSpeed engine + StepRunner and the DDP loop must compute the same thing.
    trainer, bare = report["losses"]["trainer"], report["losses"]["bare"]
    assert trainer[0] == pytest.approx(bare[0], rel=1e-6)
    assert trainer[1] != trainer[0]  # the update happened
    assert trainer[1] == pytest.approx(bare[1], rel=1e-4)
    reduction = setup["gradient_reduction"]
    assert reduction["trainer"].startswith("torch DDP reducer under the DeepSpeed engine")  # ZeRO 0 fp32, 2 ranks
    if variant:  # the A/B side: DeepSpeed's own reduction, timed in the same rounds
        assert report["variant"] == ["train.overlap_reduction=false"]
        assert reduction["variant"] == "DeepSpeed ZeRO 0, reduced after backward"
        assert len(report["variant_vs_trainer_round_ratios"]) == 2 and report["variant_images_per_sec"] > 0
    printed = capsys.readouterr().out
    assert "ratio" in printed and "channels_last trainer=" in printed and "| backbone_backward |" in printed


def test_cluster_terms_refused_with_the_keys_to_change():
    with pytest.raises(ValueError, match="the bare loop has no cluster terms: keep cluster.cg_margin=false"):
        load_tool("bench_bare_loop").main([*TINY, "--set", "model.network=mbf", "cluster.aligning_weight=0.1"])


def test_other_precisions_refused_with_the_flag_to_change():
    with pytest.raises(ValueError, match="the bare loop runs fp32 steps of one micro-batch; got train.precision=bf16"):
        load_tool("bench_bare_loop").main([*TINY, "--precision", "bf16"])
