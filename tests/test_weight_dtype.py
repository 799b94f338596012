"""head.weight_dtype='bf16': W, its optimizer rows and the bank's centers stored in bfloat16, computed in float32.

Tolerances come from the two precisions involved. bfloat16 keeps 8 significant bits: rounding to nearest moves a
value by at most u = 2^-8 of itself, and stochastic rounding picks one of the two neighbours, less than one
spacing 2^-7 |x| away. float32 keeps 24: u32 = 2^-24, and a dot product of n terms is off by at most about
n u32 of the sum of its terms' magnitudes (Higham's gamma_n). Every reference is float64 on the same stored
values (a bfloat16 value is exact in float64), so what the tests see is the head's own float32 arithmetic and
the one rounding of what goes back to bfloat16 storage.
"""
import os

import pytest
import torch

from largefr.checkpoint.files import CheckpointError
from largefr.checkpoint.reshard import check_destinations
from largefr.config import HeadConfig
from largefr.distributed.partition import ClassPartition
from largefr.heads import RowSparseAdamW, RowSparseSGD, ShardedMarginHead
from largefr.heads.cluster import ClusterBank, rounding_phi_floor
from largefr.heads.precision import round_to_storage, rounding_keys
from largefr.heads.row_gradient import sparse_row_gradient
from largefr.perf.memory_plan import PlanInputs, plan_memory
from tests.checkpoint_helpers import TrainerStandIn, build_parts, by_class, snapshot, train_and_save
from tests.distributed_helpers import run_distributed
from tests.test_sharded_head import CLASSES, DIM, LOCAL_BATCH, MARGINS, SEED, case_data, dense_reference

BF16_U = 2.0 ** -8
"""bfloat16's unit roundoff: round to nearest moves x by at most BF16_U * |x|."""
FP32_U = 2.0 ** -24
HEAD_CASES = [(1.0, 0), (0.3, 0), (0.3, 64)]
"""(sample rate, head.chunk_size): every row upcast, a gathered sample, the low-memory head's blocks."""


def _bf16_head_case(rank: int, world: int) -> list[dict]:
    results = []
    for index, (rate, chunk_size) in enumerate(HEAD_CASES):
        labels, embeddings, _ = case_data(world, 700 + 10 * world + index)
        head = ShardedMarginHead(CLASSES, DIM, margin=MARGINS["arcface"], sample_rate=rate, dtype=torch.bfloat16,
                                 chunk_size=chunk_size, generator=torch.Generator().manual_seed(SEED))
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        local = embeddings[rows].float().requires_grad_(True)
        loss = head(local, labels[rows])
        loss.backward()
        grad = head.weight.grad
        results.append(dict(loss=loss.detach(), embedding_grad=local.grad, weight=head.weight.detach().clone(),
                            grad_dtype=grad.dtype, grad_sparse=grad.is_sparse, weight_grad=grad.to_dense(),
                            sampled=head.last_sampled + head.partition.start))
    return results


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_bf16_head_loss_and_sampled_row_gradients_match_a_float64_reference(world):
    """1001 classes over 1-4 gloo ranks (uneven shards), ArcFace with the theta + m > pi fallback rows.

    loss: float32 on exact inputs; the logits s*cos come from d-term dot products, each off by at most
    (d + 4) u32 (the +4: the norms and the scale), and the cross entropy moves by at most twice the largest logit
    error: |dloss| <= 2 s (d + 4) u32. W's gradient is rounded once into bfloat16 (W's dtype): BF16_U of itself,
    beside float32's (B_g + d + 4) u32 of the largest entry. The embeddings' gradient stays float32.
    """
    per_rank = run_distributed(_bf16_head_case, world)
    scale = MARGINS["arcface"].scale
    for index, (rate, chunk_size) in enumerate(HEAD_CASES):
        labels, embeddings, _ = case_data(world, 700 + 10 * world + index)
        results = [rank_result[index] for rank_result in per_rank]
        weight = torch.cat([r["weight"] for r in results])
        assert weight.dtype == torch.bfloat16
        sampled = torch.cat([r["sampled"] for r in results])
        loss, embedding_grad, weight_grad = dense_reference("arcface", labels, embeddings.float().double(),
                                                            weight.double(), sampled, None)
        fp32_slack = (labels.numel() + DIM + 4) * FP32_U
        for rank, result in enumerate(results):
            case = (world, rank, rate, chunk_size)
            assert abs(result["loss"].item() - loss.item()) <= 2 * scale * (DIM + 4) * FP32_U, case
            assert result["grad_dtype"] == torch.bfloat16 and result["grad_sparse"] == (rate < 1.0), case
            part = ClassPartition(CLASSES, world, rank)
            expected = weight_grad[part.start:part.end]
            error = (result["weight_grad"].double() - expected).abs()
            assert bool((error <= BF16_U * expected.abs() + fp32_slack * expected.abs().max()).all()), case
            rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
            expected = embedding_grad[rows]
            assert (result["embedding_grad"].double() - expected).abs().max() <= fp32_slack * expected.abs().max(), case


