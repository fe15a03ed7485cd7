"""Data pipeline: text -> token shards (`python -m data.prepare`) -> packed, blended, rank-sharded,
resumable micro-batches.

    from data import Batch, DataError, build_train_loader, build_val_batches, dataset_vocab_size
    loader = build_train_loader(cfg, seed=1234, dp_rank=r, dp_size=dp)  # infinite iterator of Batch
    batch = next(loader); loader.state_dict(); loader.load_state_dict(state)
"""

from data.errors import DataError
from data.loader import Batch, TrainLoader, build_train_loader, build_val_batches, dataset_vocab_size

__all__ = [
    "Batch",
    "DataError",
    "TrainLoader",
    "build_train_loader",
    "build_val_batches",
    "dataset_vocab_size",
]
