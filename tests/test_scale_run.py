"""tools/scale_run.py at a small size: every phase of the whole trainer runs, the 2->2 resume repeats the
uninterrupted run's losses, and the planner follows the measured peaks (issue 25's scale run, repeatable)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_scale_run_tool_runs_every_phase(tmp_path):
    out = tmp_path / "scale.json"
    result = subprocess.run([sys.executable, "tools/scale_run.py", "--classes", "2000,40000", "--steps", "2",
                             "--tolerance", "0.2", "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    phases = [(row["classes"], row["phase"]) for row in rows]
    for classes in (2000, 40000):
        for phase in ("train", "resume 2->2", "resume 2->1", "resume 2->3", "reshard ->3", "export"):
            assert (classes, phase) in phases
    assert all(row["ok"] for row in rows)
    assert all(row["losses_equal"] and row["final_loss_equal"] for row in rows if row["phase"] == "resume 2->2")
    assert all(len(row["peak_rss_gib"]) == int(row["phase"][-1]) for row in rows if row["phase"].startswith("resume"))
    assert "| classes | phase |" in result.stdout and "checks: all phases pass" in result.stdout
