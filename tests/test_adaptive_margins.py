"""CurricularFace, MagFace, AdaFace, ElasticFace on the sharded head, against dense float64 references.

Each case runs TWO steps (the running state of step 1 feeds step 2) on real gloo groups at world
sizes 1-4 (1001 classes: uneven shards), with and without Partial FC, with and without the
cluster-guided lambda, in the default and the chunked mode; loss, embedding and W gradients of
both steps equal a dense single-process reference written below from the papers' formulas to 1e-10,
and every rank holds the reference's running state. The loss also equals a transcription of the
authors' public code on the same inputs (`test_*_equals_authors_code`: see each docstring).
"""
import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F

from largefr.config import HeadConfig
from largefr.distributed.partition import ClassPartition
from largefr.heads import ShardedMarginHead, normal_rows
from largefr.heads.margins import curricularface
from largefr.heads.margins.elasticface import ElasticFace
from largefr.heads.spare import SLACK
from tests.distributed_helpers import run_distributed

CLASSES, DIM, LOCAL_BATCH, SEED, SCALE = 1001, 16, 6, 1234, 30.0
MARGINS = {
    "curricularface": HeadConfig(type="curricularface", scale=SCALE),
    "magface": HeadConfig(type="magface", scale=SCALE),
    "magface_thmm": HeadConfig(type="magface", scale=SCALE, magface_easy_margin=False),
    "adaface": HeadConfig(type="adaface", scale=SCALE),
    "elastic_arc": HeadConfig(type="elasticface", scale=SCALE),
    "elastic_cos_sorted": HeadConfig(type="elasticface", scale=SCALE, elastic_form="cos", elastic_sorted=True),
    "elastic_arc_sorted": HeadConfig(type="elasticface", scale=SCALE, elastic_sorted=True),
}
# (sample rate, with lambda, chunk size): chunk 7 leaves a ragged last block on every shard
VARIANTS = [(1.0, False, 0), (0.3, False, 0), (0.3, True, 0), (1.0, True, 7), (0.3, False, 7)]
CASES = [(name, *variant) for name in MARGINS for variant in VARIANTS]
RESUME_CASES = ["curricularface", "adaface", "elastic_arc_sorted"]


def batch_data(world: int, case_seed: int):
    """Labels with a repeat and an ignored row; embeddings with norms from ~1 to ~150 (inside and outside
    MagFace's [10, 110]); two rows pointing away from their class (theta + m > pi)."""
    gen = torch.Generator().manual_seed(case_seed)
    batch = world * LOCAL_BATCH
    labels = torch.randint(0, CLASSES, (batch,), generator=gen)
    labels[1] = labels[0]
    labels[-1] = -1
    weight = normal_rows(0, CLASSES, DIM, std=0.01, seed=SEED, dtype=torch.float64)
    directions = F.normalize(torch.randn(batch, DIM, generator=gen, dtype=torch.float64), dim=1)
    for row in (2, batch - 2):
        directions[row] = F.normalize(-weight[labels[row]] + 0.002 * torch.randn(DIM, generator=gen,
                                                                                 dtype=torch.float64), dim=0)
    norms = 1.0 + 150.0 * torch.rand(batch, generator=gen, dtype=torch.float64)
    class_lambda = torch.rand(CLASSES, generator=gen, dtype=torch.float64)
    return labels, directions * norms.unsqueeze(1), class_lambda


def build_head(name: str, rate: float, chunk: int, group=None) -> ShardedMarginHead:
    return ShardedMarginHead(CLASSES, DIM, margin=MARGINS[name], sample_rate=rate, group=group, dtype=torch.float64,
                             logits_dtype=torch.float64, generator=torch.Generator().manual_seed(SEED),
                             chunk_size=chunk)


def step_seeds(world: int, index: int) -> tuple[int, int]:
    return 1000 * world + 2 * index, 1000 * world + 2 * index + 1