# ---------------------------------------------------------------------------------------------- optimizer rows

ROWS, WIDTH = 64, 32
SELECTED = {"scattered": torch.tensor([0, 3, 4, 5, 17, 40, 63]), "consecutive": torch.arange(10, 30)}
OPTIMIZERS = {
    "sgd": (lambda p: RowSparseSGD([p], lr=0.1, momentum=0.9, weight_decay=5e-4),
            lambda p: torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=5e-4)),
    "sgd_nesterov": (lambda p: RowSparseSGD([p], lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True),
                     lambda p: torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)),
    "adamw": (lambda p: RowSparseAdamW([p], lr=0.01, weight_decay=0.05),
              lambda p: torch.optim.AdamW([p], lr=0.01, weight_decay=0.05)),
}
STATE_KEYS = {"sgd": ("momentum_buffer",), "sgd_nesterov": ("momentum_buffer",), "adamw": ("exp_avg", "exp_avg_sq")}


def _spacing(reference: torch.Tensor) -> torch.Tensor:
    """bfloat16's spacing at each value: |x| in [2^(e-1), 2^e) has spacing 2^(e-8)."""
    _, exponent = torch.frexp(reference)
    return torch.ldexp(torch.ones_like(reference), exponent - 8)


def _assert_neighbour(stored: torch.Tensor, reference: torch.Tensor, where: str) -> None:
    """stored (bfloat16) is one of the two bfloat16 neighbours of the float32 reference: less than one spacing away
    (plus a few u32 for the order of torch.optim's float32 operations)."""
    error = (stored.double() - reference.double()).abs()
    bound = _spacing(reference.double()) + 8 * FP32_U * reference.double().abs()
    assert bool((error <= bound).all()), (where, float((error - bound).max()))


@pytest.mark.parametrize("rows_kind", list(SELECTED))
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_row_sparse_optimizers_on_bf16_rows_follow_torch_optim_in_float32(name, rows_kind):
    """Three steps on the same rows: after each, every stored value of W and of the state is a bfloat16 neighbour
    of torch.optim's float32 step taken from the stored values (so each step's error is the one rounding);
    the rows not stepped keep their bits."""
    rows = SELECTED[rows_kind]
    make_sparse, make_reference = OPTIMIZERS[name]
    data = torch.Generator().manual_seed(5)
    weight = torch.nn.Parameter((torch.randn(ROWS, WIDTH, generator=data) * 0.05).bfloat16())
    optimizer = make_sparse(weight)
    untouched = torch.ones(ROWS, dtype=torch.bool).index_fill_(0, rows, False)
    before = weight.detach()[untouched].clone()
    reference = torch.nn.Parameter(weight.detach()[rows].float())
    reference_optimizer = make_reference(reference)
    for step in range(3):
        reference.data.copy_(weight.detach()[rows].float())  # each step from the stored values and state
        for key in STATE_KEYS[name] if step else ():
            reference_optimizer.state[reference][key].copy_(optimizer.state[weight][key][rows].float())
        gradient = (torch.randn(len(rows), WIDTH, generator=data) * 0.01).bfloat16()
        weight.grad = sparse_row_gradient(rows, gradient.clone(), weight.shape)
        reference.grad = gradient.float()
        optimizer.step()
        reference_optimizer.step()
        _assert_neighbour(weight.detach()[rows], reference.detach(), f"{name} step {step} W")
        for key in STATE_KEYS[name]:
            stored = optimizer.state[weight][key]
            assert stored.dtype == torch.bfloat16
            _assert_neighbour(stored[rows], reference_optimizer.state[reference][key], f"{name} step {step} {key}")
        assert optimizer.state[weight]["step"].dtype == torch.long
    assert torch.equal(weight.detach()[untouched], before)  # bit for bit
    steps = optimizer.state[weight]["step"]
    assert int(steps[rows].min()) == 3 and int(steps.sum()) == 3 * len(rows)


