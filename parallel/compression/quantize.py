"""Quantized compressed all-reduce with error feedback (1-bit Adam style): `sign` (1 bit per
entry + one fp32 scale = mean |x| per tensor) and `int8` (8 bits per entry + one fp32 scale per
chunk).

`int8` is a two-phase all-reduce (`int8_sum`), as in 1-bit Adam's compressed all-reduce: the sum
of quantized values does not stay quantized, so each rank sums one shard of everybody's payload
(all-to-all), requantizes it and the shards are all-gathered: 2 (p-1)/p bytes per entry, 1/4 of
the fp32 ring all-reduce at any rank count. `sign` all-gathers its packed bits and sums in fp32
on every rank ((p-1)/8 bytes per entry: 1/32 of fp32 at 2 ranks, 1/16 at 4 ranks).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from parallel.compression.base import Compressor, Segment, group_size

_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Bool `[n]` -> uint8 `[ceil(n / 8)]`, most significant bit first (as numpy.packbits)."""
    n = bits.numel()
    padded = torch.zeros(-(-n // 8) * 8, dtype=torch.uint8)
    padded[:n] = bits.reshape(-1)
    return (padded.view(-1, 8) * _BIT_WEIGHTS).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `pack_bits` (works on `[..., ceil(n / 8)]`): bool `[..., n]`."""
    bits = (packed.unsqueeze(-1) & _BIT_WEIGHTS) != 0
    return bits.flatten(-2)[..., :n]


def quantize_int8(x: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat fp32 `[n]` -> (int8 `[n]`, fp32 scale `[ceil(n / chunk_size)]`); the error is at most
    scale / 2 = max |x| over the chunk / 254 per entry."""
    n = x.numel()
    x_CK = _pad(x, chunk_size).view(-1, chunk_size)
    scale_C = x_CK.abs().amax(1) / 127
    q_CK = torch.round(x_CK / scale_C.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(1))
    return q_CK.clamp_(-127, 127).to(torch.int8).view(-1)[:n], scale_C


def dequantize_int8(q: torch.Tensor, scale_C: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Inverse of `quantize_int8`, also for stacked `[P, n]` payloads with `[P, C]` scales."""
    n, num_chunks = q.shape[-1], scale_C.shape[-1]
    q_CK = torch.nn.functional.pad(q.float(), (0, num_chunks * chunk_size - n))
    q_CK = q_CK.unflatten(-1, (num_chunks, chunk_size))
    return (q_CK * scale_C.unsqueeze(-1)).flatten(-2)[..., :n]


def _pad(x: torch.Tensor, multiple: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, -x.numel() % multiple))


class SignCompression(Compressor):
    """sign(x) * mean |x|, per tensor (segment): 1/32 of the fp32 bytes plus 4 bytes per tensor."""

    kind = "sign"

    def _compressed_sum(
        self, x: torch.Tensor, group: dist.ProcessGroup | None, segments: list[Segment]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        numels = torch.tensor([s.numel for s in segments])
        scale_S = torch.stack([part.abs().mean() for part in x.split(numels.tolist())])
        bits = x >= 0
        sent = torch.where(bits, 1.0, -1.0) * scale_S.repeat_interleave(numels)
        bits_PN = unpack_bits(self._all_gather(pack_bits(bits), group), x.numel())
        scale_PS = self._all_gather(scale_S, group)
        signs_PN = torch.where(bits_PN, 1.0, -1.0)
        return sent, (signs_PN * scale_PS.repeat_interleave(numels, dim=1)).sum(0)


class Int8Compression(Compressor):
    """round(x / scale) in int8 with scale = max |x| / 127 per chunk of `chunk_size` entries,
    summed by `int8_sum`: 1/4 of the fp32 bytes plus 4 bytes per chunk (and the zeros that pad
    each parameter to whole chunks). Chunks never span two parameters, so the result does not
    depend on how DDP grouped parameters into buckets."""

    kind = "int8"
    options = ("chunk_size",)

    def __init__(
        self, warmup_steps: int = 0, second_moment: str = "compressed", chunk_size: int = 1024
    ) -> None:
        super().__init__(warmup_steps, second_moment)
        self.chunk_size = chunk_size

    def _compressed_sum(
        self, x: torch.Tensor, group: dist.ProcessGroup | None, segments: list[Segment]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return int8_sum(self, x, group, [s.numel for s in segments], self.chunk_size)


def int8_sum(
    comp: Compressor, x: torch.Tensor, group: dist.ProcessGroup | None, sizes: list[int], chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sent, sum over `group`) of flat fp32 `x`, made of parts of `sizes`, by a two-phase int8
    all-reduce whose collectives `comp` counts:
    1. each part is padded to whole chunks (so no chunk spans two parameters and the result does not
       depend on how DDP grouped them) and quantized, one scale per chunk; the padded buffer is cut
       into p equal shards of whole chunks;
    2. all-to-all: rank j receives every rank's shard j, dequantizes and sums it in rank order;
    3. rank j requantizes its summed shard; all-gather; every rank dequantizes the same total.
    `sent` is this rank's dequantized phase-1 payload: its rounding stays in this rank's residual.
    The phase-2 rounding of the sum (at most scale / 2 per entry, the summed chunk's scale) is not
    fed back: only the owner of a shard knows it, and which rank owns an entry depends on where
    it lies in the DDP bucket, which DDP rebuilds after a restart, so feeding it back (1-bit Adam's
    "server" residual) would make a restarted run diverge from an uninterrupted one."""
    p = group_size(group)
    keep, padded = padded_positions(sizes, chunk_size)
    shard = -(-padded // (p * chunk_size)) * chunk_size
    q, scale_C = quantize_int8(x.new_zeros(p * shard).index_copy_(0, keep, x), chunk_size)
    sent = dequantize_int8(q, scale_C, chunk_size)[keep]
    if p == 1:
        return sent, sent.clone()
    mine = dequantize_int8(comp._all_to_all(q, group), comp._all_to_all(scale_C, group), chunk_size).sum(0)
    q_mine, scale_mine = quantize_int8(mine, chunk_size)
    q_all, scale_all = comp._all_gather(q_mine, group), comp._all_gather(scale_mine, group)
    return sent, dequantize_int8(q_all, scale_all, chunk_size).view(-1)[keep]


def padded_positions(sizes: list[int], multiple: int) -> tuple[torch.Tensor, int]:
    """Where the entries of consecutive parts of `sizes` land when each part is padded to a
    multiple of `multiple`, and the padded length."""
    positions, start = [], 0
    for n in sizes:
        positions.append(torch.arange(start, start + n))
        start += -(-n // multiple) * multiple
    return torch.cat(positions), start
