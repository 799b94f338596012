"""Optimizers for row-sharded heads that update only the rows sampled in the last step (Partial FC).

A row that was not sampled keeps its weight and its whole optimizer state bit-identical: no
weight decay, no momentum, no step count. Each row behaves as its own optimizer that only steps
when sampled, so Adam's bias correction uses a per-row step count (a row sampled k times has step k).

State is kept per parameter as tensors aligned with the weight rows (`step`: (rows,) int64,
`momentum_buffer` / `exp_avg` / `exp_avg_sq`: (rows, d)), so a checkpoint can be re-split by class
range together with the rows. The rows to update are an argument, `step(rows=head.last_sampled)`;
with gradient accumulation over several forwards, pass the union of the sampled rows (the trainer
passes the union of its micro-batches' `HeadLoss.rows`). `step(gathered=...)` takes the weight's rows as the
forward gathered them (`HeadLoss.gathered`), read instead of gathering them again while they are still those rows.
`param_groups[i]['lr']` is read at every step, so LR schedulers work as with torch optimizers.
A step consumes the gradient (RowSparseSGD adds the weight decay into it in place, sparing a temporary of
the rows' size); the head step zeroes the gradients right after it.

Storage precision (head.weight_dtype, `largefr.heads.precision`): the state is created in the parameter's dtype.
With a bfloat16 parameter, each block of rows (and its gradient) is read and upcast to float32, updated in
float32, and written back stochastically rounded, so updates below bfloat16's spacing (weight decay, Adam's
second-moment decay) survive on average; the per-row `step` stays int64. Float32 storage: no copy, no rounding.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from largefr.heads.precision import round_to_storage, rounding_keys, upcast
from largefr.heads.row_gradient import (GatheredRows, coalesce_row_gradient_, row_gradient_rows,
                                       row_gradient_values)
from largefr.stateful import EntryNote, Kind, RestoreContext, State


class RowSparseOptimizer(torch.optim.Optimizer):
    """Shared row selection, validation and checkpoint handling; subclasses update the selected rows.

    A parameter's gradient is dense (every row; `rows` names the ones to step) or a sparse row gradient
    (`largefr.heads.row_gradient`: its rows are the ones to step, and `rows`, when given, must name the same).
    """

    def _update_rows(self, param: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor, group: dict,
                     state: dict, gathered: torch.Tensor | None) -> None:
        """Step `rows` of `param`; `grad` holds their gradients, (len(rows), d), in the same order, and `gathered`
        (when not None) their current values, read instead of param[rows] and updated in place."""
        raise NotImplementedError

    def _init_state(self, param: torch.Tensor, group: dict) -> dict:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, rows: torch.Tensor | None = None, closure: Callable[[], Any] | None = None, *,
             gathered: GatheredRows | None = None) -> Any:
        """Update `rows` (sorted unique row indices) of every parameter; `gathered`: a parameter's rows as the
        forward gathered them, used when they are this step's rows and still current (`GatheredRows.of`)."""
        if callable(rows):
            raise TypeError(f"{type(self).__name__}.step takes rows first; pass a closure as closure=...")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                param_rows, grad = self._rows_and_gradient(param, rows)
                state = self.state[param]
                if not state:
                    state.update(self._init_state(param, group))
                current = None if gathered is None else gathered.of(param, param_rows)
                self._update_rows(param, param_rows, grad, group, state, current)
        return loss

    def _rows_and_gradient(self, param: torch.Tensor, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows to step, their gradients): from a sparse row gradient itself, or `rows` of a dense one."""
        if param.grad.is_sparse:
            coalesce_row_gradient_(param)
            grad_rows = row_gradient_rows(param.grad)
            if rows is not None and not torch.equal(rows.to(grad_rows.device), grad_rows):
                raise ValueError(f"{type(self).__name__}.step: rows differ from the rows of the parameter's sparse "
                                 "gradient; pass the HeadLoss rows of the same forward (or no rows)")
            return grad_rows, row_gradient_values(param.grad)
        if rows is None:
            raise ValueError(f"{type(self).__name__}.step() got no rows: pass step(rows=head.last_sampled) "
                             "(after a forward pass)")
        self._check_rows(rows, param)
        rows = rows.to(param.device)
        return rows, _SelectedRows(rows, param).read(param.grad)

    @staticmethod
    def _check_rows(rows: torch.Tensor, param: torch.Tensor) -> None:
        if rows.dim() != 1 or rows.dtype != torch.long:
            raise ValueError(f"rows must be a 1-D int64 tensor, got shape {tuple(rows.shape)} dtype {rows.dtype}")
        if rows.numel() == 0:
            return
        outside = (rows[0] < 0) | (rows[-1] >= param.shape[0]) | (rows[1:] <= rows[:-1]).any()
        message = (f"rows must be sorted, unique and inside [0, {param.shape[0]}) (the parameter's rows); "
                   "use head.last_sampled")
        if rows.device.type != "cpu":  # no host sync per step: asserted on the device (a failure ends the process)
            torch._assert_async(~outside, message)
        elif bool(outside):
            raise ValueError(message)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for param, state in self.state.items():
            if "step" in state:  # torch leaves 'step' where it was saved; it must sit with the rows
                state["step"] = state["step"].to(device=param.device, dtype=torch.long)
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape[:1] != param.shape[:1]:
                    raise ValueError(f"optimizer state '{key}' has {value.shape[0]} rows but the parameter has "
                                     f"{param.shape[0]}: re-split the head checkpoint by class range first")

    # ---- checkpoint (largefr/stateful.py) -----------------------------------------------------------------
    def _row_parameter(self) -> torch.Tensor:
        params = [param for group in self.param_groups for param in group["params"]]
        if len(params) != 1:
            raise ValueError(f"{type(self).__name__} checkpoints the per-row state of one row-sharded parameter "
                             f"(the classifier's W); it has {len(params)}")
        return params[0]

    def checkpoint_state(self) -> State:
        """The per-row state, `optim.<key>` (dim 0: the parameter's rows). Before the first step: what the first
        step creates, on the meta device (nothing to write; a restore creates what the checkpoint holds)."""
        param = self._row_parameter()
        state = self.state.get(param) or self._init_state(torch.empty_like(param, device="meta"),
                                                          self.param_groups[0])
        return {Kind.ROWS: {f"{ROW_STATE_PREFIX}{key}": value for key, value in state.items()}}

    def restore_checkpoint_state(self, state: State, context: RestoreContext) -> None:
        """Adopt the restored rows (filled in place, or created by the restore) as the parameter's state."""
        rows = state.get(Kind.ROWS, {})
        if rows:
            self.state[self._row_parameter()] = {name.removeprefix(ROW_STATE_PREFIX): tensor
                                                 for name, tensor in rows.items()}

    @staticmethod
    def checkpoint_note(name: str) -> EntryNote | None:
        if name.startswith(ROW_STATE_PREFIX):
            return EntryNote("the head optimizer's per-row state", "optim.name; optim.momentum under SGD")
        return None


ROW_STATE_PREFIX = "optim."
"""Checkpoint names of the per-row state: `optim.<state key>`."""


class RowSparseSGD(RowSparseOptimizer):
    """torch.optim.SGD semantics (momentum, dampening, nesterov, weight_decay) on the selected rows only."""

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 dampening: float = 0.0, nesterov: bool = False):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"lr={lr}, momentum={momentum}, weight_decay={weight_decay} must all be >= 0")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov=True needs momentum > 0 and dampening = 0")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, dampening=dampening,
                        nesterov=nesterov)
        super().__init__(params, defaults)

    def _init_state(self, param: torch.Tensor, group: dict) -> dict:
        state = {"step": torch.zeros(param.shape[0], dtype=torch.long, device=param.device)}
        if group["momentum"] != 0:
            state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state

    def _update_rows(self, param: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor, group: dict,
                     state: dict, gathered: torch.Tensor | None) -> None:
        for block in row_blocks(rows, param):
            self._update_block(param, _SelectedRows(rows[block], param, state["step"]), upcast(grad[block]), group,
                               state, None if gathered is None else gathered[block])
        _SelectedRows(rows, param).count_step(state["step"])

    @staticmethod
    def _update_block(param: torch.Tensor, selected: "_SelectedRows", grad: torch.Tensor, group: dict,
                      state: dict, gathered: torch.Tensor | None) -> None:
        weight = selected.read(param, gathered)
        if group["weight_decay"] != 0:
            grad = grad.add_(weight, alpha=group["weight_decay"])  # in place: the step consumes the gradient
        momentum = group["momentum"]
        if momentum != 0:
            buffer = selected.read(state["momentum_buffer"])
            buffer.mul_(momentum).add_(grad, alpha=1 - group["dampening"])
            if group["dampening"] != 0:
                # torch.optim.SGD starts a buffer as a copy of the first gradient (no dampening). Without
                # dampening the line above already gives it: a row never stepped has a zero buffer.
                first_step = (selected.read(state["step"]) == 0).unsqueeze(1)
                buffer.copy_(torch.where(first_step, grad, buffer))
            selected.write(state["momentum_buffer"], buffer)
            grad = grad.add(buffer, alpha=momentum) if group["nesterov"] else buffer
        weight.add_(grad, alpha=-group["lr"])
        selected.write(param, weight)