def run_step(head, labels, embeddings, class_lambda, rank):
    part = head.partition
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    local = embeddings[rows].clone().requires_grad_(True)
    head.weight.grad = None
    lam = None if class_lambda is None else class_lambda[part.start:part.end]
    loss = head(local, labels[rows], lam)
    loss.backward()
    return dict(loss=loss.detach(), embedding_grad=local.grad, weight_grad=head.weight.grad.to_dense(),
                sampled=head.last_sampled + part.start, state=copy.deepcopy(head.margin.state_dict()))


def _all_cases_rank(rank, world, resume_states):
    results = []
    for index, (name, rate, with_lambda, chunk) in enumerate(CASES):
        head = build_head(name, rate, chunk)
        steps = []
        for seed in step_seeds(world, index):
            labels, embeddings, class_lambda = batch_data(world, seed)
            steps.append(run_step(head, labels, embeddings, class_lambda if with_lambda else None, rank))
        results.append(steps)
    resumed = {}
    for name in RESUME_CASES:  # state of step 1 written by ONE rank, loaded here at `world` ranks
        head = build_head(name, 1.0, 0)
        head.margin.load_state_dict(resume_states[name])
        labels, embeddings, class_lambda = batch_data(world, 77)
        resumed[name] = run_step(head, labels, embeddings, None, rank)
    return dict(cases=results, resumed=resumed)


def _single_rank_state(name: str) -> dict:
    head = build_head(name, 1.0, 0)
    labels, embeddings, _ = batch_data(1, 76)
    return run_step(head, labels, embeddings, None, 0)["state"]


@functools.lru_cache(maxsize=None)
def job_results(world: int) -> list:
    states = {name: _single_rank_state(name) for name in RESUME_CASES}
    return run_distributed(_all_cases_rank, world, states)


# ---- the dense reference, from the papers' formulas ---------------------------------------------------


def initial_state(name):
    """Running state before the first step, as the papers / authors initialise it."""
    cfg = MARGINS[name]
    if cfg.type == "curricularface":
        return {"t": 0.0}
    if cfg.type == "adaface":
        return {"mean": 20.0, "std": 100.0}
    if cfg.type == "elasticface":
        return {"generator": build_head(name, 1.0, 0).margin.generator.get_state()}
    return {}


def arc(cos, m):
    """cos(theta + m), from the angle."""
    return torch.cos(torch.acos(cos) + m)


def insightface_arc(cos, m):
    """ArcFace's cos(theta + m), continued by cos(theta) - m sin(m) past theta + m = pi."""
    return torch.where(torch.acos(cos) + m <= math.pi, arc(cos, m), cos - m * torch.sin(m))


