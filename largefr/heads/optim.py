"""Optimizers for row-sharded heads that update only the rows sampled in the last step (Partial FC).

A row that was not sampled keeps its weight and its whole optimizer state bit-identical: no
weight decay, no momentum, no step count. Each row behaves as its own optimizer that only steps
when sampled, so Adam's bias correction uses a per-row step count (a row sampled k times has step k).

State is kept per parameter as tensors aligned with the weight rows (`step`: (rows,) int64,
`momentum_buffer` / `exp_avg` / `exp_avg_sq`: (rows, d)), so a checkpoint can be re-split by class
range together with the rows. The rows to update are an argument, `step(rows=head.last_sampled)`;
with gradient accumulation over several forwards, pass the union of the sampled rows (the trainer
passes the union of its micro-batches' `HeadLoss.rows`).
`param_groups[i]['lr']` is read at every step, so LR schedulers work as with torch optimizers.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch


class RowSparseOptimizer(torch.optim.Optimizer):
    """Shared row selection, validation and checkpoint handling; subclasses update gathered rows."""

    def _update_rows(self, param: torch.Tensor, rows: torch.Tensor, group: dict, state: dict) -> None:
        raise NotImplementedError

    def _init_state(self, param: torch.Tensor, group: dict) -> dict:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, rows: torch.Tensor | None = None, closure: Callable[[], Any] | None = None) -> Any:
        """Update `rows` (sorted unique row indices) of every parameter."""
        if callable(rows):
            raise TypeError(f"{type(self).__name__}.step takes rows first; pass a closure as closure=...")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rows = self._resolve_rows(rows)
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise ValueError(f"{type(self).__name__} needs dense gradients (rows that were not "
                                     "sampled simply have zero gradient)")
                self._check_rows(rows, param)
                state = self.state[param]
                if not state:
                    state.update(self._init_state(param, group))
                self._update_rows(param, rows.to(param.device), group, state)
        return loss

    def _resolve_rows(self, rows: torch.Tensor | None) -> torch.Tensor:
        if rows is None:
            raise ValueError(f"{type(self).__name__}.step() got no rows: pass step(rows=head.last_sampled) "
                             "(after a forward pass)")
        return rows

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

    def _update_rows(self, param: torch.Tensor, rows: torch.Tensor, group: dict, state: dict) -> None:
        weight = param.index_select(0, rows)
        grad = param.grad.index_select(0, rows)
        if group["weight_decay"] != 0:
            grad = grad.add(weight, alpha=group["weight_decay"])
        momentum = group["momentum"]
        if momentum != 0:
            buffer = state["momentum_buffer"].index_select(0, rows)
            buffer.mul_(momentum).add_(grad, alpha=1 - group["dampening"])
            # torch.optim.SGD starts a buffer as a copy of the first gradient (no dampening)
            first_step = (state["step"].index_select(0, rows) == 0).unsqueeze(1)
            buffer = torch.where(first_step, grad, buffer)
            state["momentum_buffer"].index_copy_(0, rows, buffer)
            grad = grad.add(buffer, alpha=momentum) if group["nesterov"] else buffer
        weight.add_(grad, alpha=-group["lr"])
        param.index_copy_(0, rows, weight)
        state["step"].index_add_(0, rows, torch.ones_like(rows))


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

    def _update_rows(self, param: torch.Tensor, rows: torch.Tensor, group: dict, state: dict) -> None:
        lr, (beta1, beta2) = group["lr"], group["betas"]
        weight = param.index_select(0, rows)
        grad = param.grad.index_select(0, rows)
        weight.mul_(1 - lr * group["weight_decay"])
        exp_avg = state["exp_avg"].index_select(0, rows).lerp_(grad, 1 - beta1)
        exp_avg_sq = state["exp_avg_sq"].index_select(0, rows).mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        state["step"].index_add_(0, rows, torch.ones_like(rows))
        step = state["step"].index_select(0, rows).to(torch.float64)
        # bias corrections per row, in float64 like torch's Python-float arithmetic
        step_size = (lr / (1 - torch.pow(beta1, step))).to(param.dtype).unsqueeze(1)
        correction2_sqrt = torch.sqrt(1 - torch.pow(beta2, step)).to(param.dtype).unsqueeze(1)
        denom = (exp_avg_sq.sqrt() / correction2_sqrt).add_(group["eps"])
        weight.sub_(exp_avg.div(denom).mul_(step_size))
        param.index_copy_(0, rows, weight)
        state["exp_avg"].index_copy_(0, rows, exp_avg)
        state["exp_avg_sq"].index_copy_(0, rows, exp_avg_sq)
