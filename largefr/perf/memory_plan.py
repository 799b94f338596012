"""Per-rank memory plan of the class-partitioned head, and the largest class count a budget holds.

The plan counts the tensors the implementation really allocates (checked against torch's memory
profiler by tests/test_memory_plan.py and tools/scale_classes.py), per rank, for the class range
`ClassPartition` gives that rank. Two kinds of bytes:

* resident (alive between steps): W rows, the head optimizer's state (RowSparseSGD: momentum
  buffer + per-row step; RowSparseAdamW: exp_avg + exp_avg_sq + per-row step), the cluster bank
  (centers, phi, has_phi, seen, queue_count), the replicated feature queue, the local inputs.
* step peak: the largest set of temporaries alive at one moment of the head's forward + backward
  (W's gradient, gathered features, logits, the float32 softmax/gradient buffers, sampling
  indices, the low-memory head's block buffers). Each phase of the step is listed with what is
  alive in it; the peak is the largest phase. With sampling (rate < 1), W's gradient is a sparse
  row gradient: the sampled rows' values and their int64 indices (`largefr.heads.row_gradient`).

W, its optimizer state and the bank's centers are stored in `weight_dtype` (head.weight_dtype, as
`largefr.train.build` creates them: float32 or bfloat16); phi, the queue and every step temporary that
is computed on are float32 (a bfloat16 W's sampled rows are upcast after the gather, its gradient is
bfloat16); `precision` is the logits GEMM dtype (head.logits_dtype). Bytes are exact counts; vectors of
B_g entries (per-row maxima, sums, targets) are left out (a few KB).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from largefr.checkpoint.rows import ROW_BLOCK_BYTES
from largefr.choices import HEAD_OPTIMIZERS, LOGITS_DTYPES, PRECISION_BYTES, WEIGHT_DTYPES
from largefr.distributed.partition import ClassPartition
from largefr.errors import UsageError
from largefr.heads.optim import block_elements
from largefr.heads.precision import ROUNDING_CHUNK_ELEMENTS, ROUNDING_TEMPORARY_BYTES
from largefr.heads.spare import SLACK

LOGITS_BYTES = {name: PRECISION_BYTES[name] for name in LOGITS_DTYPES}
"""Logits GEMM dtype -> bytes per element (the softmax is float32 in both)."""
OPTIMIZERS = (*dict.fromkeys(HEAD_OPTIMIZERS.values()), "none")
OPTIMIZER_PHASE = "optimizer step"
FEATURE_BACKWARD_PHASE = "backward: features"
"""After the logits' backward: W's gradient complete, the features' gradient reduced."""
OPTIMIZER_ROW_COPIES = {"sgd": 2, "adamw": 4, "none": 0}
"""Float32 temporaries of one block of rows (`largefr.heads.optim.row_blocks`) alive at once while W's gradient
exists, with sampling (rate < 1): RowSparseSGD (momentum, weight decay added into the gradient in place) the
gathered weight and momentum buffer; RowSparseAdamW the gathered weight, exp_avg and exp_avg_sq, and one
denominator buffer."""
OPTIMIZER_FULL_COPIES = {"sgd": 0, "adamw": 1, "none": 0}
"""The same at rate 1.0, where the rows are updated in place: none for SGD; AdamW's denominator buffer."""
PARAM_BYTES = 4  # float32: what is computed on (features, gathered rows, logits buffers), phi, the queue
INDEX_BYTES = 8  # int64 labels, sampled indices, per-row step counts
GIB = 2**30