def reference_logits(name, cos, norms, labels, valid, column, lam, state):
    """(logits (valid rows x sampled), extra loss, new state) of one step."""
    cfg = MARGINS[name]
    c_y = cos[valid, column]
    s = cfg.scale
    logits = s * cos[valid]
    target_rows = torch.arange(len(valid))
    extra = torch.zeros((), dtype=torch.float64)
    state = dict(state)
    if cfg.type == "curricularface":
        # Huang et al. Eq. 7-9: t = alpha * mean(cos theta_y) + (1 - alpha) t, updated before use;
        # N(t, cos theta_j) = cos theta_j (t + cos theta_j) where cos(theta_y + m) < cos theta_j
        state["t"] = 0.01 * c_y.detach().mean().item() + 0.99 * state["t"]
        m = 0.5 * lam
        hard = cos[valid] > arc(c_y.detach(), m).unsqueeze(1)
        hard[target_rows, column] = False
        logits = s * torch.where(hard, cos[valid] * (state["t"] + cos[valid]), cos[valid])
        target = insightface_arc(c_y, m)
    elif cfg.type == "magface":
        # Meng et al. Eq. 4-6: m(a) linear on [l_a, u_a], g(a) = a / u_a^2 + 1 / a, L = CE + lambda_g mean g
        a = norms[valid].clamp(10.0, 110.0)
        m = lam * ((0.8 - 0.45) / (110.0 - 10.0) * (a - 10.0) + 0.45)
        target = torch.where(c_y > 0, arc(c_y, m), c_y) if cfg.magface_easy_margin else insightface_arc(c_y, m)
        extra = 35.0 * (a / 110.0 ** 2 + 1.0 / a).mean()
    elif cfg.type == "adaface":
        # Kim et al. Eq. 8-12: z = clip(h (||z|| - mu) / (sigma + eps), -1, 1), norms detached, EMA alpha = 0.01
        a = norms[valid].detach().clamp(0.001, 100.0)
        state["mean"] = 0.01 * a.mean().item() + 0.99 * state["mean"]
        state["std"] = 0.01 * a.std().item() + 0.99 * state["std"]
        z = (0.333 * (a - state["mean"]) / (state["std"] + 1e-3)).clamp(-1.0, 1.0)
        m = 0.4 * lam
        theta = torch.acos(c_y.clamp(-1 + 1e-3, 1 - 1e-3))
        target = torch.cos((theta - m * z).clamp(1e-3, math.pi - 1e-3)) - (m + m * z)
    else:
        # Boutros et al. Eq. 4-5: m_i ~ N(m, sigma); plus: the authors' sorted assignment
        generator = torch.Generator()
        generator.set_state(state["generator"])
        mean, std = ElasticFace.mean_std(cfg)
        drawn = torch.randn(len(valid), generator=generator, dtype=torch.float64) * std + mean
        state["generator"] = generator.get_state()
        if cfg.elastic_sorted:
            drawn = torch.sort(drawn).values[torch.argsort(c_y.detach(), descending=True)]
        m = lam * drawn
        target = arc(c_y, m) if cfg.elastic_form == "arc" else c_y - m
    logits = logits.index_put((target_rows, column), s * target)
    return logits, extra, state


def dense_reference(name, labels, embeddings, weight, sampled, class_lambda, state):
    embeddings = embeddings.clone().requires_grad_(True)
    weight = weight.clone().requires_grad_(True)
    cos = F.normalize(embeddings, dim=1) @ F.normalize(weight[sampled], dim=1).t()
    valid = torch.nonzero(labels >= 0).squeeze(1)
    column = torch.searchsorted(sampled, labels[valid])
    assert torch.equal(sampled[column], labels[valid]), "a positive is missing from the sampled classes"
    lam = torch.ones(len(valid), dtype=torch.float64) if class_lambda is None else class_lambda[labels[valid]]
    logits, extra, state = reference_logits(name, cos, embeddings.norm(dim=1), labels, valid, column, lam, state)
    loss = F.cross_entropy(logits, column) + extra
    loss.backward()
    return loss.detach(), embeddings.grad, weight.grad, state


def state_values(state_dict) -> dict:
    return {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}


def check_step(world, per_rank, name, labels, embeddings, class_lambda, state):
    """Compare one step of every rank with the reference; returns the reference's state after it."""
    weight = normal_rows(0, CLASSES, DIM, std=0.01, seed=SEED, dtype=torch.float64)
    sampled = torch.cat([r["sampled"] for r in per_rank])
    loss, embedding_grad, weight_grad, state = dense_reference(name, labels, embeddings, weight, sampled,
                                                               class_lambda, state)
    for rank, result in enumerate(per_rank):
        part = ClassPartition(CLASSES, world, rank)
        assert abs(result["loss"].item() - loss.item()) < 1e-10, (name, rank, result["loss"].item(), loss.item())
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        torch.testing.assert_close(result["embedding_grad"], embedding_grad[rows], atol=1e-10, rtol=0)
        torch.testing.assert_close(result["weight_grad"], weight_grad[part.start:part.end], atol=1e-10, rtol=0)
        values = state_values(result["state"])
        for key, expected in (("t", "t"), ("batch_mean", "mean"), ("batch_std", "std")):
            if key in values:
                assert abs(values[key].item() - state[expected]) < 1e-12, (name, key)
    for other in per_rank[1:]:  # the running state is the same on every rank
        for key, value in state_values(per_rank[0]["state"]).items():
            assert torch.equal(value, state_values(other["state"])[key])
        if "_extra_state" in per_rank[0]["state"]:
            assert torch.equal(per_rank[0]["state"]["_extra_state"]["generator"],
                               other["state"]["_extra_state"]["generator"])
    if "generator" in state:
        assert torch.equal(per_rank[0]["state"]["_extra_state"]["generator"], state["generator"])
    return state


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_two_steps_match_dense_reference(world):
    per_rank = job_results(world)
    for index, (name, rate, with_lambda, chunk) in enumerate(CASES):
        state = initial_state(name)
        for step, seed in enumerate(step_seeds(world, index)):
            labels, embeddings, class_lambda = batch_data(world, seed)
            results = [rank_result["cases"][index][step] for rank_result in per_rank]
            state = check_step(world, results, name, labels, embeddings, class_lambda if with_lambda else None, state)


