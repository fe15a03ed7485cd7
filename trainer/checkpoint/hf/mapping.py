"""The one mapping rule between a Hugging Face tensor and ours: a `Link`.

A family adapter describes a checkpoint as a list of links. Each link says that one rectangular
block of one of our tensors is one block of one HF tensor, possibly transposed (HF `Linear`
weights are `[out, in]`, our expert banks `[E, in, out]`), with the rows permuted (interleaved
rotary pairs -> our two-halves layout) or scaled (upcycling). Both directions come from the
same list: import reads, for any region of our tensor that a rank owns, just the HF slices
behind it; export builds each HF tensor from the blocks of ours. Checking that the links cover
every tensor exactly once is what makes "a tensor left over" or "a tensor never written" an
error instead of a silently dropped weight.

Index conventions: `our_index` / `hf_index` give the leading dims of the block; an `int` picks
one entry and drops that dim (an expert of an `[E, ...]` bank), a `slice` keeps it; dims left
out are whole.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Index = tuple[int | slice, ...]
Region = tuple[tuple[int, int], ...]  # per dim: [start, stop) in global coordinates


@dataclass(frozen=True)
class Link:
    ours: str  # our state-dict key, e.g. "layers.3.moe.experts.w1"
    hf: str  # HF tensor name, e.g. "model.layers.3.mlp.experts.0.gate_proj.weight"
    hf_shape: tuple[int, ...]  # the whole HF tensor's shape (what the adapter expects on disk)
    our_index: Index = ()
    hf_index: Index = ()
    transpose: bool = False  # our block = HF block with its last two dims swapped
    perm: tuple[int, ...] | None = None  # our block's row i = (transposed) HF block's row perm[i]
    scale: float = 1.0  # our block = scale * HF block (import only: upcycling)


def _ranges(index: Index, shape: Sequence[int]) -> list[tuple[int, int, bool]]:
    """(start, stop, kept) per dim of a tensor of `shape` for a block index."""
    out = []
    for dim, size in enumerate(shape):
        entry = index[dim] if dim < len(index) else slice(None)
        if isinstance(entry, int):
            out.append((entry, entry + 1, False))
        else:
            start, stop, step = entry.indices(size)
            assert step == 1, "blocks are contiguous"
            out.append((start, stop, True))
    return out


def block_shape(index: Index, shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(stop - start for start, stop, kept in _ranges(index, shape) if kept)


def block_numel(index: Index, shape: Sequence[int]) -> int:
    return math.prod(stop - start for start, stop, _ in _ranges(index, shape))


def hf_block_as_ours(link: Link) -> tuple[int, ...]:
    """The shape the HF block has once transposed, i.e. the shape our block must have."""
    shape = block_shape(link.hf_index, link.hf_shape)
    if link.transpose:
        shape = (*shape[:-2], shape[-1], shape[-2])
    return shape


def read_ours(
    link: Link,
    our_shape: Sequence[int],
    region: Region,
    read_hf: Callable[[str, tuple[slice, ...]], torch.Tensor],
) -> tuple[tuple[slice, ...], torch.Tensor] | None:
    """The part of `region` (of our tensor) that `link` provides: (where it goes, relative to the
    region's start; its values, in the HF tensor's dtype), reading only the HF slices behind it.
    None if they miss."""
    ours = _ranges(link.our_index, our_shape)
    inter = [(max(s, r0), min(e, r1)) for (s, e, _), (r0, r1) in zip(ours, region)]
    if any(lo >= hi for lo, hi in inter):
        return None
    # An entry of a dropped dim is an int, so the copy into the region is 2-D when the block is
    # (torch's transposed 2-D copy is ~5x faster than the same copy with a size-1 dim in front).
    dest = tuple(
        slice(lo - r0, hi - r0) if kept else lo - r0
        for (lo, hi), (r0, _), (_, _, kept) in zip(inter, region, ours)
    )
    # Block-relative ranges of the kept dims: the coordinates of the (transposed) HF block.
    rel = [(lo - s, hi - s) for (lo, hi), (s, _, kept) in zip(inter, ours) if kept]
    if link.perm is not None:
        rel[0] = (0, len(link.perm))  # read every row of the block, permute, then cut
    if link.transpose:
        rel[-2], rel[-1] = rel[-1], rel[-2]
    hf_ranges = _ranges(link.hf_index, link.hf_shape)
    hf_slices, kept_shape, kept_dims = [], [], iter(rel)
    for start, stop, kept in hf_ranges:
        if kept:
            lo, hi = next(kept_dims)
            hf_slices.append(slice(start + lo, start + hi))
            kept_shape.append(hi - lo)
        else:
            hf_slices.append(slice(start, stop))
    values = read_hf(link.hf, tuple(hf_slices)).reshape(kept_shape)
    if link.transpose:
        values = values.transpose(-1, -2)
    if link.perm is not None:
        lo, hi = next((lo - s, hi - s) for (lo, hi), (s, _, kept) in zip(inter, ours) if kept)
        values = values[list(link.perm)][lo:hi]
    if link.scale != 1.0:
        values = values.float() * link.scale
    return dest, values


def write_hf(link: Link, ours: torch.Tensor, hf_out: torch.Tensor) -> None:
    """Export: put `link`'s block of our full tensor `ours` into the HF tensor `hf_out`."""
    assert link.scale == 1.0, "scaled links are import-only (upcycling)"
    ranges = _ranges(link.our_index, ours.shape)
    block = ours[tuple(slice(s, e) for s, e, _ in ranges)].reshape(block_shape(link.our_index, ours.shape))
    if link.perm is not None:
        block = block[torch.argsort(torch.tensor(link.perm))]
    if link.transpose:
        block = block.transpose(-1, -2)
    hf_ranges = _ranges(link.hf_index, hf_out.shape)
    target = hf_out[tuple(slice(s, e) for s, e, _ in hf_ranges)]
    target.copy_(block.reshape(target.shape))