@dataclass(kw_only=True)
class PlanInputs:
    """What the plan depends on; the names follow the config (data.num_classes, head.*, optim.name)."""

    num_classes: int
    """K, classes over all ranks."""
    world_size: int
    """Ranks sharing the classes (the head's process group)."""
    dim: int
    """Embedding size d."""
    batch: int
    """Per-rank batch B (global batch B_g = world_size * B)."""
    sample_rate: float = 1.0
    """Partial FC rate (head.sample_rate)."""
    precision: str = "fp32"
    """Logits GEMM dtype: 'fp32' or 'bf16' (head.logits_dtype)."""
    weight_dtype: str = "fp32"
    """Storage dtype of W, its optimizer state and the bank's centers: 'fp32' or 'bf16' (head.weight_dtype)."""
    optimizer: str = "sgd"
    """Head optimizer: 'sgd' (momentum), 'adamw', or 'none' (no state, e.g. inference of the loss)."""
    chunk_size: int = 0
    """Low-memory head block width (head.chunk_size); 0 = default head."""
    bank: bool = True
    """Cluster bank and feature queue present (any cluster term on)."""
    queue_size: int = 8192
    """Feature queue rows (cluster.queue_size), replicated on every rank."""
    device: str = "cuda"
    """Where the step runs, 'cuda' or 'cpu': it sets the row-sparse optimizer's blocks
    (`largefr.heads.optim.block_elements`), cache-sized on CPU."""

    def __post_init__(self) -> None:
        problems = []
        if self.world_size < 1 or self.dim < 1 or self.batch < 1:
            problems.append(f"world_size={self.world_size}, dim={self.dim}, batch={self.batch} must all be >= 1")
        if self.num_classes < self.world_size:
            problems.append(f"num_classes={self.num_classes} must be >= world_size={self.world_size}")
        if not 0.0 < self.sample_rate <= 1.0:
            problems.append(f"sample_rate={self.sample_rate} must be in (0, 1]")
        if self.precision not in LOGITS_BYTES:
            problems.append(f"precision={self.precision!r} must be one of {sorted(LOGITS_BYTES)}")
        if self.weight_dtype not in WEIGHT_DTYPES:
            problems.append(f"weight_dtype={self.weight_dtype!r} must be one of {WEIGHT_DTYPES}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer={self.optimizer!r} must be one of {OPTIMIZERS}")
        if self.chunk_size < 0:
            problems.append(f"chunk_size={self.chunk_size} must be >= 0 (0 = default head)")
        if self.device not in ("cpu", "cuda"):
            problems.append(f"device={self.device!r} must be 'cpu' or 'cuda'")
        if self.bank and self.queue_size < 1:
            problems.append(f"queue_size={self.queue_size} must be >= 1 while the bank is on")
        if problems:
            raise UsageError("invalid memory plan inputs: " + "; ".join(problems))

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch

    @property
    def weight_bytes(self) -> int:
        """Bytes per stored element of W, its optimizer state and the bank's centers."""
        return PRECISION_BYTES[self.weight_dtype]

    @property
    def low_storage(self) -> bool:
        """W stored in less than float32: rows are upcast copies, writes are rounded."""
        return self.weight_bytes < PARAM_BYTES


@dataclass(kw_only=True)
class RankPlan:
    """Planned bytes of one rank."""

    rank: int
    class_start: int
    class_end: int
    num_local: int
    num_sampled: int
    resident: dict[str, int] = field(default_factory=dict)
    phases: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda name: sum(self.phases[name].values()))

    @property
    def head_peak(self) -> int:
        """Peak of the head's forward + backward alone (the optimizer step left out)."""
        return max(sum(phase.values()) for name, phase in self.phases.items() if name != OPTIMIZER_PHASE)

    @property
    def step_peak(self) -> int:
        return sum(self.phases[self.peak_phase].values())

    @property
    def resident_bytes(self) -> int:
        return sum(self.resident.values())

    @property
    def total(self) -> int:
        return self.resident_bytes + self.step_peak

    @property
    def head_step_peak(self) -> int:
        """What tools/bench_head.py measures: W + local inputs + the step's peak (no optimizer, no bank)."""
        return self.resident["W rows"] + self.resident["local inputs"] + self.head_peak

    def as_dict(self) -> dict:
        return dict(rank=self.rank, class_start=self.class_start, class_end=self.class_end, num_local=self.num_local,
                    num_sampled=self.num_sampled, resident=dict(self.resident), peak_phase=self.peak_phase,
                    step=dict(self.phases[self.peak_phase]), step_peak=self.step_peak,
                    head_step_peak=self.head_step_peak, total=self.total)


