"""The `Compressor` interface: a compressed SUM all-reduce with error feedback, byte counting,
warm-up and checkpointable state, plus the registry that maps a config's `kind` to a class.

Conventions shared by every algorithm:
- `group=None` means a group of one (no communication), as `ParallelModel.group()` returns for a
  dimension of size 1; unit tests use it to run the full compress -> aggregate path in-process.
- Error feedback is per *key* (a parameter name): the part of `grad + residual` that was not sent
  stays in the residual and is added to the next step's gradient. Keys are parameter names, not
  DDP bucket indices, because DDP rebuilds its buckets after the first iteration (and again after
  every restart), so a bucket index does not name the same parameters from one step to the next.
- Bytes on the wire are counted from the tensors each collective sends, under the
  bandwidth-optimal (ring) cost model: an all-reduce of b bytes puts 2(p-1)/p * b on the wire per
  rank, an all-gather of b bytes per rank puts (p-1) * b. `bytes_uncompressed` is the fp32
  all-reduce the caller would have done instead.
- The first `warmup_steps` optimizer steps (counted by `step()`) are sent uncompressed.
- `second_moment="factored"`: every compressed call also sums, over the group, the row and column
  sums of each rank's squared local gradient (Adafactor's factored statistics: m + n values per
  [m, n] matrix, in bf16) and keeps their rank-1 reconstruction in `second_moments[key]`, for
  Adam's second moment instead of the square of the compressed sum (`trainer.optim`). A low-rank
  or sparse sum has the wrong per-entry energy, and Adam divides by it (BENCHMARKS.md: PowerSGD
  with int8 factors at ~5% of the bytes is +1.5% in validation loss with Adam's own v, within
  0.3% with these statistics).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist

COMPRESSORS: dict[str, type[Compressor]] = {}


@dataclass
class CompressionConfig:
    """`parallel.compression`: which algorithm and its options (each class reads only its own)."""

    kind: str = "none"  # none | bf16 | powersgd | topk | sign | int8 | moe_selective
    warmup_steps: int = 0  # optimizer steps sent uncompressed first
    second_moment: str = "compressed"  # Adam's v from: compressed (the synced sum) | factored (see base.py)
    rank: int = 4  # powersgd: rank of the approximation
    seed: int = 0  # powersgd: seed of the initial Q (identical on every rank)
    factor_bits: int = 32  # powersgd: 32 (fp32 all-reduce of P and Q) or 8 (two-phase int8)
    topk_ratio: float = 0.01  # topk: fraction of the entries sent
    chunk_size: int = 1024  # int8 / moe_selective / powersgd at 8 bits: entries per quantization scale
    threshold: float = 0.0  # moe_selective: experts whose gradient norm is below it skip the sync


@dataclass(frozen=True)
class Segment:
    """One tensor inside a flat buffer (a parameter in a DDP bucket): its key and shape."""

    key: str
    shape: torch.Size

    @property
    def numel(self) -> int:
        return self.shape.numel()


def group_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


class Compressor(ABC):
    """A compressed equivalent of `dist.all_reduce(grad, SUM)`. Subclasses implement
    `_compressed_sum`; the base class does warm-up, error feedback and state."""

    kind: ClassVar[str]
    options: ClassVar[tuple[str, ...]] = ()  # CompressionConfig fields the constructor takes
    error_feedback: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            COMPRESSORS[cls.kind] = cls

    def __init__(self, warmup_steps: int = 0, second_moment: str = "compressed") -> None:
        self.warmup_steps = warmup_steps
        self.factored_second_moment = second_moment == "factored"
        self.second_moments: dict[str, torch.Tensor] = {}  # this step's, by key (factored only)
        self.steps_done = 0
        self.residuals: dict[str, torch.Tensor] = {}
        self.bytes_sent = 0  # this step, this rank
        self.bytes_uncompressed = 0
        self.last_stats: dict[str, int] = {}

    @property
    def compressing(self) -> bool:
        return self.steps_done >= self.warmup_steps

    # ---- entry points ---------------------------------------------------------------------------

    def all_reduce_sum(self, grad: torch.Tensor, group: dist.ProcessGroup | None, key: str) -> torch.Tensor:
        """Sum of `grad` over `group` (any shape; returns a new tensor of that shape and dtype)."""
        flat = grad.reshape(-1)
        return self.all_reduce_sum_segments(flat, group, [Segment(key, grad.shape)]).view(grad.shape)

    def all_reduce_sum_experts(
        self,
        grad_E: torch.Tensor,
        group: dist.ProcessGroup | None,
        key: str,
        active_E: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sum of an expert weight `[E_local, ...]` over the expert-data-parallel group. Only
        `moe_selective` uses `active_E` (which experts saw tokens); the others ignore it."""
        return self.all_reduce_sum(grad_E, group, key)

    def all_reduce_sum_segments(
        self, flat: torch.Tensor, group: dist.ProcessGroup | None, segments: list[Segment]
    ) -> torch.Tensor:
        """Sum of a flat buffer that concatenates `segments` (a DDP bucket) over `group`."""
        assert flat.numel() == sum(s.numel for s in segments), "segments must tile the buffer"
        x = flat.float()
        self.bytes_uncompressed += _all_reduce_bytes(x.numel() * 4, group_size(group))
        if not self.compressing:
            return self._all_reduce(x.clone(), group).to(flat.dtype)
        if self.factored_second_moment:
            self._sample_second_moments(x, group, segments)
        if self.error_feedback:
            x = x + self._residual(segments)
        sent, total = self._compressed_sum(x, group, segments)
        if self.error_feedback:
            self._set_residual(segments, x - sent)
        return total.to(flat.dtype)

    def step(self) -> dict[str, int]:
        """Call once per optimizer step, after the gradients are synced: returns the step's byte
        counts (a metric), resets them, and advances the warm-up counter."""
        self.last_stats = {"comm_bytes": self.bytes_sent, "comm_bytes_uncompressed": self.bytes_uncompressed}
        self.bytes_sent = self.bytes_uncompressed = 0
        self.second_moments.clear()
        self.steps_done += 1
        return self.last_stats

    # ---- the algorithm --------------------------------------------------------------------------

    @abstractmethod
    def _compressed_sum(
        self, x: torch.Tensor, group: dist.ProcessGroup | None, segments: list[Segment]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this rank's contribution as the receivers decode it, the sum over `group`)
        for the flat fp32 `x` (gradient + residual). `x - sent` becomes the new residual."""

    def _sample_second_moments(
        self, g: torch.Tensor, group: dist.ProcessGroup | None, segments: list[Segment]
    ) -> None:
        """`second_moments[key]` = the factored sum over ranks of each rank's squared local gradient
        `g` (module docstring): row and column sums (1-D tensors whole), summed in bf16."""
        stats = []
        for s, part in zip(segments, g.split([s.numel for s in segments])):
            sq = part.square()
            if len(s.shape) < 2:
                stats.append(sq)
            else:
                sq_BMN = sq.view(-1, s.shape[-2], s.shape[-1])
                stats += [sq_BMN.sum(2).reshape(-1), sq_BMN.sum(1).reshape(-1)]
        summed = self._sum_in_rank_order(torch.cat(stats).bfloat16(), group).float()
        parts = iter(summed.split([t.numel() for t in stats]))
        for s in segments:
            if len(s.shape) < 2:
                self.second_moments[s.key] = next(parts).view(s.shape)
                continue
            rows_BM = next(parts).view(-1, s.shape[-2])
            cols_BN = next(parts).view(-1, s.shape[-1])
            total_B11 = rows_BM.sum(1).clamp(min=torch.finfo(torch.float32).tiny)[:, None, None]
            self.second_moments[s.key] = (rows_BM[:, :, None] * cols_BN[:, None, :] / total_B11).view(s.shape)

    # ---- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Tensors only (loadable with `weights_only=True`). Residuals differ per rank: save them
        per rank, like RNG state."""
        return {
            "steps_done": torch.tensor(self.steps_done),
            "residuals": {k: v.clone() for k, v in self.residuals.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps_done = int(state_dict["steps_done"])
        self.residuals = {k: v.clone() for k, v in state_dict["residuals"].items()}

    # ---- helpers for subclasses -----------------------------------------------------------------

    def _residual(self, segments: list[Segment]) -> torch.Tensor:
        parts = []
        for s in segments:
            r = self.residuals.get(s.key)
            assert r is None or r.shape == s.shape, f"residual {s.key}: {tuple(r.shape)} != {tuple(s.shape)}"
            parts.append(torch.zeros(s.numel) if r is None else r.reshape(-1))
        return torch.cat(parts)

    def _set_residual(self, segments: list[Segment], residual: torch.Tensor) -> None:
        for s, r in zip(segments, residual.split([s.numel for s in segments])):
            self.residuals[s.key] = r.view(s.shape)

    def _all_reduce(self, t: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        """In-place SUM all-reduce of `t`, counted."""
        p = group_size(group)
        self.bytes_sent += _all_reduce_bytes(t.numel() * t.element_size(), p)
        if p > 1:
            dist.all_reduce(t, group=group)
        return t

    def _sum_in_rank_order(self, t: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        """SUM of flat `t` over `group` with the ring all-reduce's bytes, each entry summed in rank
        order whatever its position in `t`: all-to-all of p shards, sum, all-gather. A ring
        all-reduce adds each segment in another rank order, so an entry's rounding would depend on
        the DDP bucket it lands in, which changes when DDP rebuilds its buckets (after the first
        step, and after every restart): a restarted run would not continue bit for bit."""
        p = group_size(group)
        padded = torch.nn.functional.pad(t, (0, -t.numel() % p))
        mine = self._all_to_all(padded, group).sum(0, dtype=torch.float32).to(t.dtype)
        return self._all_gather(mine, group).view(-1)[: t.numel()]

    def _all_to_all(self, t: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        """Rank j receives slice j of every rank's `t` (cut in p equal slices), stacked in rank
        order: `[p, t.numel() // p]`, counted."""
        p = group_size(group)
        self.bytes_sent += (p - 1) * (t.numel() // p) * t.element_size()
        if p == 1:
            return t.view(1, -1)
        out = torch.empty_like(t)
        dist.all_to_all_single(out, t.contiguous(), group=group)
        return out.view(p, -1)

    def _all_gather(self, t: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        """Every rank's `t` (same shape on all ranks), stacked: `[p, *t.shape]`, counted."""
        p = group_size(group)
        self.bytes_sent += (p - 1) * t.numel() * t.element_size()
        if p == 1:
            return t.unsqueeze(0)
        out = t.new_empty(p * t.numel())
        dist.all_gather_single(out, t.contiguous().view(-1), group=group)
        return out.view(p, *t.shape)


def _all_reduce_bytes(nbytes: int, p: int) -> int:
    return 2 * (p - 1) * nbytes // p


def build_compressor(kind: str, **options: Any) -> Compressor:
    """`kind` -> class; `options` are that class's constructor arguments."""
    if kind not in COMPRESSORS:
        raise ValueError(f"parallel.compression.kind={kind!r}: expected one of {sorted(COMPRESSORS)}")
    cls = COMPRESSORS[kind]
    accepted = ("warmup_steps", "second_moment", *cls.options)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"parallel.compression: {kind} takes {list(accepted)}, not {unknown}")
    return cls(**options)


def compressor_from_config(cfg: CompressionConfig) -> Compressor:
    """Build from the config group, passing each class only the options it reads."""
    if cfg.kind not in COMPRESSORS:
        raise ValueError(f"parallel.compression.kind={cfg.kind!r}: expected one of {sorted(COMPRESSORS)}")
    cls = COMPRESSORS[cfg.kind]
    names = ("warmup_steps", "second_moment", *cls.options)
    return build_compressor(cfg.kind, **{name: getattr(cfg, name) for name in names})
