"""Decoder-only MoE transformer in plain single-device PyTorch.

Layers live in a ModuleDict keyed by layer index, so parameter names (and thus initial values
and checkpoint keys) stay the same when pipeline parallelism keeps only some layers on a rank.
Shape legend: B batch, S sequence, D model dim, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from model.attention import build_attention
from model.config import ModelConfig
from model.init import initial_value
from model.layers import RMSNorm, SwiGLU, rope_tables
from model.moe import MoE

IGNORE_INDEX = -100


@dataclass
class ModelOutput:
    ce_sum: torch.Tensor  # sum of next-token cross-entropy over non-ignored labels
    num_tokens: int  # number of non-ignored labels
    mtp_ce_sum: torch.Tensor  # multi-token-prediction CE sum, averaged over depths (0 if none)


def cross_entropy_sum(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy in fp32 over the non-ignored labels."""
    return F.cross_entropy(
        logits_BSV.float().flatten(0, 1), labels_BS.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_zero_centered)
        self.attention = build_attention(cfg, layer_idx)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_zero_centered)
        if cfg.is_moe_layer(layer_idx):
            self.moe = MoE(cfg)
        else:
            self.feed_forward = SwiGLU(cfg.dim, cfg.ffn_hidden)

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h_BSD = x_BSD + self.attention(self.attention_norm(x_BSD), cos, sin)
        ffn = self.moe if hasattr(self, "moe") else self.feed_forward
        return h_BSD + ffn(self.ffn_norm(h_BSD))


class MTPModule(nn.Module):
    """One DeepSeek-V3 multi-token-prediction depth: combine the previous depth's hidden state
    with the embedding of the next token, run one block, predict one token further ahead."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_zero_centered)
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_zero_centered)
        self.proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)
        self.block = TransformerBlock(cfg, cfg.num_layers - 1)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_zero_centered)

    def forward(self, h_BSD: torch.Tensor, emb_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        x_BSD = self.proj(torch.cat([self.hnorm(h_BSD), self.enorm(emb_BSD)], dim=-1))
        h_BSD = self.block(x_BSD, cos, sin)
        return h_BSD, self.norm(h_BSD)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg, i) for i in range(cfg.num_layers)})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_zero_centered)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPModule(cfg) for _ in range(cfg.mtp_depth))
        self.rotary_dim = cfg.rotary_dim  # MLA's rope head dim, or GQA's head_dim * partial factor
        cos, sin = rope_tables(self.rotary_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    # ---- initialisation -------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int, params: bool = True) -> None:
        """Fill every parameter with its layout-independent initial value (see model/init.py) and
        reset buffers. Works after `to_empty()` on a model built on the meta device, also when
        parallel/ has pruned it to a pipeline stage or sharded its parameters as DTensors.
        `params=False` resets the buffers only, for weights about to be loaded (an HF import)."""
        for name, param in self.named_parameters() if params else ():
            full = initial_value(name, param.shape, seed, self.cfg).to(param.device)
            if isinstance(param, DTensor):
                # Sharded by parallel/: every rank computes the same full value and keeps its
                # slice (no communication), so each layout starts from the single-process weights.
                full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
            param.copy_(full)
        cos, sin = rope_tables(
            self.rotary_dim, self.cfg.max_seq_len, self.cfg.rope_theta, self.cfg.rope_scaling
        )
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        for moe in self.moe_layers():
            moe.reset_buffers()

    # ---- forward ----------------------------------------------------------------------------
    def forward(self, inputs: torch.Tensor, labels_BS: torch.Tensor | None = None):
        """With labels: the whole model, returning its losses (`ModelOutput`). Without labels: one
        pipeline stage (parallel/pipeline.py keeps only some layers, and the embedding / final
        norm only on the first / last stage), returning the hidden state for the next stage."""
        h_BSD = self.tok_embeddings(inputs) if self.tok_embeddings is not None else inputs
        for layer in self.layers.values():
            h_BSD = layer(h_BSD, self.rope_cos, self.rope_sin)
        if labels_BS is None:
            return self.norm(h_BSD) if self.norm is not None else h_BSD
        ce_sum = self._ce_sum(self.norm(h_BSD), labels_BS)
        mtp_ce_sum = self._mtp_ce_sum(h_BSD, inputs, labels_BS) if len(self.mtp) else ce_sum.new_zeros(())
        return ModelOutput(
            ce_sum=ce_sum,
            num_tokens=int((labels_BS != IGNORE_INDEX).sum()),
            mtp_ce_sum=mtp_ce_sum,
        )

    def logits(self, h_BSD: torch.Tensor) -> torch.Tensor:
        # Through the module (not its weight), so tensor-parallel plans on `output` apply.
        return self.output(h_BSD) if self.output is not None else F.linear(h_BSD, self.tok_embeddings.weight)

    def _ce_sum(self, h_BSD: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
        return cross_entropy_sum(self.logits(h_BSD), labels_BS)

    def _mtp_ce_sum(self, h_BSD: torch.Tensor, tokens_BS: torch.Tensor, labels_BS: torch.Tensor):
        """Depth k predicts the token k+1 positions ahead from the embedding of the token k ahead.
        Positions whose target falls past the window are ignored; causal attention keeps the
        padded tail from influencing earlier positions."""
        total = h_BSD.new_zeros((), dtype=torch.float32)
        for depth, module in enumerate(self.mtp, start=1):
            next_tokens_BS = F.pad(tokens_BS[:, depth:], (0, depth), value=0)
            future_labels_BS = F.pad(labels_BS[:, depth:], (0, depth), value=IGNORE_INDEX)
            h_BSD, normed_BSD = module(
                h_BSD, self.tok_embeddings(next_tokens_BS), self.rope_cos, self.rope_sin
            )
            total = total + self._ce_sum(normed_BSD, future_labels_BS)
        return total / len(self.mtp)

    # ---- MoE bookkeeping, called by the trainer ----------------------------------------------
    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def set_aux_loss_scale(self, scale: float) -> None:
        for moe in self.moe_layers():
            moe.aux_loss_scale = scale

    def end_of_step(self) -> None:
        for moe in self.moe_layers():
            moe.end_of_step()

    def moe_stats(self) -> dict[str, float]:
        """Expert load of the last completed optimizer step, per MoE layer."""
        stats: dict[str, float] = {}
        for name, module in self.named_modules():
            if isinstance(module, MoE):
                label = name.replace("layers.", "layer").replace(".moe", "").replace(".block", "")
                for key, value in module.last_step_stats.items():
                    stats[f"moe/{label}/{key}"] = value
        return stats
