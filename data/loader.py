"""Rank-aware, resumable micro-batch loaders built from a `DataConfig`.

Layout: a global cursor `consumed_samples` walks the blended sample sequence. `next()` on rank r
of dp_size returns global samples [consumed + r*B, consumed + (r+1)*B) and advances consumed by
dp_size*B. So micro-batch k of rank r is global micro-batch k*dp_size + r, and one process with
dp_size=1 sees the micro-batches of all ranks in order: the single-process reference of the
multi-rank tests. The state is the cursor alone, so it loads at any dp_size.

Validation data: the val split of the first parquet source. With only Megatron sources (which
have no val split), the last `val_fraction` of the first source's samples are held out: training
never reads them and validation reads only them.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data.blending import BlendedSamples
from data.config import DataConfig, DataSourceConfig
from data.dataset import MegatronTokens, ParquetTokens, TokenStream, read_metadata
from data.errors import DataError
from data.packing import PackedSamples


@dataclass
class Batch:
    tokens: torch.Tensor  # [B, S] int64 model inputs
    labels: torch.Tensor  # [B, S] int64 next-token targets: tokens shifted left by one


def _to_batch(windows: np.ndarray) -> Batch:
    w = torch.from_numpy(windows)
    return Batch(tokens=w[:, :-1].contiguous(), labels=w[:, 1:].contiguous())


def _resolve_sources(cfg: DataConfig) -> list[DataSourceConfig]:
    if cfg.seq_len < 1 or cfg.micro_batch_size < 1:
        raise DataError(
            f"data: seq_len ({cfg.seq_len}) and micro_batch_size ({cfg.micro_batch_size}) must be >= 1"
        )
    if not cfg.sources:
        # Imported here so that `python -m data.prepare` does not import itself twice via data/__init__.
        from data.prepare import ensure_default_corpus

        return [DataSourceConfig(path=str(ensure_default_corpus(cfg)))]
    for i, src in enumerate(cfg.sources):
        if src.format not in ("parquet", "megatron"):
            raise DataError(f"data: sources[{i}].format is {src.format!r}; use 'parquet' or 'megatron'")
        if not src.path:
            raise DataError(f"data: sources[{i}].path is empty; give a prepared dir or a Megatron prefix")
        if not isinstance(src.weight, (int, float)) or not 0 < src.weight < math.inf:
            raise DataError(
                f"data: sources[{i}] ({src.path}) has weight {src.weight}; weights must be finite and > 0"
            )
    return list(cfg.sources)


def _open(src: DataSourceConfig, split: str) -> TokenStream:
    """The source's split, opened (and checked) once per process while its files are unchanged:
    `python -m trainer` checks the data before Hydra writes anything, and training then reuses
    what the check opened."""
    path = Path(src.path).expanduser()
    marker = path / "metadata.json" if src.format == "parquet" else Path(f"{path}.bin")
    try:
        stamp = marker.stat().st_mtime_ns
    except OSError:
        stamp = 0  # missing: the reader says so
    return _open_cached(src.format, str(path), split, src.eod_id, stamp)


@functools.lru_cache(maxsize=4)
def _open_cached(fmt: str, path: str, split: str, eod_id: int, stamp: int) -> TokenStream:
    if fmt == "parquet":
        return ParquetTokens(Path(path) / split)
    return MegatronTokens(path, eod_id)


def _holdout(num_samples: int, cfg: DataConfig, src: DataSourceConfig) -> int:
    """Samples held out of the first Megatron source for validation when no source has a val split."""
    held = max(1, int(num_samples * cfg.val_fraction)) if cfg.val_fraction > 0 else 0
    if held >= num_samples:
        raise DataError(
            f"data: {src.path} has {num_samples} samples of seq_len {cfg.seq_len}, too few to hold out "
            "validation data; lower data.seq_len or add a parquet source with a val split"
        )
    return held


def _has_val_split(sources: list[DataSourceConfig]) -> bool:
    return any(s.format == "parquet" for s in sources)


class TrainLoader:
    """Infinite iterator of this rank's micro-batches; `state_dict()` is the global cursor."""

    def __init__(
        self, samples: BlendedSamples, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1
    ) -> None:
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, dp_size={dp_size})")
        self.samples, self.micro_batch_size = samples, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.consumed_samples = 0

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> Batch:
        start = self.consumed_samples + self.dp_rank * self.micro_batch_size
        windows = self.samples.windows(np.arange(start, start + self.micro_batch_size))
        self.consumed_samples += self.dp_size * self.micro_batch_size
        return _to_batch(windows)

    @property
    def epoch(self) -> int:
        return self.consumed_samples // self.samples.epoch_len

    def state_dict(self) -> dict[str, int]:
        return {
            "consumed_samples": self.consumed_samples,
            "epoch": self.epoch,  # informational: derived from the cursor
            "samples_per_epoch": self.samples.epoch_len,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state["samples_per_epoch"]) != self.samples.epoch_len:
            raise DataError(
                f"data: the checkpoint's loader state is for {state['samples_per_epoch']} samples per epoch, "
                f"this data config gives {self.samples.epoch_len}; resume with the same data and seq_len"
            )
        self.consumed_samples = int(state["consumed_samples"])


def build_train_loader(cfg: DataConfig, *, seed: int, dp_rank: int = 0, dp_size: int = 1) -> TrainLoader:
    """Shuffled, blended, infinite micro-batches of this data-parallel rank."""
    sources = _resolve_sources(cfg)
    packed = []
    for i, src in enumerate(sources):
        samples = PackedSamples(_open(src, "train"), cfg.seq_len)
        if i == 0 and not _has_val_split(sources):
            samples = PackedSamples(
                samples.stream, cfg.seq_len, 0, len(samples) - _holdout(len(samples), cfg, src)
            )
        packed.append(samples)
    blended = BlendedSamples(packed, [s.weight for s in sources], seed)
    return TrainLoader(blended, cfg.micro_batch_size, dp_rank, dp_size)


def build_val_batches(cfg: DataConfig, *, dp_rank: int = 0, dp_size: int = 1) -> list[Batch]:
    """cfg.val_batches micro-batches of this rank, in order (no shuffle), same layout as training.

    A val set smaller than val_batches * dp_size * B samples is read round-robin from its start.
    """
    sources = _resolve_sources(cfg)
    if cfg.val_batches == 0:
        return []
    if _has_val_split(sources):
        src = next(s for s in sources if s.format == "parquet")
        samples = PackedSamples(_open(src, "val"), cfg.seq_len)
    else:
        src = sources[0]
        full = PackedSamples(_open(src, "train"), cfg.seq_len)
        held = _holdout(len(full), cfg, src)
        if held == 0:
            raise DataError(
                f"data: no validation data for {src.path}: val_fraction is 0; set data.val_batches=0"
            )
        samples = PackedSamples(full.stream, cfg.seq_len, len(full) - held, held)
    B = cfg.micro_batch_size
    return [
        _to_batch(
            samples.windows(
                np.arange((k * dp_size + dp_rank) * B, (k * dp_size + dp_rank + 1) * B) % len(samples)
            )
        )
        for k in range(cfg.val_batches)
    ]


def dataset_vocab_size(cfg: DataConfig) -> int:
    """Tokens ids the data can contain (max over sources); the model's vocab must be at least this."""
    sizes = []
    for src in _resolve_sources(cfg):
        if src.format == "parquet":
            sizes.append(int(read_metadata(Path(src.path).expanduser())["vocab_size"]))
        else:
            sizes.append(_open(src, "train").vocab_size)
    return max(sizes)
