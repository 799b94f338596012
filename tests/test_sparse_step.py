"""Partial FC's step costs what it samples: no tensor of the rank's W size is made during a step but W itself,
its optimizer state and the bank (issue 25), and the sparse row gradient equals the dense one."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from largefr.config import load_config
from largefr.heads.cluster_losses import positive_columns, sample_centers
from largefr.heads.row_gradient import gather_rows
from largefr.train.build import build_head
from largefr.train.distributed_env import DistributedEnv

ROOT = Path(__file__).resolve().parents[1]
ENV = DistributedEnv(rank=0, world_size=1, local_rank=0, launcher="env", backend="gloo", device=torch.device("cpu"))
CLASSES, DIM, BATCH = 40_000, 64, 32
W_BYTES = CLASSES * DIM * 4  # float32 shard of the one rank


def quickstart_head(*overrides: str):
    """The trainer's own head (build_head) from the quickstart config, at CLASSES classes on one rank."""
    config = load_config(str(ROOT / "configs" / "quickstart.json"),
                         [f"data.num_classes={CLASSES}", f"data.num_images={CLASSES}", "data.synthetic=null",
                          "data.rec=unused", f"model.embedding_size={DIM}", "cluster.queue_size=256", "cluster.num_sampled_centers=128",
                          *overrides])
    return build_head(config, ENV)