@pytest.mark.parametrize("chunk", [0, 7])
def test_curricular_modulation_in_row_blocks_equals_one_block(chunk, monkeypatch):
    """CurricularFace's modulation runs in row blocks (cache-sized on a CPU): blocks of one row, and of five rows
    of the chunked mode's 7 columns (a ragged last block of the 18 rows), give the very same loss and gradients
    as one block."""
    labels, embeddings, class_lambda = batch_data(3, 5)

    def step():
        head = build_head("curricularface", 0.3, chunk)
        features = embeddings.clone().requires_grad_(True)
        loss = head.loss_from_gathered(features, labels, class_lambda[head.partition.start:head.partition.end])
        loss.backward()
        return loss.detach(), features.grad, head.weight.grad.to_dense()

    whole = step()
    for elements in (1, 5 * 7):
        monkeypatch.setattr(curricularface, "MODULATION_BLOCK_CPU", elements)
        assert all(torch.equal(a, b) for a, b in zip(step(), whole))


def test_curricular_derivative_buffers_serve_the_next_step(monkeypatch):
    """On a CPU the modulation's derivative blocks of one backward are the next step's (no fresh pages each step)."""
    monkeypatch.setattr(curricularface, "MODULATION_BLOCK_CPU", 5 * CLASSES)  # 12 rows: blocks of 5, 5 and 2
    head = build_head("curricularface", 1.0, 0)
    labels, embeddings, _ = batch_data(2, 9)
    head.loss_from_gathered(embeddings.clone().requires_grad_(True), labels).backward()
    spare = head.margin.held_tensors()
    assert sorted(block.numel() for block in spare) == sorted(int(rows * CLASSES * SLACK) for rows in (5, 5, 2))
    head.loss_from_gathered(embeddings.clone().requires_grad_(True), labels).backward()
    assert {block.data_ptr() for block in head.margin.held_tensors()} == {block.data_ptr() for block in spare}


@pytest.mark.parametrize("world", [2, 3])
def test_state_written_by_one_rank_resumes_on_more(world):
    """The running state is replicated and world-size independent: step 1 on one rank, step 2 on `world`."""
    per_rank = job_results(world)
    for name in RESUME_CASES:
        state = initial_state(name)
        labels, embeddings, _ = batch_data(1, 76)
        weight = normal_rows(0, CLASSES, DIM, std=0.01, seed=SEED, dtype=torch.float64)
        state = dense_reference(name, labels, embeddings, weight, torch.arange(CLASSES), None, state)[3]
        labels, embeddings, _ = batch_data(world, 77)
        check_step(world, [r["resumed"][name] for r in per_rank], name, labels, embeddings, None, state)


# ---- the authors' public code, transcribed (not copied) op by op --------------------------------------


def authors_inputs(seed: int):
    """One process, every class, every label valid (the authors' code has no ignored rows)."""
    labels, embeddings, _ = batch_data(1, seed)
    labels[-1] = 3
    kernel = normal_rows(0, CLASSES, DIM, std=0.01, seed=SEED, dtype=torch.float64).t()  # (in, out) as theirs
    return labels, embeddings, kernel


