"""The paper's joint head: CG-ArcFace on the sharded classifier + cluster contrastive + aligning (Eq. 8).

One forward (docs/DESIGN.md section 5, "Order within a step"):
1. gather the global batch's labels, and its embeddings ONCE with autograd (shared by L_cg and L_con);
2. enqueue the global batch's momentum features, update this rank's bank shard and phi
   (every class of the batch then has a center);
3. lambda(phi) with global phi_min/phi_max, fed to the margin head as `class_lambda` (computed for the
   batch's target classes only);
4. L_cg on the margin head; sample M centers (positives first) when a term uses them; L_con
   (or the baseline that cluster.contrastive_type puts in its place) and L_ali;
5. L = L_cg + l1*L_con + l2*L_ali (during cluster.warmup_steps the margin scale goes from 1 to
   lambda and l1, l2 from 0 to their values: `set_step`). A term whose weight is 0 is not computed at all, so with
   every cluster term off (cg_margin False, both weights 0) the loss is the margin head's, bit
   for bit.

Replicated parameters (identical on every rank, gradient summed over ranks by the loss that uses
them, stepped by the head's optimizer, saved once in the checkpoint): `replicated_parameters()`
names them; today L_ali's `log_tau` and L_con's `contrastive_log_tau` (temperature_mode 'learnable').

The momentum encoder is not part of this module: the trainer runs it and passes its features.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from largefr.config import ClusterConfig
from largefr.distributed.collectives import all_gather_rows, all_gather_with_grad
from largefr.heads.baseline_losses import center_loss, triplet_loss
from largefr.heads.cluster import ClusterBank
from largefr.heads.cluster_losses import (
    SampledCenters,
    cluster_aligning_loss,
    cluster_contrastive_loss,
    cluster_temperature,
    learnable_temperature,
    sample_centers,
)
from largefr.heads.queue import FeatureQueue
from largefr.heads.row_gradient import GatheredRows
from largefr.heads.sampling import union_of_sorted
from largefr.heads.sharded_head import ShardedMarginHead
from largefr.stateful import (EntryNote, Kind, RestoreContext, State, capture_generator_state, merge_states,
                              restore_samplers, select)


@dataclass(kw_only=True, frozen=True)
class HeadLoss:
    """What a head's training forward gives the step (`largefr.train.step.StepHead`)."""

    loss: torch.Tensor
    """The total loss, the same on every rank."""
    terms: dict[str, torch.Tensor]
    """Each loss term, detached (for logging)."""
    rows: torch.Tensor | None
    """Sorted local rows of the sharded weight that get a gradient: what a row-sparse head optimizer must
    step (Partial FC's sample plus L_ali's sampled classes). None: every row (no sampling)."""
    gathered: GatheredRows | None = None
    """The weight's `rows` as the forward gathered them, which a row-sparse optimizer reads instead of gathering them
    again while they are still those rows; None where the forward made no such copy."""


def _cluster_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The queue's, phi's and the cluster losses' dtype: float32 (also for a bfloat16 W), float64 for a float64 W."""
    return torch.float64 if weight_dtype == torch.float64 else torch.float32


