"""Weighted blending of several packed sources into one deterministic global sample sequence.

Our own scheme (not Megatron's C++ helper): the k-th pick of source s is due at time
(k + 0.5) / w_s (w normalised); serving picks in order of due time keeps every source's count
within about one sample of n * w_s after any n samples. The schedule has the length of one
blend epoch (the sources' total sample count) and repeats; each source draws its samples from
its own per-epoch permutation, wrapping into its next epoch when its weight asks for more.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from data.packing import PackedSamples
from data.sampler import EpochShuffle


def blend_schedule(weights: Sequence[float], length: int) -> tuple[np.ndarray, np.ndarray]:
    """(source[j], pick[j]) for j < length: which source serves position j, and its pick count so far."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    due, source, pick = [], [], []
    for s, ws in enumerate(w):
        k = np.arange(int(np.ceil(length * ws)) + 1, dtype=np.int64)
        due.append((k + 0.5) / ws)
        source.append(np.full(len(k), s, dtype=np.int64))
        pick.append(k)
    order = np.argsort(np.concatenate(due), kind="stable")[:length]  # ties: lower source first
    return np.concatenate(source)[order], np.concatenate(pick)[order]


class BlendedSamples:
    """Global sample g -> (source, sample) -> token window; infinite (wraps over epochs)."""

    def __init__(
        self, sources: Sequence[PackedSamples], weights: Sequence[float], seed: int, shuffle: bool = True
    ) -> None:
        self.sources = list(sources)
        self.seq_len = self.sources[0].seq_len
        self.epoch_len = sum(len(s) for s in self.sources)
        self.source_of, self.pick_of = blend_schedule(weights, self.epoch_len)
        self.picks_per_epoch = np.bincount(self.source_of, minlength=len(self.sources))
        self.orders = [EpochShuffle(len(s), seed, i, shuffle) for i, s in enumerate(self.sources)]

    def windows(self, g: np.ndarray) -> np.ndarray:
        """int64 [len(g), seq_len + 1] windows of global samples g."""
        epoch, j = np.divmod(np.asarray(g, dtype=np.int64), self.epoch_len)
        src = self.source_of[j]
        out = np.empty((len(j), self.seq_len + 1), dtype=np.int64)
        for s in np.unique(src):
            sel = src == s
            position = epoch[sel] * self.picks_per_epoch[s] + self.pick_of[j[sel]]  # s's own read count
            out[sel] = self.sources[s].windows(self.orders[s](position))
        return out
