"""Starting from what users already have: pretrained backbone weights (model.init_from) and a head
warm-started from the class means of the loaded backbone (head.init = 'class_mean').

`load_init_weights` reads an insightface `backbone.pth`, a largefr `model.pt` (tools/export_backbone.py)
or a largefr checkpoint (its backbone only: the classifier may have another number of classes) and
refuses anything that does not fit the configured network exactly, naming the file and the keys.
Every rank reads the file itself and the ranks agree on the outcome, so a problem met by one rank
stops every rank with a message.

`class_mean_warm_start` runs the loaded backbone once over the training data, each rank over its
shard. Each batch's normalized embeddings are gathered (as the head's forward gathers them), and
every rank sums those of its own classes only: memory is num_local x d per rank, as the head's. A
class's mean embedding, normalized, becomes its W row (weight imprinting) and its cluster-bank
center; its spread gives phi (Eq. 1), so the cluster-guided margin and the cluster losses work from
step 1 instead of after the feature queue has filled.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from largefr.checkpoint.backbone import WeightsError, backbone_weights
from largefr.distributed.collectives import all_gather_rows, all_reduce_sum_
from largefr.distributed.partition import ClassPartition
from largefr.errors import UserError
from largefr.eval.weights import compare_state_dict, embedding_size_of, infer_network
from largefr.heads.margins import NORM_EPS

logger = logging.getLogger(__name__)

INIT_FROM_KINDS = "an insightface backbone.pth, a largefr model.pt (tools/export_backbone.py) or a largefr checkpoint"


class InitFromError(UserError, RuntimeError):
    """model.init_from cannot be read or does not fit model.network; the message names the file and keys."""


def read_init_weights(path: str) -> tuple[dict[str, torch.Tensor], str]:
    """(backbone state_dict, the file or checkpoint folder it came from) of model.init_from."""
    where = f"model.init_from={path}"
    if not os.path.exists(path):
        raise InitFromError(f"{where}: no such file or folder; give {INIT_FROM_KINDS}")
    try:
        return backbone_weights(path)
    except WeightsError as error:
        raise InitFromError(f"{where}: {error}") from None


def fit_problem(backbone: nn.Module, state: dict[str, torch.Tensor], *, network: str, embedding_size: int,
                source: str) -> str | None:
    """Why `state` cannot be loaded into `backbone` as it is (keys named), or None."""
    mismatch = compare_state_dict(backbone, state)
    if mismatch.ok:
        return None
    try:
        saved_size = embedding_size_of(state)
        guess = infer_network(state, saved_size)
    except Exception:  # noqa: BLE001 - only a hint; the mismatch itself is the error
        saved_size, guess = None, None
    hint = ""
    if guess is not None:
        hint = f"; the file holds a {guess} with embedding size {saved_size}: set model.network={guess}"
        hint += f" model.embedding_size={saved_size}" if saved_size != embedding_size else ""
    return (f"model.init_from={source}: the weights do not fit model.network={network} with "
            f"model.embedding_size={embedding_size}: {mismatch.describe()}{hint}. Nothing was loaded")


def load_init_weights(backbone: nn.Module, path: str, *, network: str, embedding_size: int, group=None,
                      device: torch.device | str = "cpu") -> str:
    """Load model.init_from into `backbone` on every rank, or raise InitFromError on every rank; the source."""
    error, source = None, path
    try:
        state, source = read_init_weights(path)
        error = fit_problem(backbone, state, network=network, embedding_size=embedding_size, source=source)
        if error is None:
            backbone.load_state_dict(state)
    except InitFromError as failure:
        error = str(failure)
    _raise_on_every_rank(error, f"model.init_from={path}", group, device)
    return source


def _raise_on_every_rank(error: str | None, what: str, group, device) -> None:
    """Every rank raises when any rank failed (a file only one node cannot read stops them all)."""
    if torch.distributed.is_initialized():
        failed = torch.tensor([0.0 if error is None else 1.0], device=device)
        torch.distributed.all_reduce(failed, group=group)
        if failed.item() > 0 and error is None:
            error = f"{what}: loading failed on another rank (see its error)"
    if error is not None:
        raise InitFromError(error)


# ---------------------------------------------------------------------------------------------
# class-mean warm start


@torch.no_grad()
def class_embedding_sums(backbone: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
                         partition: ClassPartition, dim: int, batch_size: int, group, device: torch.device,
                         num_batches: int, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of normalized embeddings, image count) of each class this rank owns, float64, over every rank's batches.

    Every rank must yield the same number of batches (padded to `batch_size` rows; label -1 pads).
    """
    sums = torch.zeros(partition.num_local, dim, dtype=torch.float64, device=device)
    counts = torch.zeros(partition.num_local, dtype=torch.float64, device=device)
    started, done = time.monotonic(), 0
    for images, labels in batches:
        dtype = next(backbone.parameters()).dtype  # a bf16/fp16 engine's module takes its own dtype
        features = F.normalize(backbone(images.to(device=device, dtype=dtype)).float(), dim=1)
        labels = labels.to(device=device, dtype=torch.long)
        pad = batch_size - features.shape[0]
        features = F.pad(features, (0, 0, 0, pad))
        labels = F.pad(labels, (0, pad), value=-1)
        all_features, all_labels = all_gather_rows(features, group), all_gather_rows(labels, group)
        mine = (all_labels >= partition.start) & (all_labels < partition.end)
        local = all_labels[mine] - partition.start
        sums.index_add_(0, local, all_features[mine].double())
        counts.index_add_(0, local, torch.ones_like(local, dtype=torch.float64))
        done += 1
        if progress and (done % max(1, num_batches // 10) == 0 or done == num_batches):
            rate = done * batch_size / max(time.monotonic() - started, 1e-9)
            print(f"head.init=class_mean: {done}/{num_batches} batches per rank ({rate:.0f} images/s per rank)",
                  file=sys.stderr, flush=True)
    return sums, counts


_ROWS_PER_BLOCK = 65536  # rows written per block: temporaries of a block, not of the shard


def class_means_and_phi(sums: torch.Tensor, counts: torch.Tensor, *, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalized mean, phi) of each class from its embedding sum and count (rows with count 0: zeros).

    phi_k = sum_i ||f_i - c_k|| / (n_k log(n_k + alpha)) of Eq. 1 with each distance replaced by the
    classes' root-mean-square distance sqrt(2 (1 - ||mean f||)), exact for unit f_i and c_k = the
    normalized mean, which one pass can compute (the mean distance needs c_k first); it is >= the mean
    distance, equal when the distances are equal.

    The means are computed in `sums`' own memory (it becomes the centers): at millions of classes a
    second num_local x d float64 copy would outweigh W itself.
    """
    centers = sums.div_(counts.clamp(min=1).unsqueeze(1))  # the mean, in place
    norm = centers.norm(dim=1)
    centers.div_(norm.clamp(min=NORM_EPS).unsqueeze(1))  # F.normalize's arithmetic, in place
    rms_distance = (2.0 * (1.0 - norm).clamp(min=0.0)).sqrt()
    phi = rms_distance / torch.log(counts + alpha)
    return centers, torch.where(counts > 0, phi, torch.zeros_like(phi))


@torch.no_grad()
def apply_class_means(head, centers: torch.Tensor, phi: torch.Tensor, counts: torch.Tensor, *,
                      row_norm: float) -> int:
    """W rows and bank rows of the classes with images; returns how many this rank set.

    W rows get norm `row_norm` (that of the random rows they replace, so the head's effective
    learning rate is unchanged; the logits use cos only). Written block by block.
    """
    seen = counts > 0
    weight = head.margin_head.weight
    bank = head.bank
    for start in range(0, seen.shape[0], _ROWS_PER_BLOCK):
        rows = slice(start, start + _ROWS_PER_BLOCK)
        block_seen = seen[rows]
        block_centers = centers[rows][block_seen]
        weight[rows][block_seen] = (block_centers * row_norm).to(weight.dtype)
        if bank is not None:
            bank.centers[rows][block_seen] = block_centers.to(bank.centers.dtype)
    if bank is not None:
        bank.phi[seen] = phi[seen].to(bank.phi.dtype)
        bank.has_phi[seen] = (counts[seen] > 1) & (phi[seen] > bank.degenerate_phi)
        bank.seen[seen] = True
        bank.queue_count[seen] = counts[seen].long()
    return int(seen.sum())


def class_mean_warm_start(head, backbone: nn.Module, loader, *, alpha: float, init_std: float, device: torch.device,
                          batch_size: int, progress: bool) -> dict[str, float]:
    """head.init='class_mean': one pass of `backbone` (eval mode) over `loader`; W and the bank set in place."""
    partition = head.partition
    dim = head.margin_head.weight.shape[1]
    was_training = backbone.training
    backbone.eval()
    try:
        sums, counts = class_embedding_sums(backbone, loader, partition=partition, dim=dim, batch_size=batch_size,
                                            group=head.group, device=device, num_batches=len(loader),
                                            progress=progress)
    finally:
        backbone.train(was_training)
    centers, phi = class_means_and_phi(sums, counts, alpha=alpha)
    set_rows = apply_class_means(head, centers, phi, counts, row_norm=init_std * math.sqrt(dim))
    totals = torch.tensor([float(set_rows), float(counts.sum())], dtype=torch.float64, device=device)
    all_reduce_sum_(totals, head.group)
    return {"classes": totals[0].item(), "images": totals[1].item(), "num_classes": float(partition.num_classes)}
