"""The trainer built from a Config on real parts: 2 gloo ranks, DeepSpeed engines, a generated data set.

Data: a tiny generated face-like set (16 identities x 8 images, 32x32) read by the torch loader,
MobileFaceNet at 32x32 with a 16-d embedding, all cluster terms on.
"""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from largefr.choices import ZERO_STAGES
from tests.distributed_helpers import free_port, run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> str:
    from largefr.data.synthetic import generate_dataset

    folder = tmp_path_factory.mktemp("tiny") / "data"
    generate_dataset(folder, identities=16, images_per_identity=8, pairs=20, image_size=32, seed=1, progress=False)
    return str(folder)


def tiny_config(data_dir: str, output: str, **sections) -> dict:
    config = {
        "data": {"rec": data_dir, "num_classes": 16, "num_images": 128, "loader": "torch", "image_size": 32,
                 "num_workers": 0, "val_targets": ["synth_val"]},
        "model": {"network": "mbf", "embedding_size": 16},
        "head": {"scale": 16.0, "margin": 0.3},
        "cluster": {"queue_size": 64, "num_sampled_centers": 8},
        "optim": {"name": "adam", "lr": 0.003, "weight_decay": 0.0},
        "schedule": {"type": "step", "epochs": 4},
        "train": {"batch_size": 8, "precision": "fp32", "zero_stage": 1, "seed": 3, "max_steps": 6},
        "eval": {"every": 0, "batch_size": 16, "nfolds": 2},
        "checkpoint": {"every": 0, "keep_last": 2},
        "logging": {"every": 1, "tensorboard": False},
        "output": output,
    }
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values} if isinstance(values, dict) else values
    return config


def _train(rank: int, world: int, config_dict: dict, resume: str | None = None, sigterm_after: int | None = None):
    from largefr.config import Config
    from largefr.train.build import build_trainer
    from largefr.train.distributed_env import init_distributed

    env = init_distributed()
    config = Config.from_dict(config_dict, world_size=world)
    trainer = build_trainer(config, env, resume=resume)
    trainer.loss_history = []
    if sigterm_after is not None and rank == 0:
        original = trainer.run_step

        def train_step_then_signal(micro_batches):
            result = original(micro_batches)
            if trainer.state.step == sigterm_after - 1:  # the step just taken is number `sigterm_after`
                os.kill(os.getpid(), signal.SIGTERM)
            return result
        trainer.run_step = train_step_then_signal
    summary = trainer.train()
    trainer.metrics.close()
    return {"losses": [float(x) for x in trainer.loss_history], "summary": summary,
            "weight": trainer.runner.head.margin_head.weight.detach().clone(),
            "buffers": [b.detach().clone() for b in trainer.runner.engine.module.buffers()],
            "start": trainer.runner.head.partition.start, "ramp": trainer.runner.head.ramp}


def _zero_stages(rank: int, world: int, data: str, output: str) -> dict:
    out = {}
    for stage in ZERO_STAGES:
        out[stage] = _train(rank, world, tiny_config(data, f"{output}/z{stage}", train={"zero_stage": stage}))
    return out


def test_zero_0_1_2_train_with_finite_decreasing_loss(tiny_data, tmp_path):
    per_rank = run_distributed(_zero_stages, 2, tiny_data, str(tmp_path))
    for stage in ZERO_STAGES:
        losses = per_rank[0][stage]["losses"]
        assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
        assert losses == pytest.approx(per_rank[1][stage]["losses"], rel=1e-6)  # the loss is global
        assert sum(losses[-2:]) < sum(losses[:2]), f"ZeRO {stage}: loss did not decrease: {losses}"
        summary = json.loads((tmp_path / f"z{stage}" / "summary.json").read_text())
        assert summary["steps"] == 6 and summary["zero_stage"] == stage and summary["world_size"] == 2
        assert set(summary["final_loss_terms"]) == {"loss_cg", "loss_con", "loss_ali"}
        assert 0.0 <= summary["verification"]["synth_val"] <= 1.0
        assert (tmp_path / f"z{stage}" / "checkpoints" / "step_6" / "manifest.json").is_file()
        # the final verification ran on rank 0's BatchNorm statistics on every rank (those the checkpoint keeps)
        for mine, first in zip(per_rank[1][stage]["buffers"], per_rank[0][stage]["buffers"], strict=True):
            assert torch.equal(mine, first)


def _interrupted_and_resumed(rank: int, world: int, data: str, output: str) -> dict:
    warmup = {"warmup_steps": 4}  # the ramp must follow the restored step, not restart
    config = tiny_config(data, f"{output}/straight", train={"zero_stage": 2}, cluster=warmup)
    straight = _train(rank, world, config)
    config = tiny_config(data, f"{output}/stopped", train={"zero_stage": 2}, cluster=warmup)
    stopped = _train(rank, world, config, sigterm_after=2)
    resumed = _train(rank, world, config, resume="auto")
    return {"straight": straight, "stopped": stopped, "resumed": resumed}


