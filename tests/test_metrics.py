"""Progress line, TensorBoard scalars, step timing and the atomic summary file."""
import json
import os
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from largefr.train.metrics import MetricsLogger, StepTimer, StepTiming, write_summary

ONE_SECOND = StepTiming(data_seconds=0.25, compute_seconds=0.75)


def _logger(tmp_path, **kwargs):
    args = dict(rank=0, every=2, total_steps=5, global_batch=8, warmup_steps=0)
    return MetricsLogger(str(tmp_path), **{**args, **kwargs})


def _run_five_steps(logger):
    for step in range(5):
        logger.log_step(step, ONE_SECOND, lr=0.01 * (step + 1),
                        losses={"total": torch.tensor(float(step)), "cg": 0.5 * step},
                        scalars={"cluster/phi_mean": torch.tensor(10.0 + step)})


def test_progress_line_content(tmp_path, capsys):
    logger = _logger(tmp_path)
    _run_five_steps(logger)
    logger.close()
    lines = [line for line in capsys.readouterr().out.splitlines() if "step " in line]
    # logged after steps 2 and 4 (every=2) and after the last one (5/5)
    assert [line.split("] ", 1)[1].split(" |")[0] for line in lines] == ["step 2/5", "step 4/5", "step 5/5"]
    first = lines[0]
    assert "8.0 img/s" in first                # 8 images per step, 1 s per step
    assert "total 0.5000 cg 0.2500" in first   # window means of steps 0 and 1
    assert "lr 2.000e-02" in first
    assert "data 25.0%" in first
    assert "eta 0:00:03" in first              # 3 steps left at 1 s each
    assert "GiB" in first
    assert "total 4.0000 cg 2.0000" in lines[2]  # last window holds step 4 alone
    with open(tmp_path / "train.log", encoding="utf-8") as handle:
        assert handle.read().splitlines() == lines


def test_tensorboard_scalars(tmp_path):
    logger = _logger(tmp_path)
    _run_five_steps(logger)
    logger.log_scalars(4, {"verification/lfw": 0.875}, line=False)
    logger.close()
    event_dir = tmp_path / "tensorboard"
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(event_dir))
    events = EventAccumulator(str(event_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"loss/total", "loss/cg", "lr", "perf/images_per_sec", "perf/data_wait_pct", "perf/eta_seconds",
                "memory/peak_gib", "cluster/phi_mean", "verification/lfw"}
    assert expected <= tags
    loss = [(e.step, e.value) for e in events.Scalars("loss/total")]
    assert loss == [(2, pytest.approx(0.5)), (4, pytest.approx(2.5)), (5, pytest.approx(4.0))]
    assert [e.value for e in events.Scalars("cluster/phi_mean")] == pytest.approx([11.0, 13.0, 14.0])
    assert events.Scalars("verification/lfw")[0].value == pytest.approx(0.875)


def test_other_ranks_write_nothing(tmp_path, capsys):
    out = tmp_path / "rank1"
    logger = _logger(out, rank=1)
    _run_five_steps(logger)
    logger.info("hello")
    logger.close()
    assert not out.exists()
    assert capsys.readouterr().out == ""


def test_mean_images_per_sec_leaves_out_warmup(tmp_path):
    logger = _logger(tmp_path, warmup_steps=2, tensorboard=False, log_file=False)
    slow = StepTiming(data_seconds=9.0, compute_seconds=1.0)
    for step in range(5):
        logger.log_step(step, slow if step < 2 else ONE_SECOND, losses={}, lr=1.0)
    assert logger.images_per_sec_mean() == pytest.approx(8.0)


def test_step_timer_splits_data_wait_and_compute():
    timer = StepTimer()
    time.sleep(0.05)
    timer.data_ready()
    time.sleep(0.15)
    timing = timer.step_done()
    assert 0.04 <= timing.data_seconds < 0.12
    assert 0.14 <= timing.compute_seconds < 0.30
    timer.data_ready()  # next step starts where the last ended: almost no data wait
    assert timer.step_done().data_seconds < 0.05


def test_write_summary_is_atomic_json(tmp_path):
    path = tmp_path / "summary.json"
    write_summary(str(path), {"steps": 10, "final_loss": torch.tensor(1.5), "nan": float("nan"),
                              "verification": {"lfw": 0.9}})
    assert json.loads(path.read_text()) == {"steps": 10, "final_loss": 1.5, "nan": None,
                                            "verification": {"lfw": 0.9}}
    with pytest.raises(TypeError):
        write_summary(str(path), {"steps": object()})
    # the failed write left the previous summary whole and no temporary file behind
    assert json.loads(path.read_text())["steps"] == 10
    assert os.listdir(tmp_path) == ["summary.json"]
