"""Sharded cluster bank, concentration phi and lambda(phi) against a dense float64 reference."""
import math

import pytest
import torch

from largefr.distributed.partition import ClassPartition
import largefr.heads.cluster as cluster_module
from largefr.heads.cluster import ClusterBank
from largefr.heads.queue import FeatureQueue
from tests.distributed_helpers import run_distributed

CLASSES, DIM, QUEUE, GLOBAL_ROWS, MC, ALPHA = 37, 5, 24, 12, 0.9, 10.0

# Labels per step (12 rows = one global batch). Class 3 enters twice at step 0 (first sight with
# two features), class 5 once (degenerate: its center is its only feature), class 30 enters at
# step 3; the queue (24 rows) forgets step 0 after step 2, so step-0-only classes keep their phi.
STEP_LABELS = [
    [3, 3, 5, 0, 0, 1, 12, 12, 12, 36, 20, 21],
    [0, 1, 1, 12, 22, 22, 23, 23, 36, 36, 2, 2],
    [1, 1, 2, 2, 22, 23, 24, 24, 25, 25, 0, 0],
    [30, 30, 30, 24, 25, 1, 1, 2, 0, 22, 23, 24],
]


def step_features(step):
    gen = torch.Generator().manual_seed(10 + step)
    return torch.nn.functional.normalize(torch.randn(GLOBAL_ROWS, DIM, generator=gen, dtype=torch.float64), dim=1)


def reference_bank():
    """Plain per-class loop over the queue contents after each step."""
    queue_f, queue_l, pointer = [torch.zeros(DIM, dtype=torch.float64)] * QUEUE, [-1] * QUEUE, 0
    centers, phi, snapshots = {}, {}, []
    for step, labels in enumerate(STEP_LABELS):
        for row, label in zip(step_features(step), labels):
            queue_f[pointer], queue_l[pointer] = row, label
            pointer = (pointer + 1) % QUEUE
        for k in sorted({l for l in queue_l if l >= 0}):
            members = [f for f, l in zip(queue_f, queue_l) if l == k]
            queue_center = torch.nn.functional.normalize(sum(members) / len(members), dim=0)
            if k in centers:
                centers[k] = torch.nn.functional.normalize(MC * centers[k] + (1 - MC) * queue_center, dim=0)
            else:
                centers[k] = queue_center
            distance_sum = sum(float((f - centers[k]).norm()) for f in members)
            phi[k] = distance_sum / (len(members) * math.log(len(members) + ALPHA))
        snapshots.append(({k: v.clone() for k, v in centers.items()}, dict(phi), set(queue_l) - {-1}))
    return snapshots, (torch.stack(queue_f), torch.tensor(queue_l), pointer)


def _bank_rank(rank, world):
    rows = GLOBAL_ROWS // world
    queue = FeatureQueue(QUEUE, DIM, dtype=torch.float64)
    bank = ClusterBank(CLASSES, DIM, momentum=MC, alpha=ALPHA, dtype=torch.float64)
    snapshots = []
    for step, labels in enumerate(STEP_LABELS):
        local = slice(rank * rows, (rank + 1) * rows)
        queue.enqueue(step_features(step)[local], torch.tensor(labels)[local])
        bank.update_from_queue(queue)
        snapshots.append({k: v.clone() for k, v in bank.state_dict().items() if k != "_extra_state"})
    return {"bank": snapshots, "queue": queue.state_dict(), "lambda": _lambda_cases(rank, world),
            "stats": _stats_case(rank, world)}


def phi_case(world, seed):
    """Global phi where each rank's shard has its own range; the last rank has no phi at all."""
    gen = torch.Generator().manual_seed(seed)
    phi = torch.empty(CLASSES, dtype=torch.float64)
    has_phi = torch.rand(CLASSES, generator=gen) < 0.6
    for rank in range(world):
        part = ClassPartition(CLASSES, world, rank)
        spread = torch.rand(part.num_local, generator=gen, dtype=torch.float64)
        phi[part.start:part.end] = 3.0 * rank + (rank + 1) * spread
        if world > 1 and rank == world - 1:
            has_phi[part.start:part.end] = False
    return phi, has_phi


