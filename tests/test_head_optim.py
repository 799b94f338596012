"""Row-sparse head optimizers: unsampled rows untouched bit for bit, sampled rows follow torch.optim."""
import copy
import io

import pytest
import torch

from largefr.config import HeadConfig
from largefr.heads import RowSparseAdamW, RowSparseSGD, ShardedMarginHead
from largefr.heads import optim as optim_module
from largefr.heads.optim import write_rows_

CLASSES, DIM, BATCH, STEPS, BASE_LR = 200, 8, 8, 3, 0.1

OPTIMIZERS = {
    "sgd": (lambda p, **kw: RowSparseSGD(p, lr=BASE_LR, momentum=0.9, weight_decay=5e-3, **kw),
            lambda p: torch.optim.SGD(p, lr=BASE_LR, momentum=0.9, weight_decay=5e-3, foreach=False)),
    "sgd_nesterov": (lambda p, **kw: RowSparseSGD(p, lr=BASE_LR, momentum=0.9, weight_decay=5e-3, nesterov=True, **kw),
                     lambda p: torch.optim.SGD(p, lr=BASE_LR, momentum=0.9, weight_decay=5e-3, nesterov=True,
                                               foreach=False)),
    "adamw": (lambda p, **kw: RowSparseAdamW(p, lr=BASE_LR, betas=(0.8, 0.95), weight_decay=0.05, **kw),
              lambda p: torch.optim.AdamW(p, lr=BASE_LR, betas=(0.8, 0.95), weight_decay=0.05, foreach=False)),
}


def lr_at(step: int) -> float:
    return BASE_LR * 0.5 ** step  # changed every step through param_groups, as a scheduler would


def snapshot(head, optimizer):
    state = optimizer.state.get(head.weight, {})
    return head.weight.detach().clone(), {key: value.clone() for key, value in state.items()}


