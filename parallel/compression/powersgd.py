"""`powersgd`: our own PowerSGD (Vogels et al., 2019) behind the `Compressor` interface.

torch's PowerSGD DDP hook hangs on gloo once DDP has more than one bucket, and its batched variant
fails in torch 2.13. Here every collective is a blocking call made in bucket order, so ranks never
interleave them differently. Per call (one DDP bucket or one expert weight):
  1. each tensor with a worthwhile low-rank form is viewed as a batch of matrices M [b, m, n]: a
     2-D weight as one matrix (b = 1), an expert bank [E, d, f] as E matrices [d, f] (each
     expert's gradient is its own low-rank problem); others are sent uncompressed in the same
     buffer as the P factors;
  2. P = M Q (Q [n, r] warm-started from the last step; the first Q comes from a seed derived from
     the tensor's key, so all ranks agree), all-reduce P, orthonormalise it (QR);
  3. Q = M^T P, all-reduce Q; the sum over ranks is P Q^T, this rank's part P (M^T P)^T, and the
     rest of M stays in the residual (error feedback). The summed Q warm-starts the next step.
Two all-reduces per call of sum(b_i * (m_i + n_i)) * r floats (+ the small tensors), in fp32, or
with `factor_bits=8` as two-phase int8 all-reduces (`quantize.int8_sum`: 1/4 of the bytes, so rank
4r costs what rank r costs in fp32). Each rank's rounding of its Q goes to its residual; P needs
none (all ranks use the same dequantized P, which only tilts the subspace a little).
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
import torch.distributed as dist

from parallel.compression.base import Compressor, Segment
from parallel.compression.quantize import int8_sum


class PowerSGDCompression(Compressor):
    kind = "powersgd"
    options = ("rank", "seed", "factor_bits", "chunk_size")

    def __init__(
        self,
        warmup_steps: int = 0,
        second_moment: str = "compressed",
        rank: int = 4,
        seed: int = 0,
        factor_bits: int = 32,
        chunk_size: int = 1024,
    ) -> None:
        super().__init__(warmup_steps, second_moment)
        self.rank = rank
        self.seed = seed
        self.factor_bits = factor_bits
        self.chunk_size = chunk_size
        self.q: dict[str, torch.Tensor] = {}  # warm-start Q per key

    def _matrix_shape(self, shape: torch.Size) -> tuple[int, int, int] | None:
        """[b, m, n] if rank-r factorisations send fewer values than the tensor, else None."""
        if len(shape) < 2:
            return None
        b, m = (1, shape[0]) if len(shape) == 2 else (shape[0], shape[1])
        n = shape.numel() // (b * m)
        return (b, m, n) if (m + n) * self.rank < m * n else None

    def _initial_q(self, key: str, b: int, n: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(key.encode()))
        return torch.randn(b, n, self.rank, generator=gen)

    def _compressed_sum(
        self, x: torch.Tensor, group: dist.ProcessGroup | None, segments: list[Segment]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        parts = x.split([s.numel for s in segments])
        low_rank = [(i, self._matrix_shape(s.shape)) for i, s in enumerate(segments)]
        low_rank = [(i, mn) for i, mn in low_rank if mn is not None]
        matrices = {i: parts[i].view(mn) for i, mn in low_rank}
        dense = [i for i in range(len(segments)) if i not in matrices]

        # 2. P = M Q for every matrix, in one buffer with the uncompressed tensors.
        for i, (b, _, n) in low_rank:
            key = segments[i].key
            if key not in self.q or self.q[key].shape[:2] != (b, n):
                self.q[key] = self._initial_q(key, b, n)
        ps = [matrices[i] @ self.q[segments[i].key] for i, _ in low_rank]
        p_sums, dense_sents, dense_sums = self._sum(ps, [parts[i] for i in dense], group)[1:]
        sent, total = list(parts), list(parts)
        for i, part_sent, part_sum in zip(dense, dense_sents, dense_sums):
            sent[i], total[i] = part_sent, part_sum
        ps = [torch.linalg.qr(p_sum).Q for p_sum in p_sums]

        # 3. Q = M^T P, summed over ranks.
        qs = [matrices[i].mT @ p for (i, _), p in zip(low_rank, ps)]
        q_sents, q_sums = self._sum(qs, [], group)[:2]
        for (i, _), p, q_sent, q_sum in zip(low_rank, ps, q_sents, q_sums):
            sent[i] = (p @ q_sent.mT).reshape(-1)
            total[i] = (p @ q_sum.mT).reshape(-1)
            # Warm start from the summed Q, unless it is zero (a zero gradient, e.g. an expert
            # without tokens): P = M Q would then stay zero forever. Same decision on all ranks.
            key = segments[i].key
            nonzero_B11 = q_sum.abs().amax(dim=(1, 2), keepdim=True) > 0
            self.q[key] = torch.where(nonzero_B11, q_sum, self._initial_q(key, *q_sum.shape[:2]))
        return torch.cat(sent), torch.cat(total)

    def _sum(
        self, factors: list[torch.Tensor], dense: list[torch.Tensor], group: dist.ProcessGroup | None
    ) -> tuple[list[torch.Tensor], ...]:
        """`factors` ([b, k, r] each) and flat `dense` tensors summed over `group`: (factors as the
        receivers decode them, factors summed, the same two for `dense`).

        Factors travel column by column ([b, r, k]) so that an int8 scale never spans two columns:
        their magnitudes follow the singular values, and a scale set by the first column would
        round the last ones away. At 8 bits, columns of equal length k are summed together in
        chunks of min(k, `chunk_size`) (at least 32): a tensor's rounding then depends on nothing
        else in its DDP bucket, which DDP rebuilds after every restart."""
        columns = [f.mT.contiguous() for f in factors]
        flat_columns = [c.reshape(-1) for c in columns]
        if self.factor_bits == 8:
            sent_f, summed_f = list(flat_columns), list(flat_columns)
            by_length: dict[int, list[int]] = {}
            for j, c in enumerate(columns):
                by_length.setdefault(c.shape[-1], []).append(j)
            for k, js in sorted(by_length.items()):
                sent, summed = self._int8_sum_parts([flat_columns[j] for j in js], group, column=k)
                for j, sent_j, summed_j in zip(js, sent, summed):
                    sent_f[j], summed_f[j] = sent_j, summed_j
            sent_d, summed_d = self._int8_sum_parts(dense, group, column=None)
        elif flat_columns or dense:
            parts = flat_columns + dense
            summed = self._sum_in_rank_order(torch.cat(parts), group).split([t.numel() for t in parts])
            sent_f, sent_d = flat_columns, dense
            summed_f, summed_d = list(summed[: len(columns)]), list(summed[len(columns) :])
        else:
            return [], [], [], []

        def as_factors(flat: list[torch.Tensor]) -> list[torch.Tensor]:
            return [t.view(c.shape).mT for t, c in zip(flat, columns)]

        return as_factors(sent_f), as_factors(summed_f), list(sent_d), list(summed_d)

    def _int8_sum_parts(
        self, parts: list[torch.Tensor], group: dist.ProcessGroup | None, column: int | None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(sent, summed) per part, by one `int8_sum`: in chunks within each `column` entries, or
        (column=None) of `chunk_size` within each part."""
        if not parts:
            return [], []
        numels = [t.numel() for t in parts]
        if column is None:
            sizes, chunk = numels, self.chunk_size
        else:
            sizes, chunk = [column] * (sum(numels) // column), max(32, min(self.chunk_size, column))
        sent, summed = int8_sum(self, torch.cat(parts), group, sizes, chunk)
        return list(sent.split(numels)), list(summed.split(numels))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "q": {k: v.clone() for k, v in self.q.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.q = {k: v.clone() for k, v in state_dict["q"].items()}