def head_losses(name: str, seeds) -> tuple[list[float], ShardedMarginHead]:
    head = build_head(name, 1.0, 0)
    losses = []
    for seed in seeds:
        labels, embeddings, _ = authors_inputs(seed)
        losses.append(head(embeddings, labels).item())
    return losses, head


def column_normalized(kernel):
    return kernel / kernel.norm(dim=0, keepdim=True)


def test_curricularface_equals_authors_code():
    """HuangYG123/CurricularFace head/metrics.py::CurricularFace.forward (m = 0.5, t buffer from 0, momentum
    0.01, s): cos clamped to [-1, 1]; cos(theta+m) as cos*cos(m) - sqrt(1-cos^2)*sin(m); hard mask
    cos > cos(theta_y+m) over the whole row; th = cos(pi-m), mm = sin(pi-m)*m fallback; t updated under
    no_grad BEFORE the mask is applied (so the step uses the new t: mirrored); hard entries -> c*(t+c);
    target column scattered last; CE of s*logits. Two steps, so the carried t is compared too."""
    m, t, losses = 0.5, 0.0, []
    for seed in (5, 6):
        labels, embeddings, kernel = authors_inputs(seed)
        cos = (F.normalize(embeddings, dim=1) @ column_normalized(kernel)).clamp(-1, 1)
        target = cos[torch.arange(len(labels)), labels].view(-1, 1)
        shifted = target * math.cos(m) - torch.sqrt(1.0 - target ** 2) * math.sin(m)
        mask = cos > shifted
        final = torch.where(target > math.cos(math.pi - m), shifted, target - math.sin(math.pi - m) * m)
        t = target.mean().item() * 0.01 + 0.99 * t
        cos = torch.where(mask, cos * (t + cos), cos).scatter(1, labels.view(-1, 1), final)
        losses.append(F.cross_entropy(SCALE * cos, labels).item())
    mine, head = head_losses("curricularface", (5, 6))
    assert max(abs(a - b) for a, b in zip(mine, losses)) < 1e-10, (mine, losses)
    assert abs(head.margin.t.item() - t) < 1e-12


@pytest.mark.parametrize("name", ["magface", "magface_thmm"])
def test_magface_equals_authors_code(name):
    """IrvingMeng/MagFace models/magface.py::MagLinear.forward + MagLoss.forward + SoftmaxBuilder._margin, with
    run/run.sh's l_a 10, u_a 110, l_margin 0.45, u_margin 0.8, lambda_g 35 and trainer.py's
    loss_id + lambda_g * loss_g: x_norm = ||x|| clamped to [l_a, u_a] (NOT detached: its gradient paths are
    the margin and g, mirrored); margin linear in x_norm; cos(theta+m) on every column, easy_margin
    (MagLinear's default) or th/mm; one-hot mix of target and plain cosines; CE + lambda_g * mean g."""
    labels, embeddings, kernel = authors_inputs(8)
    easy = MARGINS[name].magface_easy_margin
    x_norm = embeddings.norm(dim=1, keepdim=True).clamp(10.0, 110.0)
    margin = (0.8 - 0.45) / (110.0 - 10.0) * (x_norm - 10.0) + 0.45
    cos = (F.normalize(embeddings) @ column_normalized(kernel)).clamp(-1, 1)
    shifted = cos * torch.cos(margin) - torch.sqrt(1.0 - cos ** 2) * torch.sin(margin)
    if easy:
        shifted = torch.where(cos > 0, shifted, cos)
    else:
        shifted = torch.where(cos > torch.cos(math.pi - margin), shifted, cos - torch.sin(math.pi - margin) * margin)
    one_hot = torch.zeros_like(cos).scatter(1, labels.view(-1, 1), 1.0)
    output = one_hot * SCALE * shifted + (1.0 - one_hot) * SCALE * cos
    loss_g = (x_norm / 110.0 ** 2 + 1.0 / x_norm).mean()
    expected = F.cross_entropy(output, labels) + 35.0 * loss_g
    (mine,), _ = head_losses(name, (8,))
    assert abs(mine - expected.item()) < 1e-10, (mine, expected.item())


