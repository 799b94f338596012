"""docs/FINETUNE.md's complete commands, run as the page gives them in a scratch working directory, after a
small stand-in for the quickstart's run (runs/quickstart: the README's command with fewer images and steps)."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def finetune_commands() -> list[list[str]]:
    """The command lines of FINETUNE.md's 'Complete commands' bash block."""
    text = (ROOT / "docs" / "FINETUNE.md").read_text()
    block = text.split("## Complete commands", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line) for line in block.splitlines() if line.strip()]


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    argv = [sys.executable, *command[1:]] if command[0] == "python" else command
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_finetune_md_commands_run_as_written(tmp_path):
    for name in ("configs", "tools", "launch"):
        (tmp_path / name).symlink_to(ROOT / name)
    small = ["data.synthetic.cache_dir=data/quickstart", "data.synthetic.identities=16",
             "data.synthetic.images_per_identity=8", "data.synthetic.val_pairs=40", "data.synthetic.heldout_identities=0",
             "data.num_classes=16", "data.num_images=128", "train.max_steps=3", "eval.every=0", "checkpoint.every=0"]
    quickstart = _run(["python", "launch/train.py", "--config", "configs/quickstart.json", "--world", "2", "--set",
                       *small], tmp_path)
    assert quickstart.returncode == 0, quickstart.stderr[-3000:]
    commands = finetune_commands()
    assert [c[1] for c in commands] == ["tools/export_backbone.py", "tools/make_synthetic.py", "launch/train.py"]
    for command in commands:
        done = _run(command, tmp_path)
        assert done.returncode == 0, f"{shlex.join(command)}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    summary = json.loads((tmp_path / "runs" / "finetune_b" / "summary.json").read_text())
    assert summary["num_classes"] == 24 and summary["steps"] == 12 and "synth_val" in json.dumps(summary)
    assert "head.init=class_mean: 24 of 24 classes set from 192 images" in done.stderr + done.stdout
