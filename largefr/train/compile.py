"""train.compile and train.channels_last: how the backbone and the momentum encoder run, set once after the
engine is built (largefr/train/build.py calls `prepare_step_modules`).

Compile: the backbone through `DeepSpeedEngine.compile` (DeepSpeed 0.19.8 calls `nn.Module.compile` on
`engine.module`, in place: state_dict keys, checkpoints and exports are unchanged), the momentum encoder's
copy with `nn.Module.compile`. torch.compile is lazy: the graphs are compiled at the first step, so a
failure (no C++ compiler, no Triton, an operator the backend cannot lower) would surface in the middle of
the training loop. Both modules therefore compile through `EagerFallback`, a torch.compile backend that
runs the requested one and, if it raises, warns once and runs the captured graph eagerly from then on.
The backward graph is lowered together with the forward (AOTAutograd would otherwise defer it to the
first backward, outside the fallback's reach).

Channels-last: a forward pre-hook hands the convolutions NHWC images, the layout cuDNN's and oneDNN's
fastest kernels use (the weights stay as DeepSpeed flattened them; the kernels convert them per call).
A ViT has one convolution (the patch embedding), so the switch does little there.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import nn


class EagerFallback:
    """torch.compile backend: `backend`'s compiled graph, or the graph run eagerly once `backend` has failed."""

    def __init__(self, backend: str | Callable = "inductor") -> None:
        self.backend = backend
        self.failure: str | None = None

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list) -> Callable:
        if self.failure is not None:
            return graph.forward
        try:
            from torch._dynamo import lookup_backend
            from torch._functorch import config as functorch_config

            with functorch_config.patch(force_non_lazy_backward_lowering=True):
                return lookup_backend(self.backend)(graph, example_inputs)
        except Exception as error:  # noqa: BLE001 - any backend failure: the run goes on eagerly
            self.fail(error)
            return graph.forward

    def fail(self, error: BaseException) -> None:
        """Record the first failure and warn once; later graphs run eagerly without trying again."""
        if self.failure is None:
            self.failure = f"{type(error).__name__}: {error}".splitlines()[0][:500]
            warnings.warn(f"train.compile: torch.compile (backend {self.backend!r}) failed, the backbone runs "
                          f"eagerly: {self.failure}", RuntimeWarning, stacklevel=2)


def _to_channels_last(module: nn.Module, args: tuple) -> tuple:
    images = args[0]
    if images.dim() != 4:
        return args
    return (images.contiguous(memory_format=torch.channels_last), *args[1:])


def use_channels_last(module: nn.Module) -> None:
    """Give `module`'s forward NHWC images (what it returns is unchanged)."""
    module.register_forward_pre_hook(_to_channels_last)


def prepare_step_modules(engine, momentum_encoder: nn.Module | None, *, compile: bool, channels_last: bool,
                         backend: str | Callable = "inductor") -> EagerFallback | None:
    """Apply train.channels_last and train.compile to the engine's backbone and the momentum encoder's copy.

    Returns the fallback backend when compiling (its `failure` says whether it fell back), else None.
    """
    copies = [engine.module] + ([momentum_encoder.encoder] if momentum_encoder is not None else [])
    if channels_last:
        for module in copies:
            use_channels_last(module)
    if not compile:
        return None
    fallback = EagerFallback(backend)
    try:
        engine.compile(backend=fallback)
        if momentum_encoder is not None:
            momentum_encoder.encoder.compile(backend=fallback)
    except Exception as error:  # noqa: BLE001 - e.g. a torch without torch.compile: train eagerly
        fallback.fail(error)
    return fallback
