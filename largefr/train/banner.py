"""What a run says before its first step: who runs it, how long, what it resumes, and what differs from the
config's own setting (a launch with another number of ranks than `train.world`)."""
from __future__ import annotations

from dataclasses import dataclass

from largefr.config import Config
from largefr.train.schedule import steps_per_epoch


@dataclass(frozen=True)
class RunLength:
    """How a config's run unfolds on a number of ranks."""
    global_batch: int
    steps_per_epoch: int
    schedule_steps: int
    """Steps of the learning-rate schedule (schedule.epochs of them)."""
    steps: int
    """Steps the run takes: the schedule, or fewer where train.max_steps stops it."""

    def describe(self, epochs: float) -> str:
        cut = f", the {epochs:g}-epoch schedule cut at step {self.steps} of {self.schedule_steps}" \
            if self.steps < self.schedule_steps else ""
        return (f"global batch {self.global_batch}, {self.steps_per_epoch} steps per epoch, "
                f"{self.steps} steps{cut}")


def run_length(config: Config, world_size: int) -> RunLength:
    """`config`'s run on `world_size` ranks (data.num_images must be known)."""
    global_batch = config.global_batch_size(world_size)
    per_epoch = steps_per_epoch(config.data.num_images, global_batch)
    schedule_steps = round(config.schedule.epochs * per_epoch)
    return RunLength(global_batch=global_batch, steps_per_epoch=per_epoch, schedule_steps=schedule_steps,
                     steps=min(schedule_steps, config.train.max_steps or schedule_steps))


def world_note(config: Config, world_size: int) -> str | None:
    """One line on what changes when `config` (written for train.world ranks) runs on `world_size`; None if same."""
    written = config.train.world
    if written is None or written == world_size:
        return None
    epochs = config.schedule.epochs
    return (f"this config is written for {written} ranks (train.world) and this run has {world_size}: "
            f"{run_length(config, world_size).describe(epochs)}, instead of "
            f"{run_length(config, written).describe(epochs)}. To run it as written: "
            f"python launch/train.py --world {written} ...")


def resume_note(requested: str | None, found: str | None, checkpoint_dir: str) -> str | None:
    """One line when `--resume` (or checkpoint.resume) found nothing to resume; a found checkpoint is announced
    by the checkpointer once restored ("resumed from PATH (step N, saved by R ranks)")."""
    if requested is None or found is not None:
        return None
    return f"--resume {requested}: no complete checkpoint in {checkpoint_dir}; starting fresh at step 0"