def sampled_count(num_local: int, sample_rate: float, global_batch: int) -> int:
    """Columns a rank uses per step: ShardedMarginHead's ceil(rate * num_local), or every positive of
    the global batch in its range when there are more (at most min(B_g, num_local): the worst case)."""
    if sample_rate >= 1.0:
        return num_local
    rate_count = min(num_local, math.ceil(sample_rate * num_local - 1e-9))
    return max(rate_count, min(global_batch, num_local))


def resident_bytes(inputs: PlanInputs, num_local: int) -> dict[str, int]:
    """Tensors alive between steps on a rank holding `num_local` classes."""
    d, rows, stored = inputs.dim, num_local, inputs.weight_bytes
    state_copies = {"sgd": 1, "adamw": 2, "none": 0}[inputs.optimizer]
    resident = {
        "W rows": rows * d * stored,
        "optimizer state": state_copies * rows * d * stored + (rows * INDEX_BYTES if state_copies else 0),
        "bank centers": rows * d * stored if inputs.bank else 0,
        # phi (float32), has_phi and seen (bool), queue_count (int64)
        "bank phi + flags": rows * (PARAM_BYTES + 1 + 1 + INDEX_BYTES) if inputs.bank else 0,
        "feature queue": inputs.queue_size * (d * PARAM_BYTES + INDEX_BYTES) + INDEX_BYTES if inputs.bank else 0,
        "local inputs": inputs.batch * (d * PARAM_BYTES + INDEX_BYTES),
    }
    return resident


def w_grad_bytes(inputs: PlanInputs, num_sampled: int, num_local: int) -> int:
    """W's gradient, in W's dtype: dense over the shard at rate 1.0; else the sampled rows' values and int64 row
    indices."""
    if num_sampled >= num_local:
        return num_local * inputs.dim * inputs.weight_bytes
    values = lent_gradient_bytes(inputs, num_sampled, num_local) or num_sampled * inputs.dim * inputs.weight_bytes
    return values + num_sampled * INDEX_BYTES


def _features(inputs: PlanInputs, num_sampled: int, num_local: int) -> dict[str, int]:
    """Alive through the whole step: gathered rows and labels, the scaled features, sampling indices."""
    b_g, d = inputs.global_batch, inputs.dim
    gathered = b_g * (d * PARAM_BYTES + INDEX_BYTES) if inputs.world_size > 1 else 0
    return {"gathered features + labels": gathered,
            "scaled features": b_g * d * PARAM_BYTES,
            "sampled indices + targets": num_sampled * INDEX_BYTES + b_g * INDEX_BYTES}


def _default_phases(inputs: PlanInputs, num_sampled: int, num_local: int) -> dict[str, dict[str, int]]:
    """Default head: logits of every sampled column at once (ShardedMarginHead + sharded_cross_entropy)."""
    b_g, d, s = inputs.global_batch, inputs.dim, num_sampled
    base = _features(inputs, s, num_local)
    # index_select of the sampled rows; a bfloat16 W's rows (all of them at rate 1.0) are upcast to a float32 copy
    rows_copy = s * d * PARAM_BYTES if s < num_local or inputs.low_storage else 0
    cast_grad = s * d * inputs.weight_bytes if inputs.low_storage else 0  # the float32 gradient cast to W's dtype
    base["sampled W rows"] = rows_copy
    base["1/||W|| of sampled rows"] = s * PARAM_BYTES
    logits = b_g * s * LOGITS_BYTES[inputs.precision]
    softmax = b_g * s * 4
    lent = lent_gradient_bytes(inputs, s, num_local)
    if inputs.precision == "fp32":
        # the cross entropy computes the softmax in the logits' buffer (consume_logits), which becomes the gradient
        forward = {"logits (then softmax, in place)": logits, "W grad buffer (CPU: lent, free until the backward)": lent}
        backward = {"softmax / logits-grad buffer": softmax, "W grad (sampled rows)": lent or s * d * PARAM_BYTES,
                    "W grad in storage dtype": cast_grad, "features grad": b_g * d * PARAM_BYTES,
                    "1/||W||^2": s * PARAM_BYTES}
    else:
        forward = {"logits (bf16)": logits, "fp32 copy of logits (then softmax, in place)": softmax}
        backward = {"logits-grad (bf16)": logits, "normalized W (bf16)": s * d * 2,
                    "features grad (bf16 + fp32)": b_g * d * 6, "features (bf16)": b_g * d * 2,
                    "W grad (bf16 + fp32)": s * d * 6, "W grad in storage dtype": cast_grad,
                    "1/||W||^2": s * PARAM_BYTES}
    phases = {"forward: softmax": {**base, **forward}, "backward: W grad": {**base, **backward}}
    phases[FEATURE_BACKWARD_PHASE] = _feature_backward(inputs, s, num_local)
    return phases