class RowSparseAdamW(RowSparseOptimizer):
    """torch.optim.AdamW semantics (decoupled weight decay) on the selected rows, per-row step counts."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr={lr}, eps={eps}, weight_decay={weight_decay} must all be >= 0")
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"betas={betas} must be in [0, 1)")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)

    def _init_state(self, param: torch.Tensor, group: dict) -> dict:
        return {"step": torch.zeros(param.shape[0], dtype=torch.long, device=param.device),
                "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format)}

    def _update_rows(self, param: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor, group: dict,
                     state: dict, gathered: torch.Tensor | None) -> None:
        _SelectedRows(rows, param).count_step(state["step"])
        for block in row_blocks(rows, param):
            self._update_block(param, _SelectedRows(rows[block], param, state["step"]), upcast(grad[block]), group,
                               state, None if gathered is None else gathered[block])

    @staticmethod
    def _update_block(param: torch.Tensor, selected: "_SelectedRows", grad: torch.Tensor, group: dict,
                      state: dict, gathered: torch.Tensor | None) -> None:
        lr, (beta1, beta2) = group["lr"], group["betas"]
        weight = selected.read(param, gathered)
        weight.mul_(1 - lr * group["weight_decay"])
        exp_avg = selected.read(state["exp_avg"]).lerp_(grad, 1 - beta1)
        exp_avg_sq = selected.read(state["exp_avg_sq"]).mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = selected.read(state["step"]).to(torch.float64)
        # bias corrections per row, in float64 like torch's Python-float arithmetic
        step_size = (lr / (1 - torch.pow(beta1, step))).to(weight.dtype).unsqueeze(1)
        correction2_sqrt = torch.sqrt(1 - torch.pow(beta2, step)).to(weight.dtype).unsqueeze(1)
        denom = exp_avg_sq.sqrt().div_(correction2_sqrt).add_(group["eps"])
        weight.sub_(torch.div(exp_avg, denom, out=denom).mul_(step_size))  # one temporary, reused
        selected.write(param, weight)
        selected.write(state["exp_avg"], exp_avg)
        selected.write(state["exp_avg_sq"], exp_avg_sq)


BLOCK_ELEMENTS_CPU = 1 << 18
"""Elements per tensor of one block on CPU (1 MiB of float32): the block's rows of the weight, its state and its
gradient stay in cache between the gather, the update's passes and the write-back."""
BLOCK_ELEMENTS_GPU = 1 << 24
"""On a GPU kernel launches, not cache, cost: blocks of 64 MiB of float32 (a few launches per 10^5 rows of 512),
which bound the gathered copies of a step at ten million classes to a few blocks instead of the whole sample."""