def test_adaface_equals_authors_code():
    """mk-minchul/AdaFace head.py::AdaFace.forward with main.py's defaults m 0.4, h 0.333, s, t_alpha 0.01
    (eps 1e-3, batch_mean 20, batch_std 100 at start): the model passes normalised embeddings and their
    norms; cosines clamped to +-(1-eps) (the head clamps only the target cosines: no negative here
    exceeds 0.999, asserted), norms clipped to [0.001, 100] and DETACHED (mirrored), mean and unbiased
    std updated before use, scaler clip(h*(norm-mean)/(std+eps), -1, 1); g_angular = -m*scaler added to
    the target angle, clipped to [eps, pi-eps]; g_add = m + m*scaler subtracted. Two steps."""
    eps, mean, std, losses = 1e-3, 20.0, 100.0, []
    for seed in (9, 10):
        labels, embeddings, kernel = authors_inputs(seed)
        norms = embeddings.norm(dim=1, keepdim=True)
        raw = (embeddings / norms) @ column_normalized(kernel)
        assert raw.abs().max() < 1 - eps
        cosine = raw.clamp(-1 + eps, 1 - eps)
        safe = norms.clip(0.001, 100).detach()
        mean = safe.mean().item() * 0.01 + 0.99 * mean
        std = safe.std().item() * 0.01 + 0.99 * std
        scaler = (0.333 * (safe - mean) / (std + eps)).clip(-1, 1)
        one_hot = torch.zeros_like(cosine).scatter(1, labels.view(-1, 1), 1.0)
        theta = (cosine.acos() + one_hot * (-0.4 * scaler)).clip(eps, math.pi - eps)
        logits = (theta.cos() - one_hot * (0.4 + 0.4 * scaler)) * SCALE
        losses.append(F.cross_entropy(logits, labels).item())
    mine, head = head_losses("adaface", (9, 10))
    assert max(abs(a - b) for a, b in zip(mine, losses)) < 1e-10, (mine, losses)
    assert abs(head.margin.batch_mean.item() - mean) < 1e-12 and abs(head.margin.batch_std.item() - std) < 1e-12


@pytest.mark.parametrize("name", ["elastic_arc", "elastic_cos_sorted", "elastic_arc_sorted"])
def test_elasticface_equals_authors_code(name):
    """fdbtrs/ElasticFace utils/losses.py::ElasticArcFace / ElasticCosFace (plus=True for the sorted variant)
    with config/config.py's m 0.5 / 0.35, std 0.05, plus: 0.0175 (arc) / 0.02 (cos): cos clamped to [-1, 1];
    one margin per valid row (given here: the head's own draws, read from its generator); plus: margins
    sorted ascending, indexed by the descending sort of the target cosines (margin[idicate_cosie],
    under no_grad: mirrored); arc: acos, add the margin to the target angle, cos (no fallback past pi);
    cos: subtract it from the target cosine; times s."""
    cfg = MARGINS[name]
    labels, embeddings, kernel = authors_inputs(11)
    generator = torch.Generator()
    generator.set_state(build_head(name, 1.0, 0).margin.generator.get_state())
    mean, std = ElasticFace.mean_std(cfg)
    margin = (torch.randn(len(labels), generator=generator, dtype=torch.float64) * std + mean).view(-1, 1)
    cos = (F.normalize(embeddings) @ column_normalized(kernel)).clamp(-1, 1)
    if cfg.elastic_sorted:
        order = torch.sort(cos[torch.arange(len(labels)), labels], dim=0, descending=True)[1]
        margin = torch.sort(margin, dim=0)[0][order]
    m_hot = torch.zeros_like(cos).scatter(1, labels.view(-1, 1), margin)
    logits = (cos.acos() + m_hot).cos() if cfg.elastic_form == "arc" else cos - m_hot
    expected = F.cross_entropy(logits * SCALE, labels).item()
    (mine,), _ = head_losses(name, (11,))
    assert abs(mine - expected) < 1e-10, (mine, expected)
