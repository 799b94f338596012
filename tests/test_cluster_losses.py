"""Center sampling across ranks, L_Clu-Con and L_Clu-Ali against a dense float64 reference."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from largefr.distributed.collectives import all_gather_with_grad
from largefr.distributed.partition import ClassPartition
from largefr.heads.cluster import ClusterBank
from largefr.heads.cluster_losses import (
    cluster_aligning_loss,
    cluster_contrastive_loss,
    SampledCenters,
    cluster_temperature,
    positive_columns,
    sample_centers,
    sampling_shares,
)
from tests.distributed_helpers import run_distributed

CLASSES, DIM, GLOBAL_ROWS, SAMPLES = 1001, 8, 12, 40
UNSEEN_LABEL = 7  # a batch class without a center: its row is ignored by L_con
LOG_TAU, TAU_LR = math.log(0.07), 0.1


def dense_problem():
    gen = torch.Generator().manual_seed(5)
    centers = F.normalize(torch.randn(CLASSES, DIM, generator=gen, dtype=torch.float64), dim=1)
    phi = 0.05 + torch.rand(CLASSES, generator=gen, dtype=torch.float64)
    seen = torch.rand(CLASSES, generator=gen) < 0.7
    has_phi = seen & (torch.rand(CLASSES, generator=gen) < 0.9)  # some seen classes are degenerate
    seen[UNSEEN_LABEL] = has_phi[UNSEEN_LABEL] = False
    labels = torch.multinomial(seen.double(), GLOBAL_ROWS - 1, replacement=True, generator=gen)
    labels = torch.cat([labels, torch.tensor([UNSEEN_LABEL])])
    labels[3] = labels[4]  # a repeated class
    embeddings = torch.randn(GLOBAL_ROWS, DIM, generator=gen, dtype=torch.float64) * 3
    weight = torch.randn(CLASSES, DIM, generator=gen, dtype=torch.float64) * 0.1
    return centers, phi, seen, has_phi, labels, embeddings, weight


def make_bank(part):
    centers, phi, seen, has_phi, *_ = dense_problem()
    bank = ClusterBank(CLASSES, DIM, dtype=torch.float64)
    local = slice(part.start, part.end)
    bank.centers.copy_(centers[local])
    bank.phi.copy_(phi[local])
    bank.seen.copy_(seen[local])
    bank.has_phi.copy_(has_phi[local])
    return bank


def sampled_record(sampled):
    return {"ids": sampled.class_ids, "centers": sampled.centers, "phi": sampled.phi,
            "has_phi": sampled.has_phi, "counts": sampled.counts, "local": sampled.local_indices}


def _losses_rank(rank, world):
    part = ClassPartition(CLASSES, world, rank)
    bank = make_bank(part)
    *_, labels, embeddings, weight = dense_problem()
    rows = GLOBAL_ROWS // world
    gen = torch.Generator().manual_seed(rank)
    out = {"few": sampled_record(sample_centers(bank, labels, 5, generator=gen)),
           "all": sampled_record(sample_centers(bank, labels, 10 * CLASSES, generator=gen))}
    sampled = sample_centers(bank, labels, SAMPLES, generator=gen)
    out["sampled"] = sampled_record(sampled)
    for mode in ("pcl", "raw"):
        local_embeddings = embeddings[rank * rows:(rank + 1) * rows].clone().requires_grad_(True)
        features = F.normalize(all_gather_with_grad(local_embeddings, None), dim=1)
        temperature = cluster_temperature(sampled.phi, sampled.has_phi, mode=mode, tau0=0.1,
                                          clip_percentiles=(10.0, 90.0))
        loss = cluster_contrastive_loss(features, labels, sampled, part, temperature=temperature)
        loss.backward()
        out[f"con_{mode}"] = (loss.detach(), local_embeddings.grad)
    local_weight = weight[part.start:part.end].clone().requires_grad_(True)
    log_tau = torch.nn.Parameter(torch.tensor(LOG_TAU, dtype=torch.float64))
    loss = cluster_aligning_loss(sampled, local_weight, log_tau)
    loss.backward()
    out["ali"] = (loss.detach(), local_weight.grad.to_dense(), log_tau.grad.clone())
    torch.optim.SGD([log_tau], lr=TAU_LR).step()
    out["log_tau_after_step"] = log_tau.detach()
    return out


def reference_temperature(phi, has_phi, mode):
    """Plain numpy: missing phi -> largest phi; pcl: clip to percentiles, scale to mean tau0."""
    phi, has_phi = phi.numpy(), has_phi.numpy()
    filled = np.where(has_phi, phi, phi[has_phi].max())
    if mode == "raw":
        return torch.from_numpy(filled)
    low, high = np.percentile(filled, [10.0, 90.0])
    clipped = np.clip(filled, low, high)
    return torch.from_numpy(0.1 * clipped / clipped.mean())


def reference_losses(ids):
    centers, phi, _, has_phi, labels, embeddings, weight = dense_problem()
    positions = {int(c): j for j, c in enumerate(ids)}
    target = torch.tensor([positions.get(int(y), -100) for y in labels])
    out = {}
    for mode in ("pcl", "raw"):
        dense_embeddings = embeddings.clone().requires_grad_(True)
        temperature = reference_temperature(phi[ids], has_phi[ids], mode)
        logits = (F.normalize(dense_embeddings, dim=1) @ centers[ids].t()) / temperature
        loss = F.cross_entropy(logits, target, ignore_index=-100)
        loss.backward()
        out[f"con_{mode}"] = (loss.detach(), dense_embeddings.grad)
    dense_weight = weight.clone().requires_grad_(True)
    log_tau = torch.tensor(LOG_TAU, dtype=torch.float64, requires_grad=True)
    logits = centers[ids] @ F.normalize(dense_weight[ids], dim=1).t() / torch.exp(log_tau)
    loss = F.cross_entropy(logits, torch.arange(len(ids)))
    loss.backward()
    out["ali"] = (loss.detach(), dense_weight.grad, log_tau.grad)
    return out


def check_sampling(records, world, requested):
    _, phi, seen, has_phi, labels, *_ = dense_problem()
    centers = dense_problem()[0]
    ids = records[0]["ids"]
    positives = {int(y) for y in labels if seen[y]}
    available = int(seen.sum())
    assert positives <= set(ids.tolist())
    assert len(set(ids.tolist())) == len(ids) and bool(seen[ids].all())
    assert len(ids) == max(len(positives), min(requested, available))
    for rank, record in enumerate(records):
        part = ClassPartition(CLASSES, world, rank)
        assert torch.equal(record["ids"], ids) and torch.equal(record["centers"], records[0]["centers"])
        assert torch.equal(record["local"] + part.start, ids[sum(record["counts"][:rank]):][:len(record["local"])])
    torch.testing.assert_close(records[0]["centers"], centers[ids], atol=0, rtol=0)
    torch.testing.assert_close(records[0]["phi"], phi[ids], atol=0, rtol=0)
    assert torch.equal(records[0]["has_phi"], has_phi[ids])


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sampling_and_cluster_losses_match_dense_reference(world):
    results = run_distributed(_losses_rank, world)
    for key, requested in (("few", 5), ("all", 10 * CLASSES), ("sampled", SAMPLES)):
        check_sampling([r[key] for r in results], world, requested)
    ids = results[0]["sampled"]["ids"]
    expected = reference_losses(ids)
    rows = GLOBAL_ROWS // world
    for rank, result in enumerate(results):
        part = ClassPartition(CLASSES, world, rank)
        for mode in ("pcl", "raw"):
            loss, grad = result[f"con_{mode}"]
            ref_loss, ref_grad = expected[f"con_{mode}"]
            assert abs(loss.item() - ref_loss.item()) < 1e-10, mode
            torch.testing.assert_close(grad, ref_grad[rank * rows:(rank + 1) * rows], atol=1e-10, rtol=0)
        loss, weight_grad, tau_grad = result["ali"]
        ref_loss, ref_weight_grad, ref_tau_grad = expected["ali"]
        assert abs(loss.item() - ref_loss.item()) < 1e-10
        torch.testing.assert_close(weight_grad, ref_weight_grad[part.start:part.end], atol=1e-10, rtol=0)
        assert abs(tau_grad.item() - ref_tau_grad.item()) < 1e-10
        # identical tau on every rank after a step, equal to the dense step
        assert torch.equal(result["log_tau_after_step"], results[0]["log_tau_after_step"])
        assert abs(result["log_tau_after_step"].item() - (LOG_TAU - TAU_LR * ref_tau_grad.item())) < 1e-12


def test_sampling_shares_rule():
    # positives always kept; budget split by negatives available, largest remainder, lower rank first
    assert sampling_shares([10, 10, 10], [1, 0, 2], 9) == [3, 2, 4]  # budget 6 over negatives 9:10:8
    assert sampling_shares([5, 100], [5, 0], 3) == [5, 0]  # more positives than M: all positives
    assert sampling_shares([3, 4], [1, 1], 100) == [3, 4]  # fewer available than M: all of them
    assert sampling_shares([0, 0], [0, 0], 8) == [0, 0]
    shares = sampling_shares([7, 1, 30, 2], [2, 1, 0, 0], 17)
    assert sum(shares) == 17 and all(s <= a for s, a in zip(shares, [7, 1, 30, 2])) and shares[1] == 1


def test_temperature_edge_cases():
    phi = torch.tensor([0.3, 0.0, 0.2], dtype=torch.float64)
    none = torch.zeros(3, dtype=torch.bool)
    assert torch.equal(cluster_temperature(phi, none, mode="pcl", tau0=0.1), torch.full_like(phi, 0.1))
    assert torch.equal(cluster_temperature(phi, none, mode="raw"), torch.ones_like(phi))
    some = torch.tensor([True, False, True])
    expected_raw = torch.tensor([0.3, 0.3, 0.2], dtype=torch.float64)  # missing phi -> the largest
    torch.testing.assert_close(cluster_temperature(phi, some, mode="raw"), expected_raw)
    pcl = cluster_temperature(phi, some, mode="pcl", tau0=0.1)
    assert abs(pcl.mean().item() - 0.1) < 1e-15 and bool((pcl > 0).all())
    with pytest.raises(ValueError, match="temperature mode must be one of"):
        cluster_temperature(phi, some, mode="paper")


@pytest.mark.parametrize("world", [1, 3, 4])
def test_positive_columns_match_a_plain_lookup_on_uneven_shards(world):
    """Each row's column among its rank's sampled classes (sorted), -1 for a class another rank holds, a class not
    sampled, or an ignored row (label -1); against a dictionary lookup, on every rank of an uneven split."""
    classes = 23
    generator = torch.Generator().manual_seed(world)
    labels = torch.cat([torch.randint(0, classes, (40,), generator=generator), torch.tensor([-1, 0, classes - 1])])
    for rank in range(world):
        part = ClassPartition(classes, world, rank)
        local = torch.sort(torch.randperm(part.num_local, generator=generator)[: part.num_local // 2]).values
        sampled = SampledCenters(local_indices=local, counts=[], offset=0, centers=torch.empty(0, 4),
                                 phi=torch.empty(0), has_phi=torch.empty(0, dtype=torch.bool), class_ids=torch.empty(0))
        column_of = {part.start + int(row): column for column, row in enumerate(local)}
        expected = [column_of.get(int(label), -1) for label in labels]
        assert positive_columns(labels, sampled, part).tolist() == expected, (world, rank)
