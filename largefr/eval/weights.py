"""Load a backbone for evaluation from a plain state_dict file or a largefr checkpoint directory.

`--weights model.pt`: a state_dict as insightface's `backbone.pth` or `tools/export_backbone.py`
write it (a DeepSpeed `mp_rank_00_model_states.pt` works too: its 'module' entry is used).
`--checkpoint DIR`: a checkpoint directory, or a run's checkpoint root (its latest complete step).
The network name and embedding size are inferred from the tensor names and shapes when not given;
a given network that does not fit the weights is refused, naming the mismatching keys.
Files are read with `torch.load(weights_only=True)`: nothing stored in them runs. Reading the weights is
the checkpoint room's (largefr/checkpoint/backbone.py); this module fits them to a network.
"""
from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from largefr.checkpoint.backbone import WeightsError, checkpoint_weights, read_weights_file
from largefr.models import NETWORK_NAMES, get_model

_SHOWN_KEYS = 6


@dataclass(kw_only=True)
class LoadedBackbone:
    model: nn.Module
    """The backbone in eval mode, on the requested device."""
    network: str
    embedding_size: int
    source: str
    """The file or checkpoint directory the weights came from."""
    device: torch.device

    def summary(self) -> dict[str, object]:
        """What a tool's JSON report says about the model it used."""
        return {"source": self.source, "network": self.network, "embedding_size": self.embedding_size}


@dataclass(kw_only=True)
class StateDictMismatch:
    missing: list[str]
    unexpected: list[str]
    wrong_shape: list[tuple[str, tuple[int, ...], tuple[int, ...]]]
    """(key, shape in the file, shape the network wants)."""

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.wrong_shape)

    def describe(self) -> str:
        parts = []
        for what, keys in (("missing", self.missing), ("unexpected", self.unexpected)):
            if keys:
                shown = ", ".join(keys[:_SHOWN_KEYS]) + (" ..." if len(keys) > _SHOWN_KEYS else "")
                parts.append(f"{len(keys)} {what} keys ({shown})")
        if self.wrong_shape:
            shown = ", ".join(f"{k}: file {list(a)} vs network {list(b)}" for k, a, b in self.wrong_shape[:_SHOWN_KEYS])
            parts.append(f"{len(self.wrong_shape)} keys of another shape ({shown})")
        return "; ".join(parts)


def embedding_size_of(state: Mapping[str, torch.Tensor]) -> int:
    """Width of the last 1-D tensor: every backbone here ends in a BatchNorm1d over the embedding."""
    vectors = [t for t in state.values() if t.dim() == 1]
    if not vectors:
        raise WeightsError("cannot infer the embedding size: the weights hold no 1-D tensor; pass --embedding-size")
    return int(vectors[-1].shape[0])


def compare_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> StateDictMismatch:
    """Keys and shapes of `state` against those `model` expects."""
    wanted = model.state_dict()
    wrong = [(k, tuple(state[k].shape), tuple(wanted[k].shape))
             for k in wanted if k in state and state[k].shape != wanted[k].shape]
    return StateDictMismatch(missing=[k for k in wanted if k not in state],
                             unexpected=[k for k in state if k not in wanted], wrong_shape=wrong)


# Input sides tried when inferring a network from its weights: the embedding layer's shape depends on
# the input side (112 is insightface's; smaller ones come from CPU runs such as the quickstart's 32).
IMAGE_SIZES = (112, 128, 96, 64, 48, 32)


def _meta_model(network: str, embedding_size: int, image_size: int = 112) -> nn.Module:
    with torch.device("meta"):
        return get_model(network, embedding_size=embedding_size, image_size=image_size)


@functools.lru_cache(maxsize=None)
def _meta_shapes(network: str, embedding_size: int, image_size: int = 112) -> dict[str, tuple[int, ...]]:
    """Key -> shape of `network`'s state_dict, built once per process (inference tries many networks)."""
    return {key: tuple(t.shape) for key, t in _meta_model(network, embedding_size, image_size).state_dict().items()}


def _fits(state: Mapping[str, torch.Tensor], network: str, embedding_size: int, image_size: int) -> bool:
    shapes = _meta_shapes(network, embedding_size, image_size)
    return shapes.keys() == state.keys() and all(tuple(state[key].shape) == shape for key, shape in shapes.items())


