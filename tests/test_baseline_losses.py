"""The Table 3/4 baselines: Center loss, triplet loss, learnable-temperature L_con, against dense float64 references.

Loss level: the problem of tests/test_cluster_losses.py (1001 classes: uneven shards on 3 and 4 ranks, a
repeated class, a batch row whose class has no center). Head level: the whole Eq. 8 loss of
tests/test_joint_head.py with the l1 term swapped.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from largefr.config import ClusterConfig
from largefr.distributed.collectives import all_gather_with_grad
from largefr.distributed.partition import ClassPartition
from largefr.heads.baseline_losses import center_loss, triplet_loss
from largefr.heads.cluster_losses import cluster_contrastive_loss, learnable_temperature, sample_centers
from largefr.heads.joint import ClusterGuidedHead
from tests import test_joint_head as joint
from tests.distributed_helpers import run_distributed
from tests.test_cluster_losses import CLASSES, GLOBAL_ROWS, SAMPLES, UNSEEN_LABEL, dense_problem, make_bank

MARGIN, LOG_TAU0, TAU_LR = 0.2, math.log(0.1), 0.1
NEAR_ROWS = 4  # rows placed near their own center: their triplet hinge is inactive


def problem():
    """dense_problem with a few embeddings near their class center (so the triplet has inactive rows)."""
    centers, phi, seen, has_phi, labels, embeddings, weight = dense_problem()
    noise = torch.randn(NEAR_ROWS, embeddings.shape[1], generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    embeddings = embeddings.clone()
    embeddings[:NEAR_ROWS] = 2.0 * (centers[labels[:NEAR_ROWS]] + 0.05 * noise)
    return centers, seen, labels, embeddings


def _local_rows(embeddings, rank, world):
    rows = GLOBAL_ROWS // world
    return embeddings[rank * rows:(rank + 1) * rows].clone().requires_grad_(True)


def _sharded_losses(rank, world, labels, embeddings, part, bank, sampled):
    """Each loss forward and backward on this rank: {name: (loss, local embedding grad[, log tau0 grad])}."""
    out = {}
    for name in ("center", "triplet", "learnable"):
        local = _local_rows(embeddings, rank, world)
        features = F.normalize(all_gather_with_grad(local, None), dim=1)
        if name == "center":
            loss = center_loss(features, labels, bank)
        elif name == "triplet":
            loss = triplet_loss(features, labels, sampled, part, margin=MARGIN)
        else:
            log_tau0 = torch.nn.Parameter(torch.tensor(LOG_TAU0, dtype=torch.float64))
            temperature = learnable_temperature(log_tau0, sampled.total, None)
            loss = cluster_contrastive_loss(features, labels, sampled, part, temperature=temperature)
        loss.backward()
        out[name] = (loss.detach(), local.grad)
        if name == "learnable":
            out[name] += (log_tau0.grad.clone(),)
            torch.optim.SGD([log_tau0], lr=TAU_LR).step()
            out["log_tau0_after_step"] = log_tau0.detach()
    return out


def _losses_rank(rank, world):
    part = ClassPartition(CLASSES, world, rank)
    bank = make_bank(part)
    _, _, labels, embeddings = problem()
    sampled = sample_centers(bank, labels, SAMPLES, generator=torch.Generator().manual_seed(rank))
    out = {"ids": sampled.class_ids, "losses": _sharded_losses(rank, world, labels, embeddings, part, bank, sampled)}
    unseen = torch.full_like(labels, UNSEEN_LABEL)  # no row has a center: every loss is 0, gradient 0
    empty = sample_centers(bank, unseen, SAMPLES, generator=torch.Generator().manual_seed(rank))
    out["empty"] = _sharded_losses(rank, world, unseen, embeddings, part, bank, empty)
    return out


# ---- dense references: plain loops over rows ----------------------------------------------------------------
def reference_center(f, labels, centers, seen):
    rows = [(i, y) for i, y in enumerate(labels.tolist()) if seen[y]]
    total = sum(((f[i] - centers[y]) ** 2).sum() for i, y in rows)
    return total / (2 * len(rows))


def reference_triplet(f, labels, ids, centers, margin=MARGIN):
    """Rows with a sampled positive and at least one other sampled class; hardest = nearest other center."""
    terms, active = [], 0
    for i, y in enumerate(labels.tolist()):
        if y not in ids or len(ids) < 2:
            continue
        positive = ((f[i] - centers[y]) ** 2).sum()
        negative = min(  # the nearest other center = the most similar (all unit vectors)
            (((f[i] - centers[k]) ** 2).sum() for k in ids if k != y), key=lambda d: d.detach().item())
        hinge = positive - negative + margin
        active += int(hinge > 0)
        terms.append(torch.clamp(hinge, min=0))
    return sum(terms) / len(terms), active, len(terms)


def reference_learnable(f, labels, ids, centers, log_tau0):
    positions = {k: j for j, k in enumerate(ids)}
    target = torch.tensor([positions.get(int(y), -100) for y in labels])
    return F.cross_entropy(f @ centers[ids].t() / torch.exp(log_tau0), target, ignore_index=-100)


def reference_losses(ids):
    centers, seen, labels, embeddings = problem()
    out = {}
    for name in ("center", "triplet", "learnable"):
        dense = embeddings.clone().requires_grad_(True)
        f = F.normalize(dense, dim=1)
        log_tau0 = torch.tensor(LOG_TAU0, dtype=torch.float64, requires_grad=True)
        if name == "center":
            loss = reference_center(f, labels, centers, seen)
        elif name == "triplet":
            loss, active, counted = reference_triplet(f, labels, ids, centers)
            assert 0 < active < counted and counted < GLOBAL_ROWS  # both hinge cases and an ignored row
        else:
            loss = reference_learnable(f, labels, ids, centers, log_tau0)
        loss.backward()
        out[name] = (loss.detach(), dense.grad) + ((log_tau0.grad,) if name == "learnable" else ())
    return out


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_baseline_losses_match_dense_reference(world):
    results = run_distributed(_losses_rank, world)
    ids = results[0]["ids"].tolist()
    expected = reference_losses(ids)
    rows = GLOBAL_ROWS // world
    for rank, result in enumerate(results):
        assert result["ids"].tolist() == ids
        for name, (ref_loss, ref_grad, *ref_tau) in expected.items():
            loss, grad, *tau = result["losses"][name]
            assert abs(loss.item() - ref_loss.item()) < 1e-10, name
            torch.testing.assert_close(grad, ref_grad[rank * rows:(rank + 1) * rows], atol=1e-10, rtol=0)
            if ref_tau:
                assert abs(tau[0].item() - ref_tau[0].item()) < 1e-10
        # the step moved tau0 by the full (all-rank) gradient, identically on every rank
        assert torch.equal(result["losses"]["log_tau0_after_step"], results[0]["losses"]["log_tau0_after_step"])
        step = LOG_TAU0 - TAU_LR * expected["learnable"][2].item()
        assert abs(result["losses"]["log_tau0_after_step"].item() - step) < 1e-12 and step != LOG_TAU0
        for name in ("center", "triplet"):
            loss, grad = result["empty"][name]
            assert loss.item() == 0.0 and bool((grad == 0).all()), name


# ---- the joint head with each option ---------------------------------------------------------------------
OPTIONS = {"center": dict(contrastive_type="center"), "triplet": dict(contrastive_type="triplet", triplet_margin=1.5),
           "learnable": dict(temperature_mode="learnable", contrastive_tau_init=0.1)}


def _joint_rank(rank, world):
    part = ClassPartition(joint.CLASSES, world, rank)
    rows = slice(rank * joint.GLOBAL_ROWS // world, (rank + 1) * joint.GLOBAL_ROWS // world)
    out = {}
    for option, changes in OPTIONS.items():
        head = ClusterGuidedHead(joint.make_margin_head(), joint.cluster_config(**changes), seed=1)
        with torch.no_grad():
            head.margin_head.weight.copy_(joint.dense_weight()[part.start:part.end])
        steps = []
        for step in range(joint.STEPS):
            labels, embeddings, momentum = joint.step_data(step)
            local = embeddings[rows].clone().requires_grad_(True)
            head.zero_grad()
            loss, terms = head(local, labels[rows], momentum[rows])
            loss.backward()
            steps.append({"loss": loss.detach(), "terms": terms, "emb_grad": local.grad,
                          "weight_grad": head.margin_head.weight.grad.to_dense(),
                          "ids": head.last_sampled_centers.class_ids,
                          "replicated": {n: p.grad.clone() for n, p in head.replicated_parameters().items()}})
        out[option] = steps
    return out


class ReferenceTerm:
    """The l1 term of the dense Eq. 8 for one option; keeps its learnable tau0 leaf to read the gradient."""

    def __init__(self, option, centers):
        self.option, self.centers = option, centers
        self.log_tau0 = torch.tensor(math.log(0.1), dtype=torch.float64, requires_grad=True)

    def __call__(self, f, labels, ids_list, sampled_centers, valid):
        centers = {k: self.centers[k] for k in ids_list}
        if self.option == "center":
            return reference_center(f, labels, centers, {k: True for k in ids_list})
        if self.option == "triplet":
            return reference_triplet(f, labels, ids_list, centers, margin=1.5)[0]
        positive = torch.tensor([ids_list.index(int(y)) for y in labels])
        return F.cross_entropy(f @ sampled_centers.t() / torch.exp(self.log_tau0), positive)


@pytest.mark.parametrize("world", [1, 3])
def test_joint_head_with_each_baseline_matches_dense_reference(world):
    results = run_distributed(_joint_rank, world)
    rows = joint.GLOBAL_ROWS // world
    for option in OPTIONS:
        centers, phi, queue_f, queue_l = {}, {}, [], []
        for step in range(joint.STEPS):
            labels, _, momentum = joint.step_data(step)
            queue_f += list(F.normalize(momentum, dim=1))
            queue_l += labels.tolist()
            joint.reference_bank_update(centers, phi, queue_f, queue_l)
            ids = results[0][option][step]["ids"]
            term = ReferenceTerm(option, centers)
            expected = joint.reference_step(step, centers, phi, ids, contrastive=term)
            for rank, result in enumerate(results):
                part = ClassPartition(joint.CLASSES, world, rank)
                got = result[option][step]
                assert torch.equal(got["ids"], ids)
                for name in ("loss", "loss_con", "loss_ali"):
                    value = got["loss"] if name == "loss" else got["terms"][name]
                    assert abs(value.item() - expected[name].item()) < 1e-10, (option, name)
                torch.testing.assert_close(got["emb_grad"], expected["emb_grad"][rank * rows:(rank + 1) * rows],
                                           atol=1e-10, rtol=0)
                torch.testing.assert_close(got["weight_grad"], expected["weight_grad"][part.start:part.end],
                                           atol=1e-10, rtol=0)
                assert abs(got["replicated"]["log_tau"].item() - expected["tau_grad"].item()) < 1e-10
                names = ["log_tau", "contrastive_log_tau"] if option == "learnable" else ["log_tau"]
                assert list(got["replicated"]) == names
                if option == "learnable":
                    assert abs(got["replicated"]["contrastive_log_tau"].item() - term.log_tau0.grad.item()) < 1e-10


def test_baseline_config_fields_are_checked_and_only_the_learnable_mode_adds_a_parameter():
    with pytest.raises(ValueError, match=r"(?s)triplet_margin: must be >= 0.0, got -0.1.*"
                                         r"contrastive_tau_init: must be > 0, got 0"):
        ClusterConfig(triplet_margin=-0.1, contrastive_tau_init=0.0)
    with pytest.raises(ValueError, match="contrastive_type: must be one of 'cluster', 'center', 'triplet', got 'arc'"):
        ClusterConfig(contrastive_type="arc")
    # temperature_mode matters only for contrastive_type 'cluster' (no error, no parameter otherwise)
    for changes, names in ((dict(temperature_mode="learnable"), ["log_tau", "contrastive_log_tau"]),
                           (dict(temperature_mode="learnable", contrastive_type="center"), ["log_tau"]),
                           (dict(temperature_mode="learnable", contrastive_weight=0.0), ["log_tau"]),
                           (dict(temperature_mode="learnable", aligning_weight=0.0), ["contrastive_log_tau"])):
        head = ClusterGuidedHead(joint.make_margin_head(), joint.cluster_config(**changes))
        assert list(head.replicated_parameters()) == names, changes
        assert [n for n, _ in head.named_parameters() if n != "margin_head.weight"] == names


# ---- a tiny 2-rank trainer run with each option; tau0 through the head optimizer and checkpoints -------------
TRAINER_OPTIONS = {"center": {"contrastive_type": "center"}, "triplet": {"contrastive_type": "triplet"},
                   "learnable": {"temperature_mode": "learnable"}}


def _build(world, config_dict, *, resume=None, train=False):
    from largefr.config import Config
    from largefr.train.build import build_trainer
    from largefr.train.distributed_env import init_distributed

    trainer = build_trainer(Config.from_dict(config_dict, world_size=world), init_distributed(), resume=resume)
    summary = trainer.train() if train else None
    trainer.metrics.close()
    head = trainer.runner.head
    return {"summary": summary, "step": trainer.state.step,
            "replicated": {name: p.detach().clone() for name, p in head.replicated_parameters().items()},
            "tau_optimizer": head.contrastive_log_tau is not None and trainer.checkpointer.tau_optimizer.state_dict()}


def _trainer_config(data, output, option, **cluster):
    from tests.test_trainer import tiny_config

    return tiny_config(data, f"{output}/{option}", cluster={**TRAINER_OPTIONS[option], **cluster},
                       train={"max_steps": 3}, data={"val_targets": []})


def _train_each_option(rank, world, data, output):
    out = {option: _build(world, _trainer_config(data, output, option), train=True) for option in TRAINER_OPTIONS}
    out["resumed"] = _build(world, _trainer_config(data, output, "learnable"), resume="auto")
    return out


def _resume_elsewhere(rank, world, data, output):
    from largefr.checkpoint.save_load import CheckpointError

    resumed = _build(world, _trainer_config(data, output, "learnable"), resume="auto")
    try:  # the checkpoint has tau0, a 'pcl' run has none: refused with the setting to keep
        _build(world, _trainer_config(data, output, "learnable", temperature_mode="pcl"), resume="auto")
    except CheckpointError as error:
        resumed["refused"] = str(error)
    return resumed


def test_trainer_runs_each_baseline_and_checkpoints_the_learnable_temperature(tmp_path):
    from largefr.data.synthetic import generate_dataset

    data = tmp_path / "data"
    generate_dataset(data, identities=16, images_per_identity=8, pairs=20, image_size=32, seed=1, progress=False)
    per_rank = run_distributed(_train_each_option, 2, str(data), str(tmp_path))
    for option in TRAINER_OPTIONS:
        summary = per_rank[0][option]["summary"]
        assert summary["steps"] == 3 and set(summary["final_loss_terms"]) == {"loss_cg", "loss_con", "loss_ali"}
        assert all(math.isfinite(v) for v in summary["final_loss_terms"].values()), (option, summary)
        assert (tmp_path / option / "summary.json").is_file()
    trained = [r["learnable"]["replicated"]["contrastive_log_tau"] for r in per_rank]
    assert torch.equal(trained[0], trained[1]) and abs(trained[0].item() - math.log(0.1)) > 1e-4  # moved, alike
    assert list(per_rank[0]["center"]["replicated"]) == ["log_tau"]
    for result in per_rank:  # resumed on the same world size: tau0 and its optimizer state back
        assert result["resumed"]["step"] == 3 and torch.equal(result["resumed"]["replicated"]["contrastive_log_tau"],
                                                              trained[0])
        torch.testing.assert_close(result["resumed"]["tau_optimizer"]["state"],
                                   result["learnable"]["tau_optimizer"]["state"], rtol=0, atol=0)
        assert len(result["resumed"]["tau_optimizer"]["state"]) == 2  # log_tau and tau0, both stepped
    elsewhere = run_distributed(_resume_elsewhere, 1, str(data), str(tmp_path))[0]
    assert torch.equal(elsewhere["replicated"]["contrastive_log_tau"], trained[0]) and elsewhere["step"] == 3
    assert "learnable temperatures ['log_tau', 'contrastive_log_tau'], this run has ['log_tau']" in elsewhere["refused"]


def test_center_loss_alone_samples_nothing_and_a_skipped_step_is_undone():
    head = ClusterGuidedHead(joint.make_margin_head(), joint.cluster_config(contrastive_type="center",
                                                                            aligning_weight=0.0))
    labels, embeddings, momentum = joint.step_data(0)
    head(embeddings, labels, momentum)
    before = {name: buffer.clone() for name, buffer in [*head.queue.named_buffers(), *head.bank.named_buffers()]}
    labels, embeddings, momentum = joint.step_data(1)
    loss, terms = head(embeddings, labels, momentum)
    assert head.last_sampled_centers is None and set(terms) == {"loss_cg", "loss_con"} and loss.item() > 0
    head.undo_last_update()  # the trainer's skip of a non-finite step
    after = dict([*head.queue.named_buffers(), *head.bank.named_buffers()])
    assert all(torch.equal(after[name], value) for name, value in before.items())
    learnable = ClusterGuidedHead(joint.make_margin_head(), joint.cluster_config(temperature_mode="learnable",
                                                                                 contrastive_tau_init=0.25))
    learnable(embeddings, labels, momentum)
    assert learnable.stats()["contrastive_tau"] == pytest.approx(0.25)