@pytest.mark.parametrize("name,lr,weight_decay", [("sgd", 0.1, 5e-4), ("adamw", 0.1, 0.01)])
def test_weight_decay_below_bf16_spacing_is_kept_on_average(name, lr, weight_decay):
    """Weight decay alone (zero gradients) for 300 steps: each step shrinks W by lr * weight_decay (5e-5 and 1e-3 of
    itself), below bfloat16's half spacing of at least 2^-9 = 1.95e-3 of it, so rounding to nearest never moves W.
    Stochastic rounding keeps the mean on the float32 trajectory: each write adds a zero-mean error of at most one
    spacing 2^-7 |w|, so after n steps one value is off by about sqrt(n) 2^-8 |w| (standard deviation), and the mean
    of the ratio over N values by sqrt(n / N) 2^-8; the test allows five of those."""
    steps, rows = 300, torch.arange(ROWS)
    start = (torch.rand(ROWS, WIDTH, generator=torch.Generator().manual_seed(2)) + 0.5).bfloat16()
    weight = torch.nn.Parameter(start.clone())
    reference = torch.nn.Parameter(start.float())
    if name == "sgd":
        optimizer = RowSparseSGD([weight], lr=lr, momentum=0.9, weight_decay=weight_decay)
        reference_optimizer = torch.optim.SGD([reference], lr=lr, momentum=0.9, weight_decay=weight_decay)
    else:
        optimizer = RowSparseAdamW([weight], lr=lr, weight_decay=weight_decay)
        reference_optimizer = torch.optim.AdamW([reference], lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        weight.grad = torch.zeros_like(weight)
        reference.grad = torch.zeros_like(reference)
        optimizer.step(rows=rows)
        reference_optimizer.step()
    assert float(reference.detach().mean() / start.float().mean()) < 0.99  # the decay is there to be kept
    ratio = (weight.detach().double() / reference.detach().double()).mean()
    assert abs(float(ratio) - 1) < 5 * (steps / weight.numel()) ** 0.5 * BF16_U, float(ratio)
    nearest = start.clone()
    for _ in range(steps):  # what rounding to nearest would have stored: W never moves
        nearest = (nearest.float() * (1 - lr * weight_decay)).bfloat16()
    assert torch.equal(nearest, start)


def test_a_resumed_bf16_optimizer_rounds_as_an_uninterrupted_one():
    """The rounding's random bits come from (row, its step count, tensor, column), not from a generator: two steps,
    the rows and state copied out and into a new optimizer (what a checkpoint does), two more steps give the bits
    of four steps in one go."""
    data = torch.Generator().manual_seed(8)
    start = (torch.randn(ROWS, WIDTH, generator=data) * 0.05).bfloat16()
    gradients = [(torch.randn(ROWS, WIDTH, generator=data) * 0.01).bfloat16() for _ in range(4)]
    rows = SELECTED["scattered"]

    def steps(weight, optimizer, grads):
        for gradient in grads:
            weight.grad = sparse_row_gradient(rows, gradient[rows].clone(), weight.shape)
            optimizer.step()

    whole = torch.nn.Parameter(start.clone())
    whole_optimizer = RowSparseAdamW([whole], lr=0.01, weight_decay=0.05)
    steps(whole, whole_optimizer, gradients)
    first = torch.nn.Parameter(start.clone())
    first_optimizer = RowSparseAdamW([first], lr=0.01, weight_decay=0.05)
    steps(first, first_optimizer, gradients[:2])
    resumed = torch.nn.Parameter(first.detach().clone())
    resumed_optimizer = RowSparseAdamW([resumed], lr=0.01, weight_decay=0.05)
    resumed_optimizer.state[resumed] = {key: value.clone() for key, value in first_optimizer.state[first].items()}
    steps(resumed, resumed_optimizer, gradients[2:])
    assert torch.equal(resumed.detach(), whole.detach())
    for key, value in whole_optimizer.state[whole].items():
        assert torch.equal(resumed_optimizer.state[resumed][key], value), key


def test_stochastic_rounding_is_unbiased_deterministic_and_exact_on_bf16_values():
    values = torch.randn(512, 64, generator=torch.Generator().manual_seed(4)) * 0.01
    storage = torch.empty(0, dtype=torch.bfloat16)
    rows = torch.arange(512)
    draws = torch.stack([round_to_storage(values, storage, rounding_keys(rows, torch.full_like(rows, step), 1)).float()
                         for step in range(64)])
    assert torch.equal(draws[0], round_to_storage(values, storage, rounding_keys(rows, torch.zeros_like(rows), 1))
                       .float())  # the same keys give the same bits: a resumed run rounds as an uninterrupted one
    nearest = values.bfloat16().float()
    spacing = _spacing(values)
    assert bool(((draws - values).abs() < spacing).all())  # one of the two neighbours
    # mean of 64 draws: within 5 standard deviations (spacing / 2 / sqrt(64) at most) of the value, on average
    assert float(((draws.mean(0) - values).abs() / spacing).mean()) < 0.1
    assert float(((nearest - values).abs() / spacing).mean()) > 0.2  # rounding to nearest is off by 1/4 on average
    exact = values.bfloat16().float()
    assert torch.equal(round_to_storage(exact, storage, rounding_keys(rows, torch.zeros_like(rows), 3)).float(), exact)


# ---------------------------------------------------------------------------------------------- bank, checkpoint

def test_bank_stores_centers_in_bf16_and_computes_in_float32():
    bank = ClusterBank(10, 8, centers_dtype=torch.bfloat16)
    assert bank.centers.dtype == torch.bfloat16 and bank.phi.dtype == torch.float32
    features = torch.nn.functional.normalize(torch.randn(12, 8, generator=torch.Generator().manual_seed(1)), dim=1)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 9, -1])
    reference = ClusterBank(10, 8, dtype=torch.float64)
    bank.update_from_features(features, labels)
    reference.update_from_features(features.double(), labels)
    # one rounding of a unit vector into bfloat16: at most BF16_U of each coordinate
    error = (bank.centers.double() - reference.centers).abs()
    assert bool((error <= BF16_U * reference.centers.abs()).all())
    # phi from float32 arithmetic on the float32 features (not the rounded centers: the centers are float32 until
    # stored), so phi is float32-exact
    torch.testing.assert_close(bank.phi.double(), reference.phi, rtol=1e-5, atol=1e-6)


