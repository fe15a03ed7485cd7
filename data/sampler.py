"""Deterministic sample order: a fresh permutation of a source's samples for every epoch.

The permutation depends only on (seed, source index, epoch), never on the rank count or on
how far a run got, so any process can recompute the order at any cursor after a restart.
"""

from __future__ import annotations

import numpy as np


class EpochShuffle:
    """order(epoch)[j] = the sample read at position j of `epoch`; keeps the last 2 epochs cached."""

    def __init__(self, num_samples: int, seed: int, stream_id: int = 0, shuffle: bool = True) -> None:
        self.num_samples, self.seed, self.stream_id, self.shuffle = num_samples, seed, stream_id, shuffle
        self._cache: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            if len(self._cache) >= 2:  # a batch straddles at most one epoch boundary
                self._cache.pop(min(self._cache))
            if self.shuffle:
                rng = np.random.default_rng([self.seed, self.stream_id, epoch])
                self._cache[epoch] = rng.permutation(self.num_samples)
            else:
                self._cache[epoch] = np.arange(self.num_samples)
        return self._cache[epoch]

    def __call__(self, position: np.ndarray) -> np.ndarray:
        """Sample indices at global positions (epoch = position // num_samples) of this source."""
        position = np.asarray(position, dtype=np.int64)
        epoch, within = np.divmod(position, self.num_samples)
        out = np.empty_like(position)
        for e in np.unique(epoch):
            sel = epoch == e
            out[sel] = self.order(int(e))[within[sel]]
        return out