def _log_temperature(initial: float, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    """A learnable temperature stored as its log (stays positive; steps are relative), float32 at least:
    a bf16 temperature would move in steps of ~1%."""
    return nn.Parameter(torch.tensor(math.log(initial), dtype=dtype, device=device))


class _Untimed:
    """The head's parts untimed: what `set_phase_timer(None)` leaves (the step's NULL_TIMER, which heads/ cannot import)."""

    def phase(self, name: str) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def mark_backward(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        return tensor


_UNTIMED = _Untimed()


def warmup_ramp(step: int, warmup_steps: int) -> float:
    """r = min(step / warmup_steps, 1) of cluster.warmup_steps (1 when there is no warm-up)."""
    return 1.0 if warmup_steps <= 0 else min(step / warmup_steps, 1.0)


class ClusterGuidedHead(nn.Module):
    """ShardedMarginHead + feature queue + cluster bank + L_con + L_ali, on the head's process group.

    training_loss(local_embeddings, local_labels, local_momentum_features) -> HeadLoss (the loss, each
    term detached, and the rows of W a row-sparse optimizer must step); forward gives (loss, terms)
    of the same computation. Parameters: the margin head's `weight` (sharded) and the replicated temperatures of
    `replicated_parameters()`.
    """

    def __init__(self, margin_head: ShardedMarginHead, config: ClusterConfig, *, seed: int = 0):
        super().__init__()
        self.margin_head = margin_head
        self.config = config
        self.group = margin_head.group
        weight = margin_head.weight
        dim, dtype = weight.shape[1], _cluster_dtype(weight.dtype)
        self.queue: FeatureQueue | None = None
        self.bank: ClusterBank | None = None
        if config.enabled:
            self.queue = FeatureQueue(config.queue_size, dim, group=self.group, dtype=dtype, device=weight.device)
            self.bank = ClusterBank(margin_head.num_classes, dim, group=self.group, momentum=config.bank_momentum,
                                    alpha=config.alpha, dtype=dtype, centers_dtype=weight.dtype, device=weight.device)
        self.log_tau: nn.Parameter | None = None
        if config.aligning_weight > 0:
            self.log_tau = _log_temperature(config.align_tau_init, dtype, weight.device)
        self.contrastive_log_tau: nn.Parameter | None = None
        if config.contrastive_weight > 0 and config.contrastive_type == "cluster" \
                and config.temperature_mode == "learnable":
            self.contrastive_log_tau = _log_temperature(config.contrastive_tau_init, dtype, weight.device)
        self.sample_generator = torch.Generator(device=weight.device)
        self.sample_generator.manual_seed(seed * 1_000_003 + margin_head.partition.rank)
        self.last_terms: dict[str, torch.Tensor] = {}
        self.last_sampled_centers: SampledCenters | None = None
        self._undo: dict[str, Any] | None = None
        self.ramp = warmup_ramp(0, config.warmup_steps)
        """The cluster terms' strength in [0, 1] (cluster.warmup_steps); the loop sets it with set_step."""
        self._timer: Any = _UNTIMED

    def set_phase_timer(self, timer: Any | None) -> None:
        """Charge this head's parts to phases of `timer` (the step's phase-timer contract, largefr/train/phases.py:
        `phase(name)`, `mark_backward(tensor, name)`): 'head_other', 'feature_gather', 'loss_cg', 'loss_con',
        'loss_ali', forward and backward each; None: untimed (the default)."""
        self._timer = _UNTIMED if timer is None else timer

    def set_step(self, step: int) -> None:
        """Tell the head which optimizer step comes next (0 for the first): sets the warm-up ramp."""
        self.ramp = warmup_ramp(step, self.config.warmup_steps)

    @property
    def partition(self):
        return self.margin_head.partition

    REPLICATED_PARAMETER_NAMES = ("log_tau", "contrastive_log_tau")
    """Every replicated parameter the head can have (L_ali's tau, L_con's learnable tau0), in optimizer order."""

    def replicated_parameters(self) -> dict[str, nn.Parameter]:
        """This head's parameters identical on every rank (learnable temperatures), by checkpoint name."""
        named = {name: getattr(self, name) for name in self.REPLICATED_PARAMETER_NAMES}
        return {name: parameter for name, parameter in named.items() if parameter is not None}

    @property
    def _needs_sampled_centers(self) -> bool:
        """L_ali, L_con and the triplet baseline use the M sampled centers; the Center loss uses the bank."""
        cfg = self.config
        return cfg.aligning_weight > 0 or (cfg.contrastive_weight > 0 and cfg.contrastive_type != "center")

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor,
                local_momentum_features: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss (same on every rank) and each term, for this step's local rows."""
        head_loss = self.training_loss(local_embeddings, local_labels, local_momentum_features)
        return head_loss.loss, head_loss.terms

    def training_loss(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor,
                      local_momentum_features: torch.Tensor | None = None) -> HeadLoss:
        """The loss, its terms and the rows of W that get a gradient (see `HeadLoss`)."""
        with self._timer.phase("head_other"):
            return self._training_loss(local_embeddings, local_labels, local_momentum_features)

    def _training_loss(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor,
                       local_momentum_features: torch.Tensor | None) -> HeadLoss:
        timer = self._timer
        device = self.margin_head.weight.device
        labels = all_gather_rows(local_labels.to(device=device, dtype=torch.long), self.group)
        local_embeddings = timer.mark_backward(local_embeddings, "backbone_backward")
        with timer.phase("feature_gather"):
            features = all_gather_with_grad(local_embeddings, self.group)
        features = timer.mark_backward(features, "feature_gather")
        class_lambda = None
        if self.config.enabled:
            self._update_clusters(local_momentum_features, labels)
            if self.config.cg_margin:
                # during the warm-up the ramp moves lambda from ArcFace's (1) to the cluster-guided one
                class_lambda = self.bank.class_lambda(*self.config.lambda_range, ramp=self.ramp)
        sampled = None
        if (self.config.contrastive_weight > 0 or self.config.aligning_weight > 0) and self._needs_sampled_centers:
            sampled = sample_centers(self.bank, labels, self.config.num_sampled_centers,
                                     generator=self.sample_generator)
        # L_ali reads W's rows of the sampled classes: gathered in the margin head's block, so W gets one gradient
        shared_rows = sampled.local_indices if self.log_tau is not None else None
        with timer.phase("loss_cg"):
            loss = timer.mark_backward(self.margin_head.loss_from_gathered(features, labels, class_lambda,
                                                                           shared_rows=shared_rows), "loss_cg")
        terms = {"loss_cg": loss.detach()}
        touched = [self.margin_head.last_sampled]
        if self.config.contrastive_weight > 0 or self.config.aligning_weight > 0:
            self.last_sampled_centers = sampled
            loss = self._add_cluster_terms(loss, features, labels, sampled, terms)
            if self.log_tau is not None:
                touched.append(sampled.local_indices)
        self.last_terms = terms
        return HeadLoss(loss=loss, terms=terms, rows=union_of_sorted(*touched) if len(touched) > 1 else touched[0],
                        gathered=self.margin_head.last_gathered)

    def _update_clusters(self, local_momentum_features: torch.Tensor | None, labels: torch.Tensor) -> None:
        if local_momentum_features is None:
            raise ValueError("ClusterGuidedHead: cluster terms are on (cluster.cg_margin or a cluster loss weight), "
                             "so forward needs the momentum encoder's features; pass local_momentum_features or "
                             "turn the cluster terms off")
        momentum = F.normalize(local_momentum_features.detach().to(self.queue.features.dtype), dim=1)
        global_momentum = all_gather_rows(momentum, self.group)
        undo: dict[str, Any] = {"queue": self.queue.save_before_write(global_momentum.shape[0]),
                                "generator": self.sample_generator.get_state()}
        self.queue.enqueue_global(global_momentum, labels)
        rows = self._bank_rows_in_queue()  # exactly the rows update_from_queue writes
        undo["bank_rows"] = rows
        undo["bank"] = {name: buffer[rows].clone() for name, buffer in self._bank_buffers().items()}
        self._undo = undo
        self.bank.update_from_queue(self.queue)

    def _bank_rows_in_queue(self) -> torch.Tensor:
        start, end = self.partition.start, self.partition.end
        labels = self.queue.labels
        return torch.unique(labels[(labels >= start) & (labels < end)] - start)

    def _bank_buffers(self) -> dict[str, torch.Tensor]:
        return {name: buffer for name, buffer in self.bank.named_buffers()}

    @torch.no_grad()
    def undo_last_update(self) -> None:
        """Put the queue, the bank and the sampling generator back as they were before the last forward.

        The trainer calls it when a step is skipped for a non-finite loss (on every rank together),
        so a skipped step leaves no trace in the cluster state either. Cost per forward: a copy of
        the queue rows the batch overwrites and of the bank rows present in the queue.
        """
        self.margin_head.margin.undo_last_update()  # CurricularFace's t, AdaFace's statistics, ElasticFace's draws
        if self._undo is None:
            return
        undo, self._undo = self._undo, None
        self.queue.restore(undo["queue"])
        rows = undo["bank_rows"]
        for name, buffer in self._bank_buffers().items():
            buffer[rows] = undo["bank"][name]
        self.sample_generator.set_state(undo["generator"])

    def _add_cluster_terms(self, loss: torch.Tensor, features: torch.Tensor, labels: torch.Tensor,
                           sampled: SampledCenters | None, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """loss + r*l1*L_con + r*l2*L_ali, r the warm-up ramp (terms with weight 0 are skipped); records each term."""
        cfg = self.config
        if cfg.contrastive_weight > 0:
            normalized = F.normalize(features.to(_cluster_dtype(self.margin_head.weight.dtype)), dim=1)
            with self._timer.phase("loss_con"):
                loss_con = self._timer.mark_backward(self._contrastive_term(normalized, labels, sampled), "loss_con")
            terms["loss_con"] = loss_con.detach()
            loss = loss + self.ramp * cfg.contrastive_weight * loss_con
        if cfg.aligning_weight > 0:
            with self._timer.phase("loss_ali"):
                loss_ali = self._timer.mark_backward(
                    cluster_aligning_loss(sampled, self.margin_head.weight, self.log_tau, group=self.group,
                                          rows=self.margin_head.shared_block), "loss_ali")
            terms["loss_ali"] = loss_ali.detach()
            loss = loss + self.ramp * cfg.aligning_weight * loss_ali
        return loss

    def _contrastive_term(self, normalized: torch.Tensor, labels: torch.Tensor,
                          sampled: SampledCenters | None) -> torch.Tensor:
        """The contrastive_weight term: L_con (Eq. 6), or the Center / triplet baseline in its place."""
        cfg = self.config
        if cfg.contrastive_type == "center":
            return center_loss(normalized, labels, self.bank, group=self.group)
        if cfg.contrastive_type == "triplet":
            return triplet_loss(normalized, labels, sampled, self.partition, margin=cfg.triplet_margin,
                                group=self.group)
        if cfg.temperature_mode == "learnable":
            temperature = learnable_temperature(self.contrastive_log_tau, sampled.total, self.group)
        else:
            temperature = cluster_temperature(sampled.phi, sampled.has_phi, mode=cfg.temperature_mode,
                                              tau0=cfg.pcl_tau0, clip_percentiles=tuple(cfg.pcl_clip_percentiles))
        return cluster_contrastive_loss(normalized, labels, sampled, self.partition,
                                        temperature=temperature, group=self.group)

    @torch.no_grad()
    def stats(self, histogram_bins: int = 10) -> dict[str, Any]:
        """Logging statistics (collective when the bank exists: call on every rank, on logging steps)."""
        out: dict[str, Any] = {name: float(value) for name, value in self.last_terms.items()}
        out.update(self.margin_head.margin.stats())
        if self.bank is not None:
            out.update(self.bank.stats(lambda_range=tuple(self.config.lambda_range), bins=histogram_bins))
            out["queue_fill"] = float(self.queue.filled().double().mean())
        if self.log_tau is not None:
            out["align_tau"] = float(self.log_tau.exp())
        if self.contrastive_log_tau is not None:
            out["contrastive_tau"] = float(self.contrastive_log_tau.exp())
        return out

    # ---- checkpoint (largefr/stateful.py) -------------------------------------------------------------------
    def _checkpoint_pieces(self) -> list[Any]:
        """The pieces holding state of their own: the margin head, and the bank and the queue when on."""
        return [piece for piece in (self.margin_head, self.bank, self.queue) if piece is not None]

    def checkpoint_state(self) -> State:
        """The pieces' state, the center sampler (this rank's) and the replicated temperatures."""
        own: State = {Kind.PER_RANK: {"center_sampler": capture_generator_state(self.sample_generator)},
                      Kind.REPLICATED: {name: p.detach() for name, p in self.replicated_parameters().items()}}
        return merge_states(own, *(piece.checkpoint_state() for piece in self._checkpoint_pieces()))

    @torch.no_grad()
    def restore_checkpoint_state(self, state: State, context: RestoreContext) -> None:
        for piece in self._checkpoint_pieces():
            piece.restore_checkpoint_state(select(state, piece.checkpoint_state()), context)
        if Kind.PER_RANK in state:
            restore_samplers({"center_sampler": self.sample_generator}, state[Kind.PER_RANK], context)
        for name, parameter in self.replicated_parameters().items():
            parameter.copy_(state[Kind.REPLICATED][name])

    def checkpoint_note(self, name: str) -> EntryNote | None:
        """Also for the bank's and the queue's entries when this run has none (cluster terms off)."""
        for note in (self.margin_head.checkpoint_note, ClusterBank.checkpoint_note, FeatureQueue.checkpoint_note):
            found = note(name)
            if found is not None:
                return found
        return _CHECKPOINT_NOTES.get(name)


_TEMPERATURES = EntryNote("the learnable temperatures",
                          "cluster.aligning_weight, contrastive_type and temperature_mode")
_CHECKPOINT_NOTES = {"center_sampler": EntryNote("the cluster-center sampler's state", "every run"),
                     "log_tau": _TEMPERATURES, "contrastive_log_tau": _TEMPERATURES}
"""What each checkpoint entry of the joint head itself is, for error messages (`largefr.stateful.Stateful`)."""
