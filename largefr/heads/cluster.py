"""Sharded cluster-center bank C and concentration phi (docs/DESIGN.md section 5, Eq. 1), and lambda(phi).

The rank that owns class k (by `ClassPartition`, the same split as the classifier W) keeps C_k
and phi_k. Each step, for every class of this rank's range present in the (replicated) feature
queue Q:

    C^q_k = normalize(mean_{f in Q_k} f)
    C_k   = normalize(mc*C_k + (1-mc)*C^q_k)      (first sight: C_k = C^q_k)
    phi_k = sum_{f in Q_k} ||f - C_k||_2 / (|Q_k| * log(|Q_k| + alpha))

Classes absent from Q keep their last C and phi; a class never seen has neither.

Degenerate concentration (an addition to the paper, documented): while a class's center is
built from a single queued feature (first sight with |Q_k| = 1, and every later update until a
second feature of that class arrives), the center IS that feature and phi is 0 up to rounding.
Such a phi measures nothing, and as a temperature it would divide by zero. A phi at or below
sqrt(machine epsilon) of the bank's dtype is therefore stored but marked missing (`has_phi`
False): lambda = 1 for the class (plain ArcFace), and the contrastive loss gives it the
largest sampled phi, as PCL does for singleton clusters. `seen` (has a center) stays True.

Centers stored in bfloat16 (head.weight_dtype): the stored center of such a class is the feature rounded,
so the phi of the next update is not 0 but the rounding's trace, up to `rounding_phi_floor` (about 0.03
with the defaults); the threshold is then that floor. Real classes' phi are an order of magnitude above it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from largefr.distributed.collectives import all_reduce_min_, all_reduce_sum_, group_rank, group_size
from largefr.distributed.partition import ClassPartition
from largefr.heads.queue import FeatureQueue
from largefr.heads.sampling import union_of_sorted
from largefr.stateful import EntryNote, Kind, RestoreContext, State


class ClusterBank(nn.Module):
    """This rank's shard of the cluster centers (num_local x d) and concentrations (num_local).

    Buffers: `centers`, `phi`, `has_phi` (bool: phi measured and non-degenerate), `seen`
    (bool: has a center), `queue_count` (|Q_k| at the class's last update).
    dtype: of phi and of the arithmetic; centers_dtype: the centers' storage (head.weight_dtype; default dtype).
    bfloat16 centers (d values per class, the bank's class-sized part) are read upcast, row by row as used, and
    written rounded to nearest: an update moves a center by (1 - momentum) of the way, far above bfloat16's
    spacing. phi (one value per class) stays in dtype: lambda and the temperatures are read from its spread.
    """

    def __init__(self, num_classes: int, dim: int, *, group: ProcessGroup | None = None,
                 momentum: float = 0.9, alpha: float = 10.0, dtype: torch.dtype = torch.float32,
                 centers_dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"cluster bank momentum must be in [0, 1), got {momentum}")
        if alpha <= 0.0:
            raise ValueError(f"concentration smoothing alpha must be > 0 (log(|Q_k| + alpha) > 0), got {alpha}")
        self.group = group
        self.partition = ClassPartition(num_classes, group_size(group), group_rank(group))
        self.momentum = momentum
        self.alpha = alpha
        self.degenerate_phi = max(math.sqrt(torch.finfo(dtype).eps),
                                  rounding_phi_floor(centers_dtype or dtype, dtype, momentum=momentum, alpha=alpha))
        rows = self.partition.num_local
        self.register_buffer("centers", torch.zeros(rows, dim, dtype=centers_dtype or dtype, device=device))
        self.register_buffer("phi", torch.zeros(rows, dtype=dtype, device=device))
        self.register_buffer("has_phi", torch.zeros(rows, dtype=torch.bool, device=device))
        self.register_buffer("seen", torch.zeros(rows, dtype=torch.bool, device=device))
        self.register_buffer("queue_count", torch.zeros(rows, dtype=torch.int64, device=device))
        self._extremes = _KeptValue(self, "phi", "has_phi")  # see _local_phi_extremes
        self._seen = _KeptValue(self, "seen")  # see seen_count and seen_rows

    # ---- update -------------------------------------------------------------------------
    @torch.no_grad()
    def update_from_queue(self, queue: FeatureQueue) -> torch.Tensor:
        """Update C and phi of this rank's classes present in `queue`; returns their local indices."""
        return self.update_from_features(queue.features, queue.labels)

    @torch.no_grad()
    def update_from_features(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Same as `update_from_queue` on explicit rows (labels < 0 are empty slots)."""
        if features.dim() != 2 or features.shape[1] != self.centers.shape[1]:
            raise ValueError(
                f"ClusterBank.update: features must be (rows, {self.centers.shape[1]}), got "
                f"{tuple(features.shape)}; the queue and the bank need the same embedding size"
            )
        start, end = self.partition.start, self.partition.end
        inside = (labels >= start) & (labels < end)
        local_ids = labels[inside] - start
        members = features[inside].to(self.phi.dtype)
        # unique keeps every temporary O(queue) instead of O(num_local x d)
        present, member_slot = torch.unique(local_ids, return_inverse=True)
        if present.numel() == 0:
            return present
        counts = torch.bincount(member_slot, minlength=present.numel()).to(self.phi.dtype)
        sums = torch.zeros(present.numel(), members.shape[1], dtype=members.dtype, device=members.device)
        queue_centers = F.normalize(sums.index_add_(0, member_slot, members), dim=1)
        old_centers = self.centers[present].to(self.phi.dtype)  # gathered, then upcast (bfloat16 storage)
        blended = F.normalize(self.momentum * old_centers + (1.0 - self.momentum) * queue_centers, dim=1)
        new_centers = torch.where(self.seen[present].unsqueeze(1), blended, queue_centers)

        distances = (members - new_centers[member_slot]).norm(dim=1)
        spread = torch.zeros_like(counts).index_add_(0, member_slot, distances)
        new_phi = spread / (counts * torch.log(counts + self.alpha))

        extremes = self._extremes_after_update(present, new_phi)
        seen = self._seen_after_update(present)
        self.centers[present] = new_centers.to(self.centers.dtype)
        self.phi[present] = new_phi
        self.has_phi[present] = new_phi > self.degenerate_phi
        self.seen[present] = True
        self.queue_count[present] = counts.long()
        self._extremes.keep(extremes)
        self._seen.keep(seen)
        return present

    def seen_count(self) -> int:
        """How many of this rank's classes have a center (`seen`). A pass over every class only when not kept: on
        CPU `update_from_features` adds the classes it sees first; whatever else writes `seen` (a restore, a test)
        moves its version counter or replaces it, which ends the kept count."""
        return self._seen.get(self._seen_by_a_pass).count

    def seen_rows(self) -> torch.Tensor | None:
        """The sorted local rows with a center while they are few (at most `listed_seen_limit`), else None; kept
        like the count, so early in a run, when sampling among them costs most, L_con's sampling lists them without
        a pass over every class."""
        return self._seen.get(self._seen_by_a_pass).rows

    @property
    def listed_seen_limit(self) -> int:
        """Up to this many seen classes `seen_rows` lists (an int64 per class seen: at most 1/8 byte per class)."""
        return max(_LISTED_SEEN_MIN, self.partition.num_local // _LISTED_SEEN_DIVISOR)

    def _seen_by_a_pass(self) -> "_Seen":
        count = int(torch.count_nonzero(self.seen))
        return _Seen(count, torch.nonzero(self.seen).squeeze(1) if count <= self.listed_seen_limit else None)

    def _seen_after_update(self, rows: torch.Tensor) -> "_Seen | None":
        """The count (and the list while few) once `rows` (sorted, unique) are seen, from the kept ones and those
        rows; None off CPU (no host sync per step) or when none is kept."""
        kept = self._seen.current()
        if self.seen.device.type != "cpu" or kept is None:
            return None
        new = rows[~self.seen[rows]]
        count = kept.count + new.numel()
        listed = kept.rows is not None and count <= self.listed_seen_limit
        return _Seen(count, union_of_sorted(kept.rows, new) if listed else None)

    # ---- lambda -------------------------------------------------------------------------
    def global_phi_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(phi_min, phi_max) over every class with a phi on every rank; (+inf, -inf) when none.

        One all-reduce MIN of [min, -max]; a rank without any phi contributes the sentinels.
        """
        extremes = all_reduce_min_(self._local_phi_extremes().clone(), self.group)
        return extremes[0], -extremes[1]

    def _local_phi_extremes(self) -> torch.Tensor:
        """(2,) [min, -max] of this rank's phi over the classes with one ((+inf, +inf) when none).

        A pass over every class of the rank, unless kept from the last one: on CPU `update_from_features` keeps it
        from the rows it writes (a step writes the classes in the queue, a few thousand among millions). Whatever
        else writes `phi` or `has_phi` (a restore, an undo, a test) moves their version counters or replaces them,
        which ends the kept value, so it is never stale.
        """
        def a_pass() -> torch.Tensor:
            inf = torch.tensor(float("inf"), dtype=self.phi.dtype, device=self.phi.device)
            return torch.stack([torch.where(self.has_phi, self.phi, inf).min(),
                                -torch.where(self.has_phi, self.phi, -inf).max()])

        return self._extremes.get(a_pass)

    def _extremes_after_update(self, rows: torch.Tensor, new_phi: torch.Tensor) -> torch.Tensor | None:
        """The local [min, -max] once `rows` take `new_phi`, from the kept one and those rows only; None (a pass
        at the next read) off CPU (no host sync per step), when none is kept, or when a row holding an extreme
        moves inward or loses its phi."""
        kept = self._extremes.current()
        if self.phi.device.type != "cpu" or kept is None:
            return None
        lowest, highest = kept[0], -kept[1]
        old_phi, old_has = self.phi[rows], self.has_phi[rows]
        new_has = new_phi > self.degenerate_phi  # as update_from_features stores them
        new_phi = new_phi.to(self.phi.dtype)
        inward = old_has & (((old_phi == lowest) & ~(new_has & (new_phi <= lowest)))
                            | ((old_phi == highest) & ~(new_has & (new_phi >= highest))))
        if bool(inward.any()):
            return None
        inf = torch.tensor(float("inf"), dtype=self.phi.dtype, device=self.phi.device)
        return torch.stack([torch.minimum(lowest, torch.where(new_has, new_phi, inf).min()),
                            -torch.maximum(highest, torch.where(new_has, new_phi, -inf).max())])

    @torch.no_grad()
    def lambda_from_phi(self, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
        """This rank's (num_local,) margin factor lo + (hi-lo)*(phi-phi_min)/(phi_max-phi_min).

        lambda = 1 (plain ArcFace) where phi is missing, and everywhere when phi_max == phi_min
        or no class has a phi. Collective: call on every rank of the group. A step needs only its target
        classes' lambda: `class_lambda` gives those without a pass over every class.
        """
        return self.class_lambda(lo, hi)[...]

    def class_lambda(self, lo: float = 0.0, hi: float = 1.0, *, ramp: float = 1.0) -> "ClassLambda":
        """lambda_from_phi(lo, hi), moved towards 1 by the warm-up `ramp`, computed for the rows indexed.
        Collective (the global phi range): call on every rank of the group."""
        phi_min, phi_max = self.global_phi_range()
        return ClassLambda(self.phi, self.has_phi, phi_min, phi_max, lo=lo, hi=hi, ramp=ramp)

    # ---- logging ------------------------------------------------------------------------
    @torch.no_grad()
    def stats(self, lambda_range: tuple[float, float] = (0.0, 1.0), bins: int = 10) -> dict[str, Any]:
        """Global statistics for logging (collective; `.item()` inside, so call on logging steps).

        phi_fraction: classes with a phi / num_classes; seen_fraction: classes with a center;
        phi_mean/min/max over classes with a phi (nan when none); lambda_mean and lambda_hist
        (`bins` equal bins over lambda_range) over classes with a phi.
        """
        lo, hi = lambda_range
        class_lambda = self.class_lambda(lo, hi)  # its phi range is the figures' too: one all-reduce
        phi_min, phi_max = class_lambda.phi_min, class_lambda.phi_max
        width = (hi - lo) / bins if hi > lo else 1.0
        sums = torch.zeros(4 + bins, dtype=self.phi.dtype, device=self.phi.device)
        for start in range(0, self.partition.num_local, STATS_BLOCK_ROWS):  # temporaries of a block, not the shard
            rows = slice(start, start + STATS_BLOCK_ROWS)
            mask = self.has_phi[rows]
            lam = class_lambda[rows][mask]
            bin_index = ((lam - lo) / width).floor().clamp(0, bins - 1).long()
            sums[4:] += torch.bincount(bin_index, minlength=bins).to(self.phi.dtype)
            sums[:4] += torch.stack([mask.sum().to(self.phi.dtype), self.seen[rows].sum().to(self.phi.dtype),
                                     self.phi[rows][mask].sum(), lam.sum()])
        all_reduce_sum_(sums, self.group)
        count = sums[0].item()
        nan = float("nan")
        return {
            "phi_fraction": count / self.partition.num_classes,
            "seen_fraction": sums[1].item() / self.partition.num_classes,
            "phi_mean": sums[2].item() / count if count else nan,
            "phi_min": phi_min.item() if count else nan,
            "phi_max": phi_max.item() if count else nan,
            "lambda_mean": sums[3].item() / count if count else nan,
            "lambda_hist": [int(v) for v in sums[4:].tolist()],
            "lambda_hist_edges": [lo + i * (hi - lo) / bins for i in range(bins + 1)],
        }

    # ---- checkpoint ---------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, int]:
        part = self.partition
        return {"num_classes": part.num_classes, "world_size": part.world_size,
                "class_start": part.start, "class_end": part.end}

    def set_extra_state(self, state: dict[str, int]) -> None:
        part = self.partition
        mine = self.get_extra_state()
        if state.get("class_start") != part.start or state.get("class_end") != part.end \
                or state.get("num_classes") != part.num_classes:
            raise ValueError(
                f"ClusterBank shard holds classes [{state.get('class_start')}, {state.get('class_end')}) of "
                f"{state.get('num_classes')} (written by {state.get('world_size')} ranks), but this rank owns "
                f"[{mine['class_start']}, {mine['class_end']}) of {mine['num_classes']}: re-split the "
                "checkpoint by class range for this world size before loading"
            )

    # ---- checkpoint (largefr/stateful.py) -----------------------------------------------------------------
    def checkpoint_state(self) -> State:
        """Every buffer as rows of this rank's classes, `bank.<buffer>` (a restore reads into them in place)."""
        return {Kind.ROWS: {f"{BANK_PREFIX}{name}": buffer for name, buffer in self.named_buffers()}}

    def restore_checkpoint_state(self, state: State, context: RestoreContext) -> None:
        """Nothing left to do: the rows were read into the buffers."""

    @staticmethod
    def checkpoint_note(name: str) -> EntryNote | None:
        if name.startswith(BANK_PREFIX):
            return EntryNote("the cluster bank's rows", "the cluster terms: cluster.cg_margin or a cluster loss weight")
        return None


@dataclass(frozen=True)
class _Seen:
    """What the bank keeps of `seen`: how many classes have a center and, while few, which (sorted local rows)."""

    count: int
    rows: torch.Tensor | None


STATS_BLOCK_ROWS = 1 << 18
"""Classes per block of `ClusterBank.stats`' pass: a logging step's temporaries stay a few MiB at any class count."""
_LISTED_SEEN_DIVISOR = 64
_LISTED_SEEN_MIN = 4096
"""`ClusterBank.seen_rows` lists up to max(4096, num_local / 64) classes."""


class _KeptValue:
    """A value derived from some of a module's buffers, kept while none of them is written or replaced: every in-place
    write moves a tensor's version counter, so a write from anywhere (an update, a restore, an undo, a test) ends
    it."""

    def __init__(self, owner: nn.Module, *names: str):
        self.owner, self.names = owner, names
        self.value: Any = None
        self.of: tuple = ()

    def current(self) -> Any:
        """The kept value, or None when there is none or the buffers changed since."""
        return self.value if self.value is not None and self.of == self._identity() else None

    def get(self, compute: Callable[[], Any]) -> Any:
        """The kept value, computed (and kept) first when there is none."""
        if self.current() is None:
            self.keep(compute())
        return self.value

    def keep(self, value: Any) -> None:
        """Keep `value` (None: keep nothing) for the buffers as they are now."""
        self.value, self.of = value, self._identity() if value is not None else ()

    def _identity(self) -> tuple:
        buffers = (getattr(self.owner, name) for name in self.names)
        return tuple(part for tensor in buffers for part in (id(tensor), tensor._version))


def rounding_phi_floor(centers_dtype: torch.dtype, dtype: torch.dtype, *, momentum: float, alpha: float) -> float:
    """The largest phi that rounding the stored centers can give a class whose queue holds one feature, f, that
    the center was built from (0 when the centers are stored in the arithmetic's dtype).

    Stored, C = round(B) with B the blended unit center: the error e = C - f obeys |e_t| <= m |e_(t-1)| + u (u the
    unit roundoff of the storage, e_0 the rounding of f itself), so m |e| <= r = m u / (1 - m). The next blend is
    normalize(f + m e), at most 2 r / (1 - r) from f (the normalisation at most doubles the offset), and
    phi = distance / log(1 + alpha) with one feature.
    """
    if torch.finfo(centers_dtype).eps <= torch.finfo(dtype).eps:
        return 0.0
    offset = momentum * (torch.finfo(centers_dtype).eps / 2) / (1.0 - momentum)
    return 2.0 * offset / (1.0 - offset) / math.log(1.0 + alpha)


BANK_PREFIX = "bank."
"""Checkpoint names of the bank's buffers: `bank.<buffer name>`."""


class ClassLambda:
    """lambda of a bank's classes, evaluated only where indexed: `class_lambda[local_rows]` -> (len(rows),).

    A step reads the lambda of its target classes, a few hundred among millions: computing the rest would be
    a pass over every class. The value is that of `ClusterBank.lambda_from_phi`, element for element:
    lo + (hi-lo)*(phi-phi_min)/(phi_max-phi_min), 1 where phi is missing or the span is empty, then
    1 + ramp*(lambda-1) while the cluster terms warm up (ramp < 1).
    """

    def __init__(self, phi: torch.Tensor, has_phi: torch.Tensor, phi_min: torch.Tensor, phi_max: torch.Tensor, *,
                 lo: float, hi: float, ramp: float = 1.0):
        self.phi, self.has_phi = phi, has_phi
        self.phi_min, self.phi_max, self.span = phi_min, phi_max, phi_max - phi_min
        self.lo, self.hi, self.ramp = lo, hi, ramp

    @property
    def shape(self) -> torch.Size:
        return self.phi.shape

    @torch.no_grad()
    def __getitem__(self, rows) -> torch.Tensor:
        phi = self.phi[rows]
        scaled = self.lo + (self.hi - self.lo) * (phi - self.phi_min) / self.span
        usable = self.has_phi[rows] & torch.isfinite(self.span) & (self.span > 0)
        lam = torch.where(usable, scaled, torch.ones_like(phi))
        return lam if self.ramp >= 1.0 else 1.0 + self.ramp * (lam - 1.0)
