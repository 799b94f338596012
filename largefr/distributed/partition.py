"""Which classes a rank owns. Every shard-aware module asks this one helper."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ClassPartition:
    """Contiguous class range owned by `rank` when `num_classes` are split over `world_size` ranks.

    The first `num_classes % world_size` ranks own one extra class, so shards differ by at most one.
    """

    num_classes: int
    world_size: int
    rank: int

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside [0, {self.world_size})")
        if self.num_classes < self.world_size:
            raise ValueError(
                f"num_classes ({self.num_classes}) < world size ({self.world_size}): every rank must own "
                "at least one class; use fewer ranks or more classes"
            )

    @property
    def num_local(self) -> int:
        base, extra = divmod(self.num_classes, self.world_size)
        return base + (1 if self.rank < extra else 0)

    @property
    def start(self) -> int:
        base, extra = divmod(self.num_classes, self.world_size)
        return self.rank * base + min(self.rank, extra)

    @property
    def end(self) -> int:
        return self.start + self.num_local

    def owns(self, class_id: int) -> bool:
        return self.start <= class_id < self.end

    def for_rank(self, rank: int) -> "ClassPartition":
        return ClassPartition(self.num_classes, self.world_size, rank)

    def all_ranges(self) -> list[tuple[int, int]]:
        """(start, end) of every rank, in rank order."""
        return [(p.start, p.end) for p in (self.for_rank(r) for r in range(self.world_size))]

    def owner_of(self, class_id: int) -> int:
        """Rank that owns `class_id`."""
        if not 0 <= class_id < self.num_classes:
            raise ValueError(f"class id {class_id} outside [0, {self.num_classes})")
        base, extra = divmod(self.num_classes, self.world_size)
        boundary = extra * (base + 1)
        if class_id < boundary:
            return class_id // (base + 1)
        return extra + (class_id - boundary) // base
