"""Evaluation split across data-parallel ranks, gathered back in one process's order.

Generation keeps one process's length-sorted batches and runs batch j on rank j mod N, so every
prompt is generated beside the same batch-mates with the same padding as in one process: the greedy
predictions are bit-identical for any world size, and each rank generates about 1/N of them. Program
execution (HumanEval) is split item by item. Every rank receives the gathered results, so the R matrix
is the same on all of them while only rank 0 writes it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, TypeVar

import torch.distributed as dist

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class Shard:
    """This rank's share of the evaluation; `generated` counts the prompts it generated itself."""

    rank: int = 0
    world: int = 1
    generated: int = 0

    @classmethod
    def current(cls) -> "Shard":
        """The process group's layout, or a shard of one outside a distributed run."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def owns(self, index: int) -> bool:
        return index % self.world == self.rank

    def gather(self, local: dict[int, T]) -> dict[int, T]:
        """Every rank's `{index: value}` merged, on every rank."""
        if self.world == 1:
            return dict(local)
        parts: list[dict[int, T] | None] = [None] * self.world
        dist.all_gather_object(parts, local)
        return {index: value for part in parts for index, value in part.items()}

    def map(self, fn: Callable[[list[T]], list[R]], items: list[T]) -> list[R]:
        """`fn` applied to this rank's items (every world-th), the results gathered in `items`' order."""
        mine = [i for i in range(len(items)) if self.owns(i)]
        merged = self.gather(dict(zip(mine, fn([items[i] for i in mine]))))
        return [merged[i] for i in range(len(items))]

    def work_per_rank(self) -> list[int]:
        """Prompts each rank generated so far (a collective: every rank calls it)."""
        return [count for _, count in sorted(self.gather({self.rank: self.generated}).items())]