def load_phi(bank, phi, has_phi):
    part = bank.partition
    bank.phi.copy_(phi[part.start:part.end])
    bank.has_phi.copy_(has_phi[part.start:part.end])
    bank.seen.copy_(has_phi[part.start:part.end])


def _lambda_cases(rank, world):
    bank = ClusterBank(CLASSES, DIM, dtype=torch.float64)
    out = {"none": bank.lambda_from_phi()}
    phi, has_phi = phi_case(world, seed=3)
    load_phi(bank, phi, has_phi)
    out["default"] = bank.lambda_from_phi()
    out["range"] = bank.lambda_from_phi(0.25, 1.5)
    rows = torch.arange(bank.partition.num_local - 1, -1, -2)  # some rows, in any order: what a step reads
    out["ramped_rows"] = (rows, bank.class_lambda(0.25, 1.5, ramp=0.3)[rows])
    load_phi(bank, torch.full_like(phi, 0.7), has_phi)
    out["flat"] = bank.lambda_from_phi(0.25, 1.5)
    return out


def _stats_case(rank, world):
    bank = ClusterBank(CLASSES, DIM, dtype=torch.float64)
    phi, has_phi = phi_case(world, seed=4)
    load_phi(bank, phi, has_phi)
    return bank.stats(lambda_range=(0.5, 1.0), bins=4)


def reference_lambda(phi, has_phi, lo, hi):
    values = phi[has_phi]
    if values.numel() == 0 or values.max() == values.min():
        return torch.ones_like(phi)
    scaled = lo + (hi - lo) * (phi - values.min()) / (values.max() - values.min())
    return torch.where(has_phi, scaled, torch.ones_like(phi))


@pytest.fixture(scope="module")
def reference():
    snapshots, final_queue = reference_bank()
    first_phi = snapshots[0][1]
    last_queue = snapshots[-1][2]
    # the scenario really covers: new classes, absent classes, a degenerate first sight
    assert 30 in snapshots[3][1] and 30 not in snapshots[2][1]
    assert 3 in first_phi and 3 not in last_queue and snapshots[-1][1][3] == first_phi[3]
    assert first_phi[5] < 1e-12 and first_phi[3] > 0.01
    return snapshots, final_queue


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_queue_bank_lambda_and_stats_match_dense_reference(world, reference):
    results = run_distributed(_bank_rank, world)
    reference, (queue_features, queue_labels, queue_pointer) = reference
    for rank, result in enumerate(results):
        # the queue is bit-identical on every rank and equal to a row-by-row ring buffer
        assert torch.equal(result["queue"]["features"], results[0]["queue"]["features"])
        assert torch.equal(result["queue"]["features"], queue_features)
        assert torch.equal(result["queue"]["labels"], queue_labels)
        assert int(result["queue"]["pointer"]) == queue_pointer
        part = ClassPartition(CLASSES, world, rank)
        for step, state in enumerate(result["bank"]):
            centers, phi, _ = reference[step]
            for k in range(part.start, part.end):
                row = k - part.start
                assert bool(state["seen"][row]) == (k in centers), (step, k)
                if k not in centers:
                    assert not state["has_phi"][row]
                    continue
                torch.testing.assert_close(state["centers"][row], centers[k], atol=1e-12, rtol=0)
                assert abs(state["phi"][row].item() - phi[k]) < 1e-12, (step, k)
                assert bool(state["has_phi"][row]) == (phi[k] > math.sqrt(torch.finfo(torch.float64).eps)), (step, k)
        check_lambda(result["lambda"], part, world)
        check_stats(result["stats"], world)


