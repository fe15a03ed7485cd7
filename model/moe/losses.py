"""Router losses: Switch/GShard load balancing at three scopes, and the router z-loss.

Balancing loss = E * sum_i f_i * P_i, with f_i the share of routed token copies sent to expert i
and P_i the mean router probability of expert i. Scopes:
- micro_batch: f and P over this micro-batch;
- sequence: per sequence, then averaged (DeepSeek-V3's complementary sequence-wise loss);
- global_batch: f from counts summed over the data-parallel group (`reduce_counts`), P local.
  Averaging the local losses over ranks then equals the loss over the micro-batches the dp ranks
  process together, because every rank holds the same number of tokens. On one process the
  reduction is the identity. Its value therefore depends on dp (as Megatron's global-batch loss
  depends on dp and accumulation); micro_batch and sequence scopes do not depend on the layout.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

CountsReducer = Callable[[torch.Tensor], torch.Tensor]


def load_balancing_loss(
    probs_TE: torch.Tensor,
    experts_TK: torch.Tensor,
    scope: str,
    seq_len: int,
    reduce_counts: CountsReducer | None = None,
) -> torch.Tensor:
    T, E = probs_TE.shape
    K = experts_TK.shape[1]
    if scope == "sequence":
        B = T // seq_len
        ones = torch.ones(B, seq_len * K, device=probs_TE.device)
        counts_BE = torch.zeros(B, E, device=probs_TE.device).scatter_add_(1, experts_TK.view(B, -1), ones)
        f_BE = counts_BE / (seq_len * K)
        P_BE = probs_TE.view(B, seq_len, E).mean(dim=1)
        return E * (f_BE * P_BE).sum(dim=-1).mean()
    counts_E = torch.bincount(experts_TK.reshape(-1), minlength=E).float()
    if scope == "global_batch" and reduce_counts is not None:
        counts_E = reduce_counts(counts_E)
    f_E = counts_E / counts_E.sum()
    return E * (f_E * probs_TE.mean(dim=0)).sum()


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """Penalises large router logits (ST-MoE), keeping the softmax out of its saturated regime."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


class AuxLossInjector(torch.autograd.Function):
    """Identity on the layer output; in backward, also sends gradient `scale` into the aux loss.

    The aux loss then needs no path to the final loss (Megatron's approach): this is what lets
    pipeline stages that never see the loss still train their routers.
    """

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux_loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(aux_loss)
        ctx.scale = scale
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (aux_loss,) = ctx.saved_tensors
        return grad_output, torch.full_like(aux_loss, ctx.scale), None