def test_a_bf16_bank_gives_no_phi_to_a_class_seen_through_one_feature():
    """The rounding of a stored center must not pass for a concentration: a class whose queue holds the one feature
    its center came from, updated 60 times, stays without a phi (a phi of ~1e-3 would be a temperature of ~1e-3
    in L_con: the quickstart's loss_con went to 638 at step 10 before this floor); classes with two different
    features get theirs. The floor is 0 for float32 centers (the float32 threshold, unchanged)."""
    bank = ClusterBank(500, 128, centers_dtype=torch.bfloat16, momentum=0.9)
    features = torch.nn.functional.normalize(torch.randn(500, 128, generator=torch.Generator().manual_seed(6)), dim=1)
    for _ in range(60):
        bank.update_from_features(features, torch.arange(500))
        assert not bool(bank.has_phi.any()), float(bank.phi.max())
    assert float(bank.phi.max()) > 0  # the rounding's trace is there, below the floor
    pairs = torch.cat([features[:10], features[10:20]])
    bank.update_from_features(pairs, torch.cat([torch.arange(10), torch.arange(10)]))
    assert bool(bank.has_phi[:10].all())
    assert rounding_phi_floor(torch.float32, torch.float32, momentum=0.9, alpha=10.0) == 0.0
    assert ClusterBank(10, 8).degenerate_phi == torch.finfo(torch.float32).eps ** 0.5


HEAD_BF16 = {"head_type": "curricularface", "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9,
                                                      "weight_decay": 5e-4}, "head": {"weight_dtype": "bf16"}}