def check_lambda(lambdas, part, world):
    local = slice(part.start, part.end)
    torch.testing.assert_close(lambdas["none"], torch.ones(part.num_local, dtype=torch.float64))
    phi, has_phi = phi_case(world, seed=3)
    torch.testing.assert_close(lambdas["default"], reference_lambda(phi, has_phi, 0.0, 1.0)[local], atol=1e-12, rtol=0)
    torch.testing.assert_close(lambdas["range"], reference_lambda(phi, has_phi, 0.25, 1.5)[local], atol=1e-12, rtol=0)
    torch.testing.assert_close(lambdas["flat"], torch.ones(part.num_local, dtype=torch.float64))
    rows, ramped = lambdas["ramped_rows"]  # warm-up: 1 + ramp * (lambda - 1), at the rows asked for only
    expected = 1.0 + 0.3 * (reference_lambda(phi, has_phi, 0.25, 1.5)[local][rows] - 1.0)
    torch.testing.assert_close(ramped, expected, atol=1e-12, rtol=0)


def check_stats(stats, world):
    phi, has_phi = phi_case(world, seed=4)
    lam = reference_lambda(phi, has_phi, 0.5, 1.0)[has_phi]
    values = phi[has_phi]
    assert stats["phi_fraction"] == pytest.approx(has_phi.sum().item() / CLASSES, abs=1e-12)
    assert stats["phi_mean"] == pytest.approx(values.mean().item(), abs=1e-12)
    assert stats["phi_min"] == pytest.approx(values.min().item(), abs=1e-12)
    assert stats["phi_max"] == pytest.approx(values.max().item(), abs=1e-12)
    assert stats["lambda_mean"] == pytest.approx(lam.mean().item(), abs=1e-12)
    expected_hist = [int(((lam >= 0.5 + 0.125 * b) & ((lam < 0.5 + 0.125 * (b + 1)) | (b == 3))).sum())
                     for b in range(4)]
    assert stats["lambda_hist"] == expected_hist and sum(expected_hist) == int(has_phi.sum())


def test_stats_pass_over_every_class_goes_block_by_block(monkeypatch):
    """A logging step's statistics read every class, in blocks: nothing of a byte per class is allocated (the whole
    shard at once made several float32 temporaries per class, which the planner does not count), and the figures
    are those of one pass over all of them."""
    from torch.profiler import ProfilerActivity, profile

    classes = 100_000
    generator = torch.Generator().manual_seed(9)
    bank = ClusterBank(classes, 4)
    bank.seen.copy_(torch.rand(classes, generator=generator) < 0.7)
    bank.has_phi.copy_(bank.seen & (torch.rand(classes, generator=generator) < 0.8))
    bank.phi.copy_(torch.rand(classes, generator=generator))

    def stats_and_largest_allocation():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            stats = bank.stats(lambda_range=(0.5, 1.0), bins=4)
        sizes = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        return stats, max(sizes)

    monkeypatch.setattr(cluster_module, "STATS_BLOCK_ROWS", classes)
    whole, whole_largest = stats_and_largest_allocation()
    monkeypatch.setattr(cluster_module, "STATS_BLOCK_ROWS", 4096)
    blocks, blocks_largest = stats_and_largest_allocation()
    assert whole_largest >= 4 * classes > classes > blocks_largest  # the check can fail: one block does
    assert blocks["lambda_hist"] == whole["lambda_hist"] and sum(whole["lambda_hist"]) == int(bank.has_phi.sum())
    for key in ("phi_fraction", "seen_fraction", "phi_mean", "phi_min", "phi_max", "lambda_mean"):
        assert blocks[key] == pytest.approx(whole[key], rel=1e-5), key


def test_bank_state_dict_round_trip_and_range_check():
    bank = ClusterBank(CLASSES, DIM, dtype=torch.float64)
    bank.update_from_features(step_features(0), torch.tensor(STEP_LABELS[0]))
    restored = ClusterBank(CLASSES, DIM, dtype=torch.float64)
    restored.load_state_dict(bank.state_dict())
    for name, value in bank.state_dict().items():
        if name != "_extra_state":
            assert torch.equal(restored.state_dict()[name], value), name
    state = bank.state_dict()
    state["_extra_state"] = {**state["_extra_state"], "class_start": 10, "class_end": 19, "world_size": 4}
    with pytest.raises(ValueError, match=r"holds classes \[10, 19\) of 37 \(written by 4 ranks\).*re-split"):
        restored.load_state_dict(state)