def train_three_steps(name):
    head = ShardedMarginHead(CLASSES, DIM, margin=HeadConfig(scale=16.0), sample_rate=0.3, dtype=torch.float64,
                             logits_dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    optimizer = OPTIMIZERS[name][0]([head.weight])
    data = torch.Generator().manual_seed(1)
    initial = head.weight.detach().clone()
    history = []
    for step in range(STEPS):
        optimizer.zero_grad()
        embeddings = torch.randn(BATCH, DIM, generator=data, dtype=torch.float64)
        head(embeddings, torch.randint(0, CLASSES, (BATCH,), generator=data)).backward()
        optimizer.param_groups[0]["lr"] = lr_at(step)
        before = snapshot(head, optimizer)
        grad = head.weight.grad.to_dense().clone()  # before the step, which consumes the gradient
        optimizer.step(head.last_sampled)
        history.append(dict(sampled=head.last_sampled.clone(), grad=grad, before=before,
                            after=snapshot(head, optimizer)))
    return head, optimizer, initial, history


def unsampled_mask(sampled: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(CLASSES, dtype=torch.bool)
    mask[sampled] = False
    return mask


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_unsampled_rows_and_state_stay_bit_identical(name):
    head, optimizer, initial, history = train_three_steps(name)
    never = unsampled_mask(torch.cat([h["sampled"] for h in history]))
    assert 10 < int(never.sum()) < CLASSES - 60, "the test needs rows that were never sampled"
    assert torch.equal(head.weight.detach()[never], initial[never])
    for key, value in optimizer.state[head.weight].items():
        assert torch.equal(value[never], torch.zeros_like(value[never])), key
    for entry in history:  # rows skipped in one step are unchanged across that step
        skipped = unsampled_mask(entry["sampled"])
        (w0, state0), (w1, state1) = entry["before"], entry["after"]
        assert torch.equal(w0[skipped], w1[skipped])
        for key in state0:
            assert torch.equal(state0[key][skipped], state1[key][skipped]), key


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_sampled_rows_follow_torch_optim_on_those_rows(name):
    head, optimizer, initial, history = train_three_steps(name)
    taken = torch.stack([~unsampled_mask(h["sampled"]) for h in history], dim=1)  # (rows, steps)
    patterns = {tuple(row.tolist()) for row in taken}
    assert len(patterns) >= 5, "rows should be sampled in varied subsets of the steps"
    for pattern in patterns:
        rows = torch.nonzero((taken == torch.tensor(pattern)).all(dim=1)).squeeze(1)
        param = initial[rows].clone().requires_grad_(True)
        reference = OPTIMIZERS[name][1]([param])
        for step in (s for s in range(STEPS) if pattern[s]):
            reference.param_groups[0]["lr"] = lr_at(step)
            param.grad = history[step]["grad"][rows]
            reference.step()
        torch.testing.assert_close(head.weight.detach()[rows], param.detach(), atol=1e-14, rtol=1e-13)
        state = optimizer.state[head.weight]
        assert torch.equal(state["step"][rows], torch.full_like(rows, sum(pattern)))
        for key, value in reference.state[param].items():
            if key != "step":
                torch.testing.assert_close(state[key][rows], value, atol=1e-14, rtol=1e-13)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_state_dict_round_trip_continues_identically(name):
    head, optimizer, _, history = train_three_steps(name)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    weight = torch.nn.Parameter(head.weight.detach().clone())
    resumed = OPTIMIZERS[name][0]([weight])
    resumed.load_state_dict(torch.load(buffer))
    assert resumed.state[weight]["step"].dtype == torch.long
    rows = history[0]["sampled"]
    for param, opt in ((head.weight, optimizer), (weight, resumed)):
        param.grad = history[1]["grad"].clone()
        opt.step(rows)
    assert torch.equal(weight.detach(), head.weight.detach())
    for key, value in optimizer.state[head.weight].items():
        assert torch.equal(resumed.state[weight][key], value), key


def test_bad_rows_and_resharded_state_are_reported():
    weight = torch.nn.Parameter(torch.zeros(5, 2))
    weight.grad = torch.ones(5, 2)
    optimizer = RowSparseSGD([weight], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="got no rows: pass step\\(rows=head.last_sampled\\)"):
        optimizer.step()
    with pytest.raises(ValueError, match="rows must be sorted, unique and inside \\[0, 5\\)"):
        optimizer.step(torch.tensor([3, 1]))
    optimizer.step(torch.tensor([1, 3]))
    state = copy.deepcopy(optimizer.state_dict())
    other = RowSparseSGD([torch.nn.Parameter(torch.zeros(4, 2))], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="has 5 rows but the parameter has 4: re-split"):
        other.load_state_dict(state)


def gathered_reference_step(name: str, weight: torch.Tensor, grad: torch.Tensor, state: dict, rows: torch.Tensor,
                            lr: float) -> None:
    """The row update as the first implementation wrote it: gather the rows, update the copies, scatter back."""
    w, g = weight.index_select(0, rows), grad.index_select(0, rows)
    if name.startswith("sgd"):
        g = g.add(w, alpha=5e-3)
        buf = state["momentum_buffer"].index_select(0, rows).mul_(0.9).add_(g)
        buf = torch.where((state["step"].index_select(0, rows) == 0).unsqueeze(1), g, buf)
        state["momentum_buffer"].index_copy_(0, rows, buf)
        w.add_(g.add(buf, alpha=0.9) if name == "sgd_nesterov" else buf, alpha=-lr)
        state["step"].index_add_(0, rows, torch.ones_like(rows))
    else:
        w.mul_(1 - lr * 0.05)
        exp_avg = state["exp_avg"].index_select(0, rows).lerp_(g, 1 - 0.8)
        exp_avg_sq = state["exp_avg_sq"].index_select(0, rows).mul_(0.95).addcmul_(g, g, value=1 - 0.95)
        state["step"].index_add_(0, rows, torch.ones_like(rows))
        step = state["step"].index_select(0, rows).to(torch.float64)
        step_size = (lr / (1 - torch.pow(0.8, step))).to(w.dtype).unsqueeze(1)
        correction2_sqrt = torch.sqrt(1 - torch.pow(0.95, step)).to(w.dtype).unsqueeze(1)
        w.sub_(exp_avg.div((exp_avg_sq.sqrt() / correction2_sqrt).add_(1e-8)).mul_(step_size))
        state["exp_avg"].index_copy_(0, rows, exp_avg)
        state["exp_avg_sq"].index_copy_(0, rows, exp_avg_sq)
    weight.index_copy_(0, rows, w)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("rate", [1.0, 0.3])
@pytest.mark.parametrize("block_rows", [None, 7])
@pytest.mark.parametrize("forward_copy", [False, True])
def test_row_updates_are_bit_identical_to_the_gathered_reference(name, rate, block_rows, forward_copy, monkeypatch):
    """In place at rate 1.0 (every row), gathered below it: the same bits as gather-update-scatter, float32;
    also when the update goes block by block (7 rows per block: blocks of consecutive rows updated in place,
    others gathered), and when the weight's rows are read from the forward's copy (`head.last_gathered`)."""
    if block_rows is not None:
        monkeypatch.setattr(optim_module, "BLOCK_ELEMENTS_CPU", block_rows * DIM)
    head = ShardedMarginHead(CLASSES, DIM, margin=HeadConfig(scale=16.0), sample_rate=rate,
                             generator=torch.Generator().manual_seed(0))
    optimizer = OPTIMIZERS[name][0]([head.weight])
    weight = head.weight.detach().clone()
    state = {key: value.clone() for key, value in optimizer._init_state(head.weight, optimizer.param_groups[0]).items()}
    data = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        optimizer.zero_grad()
        head(torch.randn(BATCH, DIM, generator=data), torch.randint(0, CLASSES, (BATCH,), generator=data)).backward()
        optimizer.param_groups[0]["lr"] = lr_at(step)
        grad = head.weight.grad.to_dense().clone()  # the step consumes the gradient
        copy_used = forward_copy and rate < 1.0
        assert (head.last_gathered is not None) == (rate < 1.0)
        optimizer.step(head.last_sampled, gathered=head.last_gathered if forward_copy else None)
        if copy_used:  # it was read (and updated in place): taken once
            assert head.last_gathered.of(head.weight, head.last_sampled) is None
        gathered_reference_step(name, weight, grad, state, head.last_sampled, lr_at(step))
    assert torch.equal(head.weight.detach(), weight)
    for key, value in state.items():
        assert torch.equal(optimizer.state[head.weight][key], value), key


def test_the_forward_copy_of_the_rows_is_read_only_while_it_holds_them():
    """`GatheredRows.of` gives the forward's copy of W's rows only for the same weight and rows, while neither the
    weight nor the copy was written, and before the head's next forward (which may write the copy's memory: a
    spare buffer). A step given a stale copy updates from the weight itself: the same bits as without it."""
    head = ShardedMarginHead(CLASSES, DIM, margin=HeadConfig(scale=16.0), sample_rate=0.3,
                             generator=torch.Generator().manual_seed(0))
    optimizer = OPTIMIZERS["sgd"][0]([head.weight])
    data = torch.Generator().manual_seed(1)

    def forward():
        optimizer.zero_grad()
        head(torch.randn(BATCH, DIM, generator=data), torch.randint(0, CLASSES, (BATCH,), generator=data)).backward()
        return head.last_gathered, head.last_sampled

    record, rows = forward()
    assert torch.equal(record.of(head.weight, rows), head.weight.detach()[rows])
    assert torch.equal(record.of(head.weight, rows.clone()), head.weight.detach()[rows])  # equal rows, another tensor
    assert record.of(head.weight, rows[1:]) is None
    assert record.of(torch.nn.Parameter(head.weight.detach().clone()), rows) is None
    with torch.no_grad():
        head.weight[rows[:1]] += 1.0  # the weight written since the gather
    assert record.of(head.weight, rows) is None
    weight, state = head.weight.detach().clone(), {key: value.clone() for key, value in
                                                    optimizer._init_state(head.weight, optimizer.param_groups[0]).items()}
    grad = head.weight.grad.to_dense().clone()
    optimizer.step(rows, gathered=record)  # stale: read from the weight, as the reference does
    gathered_reference_step("sgd", weight, grad, state, rows, BASE_LR)
    assert torch.equal(head.weight.detach(), weight)

    record, rows = forward()
    record.values[0, 0] += 1.0  # the copy written since the gather
    assert record.of(head.weight, rows) is None
    record, rows = forward()
    forward()  # the next forward (a second micro-batch) may write the copy's memory
    assert record.of(head.weight, rows) is None and record.values is None


def test_optimizer_bench_tool_times_both_optimizers(tmp_path, capsys):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "bench_head_optimizer.py"
    spec = importlib.util.spec_from_file_location("bench_head_optimizer", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "bench.json"
    assert tool.main(["--rows", "300", "--embedding-size", "16", "--repeats", "2", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert [(r["optimizer"], r["sample_rate"]) for r in results] == [("sgd", 1.0), ("sgd", 0.1), ("adamw", 1.0),
                                                                       ("adamw", 0.1)]
    assert all(r["row_sparse_ms"] > 0 and r["torch_ms"] > 0 for r in results)
    assert "| sgd | 1.0 |" in capsys.readouterr().out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.int64, torch.bool])
def test_write_rows_is_index_copy_bit_for_bit(dtype):
    generator = torch.Generator().manual_seed(3)
    tensor = (torch.randn(1000, 7, generator=generator) * 100).to(dtype)
    rows = torch.randperm(1000, generator=generator)[:300].sort().values
    values = (torch.randn(300, 7, generator=generator) * 100).to(dtype)
    expected = tensor.clone().index_copy_(0, rows, values)
    version = tensor._version
    write_rows_(tensor, rows, values)
    assert torch.equal(tensor.view(-1).view(torch.uint8), expected.view(-1).view(torch.uint8))
    assert tensor._version > version  # a write through NumPy moves the counter as index_copy_ does
    vector = torch.arange(1000).to(dtype)  # 1-D state (per-row counts) too
    write_rows_(vector, rows, values[:, 0])
    assert torch.equal(vector, torch.arange(1000).to(dtype).index_copy_(0, rows, values[:, 0]))