def _chunked_phases(inputs: PlanInputs, num_sampled: int, num_local: int) -> dict[str, dict[str, int]]:
    """Low-memory head: one (B_g x chunk) block at a time (largefr.heads.chunked)."""
    b_g, d, s = inputs.global_batch, inputs.dim, num_sampled
    width = min(inputs.chunk_size, s)
    sampled = s < num_local
    low = inputs.precision != "fp32"
    base = _features(inputs, s, num_local)
    upcast = width * d * PARAM_BYTES if inputs.low_storage else 0  # a bfloat16 W block's float32 copy
    block = {"logits block (fp32)": b_g * width * 4, "normalized W block": width * d * PARAM_BYTES,
             "gathered W block": width * d * inputs.weight_bytes if sampled else 0, "upcast W block": upcast,
             "bf16 block + W block + features": (b_g * width + width * d + b_g * d) * 2 if low else 0}
    # the sampled rows' gradient: in float32 while the blocks run (bfloat16 W: cast to W's dtype after the last one)
    w_grad = s * d * PARAM_BYTES if inputs.low_storage else w_grad_bytes(inputs, s, num_local)
    backward = {"W grad": w_grad, "features grad": b_g * d * PARAM_BYTES,
                "row-weighted features": b_g * d * LOGITS_BYTES[inputs.precision],
                "bf16 block products": (b_g * d + width * d) * 2 if low else 0}
    return {"forward: block": {**base, **block},
            "backward: block": {**base, **block, **backward},
            FEATURE_BACKWARD_PHASE: _feature_backward(inputs, s, num_local)}


def _feature_backward(inputs: PlanInputs, num_sampled: int, num_local: int) -> dict[str, int]:
    """After the logits: W's gradient is complete; normalisation backward and the reduce-scatter run."""
    b_g, b, d = inputs.global_batch, inputs.batch, inputs.dim
    phase = _features(inputs, num_sampled, num_local)
    phase["W grad"] = w_grad_bytes(inputs, num_sampled, num_local)
    phase["normalisation backward"] = 3 * b_g * d * PARAM_BYTES
    # gloo has no reduce_scatter: the gradient is all-reduced in a copy, then this rank's rows copied out
    phase["reduce-scatter"] = (b_g + b) * d * PARAM_BYTES if inputs.world_size > 1 else 0
    return phase


def plan_rank(inputs: PlanInputs, rank: int) -> RankPlan:
    """The plan of one rank, for the class range ClassPartition assigns it."""
    part = ClassPartition(inputs.num_classes, inputs.world_size, rank)
    num_sampled = sampled_count(part.num_local, inputs.sample_rate, inputs.global_batch)
    phases_of = _chunked_phases if inputs.chunk_size > 0 else _default_phases
    phases = phases_of(inputs, num_sampled, part.num_local)
    if inputs.optimizer != "none":
        phases[OPTIMIZER_PHASE] = _optimizer_phase(inputs, num_sampled, part.num_local)
    spare = spare_bytes(inputs, num_sampled, part.num_local)
    for name in (FEATURE_BACKWARD_PHASE, OPTIMIZER_PHASE):  # the phases after the head's backward handed them back
        if spare and name in phases:
            phases[name]["spare buffers (CPU: the logits' and the sampled rows', for the next step)"] = spare
    return RankPlan(rank=rank, class_start=part.start, class_end=part.end, num_local=part.num_local,
                    num_sampled=num_sampled, resident=resident_bytes(inputs, part.num_local), phases=phases)