def test_bank_rejects_wrong_feature_size_and_bad_settings():
    bank = ClusterBank(CLASSES, DIM)
    with pytest.raises(ValueError, match=r"features must be \(rows, 5\), got \(3, 4\)"):
        bank.update_from_features(torch.zeros(3, 4), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="momentum must be in"):
        ClusterBank(CLASSES, DIM, momentum=1.0)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        ClusterBank(CLASSES, DIM, alpha=0.0)


def _plain_extremes(bank: ClusterBank) -> tuple[float, float]:
    values = [float(v) for v, has in zip(bank.phi.tolist(), bank.has_phi.tolist()) if has]
    return (min(values), max(values)) if values else (math.inf, -math.inf)


def test_kept_phi_range_equals_a_pass_over_every_class_through_updates_undos_and_restores():
    """The rank's phi range kept from the written rows (no pass over every class per step) is the plain min and max
    after every update, including updates that move an extreme inward, and after writes from elsewhere."""
    generator = torch.Generator().manual_seed(5)
    bank = ClusterBank(60, 4, momentum=0.5)
    checks = kept = 0
    for step in range(200):
        count = int(torch.randint(1, 40, (1,), generator=generator))
        labels = torch.randint(0, 60, (count,), generator=generator)
        spread = 0.01 if step % 7 == 0 else 1.0  # now and then a tight class: a new minimum
        features = torch.nn.functional.normalize(torch.randn(count, 4, generator=generator) * spread + 1.0, dim=1)
        was_kept = bank._extremes.value is not None
        bank.update_from_features(features, labels)
        kept += was_kept and bank._extremes.value is not None
        if step % 50 == 25:  # writes from elsewhere: an undo, a restore
            bank.phi[3] = 123.0
            bank.has_phi[3] = True
        if step % 50 == 40:
            bank.load_state_dict(ClusterBank(60, 4, momentum=0.5).state_dict())
        phi_min, phi_max = bank.global_phi_range()
        assert (float(phi_min), float(phi_max)) == _plain_extremes(bank), step
        checks += 1
    assert checks == 200 and kept > 100, f"the range was kept from the rows in only {kept} of 200 updates"


def test_kept_seen_count_and_rows_equal_a_pass_over_every_class_through_updates_and_restores(monkeypatch):
    """L_con's sampling reads how many classes have a center, and while few which ones, without a pass over every
    class per step: what is kept from the rows each update writes equals a plain count and list after every update
    and after writes from elsewhere; the list ends once more classes than the limit are seen."""
    monkeypatch.setattr(cluster_module, "_LISTED_SEEN_MIN", 100)
    generator = torch.Generator().manual_seed(6)
    bank = ClusterBank(500, 4, momentum=0.5)
    assert bank.listed_seen_limit == 100
    kept = listed = unlisted = 0
    for step in range(120):
        labels = torch.randint(0, 500, (int(torch.randint(1, 30, (1,), generator=generator)),), generator=generator)
        features = torch.nn.functional.normalize(torch.randn(labels.numel(), 4, generator=generator), dim=1)
        was_kept = bank._seen.value is not None
        bank.update_from_features(features, labels)
        kept += was_kept and bank._seen.value is not None
        if step % 40 == 20:  # writes from elsewhere: a restore to an empty bank, a class marked by hand
            bank.load_state_dict(ClusterBank(500, 4, momentum=0.5).state_dict())
        if step % 40 == 30:
            bank.seen[int(torch.nonzero(~bank.seen)[0])] = True
        assert bank.seen_count() == int(bank.seen.sum()), step
        if bank.seen_count() <= 100:
            assert torch.equal(bank.seen_rows(), torch.nonzero(bank.seen).squeeze(1)), step
            listed += 1
        else:
            assert bank.seen_rows() is None, step
            unlisted += 1
    assert kept > 100, f"the count was kept from the rows in only {kept} of 120 updates"
    assert listed > 20 and unlisted > 20, (listed, unlisted)
