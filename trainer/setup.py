"""Building blocks of a run: device, autocast, data, model. Each is a plain function of the config
(no global state), so the distributed setup of a later issue can call them per rank.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from data import Batch, DataError, TrainLoader, build_train_loader, build_val_batches, dataset_vocab_size
from trainer.config import JobConfig
from trainer.errors import ConfigError, bad_value


def resolve_device(name: str) -> torch.device:
    """`train.device`: auto picks CUDA when visible (this process's local GPU), else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


def autocast_for(device: torch.device) -> Callable[[], AbstractContextManager]:
    """bf16 autocast on CUDA (fp32 master weights, fp32 loss: the model upcasts logits); fp32 on CPU."""
    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def build_data(
    cfg: JobConfig, *, seed: int, dp_rank: int = 0, dp_size: int = 1
) -> tuple[TrainLoader, list[Batch]]:
    """This rank's training loader and validation batches, after checking the model's vocab covers
    the data. `DataError` becomes a `ConfigError` on the data source it concerns."""
    try:
        data_vocab = dataset_vocab_size(cfg.data)
        train = build_train_loader(cfg.data, seed=seed, dp_rank=dp_rank, dp_size=dp_size)
        val = build_val_batches(cfg.data, dp_rank=dp_rank, dp_size=dp_size)
    except DataError as e:
        raise data_config_error(cfg, e) from e
    if cfg.model.vocab_size < data_vocab:
        raise bad_value(
            "model.vocab_size",
            cfg.model.vocab_size,
            f"is smaller than the dataset's vocab of {data_vocab} tokens",
            f"set model.vocab_size>={data_vocab}",
        )
    return train, val


def data_config_error(cfg: JobConfig, err: DataError) -> ConfigError:
    """Name the source whose path appears in the data error (else `data`), keep data's own line."""
    field = "data.cache_dir" if not cfg.data.sources else "data"
    for i, src in enumerate(cfg.data.sources):
        if src.path and src.path.rstrip("/") in str(err):
            field = f"data.sources[{i}].path"
            break
    text = str(err).removeprefix("data:").strip()
    return ConfigError(field, f"{field}: {text}")