def infer_network_and_size(state: Mapping[str, torch.Tensor],
                           embedding_size: int | None = None) -> tuple[str, int] | None:
    """(network name, input side) whose parameter names and shapes equal those of `state`, or None."""
    size = embedding_size or embedding_size_of(state)
    # Names depend on neither the input side nor the embedding size: only networks named alike are tried.
    named_alike = [network for network in NETWORK_NAMES if _meta_shapes(network, 8).keys() == state.keys()]
    for image_size in IMAGE_SIZES:
        for network in named_alike:
            if _fits(state, network, size, image_size):
                return network, image_size
    return None


def infer_network(state: Mapping[str, torch.Tensor], embedding_size: int | None = None) -> str | None:
    """The network name whose parameter names and shapes equal those of `state`, or None."""
    found = infer_network_and_size(state, embedding_size)
    return found[0] if found else None


def _image_size_for(state: Mapping[str, torch.Tensor], network: str, size: int) -> int | None:
    """The input side at which `network` has the shapes of `state`, or None when none fits."""
    for image_size in IMAGE_SIZES:
        if _fits(state, network, size, image_size):
            return image_size
    return None


def _network_for(state: Mapping[str, torch.Tensor], network: str | None, size: int,
                 source: str) -> tuple[str, int]:
    """(network, input side): `network` if given (checked against `state`), else the one `state` fits."""
    if network is not None and network not in NETWORK_NAMES:
        raise WeightsError(f"unknown network {network!r}; valid choices: {', '.join(NETWORK_NAMES)}")
    if network is not None:
        image_size = _image_size_for(state, network, size)
        if image_size is not None:
            return network, image_size
        mismatch = compare_state_dict(_meta_model(network, size), state)
        guess = infer_network(state, size)
        hint = f"; they fit --network {guess}" if guess is not None else ""
        raise WeightsError(f"{source}: weights do not fit network {network!r} (embedding size {size}): "
                           f"{mismatch.describe()}{hint}")
    found = infer_network_and_size(state, size)
    if found is None:
        raise WeightsError(f"{source}: the weights fit none of the networks {', '.join(NETWORK_NAMES)} with "
                           f"embedding size {size}; pass --network and --embedding-size to see which keys differ")
    return found


def build_backbone(state: Mapping[str, torch.Tensor], *, source: str, network: str | None = None,
                   embedding_size: int | None = None, device: torch.device | str = "cpu") -> LoadedBackbone:
    """The backbone that `state` fits (or `network`, checked), weights loaded, in eval mode."""
    size = embedding_size or embedding_size_of(state)
    network, image_size = _network_for(state, network, size, source)
    model = get_model(network, embedding_size=size, image_size=image_size)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    device = torch.device(device)
    return LoadedBackbone(model=model.to(device).eval(), network=network, embedding_size=size, source=source,
                          device=device)


def load_backbone(*, weights: str | None = None, checkpoint: str | None = None, network: str | None = None,
                  embedding_size: int | None = None, device: torch.device | str = "cpu") -> LoadedBackbone:
    """Backbone from exactly one of `weights` (a state_dict file) or `checkpoint` (a directory)."""
    if (weights is None) == (checkpoint is None):
        raise WeightsError("give exactly one of --weights FILE or --checkpoint DIR")
    if weights is not None:
        state, source = read_weights_file(weights), weights
    else:
        state, source = checkpoint_weights(checkpoint)
    return build_backbone(state, source=source, network=network, embedding_size=embedding_size, device=device)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_model_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """--weights/--checkpoint, --network, --embedding-size, --device, --batch-size: shared by the eval tools
    (`required=False`: for a tool that embeds only when given images)."""
    source = parser.add_mutually_exclusive_group(required=required)
    source.add_argument("--weights", help="backbone state_dict file (insightface backbone.pth, export_backbone.py)")
    source.add_argument("--checkpoint", help="a run folder, its checkpoints/ folder or one step_<N> folder (latest complete step)")
    parser.add_argument("--network", choices=NETWORK_NAMES, default=None,
                        help="backbone name (default: inferred from the weights' names and shapes)")
    parser.add_argument("--embedding-size", type=int, default=None, help="default: inferred from the weights")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass, in this one process (default 64)")


def load_backbone_from_args(args: argparse.Namespace) -> LoadedBackbone:
    if args.batch_size < 1:
        raise WeightsError(f"--batch-size must be >= 1, got {args.batch_size}")
    return load_backbone(weights=args.weights, checkpoint=args.checkpoint, network=args.network,
                         embedding_size=args.embedding_size, device=args.device or default_device())