def _save_bf16(rank: int, world: int, root: str) -> dict:
    parts, checkpointer = build_parts(world, 3, root, **HEAD_BF16)
    train_and_save(parts, checkpointer, rank)
    return snapshot(parts)


def _restore_bf16(rank: int, world: int, root: str) -> dict:
    parts, checkpointer = build_parts(world, 11, root, **HEAD_BF16)  # another seed: W starts different
    before = parts.head.margin_head.weight.detach().clone()
    checkpointer.restore(TrainerStandIn(), os.path.join(root, "checkpoints", "step_2"))
    fp32_parts, fp32_checkpointer = build_parts(world, 11, root, **{**HEAD_BF16, "head": {"weight_dtype": "fp32"}})
    try:
        fp32_checkpointer.restore(TrainerStandIn(), os.path.join(root, "checkpoints", "step_2"))
        refusal = None
    except CheckpointError as error:
        refusal = str(error)
    return {**snapshot(parts), "refusal": refusal, "before": {"start": parts.head.partition.start,
                                                               "rows": {"weight": before}}}


def test_bf16_checkpoint_restores_bit_for_bit_on_another_world_size_and_refuses_fp32(tmp_path):
    """Saved by 3 ranks (37 classes: 13/12/12), restored by 2 (19/18): every row (W, momentum, per-row step, bank)
    by class id, bit for bit and still bfloat16; a build with head.weight_dtype=fp32 is refused naming the key."""
    root = str(tmp_path)
    saved = run_distributed(_save_bf16, 3, root)
    restored = run_distributed(_restore_bf16, 2, root)
    assert not torch.equal(by_class([r["before"] for r in restored], "weight"), by_class(saved, "weight"))
    for name in ("weight", "optim.momentum_buffer", "optim.step", "bank.centers", "bank.phi", "bank.seen"):
        expected = by_class(saved, name)
        assert torch.equal(by_class(restored, name), expected), name
        assert by_class(restored, name).dtype == expected.dtype, name
    assert by_class(saved, "weight").dtype == torch.bfloat16 == by_class(saved, "bank.centers").dtype
    assert by_class(saved, "optim.momentum_buffer").dtype == torch.bfloat16
    assert by_class(saved, "optim.step").sum() > 0
    for rank_state in restored:
        assert rank_state["refusal"] is not None
        assert "head.weight_dtype='bf16', this run has 'fp32'" in rank_state["refusal"], rank_state["refusal"]


def test_rows_of_another_dtype_are_refused_when_the_config_does_not_say():
    """A checkpoint whose config lacks head.weight_dtype (written before it existed: float32 rows) restored into
    bfloat16 rows: the row check names the rows and both dtypes instead of reading float32 bytes as bfloat16."""
    partition = ClassPartition(37, 2, 1)
    manifest = {"rows": {"weight": {"shape": [8], "dtype": "float32"}}}
    live = {"weight": torch.empty(partition.num_local, 8, dtype=torch.bfloat16)}
    with pytest.raises(CheckpointError, match=r"head rows 'weight' are float32 of shape \[18, 8\].*this run has "
                                              r"torch.bfloat16"):
        check_destinations("ckpt/step_2", manifest, partition, live)


# ---------------------------------------------------------------------------------------------- planner

@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_planner_counts_bf16_storage_of_w_its_optimizer_state_and_the_bank(optimizer):
    inputs = dict(num_classes=1_000_003, world_size=4, dim=256, batch=64, sample_rate=0.1, optimizer=optimizer)
    fp32, bf16 = plan_memory(PlanInputs(**inputs)), plan_memory(PlanInputs(**inputs, weight_dtype="bf16"))
    rows, d = fp32.num_local, 256
    copies = {"sgd": 1, "adamw": 2}[optimizer]
    saved = {"W rows": rows * d * 2, "optimizer state": copies * rows * d * 2, "bank centers": rows * d * 2}
    for name, size in saved.items():
        assert fp32.resident[name] - bf16.resident[name] == size, name
    assert fp32.resident_bytes - bf16.resident_bytes == sum(saved.values())
    assert bf16.resident["bank phi + flags"] == fp32.resident["bank phi + flags"]  # phi stays float32
    with pytest.raises(ValueError, match="weight_dtype='fp16' must be one of"):
        PlanInputs(**inputs, weight_dtype="fp16")