def test_sigterm_checkpoints_and_resume_reproduces_losses(tiny_data, tmp_path):
    per_rank = run_distributed(_interrupted_and_resumed, 2, tiny_data, str(tmp_path))
    for rank, result in enumerate(per_rank):
        stopped, resumed, straight = result["stopped"], result["resumed"], result["straight"]
        # SIGTERM on rank 0 after step 2 reaches every rank with step 3: all stop after 3 steps
        assert stopped["summary"]["interrupted"] and stopped["summary"]["steps"] == 3
        assert resumed["summary"]["steps"] == 6 and not resumed["summary"]["interrupted"]
        torch.testing.assert_close(torch.tensor(stopped["losses"] + resumed["losses"]),
                                   torch.tensor(straight["losses"]), rtol=0, atol=1e-6)
        torch.testing.assert_close(resumed["weight"], straight["weight"], rtol=0, atol=1e-6)
        assert (stopped["ramp"], resumed["ramp"]) == (0.5, 1.0)  # set from steps 2 and 5 (counted from 0)
    assert (tmp_path / "stopped" / "checkpoints" / "step_3" / "manifest.json").is_file()


# ---------------------------------------------------------------------------- launch/train.py


def _launch(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _write(tmp_path, config: dict) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return str(path)


def test_plain_python_missing_bin_fails_with_message(tiny_data, tmp_path):
    config = tiny_config(tiny_data, str(tmp_path / "out"), data={"val_targets": ["lfw"]})
    result = _launch([sys.executable, "launch/train.py", "--config", _write(tmp_path, config)])
    assert result.returncode == 1
    assert f"verification set 'lfw' (data.val_targets) not found; looked for {os.path.join(tiny_data, 'lfw.bin')}" \
        in result.stderr
    assert "data.val_targets" in result.stderr


def test_plain_python_config_error_exit_code_2(tiny_data, tmp_path):
    config = tiny_config(tiny_data, str(tmp_path / "out"), train={"batch_sise": 8})
    result = _launch([sys.executable, "launch/train.py", "--config", _write(tmp_path, config)])
    assert result.returncode == 2 and "batch_sise" in result.stderr and "batch_size" in result.stderr


@pytest.mark.parametrize("problem", ["config", "data folder", "bin"])
def test_deepspeed_launcher_errors_end_every_rank(tiny_data, tmp_path, problem):
    overrides = {"config": {"train": {"zero_stag": 1}}, "data folder": {"data": {"rec": str(tmp_path / "nowhere")}},
                 "bin": {"data": {"val_targets": ["agedb_30"]}}}[problem]
    config = tiny_config(tiny_data, str(tmp_path / "out"), **overrides)
    result = _launch([*launcher_command("deepspeed"), "launch/train.py", "--config", _write(tmp_path, config)])
    assert result.returncode != 0
    expected = {"config": "zero_stag", "data folder": "nowhere", "bin": "agedb_30.bin"}[problem]
    for rank in (0, 1):
        assert any(line.startswith(f"[rank {rank}] error:") and expected in line
                   for line in result.stderr.splitlines() + result.stdout.splitlines()), result.stderr[-3000:]


def launcher_command(launcher: str) -> list[str]:
    """The launcher's command line, on a free port: the default 29500 collides with any other job on the machine."""
    port = str(free_port())
    return {"python": [sys.executable], "deepspeed": ["deepspeed", "--num_gpus", "2", "--master_port", port],
            "torchrun": ["torchrun", "--nproc_per_node", "2", "--master_port", port]}[launcher]


@pytest.mark.parametrize("launcher", ["python", "deepspeed", "torchrun"])
def test_launch_train_py_runs_under_each_launcher(tiny_data, tmp_path, launcher):
    config = tiny_config(tiny_data, str(tmp_path / "out"), train={"max_steps": 2}, eval={"every": 0},
                         data={"val_targets": []})
    command = launcher_command(launcher)
    result = _launch([*command, "launch/train.py", "--config", _write(tmp_path, config)])
    assert result.returncode == 0, result.stderr[-3000:]
    if launcher == "deepspeed":  # its CPU comm op's shared-memory buffers are not left in /dev/shm
        port = command[command.index("--master_port") + 1]
        assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["world_size"] == (1 if launcher == "python" else 2)
    assert summary["launcher"] == ("single" if launcher == "python" else launcher)
    assert "step 2/2" in (tmp_path / "out" / "train.log").read_text()


# ---------------------------------------------------------------------------- non-finite loss


def _nonfinite_worker(rank: int, world: int, policy: str, gas: int = 1) -> dict:
    from largefr.train.distributed_env import init_distributed
    from largefr.train.engine import build_deepspeed_config, build_optimizer, create_engine
    from largefr.train.head_step import ExternalHeadStep
    from largefr.train.step import NonFiniteLossError, StepRunner
    from tests.train_helpers import PoisonedHead, ShardedArcFace, full_weight, rank_batch, tiny_backbone

    init_distributed()
    head = ShardedArcFace(full_weight(5))

    def nan_on_rank1(call: int) -> bool:  # NaN in the last micro-batch of rank 1
        return rank == 1 and call == gas

    head_nan_on_rank1 = PoisonedHead(head, nan_on_rank1)

    backbone = tiny_backbone()
    config = build_deepspeed_config(micro_batch_size=4, gradient_accumulation_steps=gas, world_size=world,
                                    zero_stage=2, precision="fp32", gradient_clipping=0.0)
    engine = create_engine(backbone, build_optimizer(backbone.parameters(), name="sgd", lr=0.5), config)
    head_optimizer = torch.optim.SGD(head.parameters(), lr=0.5, momentum=0.9)
    runner = StepRunner(engine=engine, head=head_nan_on_rank1, on_nonfinite=policy,
                        head_step=ExternalHeadStep(head_optimizer, sharded=[head.weight], replicated=[],
                                                   gradient_accumulation_steps=gas))
    before = [p.detach().clone() for p in engine.module.parameters()] + [head.weight.detach().clone()]
    try:
        result = runner.step([rank_batch(rank, 4, 5, seed=m) for m in range(gas)], lr=0.5, head_lr=0.5)
    except NonFiniteLossError as error:
        return {"raised": str(error)}
    after = [p.detach() for p in engine.module.parameters()] + [head.weight.detach()]
    return {"applied": result.applied, "nonfinite": result.nonfinite_microbatches,
            "unchanged": all(torch.equal(a, b) for a, b in zip(before, after)),
            "finite": all(bool(torch.isfinite(a).all()) for a in after),
            "optimizer_state": len(head_optimizer.state), "engine_steps": engine.global_steps}


def test_nonfinite_loss_on_one_rank_is_skipped_on_every_rank():
    for result in run_distributed(_nonfinite_worker, 2, "skip"):
        assert result == {"applied": False, "nonfinite": 1, "unchanged": True, "finite": True,
                          "optimizer_state": 0, "engine_steps": 0}


def test_nonfinite_micro_batch_under_accumulation_contributes_nothing():
    # gas 2: the bad micro-batch gets a zero backward (DeepSpeed's bookkeeping stays intact), the good one steps
    for result in run_distributed(_nonfinite_worker, 2, "skip", 2):
        assert result == {"applied": True, "nonfinite": 1, "unchanged": False, "finite": True,
                          "optimizer_state": 1, "engine_steps": 1}


def test_nonfinite_loss_aborts_every_rank():
    for result in run_distributed(_nonfinite_worker, 2, "abort"):
        assert "non-finite loss" in result["raised"] and "train.on_nonfinite=skip" in result["raised"]


# ---------------------------------------------------------------------------- resume on another world size


def _build_resumed(rank: int, world: int, config_dict: dict) -> dict:
    from largefr.config import Config
    from largefr.train.build import build_trainer
    from largefr.train.distributed_env import init_distributed

    env = init_distributed()
    trainer = build_trainer(Config.from_dict(config_dict, world_size=world), env, resume="auto")
    head = trainer.runner.head
    trainer.metrics.close()
    return {"weight": head.margin_head.weight.detach().clone(), "centers": head.bank.centers.clone(),
            "queue": head.queue.features.clone(), "step": trainer.state.step, "start": head.partition.start}


def _rows_by_class(results: list[dict], key: str) -> torch.Tensor:
    return torch.cat([r[key] for r in sorted(results, key=lambda r: r["start"])])


@pytest.mark.slow
def test_two_rank_checkpoint_resumes_on_one_and_three_ranks(tiny_data, tmp_path):
    config = tiny_config(tiny_data, str(tmp_path / "run"), train={"zero_stage": 0, "max_steps": 3},
                         data={"val_targets": []})
    trained = run_distributed(_build_resumed, 2, config)  # fresh build (no checkpoint yet) ...
    run_distributed(_train, 2, config)  # ... then 3 steps and a checkpoint at step 3
    saved = run_distributed(_build_resumed, 2, config)
    assert saved[0]["step"] == 3 and not torch.equal(_rows_by_class(saved, "weight"), _rows_by_class(trained, "weight"))
    for world in (1, 3):
        resumed = run_distributed(_build_resumed, world, config)
        assert all(r["step"] == 3 for r in resumed)
        for key in ("weight", "centers"):
            torch.testing.assert_close(_rows_by_class(resumed, key), _rows_by_class(saved, key), rtol=0, atol=0)
        torch.testing.assert_close(resumed[0]["queue"], saved[0]["queue"], rtol=0, atol=0)
