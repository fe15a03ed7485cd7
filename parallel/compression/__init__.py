"""Gradient compression for data-parallel (DDP) and expert-data-parallel gradient sync.

    compressor = compressor_from_config(cfg.parallel.compression)   # or build_compressor("topk", ...)
    ddp.register_comm_hook(dp_group, compression_hook(compressor, model))   # dense parameters
    grad.copy_(compressor.all_reduce_sum_experts(grad, edp_group, name))    # expert weights
    stats = compressor.step()   # once per optimizer step: {"comm_bytes", "comm_bytes_uncompressed"}

Algorithms (`kind`): none, bf16, powersgd, topk, sign, int8, moe_selective; see base.py for the
shared conventions (sum semantics, error feedback per parameter name, byte counting, warm-up).
"""

from parallel.compression.base import (
    COMPRESSORS,
    CompressionConfig,
    Compressor,
    Segment,
    build_compressor,
    compressor_from_config,
)
from parallel.compression.dense import BF16Compression, NoCompression
from parallel.compression.hook import compression_hook
from parallel.compression.powersgd import PowerSGDCompression
from parallel.compression.quantize import Int8Compression, SignCompression
from parallel.compression.selective import MoESelectiveCompression
from parallel.compression.topk import TopKCompression

__all__ = [
    "COMPRESSORS",
    "BF16Compression",
    "CompressionConfig",
    "Compressor",
    "Int8Compression",
    "MoESelectiveCompression",
    "NoCompression",
    "PowerSGDCompression",
    "Segment",
    "SignCompression",
    "TopKCompression",
    "build_compressor",
    "compression_hook",
    "compressor_from_config",
]