def spare_bytes(inputs: PlanInputs, num_sampled: int, num_local: int) -> int:
    """What the default head keeps between steps on a CPU (`largefr.heads.spare`): the logits' buffer, and the block
    of sampled rows when W is sampled and stored in float32; each `SLACK` times its size. Counted in the phases
    after the backward that hands them back (before it, they are the step's own logits and rows)."""
    if not _buffers_are_spare(inputs):
        return 0
    rows = num_sampled * inputs.dim * PARAM_BYTES if _rows_are_spare(inputs, num_sampled, num_local) else 0
    return int((inputs.global_batch * num_sampled * 4 + rows) * SLACK)


def lent_gradient_bytes(inputs: PlanInputs, num_sampled: int, num_local: int) -> int:
    """The buffer the default head on a CPU lends the sampled rows' gradient in (`SpareBuffers.lend`), `SLACK` times
    its size: W's gradient during the step, kept (free) between steps; 0 where the head lends none."""
    if not _rows_are_spare(inputs, num_sampled, num_local):
        return 0
    return int(num_sampled * inputs.dim * PARAM_BYTES * SLACK)


def _buffers_are_spare(inputs: PlanInputs) -> bool:
    """Whether the default head reuses its logits' buffer (`ShardedMarginHead._block_loss`): on a CPU, logits in
    float32."""
    return inputs.device == "cpu" and inputs.chunk_size == 0 and inputs.precision == "fp32"


def _rows_are_spare(inputs: PlanInputs, num_sampled: int, num_local: int) -> bool:
    """Whether it also reuses its sampled rows' buffers and lends their gradient one: W sampled and stored in
    float32."""
    return _buffers_are_spare(inputs) and num_sampled < num_local and not inputs.low_storage


def _optimizer_phase(inputs: PlanInputs, num_sampled: int, num_local: int) -> dict[str, int]:
    """W's gradient and one block of the row-sparse update (`largefr.heads.optim.row_blocks`): its float32 copies,
    and with bfloat16 storage (every row read as a float32 copy, even at rate 1.0) the gradient's float32 copy and
    the stochastic rounding of one write."""
    block = min(num_sampled * inputs.dim, block_elements(torch.device(inputs.device)))
    if inputs.low_storage:
        # the block's rounded rows, and the hash's temporaries of one chunk of them
        copies = OPTIMIZER_ROW_COPIES[inputs.optimizer] + 1
        rounding = inputs.weight_bytes * block + ROUNDING_TEMPORARY_BYTES * min(block, ROUNDING_CHUNK_ELEMENTS)
    else:
        copies = (OPTIMIZER_FULL_COPIES if num_sampled >= num_local else OPTIMIZER_ROW_COPIES)[inputs.optimizer]
        rounding = 0
    return {"W grad": w_grad_bytes(inputs, num_sampled, num_local), "sampled-row copies": copies * PARAM_BYTES * block,
            "rounding to storage": rounding}


def plan_memory(inputs: PlanInputs) -> RankPlan:
    """The plan of the rank with the most classes (rank 0: ClassPartition gives the extra classes first)."""
    return plan_rank(inputs, 0)


def max_classes_within(inputs: PlanInputs, budget_bytes: int) -> int:
    """Largest num_classes whose busiest rank fits `budget_bytes` with the other inputs unchanged; 0 if none."""
    return _largest(lambda classes: plan_memory(_with(inputs, num_classes=classes)).total <= budget_bytes,
                    inputs.world_size)