def one_step(parts, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(BATCH, DIM, generator=generator, requires_grad=True)
    labels = torch.randint(0, CLASSES, (BATCH,), generator=generator)
    momentum = torch.randn(BATCH, DIM, generator=generator)
    head_loss = parts.head.training_loss(embeddings, labels, momentum)
    head_loss.loss.backward()
    result = parts.step.step(loss_scale=1.0, engine_step_applied=True, rows=head_loss.rows,
                             gathered=head_loss.gathered)
    assert result.applied, result.reason


def allocation_sizes(fn) -> list[int]:
    """Bytes of every allocation `fn` makes (torch's CPU memory profiler)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.nbytes() > 0]


def largest_allocation(fn) -> int:
    return max(allocation_sizes(fn))


@pytest.mark.parametrize("optimizer,chunk_size,clip", [("sgd", 0, 0.0), ("adamw", 0, 5.0), ("sgd", 1024, 5.0)])
def test_sampled_step_allocates_nothing_the_size_of_the_shard(optimizer, chunk_size, clip):
    """The full method (L_cg with the cluster-guided margin, L_con, L_ali), the head optimizer, clipping, at r = 0.1.

    The largest single allocation must stay below a quarter of W: the per-class vectors (lambda, sampling
    scores) are W / d, the sampled rows W / 10. Before the sparse gradient, `index_select`'s backward made a
    zero gradient of W's size, and the finiteness check two more.
    """
    parts = quickstart_head("head.sample_rate=0.1", f"optim.name={optimizer}", f"head.chunk_size={chunk_size}",
                            f"optim.head_grad_clip={clip}")
    assert parts.head.config.aligning_weight > 0 and parts.head.config.contrastive_weight > 0
    one_step(parts, seed=0)  # the optimizer creates its (resident) state in its first step
    largest = largest_allocation(lambda: one_step(parts, seed=1))
    assert largest < W_BYTES / 4, (largest, W_BYTES)
    assert parts.head.margin_head.weight.grad is None  # the step zeroed it (set_to_none)


def test_sampling_and_target_lambda_make_nothing_per_class():
    """The margin head's negatives, L_con's sampled centers and positive columns and the target classes' lambda
    follow the sample: nothing of a byte per class is made (a score, a lambda or a flag for each of the rank's
    classes, a list of the classes with a center). Scoring every class and taking the top k, computing every
    class's lambda, or listing the seen classes to draw L_con's negatives fails this."""
    parts = quickstart_head("head.sample_rate=0.01")
    one_step(parts, seed=0)  # the bank gets centers and phi
    head = parts.head
    labels = torch.randint(0, CLASSES, (BATCH,), generator=torch.Generator().manual_seed(3))
    class_lambda = head.bank.class_lambda(0.0, 1.0, ramp=0.5)  # (its phi range is one pass, made once a step)
    head.bank.seen[:] = True  # late in training: every class has a center, and L_con's negatives are drawn among them
    sampled = sample_centers(head.bank, labels, 128, generator=head.sample_generator)
    largest = largest_allocation(lambda: (head.margin_head.sample_classes(labels),
                                          sample_centers(head.bank, labels, 128, generator=head.sample_generator),
                                          positive_columns(labels, sampled, head.margin_head.partition),
                                          class_lambda[labels]))
    assert largest < CLASSES, (largest, CLASSES)  # (the 128 sampled centers gathered: 128 x 66 floats, 33 KB)


def test_full_rate_step_still_uses_a_dense_gradient():
    """At r = 1.0 every row is used: one dense gradient, updated in place (the check above must not pass here)."""
    parts = quickstart_head("head.sample_rate=1.0")
    one_step(parts, seed=0)
    assert largest_allocation(lambda: one_step(parts, seed=1)) >= W_BYTES


def test_sparse_row_gradient_equals_dense_float64_reference():
    """gather_rows twice (the margin head's sample and L_ali's classes, overlapping) on float64 W: the summed
    sparse gradient equals autograd's dense gradient of the same function through plain indexing."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(50, 6, generator=generator, dtype=torch.float64)
    features = torch.randn(9, 6, generator=generator, dtype=torch.float64)
    sampled = torch.tensor([1, 4, 7, 20, 33, 49])
    centers = torch.tensor([0, 4, 20, 21])

    def loss_of(rows_of):
        logits = features @ F.normalize(rows_of(sampled), dim=1).t()
        aligning = (features[:4] @ rows_of(centers).t()).square().sum()
        return torch.logsumexp(logits, dim=1).sum() + aligning

    sparse_weight = weight.clone().requires_grad_(True)
    loss_of(lambda rows: gather_rows(sparse_weight, rows)).backward()
    dense_weight = weight.clone().requires_grad_(True)
    loss_of(lambda rows: dense_weight[rows]).backward()

    grad = sparse_weight.grad
    assert grad.is_sparse
    coalesced = grad.coalesce()
    assert torch.equal(coalesced.indices()[0], torch.unique(torch.cat([sampled, centers])))
    torch.testing.assert_close(coalesced.to_dense(), dense_weight.grad, atol=1e-14, rtol=0)


@pytest.mark.parametrize("rate", [0.5, 1.0])
def test_step_writes_its_logits_and_rows_into_the_last_steps_buffers(rate):
    """On CPU the margin head's backward hands its logits buffer (softmax, then gradient) and its gathered rows back
    for the next step, and lends the rows' gradient until the head step drops it (largefr.heads.spare): a step
    after the first two makes no new tensor of their sizes, and three steps give the same bits as three whose
    buffers are all new. (At rate 0.5 the sampled rows are 5 MB, four times the optimizer's 1 MB row blocks.)"""
    reused, fresh = quickstart_head(f"head.sample_rate={rate}"), quickstart_head(f"head.sample_rate={rate}")
    fresh.head.margin_head.spare.give = lambda *buffers: None  # nothing handed back or lent twice: every buffer new
    for seed in range(2):
        one_step(reused, seed)
        one_step(fresh, seed)
    margin_head = reused.head.margin_head
    sizes = allocation_sizes(lambda: one_step(reused, seed=2))
    one_step(fresh, seed=2)
    if rate < 1.0:  # nothing of the sample's size: its rows, their gradient (L_ali's rows added in place), logits
        rows_bytes = margin_head.num_sample * DIM * 4
        assert max(sizes) < rows_bytes / 4, (max(sizes), rows_bytes)
    else:  # the dense W gradient is new each step (it is W's size); the logits are not
        assert BATCH * CLASSES * 4 not in sizes, "the logits were written into a new buffer"
    for a, b in zip(reused.head.parameters(), fresh.head.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(margin_head.weight, fresh.head.margin_head.weight)
