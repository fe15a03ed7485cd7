"""Layout-independent weight initialisation.

Every parameter is drawn from its own generator, seeded from (run seed, parameter name). The
values therefore depend only on the seed and the parameter's fully-qualified name, not on the
order modules were built, which ranks hold which layers, or how tensors are sharded: a pipeline
stage or an expert-parallel shard gets exactly the slice of the single-process weights.
"""

from __future__ import annotations

import math
import zlib

import torch

from model.config import ModelConfig


def param_generator(seed: int, name: str) -> torch.Generator:
    # crc32, not hash(): Python's str hash is salted per process.
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def init_std(name: str, cfg: ModelConfig) -> float:
    """Normal(0, init_std) for weights; residual-branch output projections scaled down by
    sqrt(2 * layers) so the residual stream's variance does not grow with depth (GPT-2)."""
    leaf = name.rsplit(".", 2)
    if "wo" in leaf or "w2" in leaf:
        return cfg.init_std / math.sqrt(2 * cfg.num_layers)
    return cfg.init_std


def initial_value(name: str, shape: torch.Size, seed: int, cfg: ModelConfig) -> torch.Tensor:
    """The full (unsharded) initial value of parameter `name`, on CPU in fp32."""
    leaf = name.rsplit(".", 1)[-1]
    if name.endswith("out_norm.weight"):
        return torch.ones(shape)  # Gated DeltaNet's gated norm: weight * normed, never zero-centred
    if leaf == "A_log":
        # Gated DeltaNet decay rates A in [1, 16] (Mamba-2's A_init_range), stored as log A.
        return torch.empty(shape).uniform_(1.0, 16.0, generator=param_generator(seed, name)).log()
    if leaf == "dt_bias":
        # Mamba's: softplus(dt_bias) = dt, log-uniform in [1e-3, 1e-1], so the per-token decay
        # exp(-A dt) starts slow (HF's ones would start at exp(-1.3 A), nearly forgetting each step).
        u = torch.empty(shape).uniform_(generator=param_generator(seed, name))
        dt = torch.exp(u * (math.log(1e-1) - math.log(1e-3)) + math.log(1e-3))
        return dt + torch.log(-torch.expm1(-dt))  # inverse softplus
    if leaf.startswith("conv_"):
        # Depthwise causal conv taps: std 1/sqrt(kernel) keeps the conv output at its input's scale.
        std = 1.0 / math.sqrt(shape[-1])
        return torch.empty(shape).normal_(0.0, std, generator=param_generator(seed, name))
    if name.endswith("norm.weight"):
        # Zero-centered norms (Qwen3-Next) scale by 1 + weight: both start as the identity.
        return torch.zeros(shape) if cfg.norm_zero_centered else torch.ones(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)  # q/k/v biases (`qkv_bias`), as in Qwen2's init
    return torch.empty(shape).normal_(0.0, init_std(name, cfg), generator=param_generator(seed, name))
