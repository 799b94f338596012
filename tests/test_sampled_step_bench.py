"""tools/bench_sampled_step.py: Partial FC's step against a dense one with as many rows, on real ranks."""
import json

import pytest

from tests.eval_fixtures import load_tool


@pytest.mark.slow  # four 2-rank runs: about 20 s
def test_the_tool_times_both_sides_on_two_ranks(tmp_path, capsys):
    tool = load_tool("bench_sampled_step")
    report = tmp_path / "step.json"
    code = tool.main(["--classes", "2000", "--sample-rate", "0.25", "--steps", "1", "--warmup", "1", "--rounds", "1",
                      "--batch-size", "4", "--json", str(report), "--set", "model.embedding_size=16"])
    assert code == 0
    result = json.loads(report.read_text())
    [row] = result["rows"]
    assert (row["A"]["classes"], row["A"]["rate"]) == (2000, 0.25) and (row["B"]["classes"], row["B"]["rate"]) == (500, 1.0)
    for side in ("A", "B"):
        assert row[side]["step_seconds"] > 0 and row[side]["phases_seconds"]["loss_cg"] > 0
    assert row["ratio"] == row["A"]["step_seconds"] / row["B"]["step_seconds"]
    assert 0 < row["A"]["cpu_seconds"] and row["cpu_ratio"] == row["A"]["cpu_seconds"] / row["B"]["cpu_seconds"]
    out = capsys.readouterr().out
    assert "median A / B at 2,000 classes" in out and "(CPU time: " in out and "| loss_cg |" in out