def block_elements(device: torch.device) -> int:
    """Elements per tensor of one block of a row update on `device` (`row_blocks`)."""
    return BLOCK_ELEMENTS_CPU if device.type == "cpu" else BLOCK_ELEMENTS_GPU


def row_blocks(rows: torch.Tensor, param: torch.Tensor) -> list[slice]:
    """Consecutive slices of `rows` to update one after the other, `block_elements` each. Element for element the
    arithmetic is the same whatever the blocks."""
    count = rows.numel()
    per_block = max(1, block_elements(param.device) // max(1, param[0].numel()))
    return [slice(start, min(start + per_block, count)) for start in range(0, count, per_block)] or [slice(0, 0)]


class _SelectedRows:
    """The stepped rows of tensors aligned with a parameter's rows (the parameter, its state).

    Consecutive rows (sample rate 1.0, where every row is stepped, or a block of such rows): views of the
    tensors, updated in place, no copies. Other rows: gathered copies, written back by index. The arithmetic is
    the same either way, so both give the same bits. Half-precision tensors are read as float32 copies and
    written back stochastically rounded, keyed by the rows' step counts `step_counts` (`largefr.heads.precision`).
    """

    def __init__(self, rows: torch.Tensor, param: torch.Tensor, step_counts: torch.Tensor | None = None):
        self.rows = rows
        self.span = _consecutive_span(rows, param)
        self.step_counts = step_counts
        self.writes = 0  # salts the rounding of each tensor written, in the fixed order of the update

    def read(self, tensor: torch.Tensor, gathered: torch.Tensor | None = None) -> torch.Tensor:
        """The rows of `tensor`: a view of a span, else `gathered` (these rows of it, copied already) or a gather."""
        if self.span is not None:
            return upcast(tensor[self.span])
        return upcast(gathered if gathered is not None else tensor.index_select(0, self.rows))

    def write(self, tensor: torch.Tensor, rows_value: torch.Tensor) -> None:
        if rows_value.dtype != tensor.dtype:  # half-precision storage: rows_value is a float32 copy
            self.writes += 1
            keys = rounding_keys(self.rows, self.read(self.step_counts), self.writes)
            rows_value = round_to_storage(rows_value, tensor, keys)
            if self.span is not None:
                tensor[self.span].copy_(rows_value)
                return
        if self.span is None:
            write_rows_(tensor, self.rows, rows_value)

    def count_step(self, step: torch.Tensor) -> None:
        if self.span is not None:
            step[self.span].add_(1)
        else:
            step.index_add_(0, self.rows, torch.ones_like(self.rows))


_INTEGER_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def write_rows_(tensor: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
    """tensor[rows] = values (rows unique), bit for bit.

    On CPU through NumPy's indexed assignment on integer views of the same bytes, which copies each row whole:
    57 ms for 500,000 scattered rows of 128 float32 on the 2-core dev machine, against 97 ms for `index_copy_`
    (`index_put_` and `scatter_` alike), a cost only sampled rows pay (docs/PERFORMANCE.md).
    """
    if tensor.device.type != "cpu" or not (tensor.is_contiguous() and values.is_contiguous()) \
            or tensor.element_size() not in _INTEGER_OF_SIZE or values.dtype != tensor.dtype:
        tensor.index_copy_(0, rows, values)
        return
    as_integer = _INTEGER_OF_SIZE[tensor.element_size()]
    tensor.detach().view(as_integer).numpy()[rows.numpy()] = values.detach().view(as_integer).numpy()
    torch.autograd.graph.increment_version(tensor)  # a write torch did not see: its version counter moves as for one


def _consecutive_span(rows: torch.Tensor, param: torch.Tensor) -> slice | None:
    """rows (sorted, unique, inside) as a slice when they are consecutive: all of the parameter's rows, or on CPU
    any run (last - first = count - 1; reading two values there costs no device synchronisation)."""
    count = rows.numel()
    if count == param.shape[0]:
        return slice(0, count)
    if count == 0 or rows.device.type != "cpu":
        return None
    first = int(rows[0])
    return slice(first, first + count) if int(rows[-1]) - first == count - 1 else None
