"""Packed samples: fixed-length windows over a token stream, ignoring document boundaries.

Sample i of a source is stream[i*S : i*S + S + 1] (S = seq_len), so consecutive windows overlap
by one token and no token is wasted: inputs = window[:-1], labels = window[1:]. EOD tokens in the
stream mark document boundaries; attention is not masked at them (standard GPT packing).
"""

from __future__ import annotations

import numpy as np

from data.dataset import TokenStream
from data.errors import DataError


class PackedSamples:
    """Windows `first .. first+num_samples-1` of a stream (a sub-range holds out validation data)."""

    def __init__(self, stream: TokenStream, seq_len: int, first: int = 0, count: int | None = None) -> None:
        total = (stream.num_tokens - 1) // seq_len  # windows i with i*S + S + 1 <= num_tokens
        if total < 1:
            raise DataError(
                f"data: {getattr(stream, 'path', 'dataset')} has {stream.num_tokens} tokens, too few for one "
                f"sample of seq_len {seq_len} (needs {seq_len + 1}); lower data.seq_len or add data"
            )
        self.stream, self.seq_len, self.first = stream, seq_len, first
        self.num_samples = total - first if count is None else count
        self._window = np.arange(seq_len + 1, dtype=np.int64)

    def __len__(self) -> int:
        return self.num_samples

    def windows(self, idx: np.ndarray) -> np.ndarray:
        """int64 [len(idx), seq_len + 1] token windows for sample indices `idx`."""
        starts = (np.asarray(idx, dtype=np.int64) + self.first) * self.seq_len
        return self.stream.gather(starts[:, None] + self._window)
