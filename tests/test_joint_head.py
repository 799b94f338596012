"""ClusterGuidedHead: full Eq. 8 loss against a dense float64 reference; cluster terms off == margin head."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from largefr.config import ClusterConfig, HeadConfig
from largefr.distributed.partition import ClassPartition
from largefr.heads.joint import ClusterGuidedHead
from largefr.heads.sharded_head import ShardedMarginHead
from largefr.stateful import RestoreContext
from tests.distributed_helpers import run_distributed

CLASSES, DIM, GLOBAL_ROWS, STEPS, SAMPLES = 37, 6, 12, 2, 12
SCALE, MARGIN, LAMBDA_RANGE, WEIGHTS, TAU0 = 64.0, 0.5, (0.2, 1.0), (1.0, 0.5), 0.1


def step_data(step):
    gen = torch.Generator().manual_seed(40 + step)
    labels = torch.randint(0, 14, (GLOBAL_ROWS,), generator=gen) * 2 + step  # repeats; step 1 adds odd classes
    embeddings = torch.randn(GLOBAL_ROWS, DIM, generator=gen, dtype=torch.float64)
    momentum = torch.randn(GLOBAL_ROWS, DIM, generator=gen, dtype=torch.float64)
    return labels, embeddings, momentum


def dense_weight():
    return torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(9), dtype=torch.float64)


def make_margin_head(sample_rate=1.0):
    return ShardedMarginHead(CLASSES, DIM, margin=HeadConfig(type="arcface", scale=SCALE, margin=MARGIN),
                             sample_rate=sample_rate, dtype=torch.float64, logits_dtype=torch.float64,
                             generator=torch.Generator().manual_seed(3))


def cluster_config(**changes):
    settings = dict(cg_margin=True, lambda_range=LAMBDA_RANGE, contrastive_weight=WEIGHTS[0],
                    aligning_weight=WEIGHTS[1], queue_size=64, num_sampled_centers=SAMPLES,
                    temperature_mode="pcl", pcl_tau0=TAU0, align_tau_init=0.07)
    return ClusterConfig(**{**settings, **changes})


def _joint_rank(rank, world):
    part = ClassPartition(CLASSES, world, rank)
    rows = slice(rank * GLOBAL_ROWS // world, (rank + 1) * GLOBAL_ROWS // world)
    head = ClusterGuidedHead(make_margin_head(), cluster_config(), seed=1)
    with torch.no_grad():
        head.margin_head.weight.copy_(dense_weight()[part.start:part.end])
    steps = []
    for step in range(STEPS):
        labels, embeddings, momentum = step_data(step)
        local = embeddings[rows].clone().requires_grad_(True)
        head.zero_grad()
        head_loss = head.training_loss(local, labels[rows], momentum[rows])
        loss, terms = head_loss.loss, head_loss.terms
        loss.backward()
        steps.append({"loss": loss.detach(), "terms": terms, "emb_grad": local.grad,
                      "weight_grad": head.margin_head.weight.grad.clone(), "tau_grad": head.log_tau.grad.clone(),
                      "ids": head.last_sampled_centers.class_ids, "touched": head_loss.rows})
    return {"steps": steps, "stats": head.stats(), "off": _terms_off_rank(rank, world)}


def _terms_off_rank(rank, world):
    """Margin head alone vs wrapped with every cluster term off (and with lambda fixed to 1)."""
    rows = slice(rank * GLOBAL_ROWS // world, (rank + 1) * GLOBAL_ROWS // world)
    alone = make_margin_head(sample_rate=0.5)
    wrapped = ClusterGuidedHead(make_margin_head(sample_rate=0.5),
                                cluster_config(cg_margin=False, contrastive_weight=0.0, aligning_weight=0.0))
    unit_config = cluster_config(lambda_range=(1.0, 1.0), contrastive_weight=0.0, aligning_weight=0.0)
    unit_lambda = ClusterGuidedHead(make_margin_head(sample_rate=0.5), unit_config)
    out = {"bitwise": [], "unit_lambda": []}
    for step in range(STEPS):
        labels, embeddings, momentum = step_data(step)
        results = []
        for head in (alone, wrapped, unit_lambda):
            local = embeddings[rows].clone().requires_grad_(True)
            head.zero_grad()
            loss = head(local, labels[rows]) if head is alone else head(local, labels[rows], momentum[rows])[0]
            loss.backward()
            weight = head.weight if head is alone else head.margin_head.weight
            results.append((loss.detach(), local.grad, weight.grad.to_dense()))
        out["bitwise"].append(all(torch.equal(a, b) for a, b in zip(results[0], results[1])))
        out["unit_lambda"].append(max(float((a - b).abs().max()) for a, b in zip(results[0], results[2])))
    out["no_queue"] = wrapped.queue is None and wrapped.log_tau is None
    return out


def reference_bank_update(centers, phi, queue_f, queue_l, mc=0.9, alpha=10.0):
    for k in sorted(set(queue_l)):
        members = [f for f, l in zip(queue_f, queue_l) if l == k]
        queue_center = F.normalize(sum(members) / len(members), dim=0)
        centers[k] = queue_center if k not in centers else F.normalize(mc * centers[k] + (1 - mc) * queue_center, dim=0)
        phi[k] = sum(float((f - centers[k]).norm()) for f in members) / (len(members) * math.log(len(members) + alpha))


def reference_pcl_contrastive(f, labels, ids_list, sampled_centers, valid):
    """Dense L_con (Eq. 6) with the 'pcl' temperature of the sampled classes."""
    filled = np.array([valid.get(k, max(valid.values())) for k in ids_list])
    low, high = np.percentile(filled, [10, 90])
    temperature = torch.from_numpy(TAU0 * np.clip(filled, low, high) / np.clip(filled, low, high).mean())
    positive = torch.tensor([ids_list.index(int(y)) for y in labels])
    return F.cross_entropy(f @ sampled_centers.t() / temperature, positive)


def reference_step(step, centers, phi, ids, contrastive=reference_pcl_contrastive):
    """Dense Eq. 8 on the full batch and the full W, with the sampled ids of the sharded run.

    contrastive(f, labels, ids, sampled centers, {class: valid phi}) is the l1 term (L_con by default).
    """
    labels, embeddings, _ = step_data(step)
    valid = {k: v for k, v in phi.items() if v > math.sqrt(torch.finfo(torch.float64).eps)}
    lo, hi = LAMBDA_RANGE
    lam = torch.ones(CLASSES, dtype=torch.float64)
    if valid and max(valid.values()) > min(valid.values()):
        for k, v in valid.items():
            lam[k] = lo + (hi - lo) * (v - min(valid.values())) / (max(valid.values()) - min(valid.values()))
    emb = embeddings.clone().requires_grad_(True)
    weight = dense_weight().requires_grad_(True)
    log_tau = torch.tensor(math.log(0.07), dtype=torch.float64, requires_grad=True)
    f, w = F.normalize(emb, dim=1), F.normalize(weight, dim=1)
    cos = f @ w.t()
    theta = torch.acos(cos[torch.arange(GLOBAL_ROWS), labels])
    assert bool((theta + MARGIN < math.pi).all())  # the reference has no theta + m > pi fallback
    onehot = F.one_hot(labels, CLASSES).bool()
    logits = torch.where(onehot, (SCALE * torch.cos(theta + lam[labels] * MARGIN)).unsqueeze(1), SCALE * cos)
    loss_cg = F.cross_entropy(logits, labels)
    ids_list = ids.tolist()
    sampled_centers = torch.stack([centers[k] for k in ids_list])
    loss_con = contrastive(f, labels, ids_list, sampled_centers, valid)
    loss_ali = F.cross_entropy(sampled_centers @ w[ids].t() / torch.exp(log_tau), torch.arange(len(ids_list)))
    total = loss_cg + WEIGHTS[0] * loss_con + WEIGHTS[1] * loss_ali
    total.backward()
    return {"loss": total.detach(), "loss_cg": loss_cg.detach(), "loss_con": loss_con.detach(),
            "loss_ali": loss_ali.detach(), "emb_grad": emb.grad, "weight_grad": weight.grad, "tau_grad": log_tau.grad}


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_joint_head_matches_dense_reference_and_terms_off_is_margin_head(world):
    results = run_distributed(_joint_rank, world)
    centers, phi, queue_f, queue_l = {}, {}, [], []
    for step in range(STEPS):
        labels, _, momentum = step_data(step)
        queue_f += list(F.normalize(momentum, dim=1))
        queue_l += labels.tolist()
        reference_bank_update(centers, phi, queue_f, queue_l)
        ids = results[0]["steps"][step]["ids"]
        assert set(labels.tolist()) <= set(ids.tolist()) and len(ids) == min(SAMPLES, len(centers))
        expected = reference_step(step, centers, phi, ids)
        rows = GLOBAL_ROWS // world
        for rank, result in enumerate(results):
            part = ClassPartition(CLASSES, world, rank)
            got = result["steps"][step]
            assert torch.equal(got["ids"], ids)
            assert abs(got["loss"].item() - expected["loss"].item()) < 1e-10
            for name in ("loss_cg", "loss_con", "loss_ali"):
                assert abs(got["terms"][name].item() - expected[name].item()) < 1e-10, name
            torch.testing.assert_close(got["emb_grad"], expected["emb_grad"][rank * rows:(rank + 1) * rows],
                                       atol=1e-10, rtol=0)
            torch.testing.assert_close(got["weight_grad"], expected["weight_grad"][part.start:part.end],
                                       atol=1e-10, rtol=0)
            assert abs(got["tau_grad"].item() - expected["tau_grad"].item()) < 1e-10
            assert torch.equal(got["touched"], torch.arange(part.num_local))  # sample_rate 1: every row
    for result in results:
        stats = result["stats"]
        assert stats["phi_fraction"] == pytest.approx(sum(v > 1e-8 for v in phi.values()) / CLASSES)
        assert stats["loss_con"] == pytest.approx(expected["loss_con"].item(), abs=1e-10)
        assert stats["align_tau"] == pytest.approx(0.07) and stats["queue_fill"] == pytest.approx(24 / 64)
        assert result["off"]["bitwise"] == [True] * STEPS and result["off"]["no_queue"]
        assert max(result["off"]["unit_lambda"]) < 1e-12


def test_joint_head_needs_momentum_features_and_valid_config():
    head = ClusterGuidedHead(make_margin_head(), cluster_config())
    labels, embeddings, _ = step_data(0)
    with pytest.raises(ValueError, match="needs the momentum encoder's features"):
        head(embeddings, labels)
    with pytest.raises(ValueError, match=r"(?s)temperature_mode: must be one of 'pcl', 'raw', 'learnable', got 'paper'.*"
                                         r"queue_size: must be >= 1, got 0"):
        cluster_config(temperature_mode="paper", queue_size=0)


def test_joint_head_state_dict_round_trip():
    head = ClusterGuidedHead(make_margin_head(), cluster_config(), seed=4)
    labels, embeddings, momentum = step_data(0)
    head(embeddings, labels, momentum)
    restored = ClusterGuidedHead(make_margin_head(), cluster_config(), seed=5)
    restored.load_state_dict(head.state_dict())  # W, bank rows, queue (a checkpoint streams the rows into them)
    restored.restore_checkpoint_state(head.checkpoint_state(), RestoreContext(step=1))  # and the samplers
    assert torch.equal(restored.queue.features, head.queue.features)
    assert torch.equal(restored.bank.phi, head.bank.phi)
    draws = [torch.rand(3, generator=h.sample_generator) for h in (restored, head)]
    assert torch.equal(draws[0], draws[1])


# ---- issue 4's last "done when": a short CPU training run on 2 gloo ranks ------------------------
RUN_CLASSES, RUN_BATCH, RUN_STEPS, RUN_QUEUE, RUN_DIM = 200, 16, 40, 256, 32


def tiny_backbone(dim):
    torch.manual_seed(0)  # identical initial backbone on every rank
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, stride=2, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(32 * 4 * 4, dim))


def synthetic_batch(rank, step):
    """Learnable identities: a fixed random 3x16x16 pattern per class plus per-image noise."""
    prototypes = torch.randn(RUN_CLASSES, 3, 16, 16, generator=torch.Generator().manual_seed(123))
    gen = torch.Generator().manual_seed(1000 * step + rank)
    labels = torch.randint(0, RUN_CLASSES, (RUN_BATCH,), generator=gen)
    return prototypes[labels] + 0.5 * torch.randn(RUN_BATCH, 3, 16, 16, generator=gen), labels


def _training_rank(rank, world):
    from largefr.distributed.collectives import all_reduce_sum_
    from largefr.heads.momentum import MomentumEncoder

    backbone = tiny_backbone(RUN_DIM)
    encoder = MomentumEncoder(backbone, momentum=0.99)
    margin_head = ShardedMarginHead(RUN_CLASSES, RUN_DIM, margin=HeadConfig(),
                                    generator=torch.Generator().manual_seed(0))
    head = ClusterGuidedHead(margin_head, ClusterConfig(queue_size=RUN_QUEUE, num_sampled_centers=64), seed=0)
    optimizer = torch.optim.SGD([*backbone.parameters(), *head.parameters()], lr=0.05, momentum=0.9)
    history = []
    for step in range(RUN_STEPS):
        images, labels = synthetic_batch(rank, step)
        momentum_features = encoder(images)
        loss, terms = head(backbone(images), labels, momentum_features)
        optimizer.zero_grad()
        loss.backward()
        for param in backbone.parameters():  # each rank holds its rows' share of the global loss: sum
            all_reduce_sum_(param.grad, None)
        optimizer.step()
        encoder.update(backbone)
        stats = head.stats()
        history.append({k: stats[k] for k in ("loss_cg", "loss_con", "loss_ali", "phi_fraction", "seen_fraction",
                                              "queue_fill", "lambda_mean", "align_tau")})
    return history


def run_training(world=2):
    return run_distributed(_training_rank, world)


@pytest.mark.slow
def test_short_cpu_training_run_has_finite_terms_and_growing_phi():
    histories = run_training()
    history = histories[0]
    np.testing.assert_equal(histories[1], history)  # logged statistics are global: same on both ranks (nan too)
    for row in history:
        assert all(math.isfinite(row[k]) for k in ("loss_cg", "loss_con", "loss_ali")), row
    fractions = [row["phi_fraction"] for row in history]
    assert all(b >= a for a, b in zip(fractions, fractions[1:])) and fractions[-1] > 2 * fractions[0]
    assert history[-1]["loss_cg"] < history[0]["loss_cg"]


if __name__ == "__main__":  # python -m tests.test_joint_head: print the run's numbers
    print("step  loss_cg  loss_con  loss_ali  phi_frac  seen_frac  queue_fill  lambda_mean  tau")
    for index, row in enumerate(run_training()[0]):
        print(f"{index + 1:4d}  {row['loss_cg']:7.3f}  {row['loss_con']:8.3f}  {row['loss_ali']:8.3f}  "
              f"{row['phi_fraction']:8.3f}  {row['seen_fraction']:9.3f}  {row['queue_fill']:10.3f}  "
              f"{row['lambda_mean']:11.3f}  {row['align_tau']:.4f}")


# ---- cluster.warmup_steps: the ramp is the scaled setting it claims to be --------------------------
WARMUP_STEPS = 4


def _warmup_rank(rank, world):
    """Per step: the warmed-up head against a plain head whose config is the ramp written out."""
    rows = slice(rank * GLOBAL_ROWS // world, (rank + 1) * GLOBAL_ROWS // world)
    part = ClassPartition(CLASSES, world, rank)
    out = []
    for step in (0, 2, 4, 7):  # r = 0, 0.5, 1, 1
        r = min(step / WARMUP_STEPS, 1.0)
        low, high = LAMBDA_RANGE  # lambda' = 1 + r (lambda - 1) is lambda with the range [1 - r + r lo, 1 - r + r hi]
        written_out = cluster_config(lambda_range=(1 - r + r * low, 1 - r + r * high),
                                     contrastive_weight=r * WEIGHTS[0], aligning_weight=r * WEIGHTS[1])
        if r == 0:  # weight 0 would skip the terms (and their sampling): keep them, weighted by 0
            written_out = cluster_config(lambda_range=(1.0, 1.0), contrastive_weight=1e-300, aligning_weight=1e-300)
        warmed = ClusterGuidedHead(make_margin_head(), cluster_config(warmup_steps=WARMUP_STEPS), seed=1)
        plain = ClusterGuidedHead(make_margin_head(), written_out, seed=1)
        results = []
        for head in (warmed, plain):
            with torch.no_grad():
                head.margin_head.weight.copy_(dense_weight()[part.start:part.end])
            head.set_step(step)
            per_head = []
            for data_step in range(STEPS):
                labels, embeddings, momentum = step_data(data_step)
                local = embeddings[rows].clone().requires_grad_(True)
                head.zero_grad()
                loss, _ = head(local, labels[rows], momentum[rows])
                loss.backward()
                per_head.append((loss.detach(), local.grad, head.margin_head.weight.grad.to_dense()))
            results.append(per_head)
        out.append({"step": step, "ramp": warmed.ramp,
                    "diff": max(float((a - b).abs().max()) for w, p in zip(*results) for a, b in zip(w, p))})
    return out


@pytest.mark.parametrize("world", [1, 3])
def test_warmup_ramp_is_arcface_margin_then_the_cluster_terms_scaled_in(world):
    for rank_result in run_distributed(_warmup_rank, world):
        assert [r["ramp"] for r in rank_result] == [0.0, 0.5, 1.0, 1.0]
        for r in rank_result:
            assert r["diff"] < 1e-12, f"step {r['step']} (ramp {r['ramp']}): {r['diff']}"


def test_warmup_steps_must_not_be_negative():
    with pytest.raises(ValueError, match="warmup_steps: must be >= 0, got -1"):
        cluster_config(warmup_steps=-1)


def _shared_block_rank(rank, world):
    """The joint head at Partial FC rate 0.3 with L_ali, against the same head reading L_ali's rows from W by a
    second gather (shared_rows ignored): same losses and gradients; W gets one sorted row gradient."""
    part = ClassPartition(CLASSES, world, rank)
    rows = slice(rank * GLOBAL_ROWS // world, (rank + 1) * GLOBAL_ROWS // world)
    shared, separate = (ClusterGuidedHead(make_margin_head(sample_rate=0.3), cluster_config(), seed=1)
                        for _ in range(2))
    original = separate.margin_head.loss_from_gathered
    separate.margin_head.loss_from_gathered = lambda f, l, c=None, shared_rows=None: original(f, l, c)
    gaps, masked_columns, one_gradient = [], 0, []
    for step in range(STEPS + 2):
        labels, embeddings, momentum = step_data(step % STEPS)
        results = []
        for head in (shared, separate):
            local = embeddings[rows].clone().requires_grad_(True)
            head.zero_grad()
            head_loss = head.training_loss(local, labels[rows], momentum[rows])
            head_loss.loss.backward()
            grad = head.margin_head.weight.grad
            if head is shared:
                indices = grad._indices()[0]
                one_gradient.append(bool(torch.equal(indices, head_loss.rows)))
                masked_columns += len(head_loss.rows) - len(head.margin_head.last_sampled)
            results.append((head_loss.loss.detach(), local.grad, grad.to_dense(), head.log_tau.grad))
        gaps.append(max(float((a - b).abs().max()) for a, b in zip(*results)))
    return {"gap": max(gaps), "masked": masked_columns, "one_gradient": all(one_gradient), "local": part.num_local}


@pytest.mark.parametrize("world", [1, 3])
def test_l_ali_rows_gathered_in_the_margin_heads_block_give_the_same_step(world):
    results = run_distributed(_shared_block_rank, world)
    assert all(r["one_gradient"] for r in results), "W's gradient must be the block's rows, sorted, once"
    assert sum(r["masked"] for r in results) > 0, "no step had an L_ali row outside the sample: nothing was tested"
    assert max(r["gap"] for r in results) < 1e-12, [r["gap"] for r in results]
