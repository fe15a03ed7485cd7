"""Data configuration: which token shards to read and how to pack them."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DataSourceConfig:
    path: str = ""  # a prepared dataset dir (format=parquet) or a Megatron prefix (format=megatron)
    weight: float = 1.0  # relative sampling weight when several sources are blended
    format: str = "parquet"  # parquet | megatron
    # megatron only: token put between documents; -1 = take "eod_id" from the sidecar <path>.json
    eod_id: int = -1


@dataclass
class DataConfig:
    # Empty: the embedded default corpus, the Python standard library of the running
    # interpreter, tokenized once into `cache_dir` on first use.
    sources: list[DataSourceConfig] = field(default_factory=list)
    cache_dir: str = "~/.cache/moeforge"
    seq_len: int = 256
    micro_batch_size: int = 8  # sequences per rank per forward pass
    tokenizer_vocab_size: int = 4096  # BPE vocab trained for the embedded corpus
    val_fraction: float = 0.02  # documents held out for validation when preparing (megatron-only: samples)
    val_batches: int = 8  # micro-batches per validation pass