def format_plan(plan: RankPlan, inputs: PlanInputs) -> str:
    """A markdown table of one rank's plan (MiB), resident components, then the peak phase's."""
    lines = [f"rank {plan.rank}: classes [{plan.class_start}, {plan.class_end}) = {plan.num_local} local, "
             f"{plan.num_sampled} sampled per step; B_g = {inputs.global_batch}, d = {inputs.dim}, "
             f"logits {inputs.precision}, W stored {inputs.weight_dtype}, optimizer {inputs.optimizer}, "
             f"chunk_size {inputs.chunk_size}",
             "", "| component | MiB |", "|---|---:|"]
    for name, size in plan.resident.items():
        lines.append(f"| {name} | {size / 2**20:.1f} |")
    lines.append(f"| **resident** | **{plan.resident_bytes / 2**20:.1f}** |")
    for name, size in plan.phases[plan.peak_phase].items():
        if size:
            lines.append(f"| step: {name} | {size / 2**20:.1f} |")
    lines.append(f"| **step peak** ({plan.peak_phase}) | **{plan.step_peak / 2**20:.1f}** |")
    lines.append(f"| **total per rank** | **{plan.total / 2**20:.1f}** ({plan.total / GIB:.2f} GiB) |")
    return "\n".join(lines)


RUN_PHASES = ("training step", "checkpoint save", "resume", "class-mean warm start")
"""Phases of a run whose per-rank peak grows with the class count (the reshard tool's does not: one block)."""


def phase_peaks(inputs: PlanInputs, *, resume_world: int | None = None, base_bytes: int = 0) -> dict[str, int]:
    """Planned peak bytes per rank (the busiest) of each phase of a run, `base_bytes` (the process without the
    head: libraries, backbone, engine; measured by tools/scale_run.py at a small class count) included.

    training step: resident + the step's peak (`plan_memory`).
    checkpoint save: resident (torch.save writes the tensors as they are, no copy).
    resume: the resident state on `resume_world` ranks (default: the same world) + the larger of one block (rows
        are read straight into the live tensors, largefr.checkpoint.rows; the block only for hashing or another
        device) and the first step's peak on those ranks: a resumed job goes on training.
    reshard: tools/reshard_checkpoint.py holds one block whatever the checkpoint's size (`base_bytes` is then
        that tool's own memory).
    class-mean warm start: W, bank and queue (no optimizer state yet) + the float64 per-class sums and counts.
    """
    world = resume_world or inputs.world_size
    train = plan_memory(inputs)
    at_resume = plan_memory(_with(inputs, world_size=world))
    num_local = train.num_local
    return {
        "training step": base_bytes + train.total,
        "checkpoint save": base_bytes + train.resident_bytes,
        "resume": base_bytes + at_resume.resident_bytes + max(ROW_BLOCK_BYTES, at_resume.step_peak),
        "reshard": base_bytes + ROW_BLOCK_BYTES,
        "class-mean warm start": base_bytes + train.resident_bytes - train.resident["optimizer state"]
        + num_local * (inputs.dim + 2) * 8,
    }


def max_classes_per_phase(inputs: PlanInputs, budget_bytes: int, *, resume_world: int | None = None,
                          base_bytes: int = 0) -> dict[str, int]:
    """For each run phase, the largest class count whose busiest rank fits `budget_bytes` (0 if none)."""
    def fits(phase: str, classes: int) -> bool:
        peaks = phase_peaks(_with(inputs, num_classes=classes), resume_world=resume_world, base_bytes=base_bytes)
        return peaks[phase] <= budget_bytes

    return {phase: _largest(lambda classes, p=phase: fits(p, classes), max(inputs.world_size, resume_world or 1))
            for phase in RUN_PHASES}


def _largest(fits, low: int) -> int:
    """Largest n >= low with fits(n) (fits monotone decreasing in n); 0 when fits(low) fails."""
    if not fits(low):
        return 0
    high = low * 2
    while fits(high):
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def _with(inputs: PlanInputs, **changes) -> PlanInputs:
    fields = {name: getattr(inputs, name) for name in inputs.__dataclass_fields__}
    return PlanInputs(**{**fields, **changes})
