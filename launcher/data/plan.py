"""Which samples each process sees, and in which order.

Every epoch has one global order, a permutation seeded by (seed, epoch) alone, so it does not depend on the number
of processes. Global micro-batch b is the slice order[b*G:(b+1)*G] with G = batch_size x processes; process r
takes every world-th sample of it (slice[r::world]). Hence 2 processes with batch B see, per step, exactly the
samples 1 process with batch 2B sees, and a resumed run can start at any batch of an epoch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers; nearby inputs give unrelated seeds."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """The global sample order of an epoch (CPU int64), a pure function of (n, seed, epoch)."""
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, epoch)))


@dataclass(frozen=True)
class TrainPlan:
    """How an epoch's global order splits into micro-batches and across processes."""

    num_samples: int
    batch_size: int  # per process
    world: int
    rank: int
    drop_last: bool

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world

    @property
    def batches_per_epoch(self) -> int:
        full, rest = divmod(self.num_samples, self.global_batch)
        # A last partial batch is kept only when every process gets at least one sample of it.
        return full + int(not self.drop_last and rest >= self.world)

    def global_count(self, b: int) -> int:
        """Samples in global micro-batch b (all processes together)."""
        return min(self.global_batch, self.num_samples - b * self.global_batch)

    def rank_slice(self, order: torch.Tensor, b: int) -> torch.Tensor:
        start = b * self.global_batch
        return order[start : start + self.global_batch][self.rank :: self.world]
