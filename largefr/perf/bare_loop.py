"""The trainer's ArcFace step against a bare torch loop of the same model, head and optimizers, in one run.

Trainer side: a `Trainer` built by `largefr.train.build.build_trainer` (the DeepSpeed engine, the sharded
head and its row-sparse optimizer, `StepRunner`, the loop with its logging), fed by the synthetic
in-memory loader, run with `Trainer.train` for `steps` steps at a time.
Bare side: what a minimal training script does with the same parts: the same backbone (same init, same
layout) under torch `DistributedDataParallel` with its default 25 MB buckets, the same `ShardedMarginHead`
(same init, same Partial FC sampler), the same backbone optimizer with torch's gradient clipping, the same
row-sparse head optimizer, the same batches and learning rates; no DeepSpeed, no cluster terms, no
finiteness checks, no logging. DDP runs with `broadcast_buffers=False` because the engine does not
broadcast BatchNorm buffers either.

Rounds alternate the order of the two sides, so the ratio holds on a loaded machine. A phase table
(`largefr.perf.profiling.PhaseTimer`, same phase names on both sides) says where the extra time goes.
Both sides start from the same weights and data: their losses on step 1 must be equal and on step 2
(after one update of each) close, which the report carries as the like-for-like check.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist

from largefr.perf.profiling import PhaseTimer, mark_backward, profile_steps
from largefr.train.phases import NULL_TIMER

BENCH_OVERRIDES = ("data.loader=synthetic", "data.val_targets=[]", "data.synthetic=null", "model.network=r18",
                   "cluster.cg_margin=false", "cluster.contrastive_weight=0", "cluster.aligning_weight=0",
                   "optim.name=sgd", "optim.momentum=0.9", "optim.gradient_clipping=5.0",
                   "eval.every=0", "checkpoint.every=0", "logging.tensorboard=false")
"""What the benchmark sets before the user's --set: ArcFace only, in-memory data, SGD with momentum and
clipping 5 (arcface_torch's recipe), no periodic work. The user's --set comes after and wins."""

PHASES = ("data_wait", "backbone_forward", "feature_gather", "loss_cg", "head_other", "backbone_backward",
          "optimizer_engine", "optimizer_head", "other")
"""Phases of the table, the names `tools/profile_step.py` uses for the same work."""

THREADS_PER_RANK = 1
"""torch threads of each rank (the project's CPU runs: one per rank on a 2-core machine)."""

CHECK_STEPS = 2
"""Steps both sides run first from the same weights: losses of step 1 equal, of step 2 close."""


@dataclasses.dataclass(kw_only=True)
class BareLoopPlan:
    steps: int
    """Timed steps of each side per round."""
    repeats: int
    """Rounds (the order of the sides alternates)."""
    warmup: int
    """Untimed steps of each side before the rounds (after the like-for-like check)."""
    profile_steps: int
    """Steps of each side run under a PhaseTimer for the phase table (0: no table)."""


# ---- the bare side ------------------------------------------------------------------------------
class BareLoop:
    """A minimal data-parallel training loop of the trainer's backbone, head and optimizers."""

    def __init__(self, config, env, schedule, head_lr_factor: float):
        from torch.nn.parallel import DistributedDataParallel

        from largefr.models import get_model
        from largefr.data.prepare import prepare_data
        from largefr.train.build import backbone_options, build_head, seed_everything
        from largefr.train.compile import EagerFallback, use_channels_last
        from largefr.train.engine import build_optimizer

        seed_everything(config.train.seed, env.rank)  # as build_trainer does: the same initial backbone
        m, o = config.model, config.optim
        backbone = get_model(m.network, embedding_size=m.embedding_size, dropout=m.dropout,
                             image_size=config.data.image_size, **backbone_options(m)).to(env.device)
        if config.train.channels_last:
            use_channels_last(backbone)
        if config.train.compile:
            backbone.compile(backend=EagerFallback(config.train.compile_backend))
        self.backbone = DistributedDataParallel(backbone, broadcast_buffers=False) if env.world_size > 1 else backbone
        self.optimizer = build_optimizer(backbone.parameters(), name=o.name, lr=o.lr, momentum=o.momentum,
                                         weight_decay=o.weight_decay, betas=tuple(o.betas))
        parts = build_head(config, env)
        self.head, self.head_optimizer = parts.head.margin_head, parts.weight_optimizer
        self.clip, self.world = o.gradient_clipping, env.world_size
        self.loader = prepare_data(config, env).open_loader()
        self.schedule, self.head_lr_factor = schedule, head_lr_factor
        self.step_index, self.device = 0, env.device
        self.timer: PhaseTimer = NULL_TIMER
        self._batches = iter(())

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = next(self._batches, None)
        if batch is None:
            self.loader.set_epoch(0)
            self._batches = self.loader.iter_from(0)
            batch = next(self._batches)
        return batch

    def step(self) -> torch.Tensor:
        """One training step; returns the loss (detached)."""
        from largefr.distributed.collectives import all_gather_rows
        from largefr.train.head_step import scale_feature_gradient
        from largefr.train.schedule import set_learning_rate

        timer = self.timer
        with timer.phase("data_wait"):
            images, labels = self._next_batch()
        lr = self.schedule.lr_at(self.step_index)
        set_learning_rate(self.optimizer, lr)
        set_learning_rate(self.head_optimizer, lr * self.head_lr_factor)
        with timer.phase("backbone_forward"):
            embeddings = self.backbone(images.to(self.device))
        embeddings = scale_feature_gradient(embeddings, float(self.world))  # DDP averages; the gather sums shares
        with timer.phase("head_other"):
            labels = all_gather_rows(labels.to(self.device, dtype=torch.long), self.head.group)
            features = _gather(embeddings, self.head.group, timer)
            with timer.phase("loss_cg"):
                loss = self.head.loss_from_gathered(features, labels)
            loss = mark_backward(loss, timer, "loss_cg") if timer.enabled else loss
        with timer.phase("backbone_backward"):
            loss.backward()
        with timer.phase("optimizer_engine"):
            if self.clip > 0:
                torch.nn.utils.clip_grad_norm_(self.optimizer.param_groups[0]["params"], self.clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        with timer.phase("optimizer_head"):
            self.head_optimizer.step(rows=self.head.last_sampled)
            self.head_optimizer.zero_grad(set_to_none=True)
        self.step_index += 1
        return loss.detach()


def _gather(embeddings: torch.Tensor, group, timer) -> torch.Tensor:
    """The head's feature all-gather, charged to 'feature_gather' forward and backward (as profile_step does)."""
    from largefr.distributed.collectives import all_gather_with_grad

    if not timer.enabled:
        return all_gather_with_grad(embeddings, group)
    embeddings = mark_backward(embeddings, timer, "backbone_backward")
    with timer.phase("feature_gather"):
        gathered = all_gather_with_grad(embeddings, group)
    return mark_backward(gathered, timer, "feature_gather")


# ---- the trainer side ---------------------------------------------------------------------------
def run_trainer_steps(trainer, steps: int) -> None:
    """`steps` more steps of the trainer's own loop (`Trainer.train`: data, step, logging)."""
    trainer.plan.total_steps = trainer.state.step + steps
    trainer.metrics.total_steps = trainer.plan.total_steps
    trainer.train()


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _timed(fn) -> float:
    _barrier()
    started = time.perf_counter()
    fn()
    _barrier()
    return time.perf_counter() - started


def _like_for_like(trainer, bare: BareLoop) -> dict[str, list[float]]:
    trainer.loss_history = []
    run_trainer_steps(trainer, CHECK_STEPS)
    bare_losses = [float(bare.step()) for _ in range(CHECK_STEPS)]
    trainer_losses = [float(loss) for loss in trainer.loss_history]
    trainer.loss_history = None
    return {"trainer": trainer_losses, "bare": bare_losses}


def _phases(trainer, bare: BareLoop, steps: int, device) -> dict[str, dict[str, float]]:
    """Milliseconds per step of every phase, each side under its own PhaseTimer."""
    trainer_timer, bare_timer = PhaseTimer(device), PhaseTimer(device)
    trainer.plan.total_steps = trainer.state.step + steps + 1  # profile_steps keeps the step inside the plan
    profile_steps(trainer, trainer_timer, steps=steps, warmup=0)
    bare.timer = bare_timer
    try:
        for _ in range(steps):
            with bare_timer.phase("other"):
                bare.step()
    finally:
        bare.timer = NULL_TIMER
    unknown = sorted((set(trainer_timer.totals) | set(bare_timer.totals)) - set(PHASES))
    if unknown:
        raise RuntimeError(f"phases {unknown} are not in largefr/perf/bare_loop.py PHASES; add them there")
    return {name: {"trainer_ms": trainer_timer.totals.get(name, 0.0) / steps * 1e3,
                   "bare_ms": bare_timer.totals.get(name, 0.0) / steps * 1e3} for name in PHASES}


def _built_trainer(config, env, output: str):
    """`build_trainer` as a run builds it, in `output`, without the loop's checkpoint and summary at the end."""
    from largefr.train.build import build_trainer

    trainer = build_trainer(dataclasses.replace(config, output=output), env)
    trainer.checkpointer, trainer.summary_path = None, None
    return trainer


def _rounds(sides: dict[str, Any], plan: BareLoopPlan) -> list[dict[str, float]]:
    """`plan.repeats` rounds of `plan.steps` steps of every side; the order rotates from round to round."""
    names, rounds = list(sides), []
    for index in range(plan.repeats):
        shift = index % len(names)
        rounds.append({name: _timed(lambda: sides[name](plan.steps)) for name in names[shift:] + names[:shift]})
    return rounds


def rank_bench(rank: int, world: int, config, plan: BareLoopPlan, variant_config=None) -> dict[str, Any]:
    """One rank of the benchmark (run on spawned gloo ranks): the sides built, checked, timed, profiled.

    `variant_config`: a second trainer (the config with other settings) timed in the same rounds.
    """
    from largefr.train.distributed_env import init_distributed

    env = init_distributed()
    with tempfile.TemporaryDirectory() as output:
        trainer = _built_trainer(config, env, os.path.join(output, "trainer"))
        bare = BareLoop(dataclasses.replace(config, output=output), env, trainer.schedule, trainer.head_lr_factor)
        variant = None if variant_config is None else _built_trainer(variant_config, env, os.path.join(output, "v"))
        trainers = [t for t in (trainer, variant) if t is not None]
        try:
            losses = _like_for_like(trainer, bare)
            sides = {"trainer": lambda steps: run_trainer_steps(trainer, steps),
                     "bare": lambda steps: [bare.step() for _ in range(steps)]}
            if variant is not None:
                sides["variant"] = lambda steps: run_trainer_steps(variant, steps)
            for run in sides.values():
                run(plan.warmup)
            rounds = _rounds(sides, plan)
            phases = _phases(trainer, bare, plan.profile_steps, env.device) if plan.profile_steps else {}
        finally:
            for built in trainers:
                built.metrics.close()
    return {"rank": rank, "losses": losses, "rounds": rounds, "phases": phases,
            "reduction": {"trainer": reduction_path(trainer.runner),
                          "variant": reduction_path(variant.runner) if variant is not None else None}}


def reduction_path(runner) -> str:
    """How the trainer's step reduces backbone gradients (stated in the report beside the bare loop's)."""
    if runner.backbone is not runner.engine:
        return "torch DDP reducer under the DeepSpeed engine (overlapped)"
    zero = runner.engine.zero_optimization_stage()
    if zero == 2 or (zero == 1 and runner.engine.zero_overlap_comm()):
        return f"DeepSpeed ZeRO {zero}, buckets reduced from the gradient hooks (overlapped)"
    return f"DeepSpeed ZeRO {zero}, reduced after backward"


# ---- the report ---------------------------------------------------------------------------------
def summarize(per_rank: list[dict], config, plan: BareLoopPlan, world: int,
              variant: list[str] | None = None) -> dict[str, Any]:
    """Images/s of each side (slowest rank per round, median over rounds), their ratio, phases, the check."""
    global_batch = config.train.batch_size * world * config.train.gradient_accumulation_steps
    seconds = {side: [max(r["rounds"][i][side] for r in per_rank) for i in range(plan.repeats)]
               for side in per_rank[0]["rounds"][0]}
    ips = {side: [global_batch * plan.steps / s for s in values] for side, values in seconds.items()}
    round_ratios = [t / b for t, b in zip(ips["trainer"], ips["bare"])]
    phases = {name: {key: statistics.fmean(r["phases"][name][key] for r in per_rank)
                     for key in ("trainer_ms", "bare_ms")} for name in (PHASES if plan.profile_steps else ())}
    losses = per_rank[0]["losses"]
    return {
        "setup": {"network": config.model.network, "image_size": config.data.image_size,
                  "batch_size_per_rank": config.train.batch_size, "world": world, "global_batch": global_batch,
                  "classes": config.data.num_classes, "embedding_size": config.model.embedding_size,
                  "sample_rate": config.head.sample_rate, "precision": config.train.precision,
                  "zero_stage": config.train.zero_stage, "deepspeed": config.deepspeed or {},
                  "optimizer": config.optim.name, "gradient_clipping": config.optim.gradient_clipping,
                  "channels_last": {"trainer": config.train.channels_last, "bare": config.train.channels_last},
                  "compile": {"trainer": config.train.compile, "bare": config.train.compile},
                  "gradient_reduction": {**per_rank[0]["reduction"], "bare": "torch DDP reducer, default buckets"},
                  "torch": torch.__version__, "threads_per_rank": THREADS_PER_RANK},
        "steps": plan.steps, "repeats": plan.repeats, "warmup": plan.warmup, "profile_steps": plan.profile_steps,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "trainer_images_per_sec": statistics.median(ips["trainer"]),
        "bare_images_per_sec": statistics.median(ips["bare"]),
        "ratio": statistics.median(ips["trainer"]) / statistics.median(ips["bare"]),
        "round_ratios": round_ratios, "round_ratio_median": statistics.median(round_ratios),
        "round_seconds": seconds,
        "phases_ms": phases,
        "losses": losses,
        "step1_loss_difference": abs(losses["trainer"][0] - losses["bare"][0]),
        "step2_loss_relative_difference": abs(losses["trainer"][1] - losses["bare"][1]) / abs(losses["bare"][1]),
        **(_variant_summary(ips, variant) if variant else {}),
    }


def _variant_summary(ips: dict[str, list[float]], variant: list[str]) -> dict[str, Any]:
    """The variant trainer's images/s, its ratio to the bare loop and to the trainer (per round, then median)."""
    per_round = [v / t for v, t in zip(ips["variant"], ips["trainer"])]
    return {"variant": variant, "variant_images_per_sec": statistics.median(ips["variant"]),
            "variant_ratio": statistics.median(ips["variant"]) / statistics.median(ips["bare"]),
            "variant_vs_trainer_round_ratios": per_round,
            "variant_vs_trainer": statistics.median(per_round)}


def bench_bare_loop(config, world: int, plan: BareLoopPlan, *, variant_config=None,
                    variant: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark on `world` spawned gloo ranks (1 torch thread each); the summarized report.

    `variant_config` (built from the config with the overrides `variant`): a second trainer in the same rounds.
    """
    from largefr.distributed.spawn import run_ranks

    if config.cluster.enabled:
        raise ValueError("the bare loop has no cluster terms: keep cluster.cg_margin=false, "
                         "cluster.contrastive_weight=0 and cluster.aligning_weight=0")
    if config.train.precision != "fp32" or config.train.gradient_accumulation_steps != 1:
        raise ValueError(f"the bare loop runs fp32 steps of one micro-batch; got train.precision="
                         f"{config.train.precision}, train.gradient_accumulation_steps="
                         f"{config.train.gradient_accumulation_steps}: use --precision fp32 and no accumulation "
                         "(bf16 would need DeepSpeed's fp32 master weights on the bare side too)")
    per_rank = run_ranks(rank_bench, world, config, plan, variant_config, threads=THREADS_PER_RANK)
    return summarize(per_rank, config, plan, world, variant)


def format_report(report: dict[str, Any]) -> str:
    """The headline, the per-round ratios, the check and the phase table, as printed by the tool."""
    s = report["setup"]
    lines = [f"{s['network']} {s['image_size']} px, {s['world']} ranks x batch {s['batch_size_per_rank']}, "
             f"d={s['embedding_size']}, {s['classes']} classes, sample rate {s['sample_rate']}, {s['precision']}, "
             f"ZeRO {s['zero_stage']}, {s['optimizer']} clip {s['gradient_clipping']}",
             f"layout: channels_last trainer={s['channels_last']['trainer']} bare={s['channels_last']['bare']}; "
             f"compile trainer={s['compile']['trainer']} bare={s['compile']['bare']}",
             f"gradient reduction: trainer {s['gradient_reduction']['trainer']}; "
             f"bare {s['gradient_reduction']['bare']}",
             f"trainer {report['trainer_images_per_sec']:.2f} img/s, bare loop {report['bare_images_per_sec']:.2f} "
             f"img/s, ratio {report['ratio']:.3f} (median of {report['repeats']} alternating rounds of "
             f"{report['steps']} steps; per round " + ", ".join(f"{r:.3f}" for r in report["round_ratios"])
             + f", their median {report['round_ratio_median']:.3f})",
             *([f"variant ({' '.join(report['variant'])}): {report['variant_images_per_sec']:.2f} img/s, "
                f"ratio to bare {report['variant_ratio']:.3f}, to the trainer {report['variant_vs_trainer']:.3f} "
                f"(median per round; gradient reduction: {s['gradient_reduction']['variant']})"]
               if "variant" in report else []),
             f"like for like: step-1 loss trainer {report['losses']['trainer'][0]:.6f} bare "
             f"{report['losses']['bare'][0]:.6f}; step-2 relative difference "
             f"{report['step2_loss_relative_difference']:.1e}"]
    if report["phases_ms"]:
        lines += ["", f"| phase | trainer ms/step | bare ms/step | extra ms |", "|---|---:|---:|---:|"]
        totals = [0.0, 0.0]
        for name, row in report["phases_ms"].items():
            totals[0] += row["trainer_ms"]
            totals[1] += row["bare_ms"]
            lines.append(f"| {name} | {row['trainer_ms']:.1f} | {row['bare_ms']:.1f} | "
                         f"{row['trainer_ms'] - row['bare_ms']:+.1f} |")
        lines.append(f"| **sum** | {totals[0]:.1f} | {totals[1]:.1f} | {totals[0] - totals[1]:+.1f} |")
    return "\n".join(lines)
