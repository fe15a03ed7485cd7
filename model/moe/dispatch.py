"""Token dispatch: turn per-token expert choices into expert-contiguous token batches and back.

`LocalDispatcher` keeps everything on this rank. Expert parallelism swaps in a dispatcher with the
same two methods that exchanges tokens with all-to-all (`parallel/expert.py`); the MoE layer
does not change. Capacity dropping happens before dispatch, so every dispatcher sees the same
kept assignments.
Shape legend: T tokens, K experts per token, E experts, N kept token copies, D model dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class DispatchState:
    order_N: torch.Tensor  # index into the flattened [T*K] assignments, grouped by expert
    token_idx_N: torch.Tensor  # which token each routed copy came from
    num_tokens: int


class LocalDispatcher:
    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts

    def dispatch(
        self, x_TD: torch.Tensor, experts_TK: torch.Tensor, keep_TK: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchState]:
        """Returns the routed token copies sorted by expert, and the count per expert."""
        num_experts = self.num_experts
        flat_experts = experts_TK.reshape(-1)
        if keep_TK is not None:
            # Dropped copies get a sentinel id that sorts after every real expert, then are cut off.
            flat_experts = flat_experts.masked_fill(~keep_TK.reshape(-1), num_experts)
        counts_E = torch.bincount(flat_experts, minlength=num_experts + 1)[:num_experts]
        order_N = torch.argsort(flat_experts, stable=True)
        if keep_TK is not None:
            order_N = order_N[: int(counts_E.sum())]
        token_idx_N = order_N // experts_TK.shape[1]
        state = DispatchState(order_N, token_idx_N, x_TD.shape[0])
        return x_TD[token_idx_N], counts_E, state

    def combine(self, y_ND: torch.Tensor, weights_TK: torch.Tensor, state: DispatchState) -> torch.Tensor:
        """Weight each expert output by its routing weight and sum the copies of each token."""
        weights_N1 = weights_TK.reshape(-1)[state.order_N].unsqueeze(-1).to(y_ND.dtype)
        y_TD = y_ND.new_zeros(state.num_tokens, y_ND.shape[-1])
        return y_TD.index_add(0, state.token_idx_N, y_ND * weights_N1)


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def capacity_keep_mask(
    experts_TK: torch.Tensor, weights_TK: torch.Tensor, num_experts: int, capacity: int, policy: str
) -> torch.Tensor:
    """Which assignments fit in their expert's capacity. `probs` keeps each expert's highest-weight
    assignments; `position` keeps the earliest tokens (GShard/Switch order)."""
    T, K = experts_TK.shape
    flat_experts = experts_TK.reshape(-1)
    if policy == "probs":
        priority_order = torch.argsort(-weights_TK.detach().reshape(-1), stable=True)
    else:
        priority_order = torch.arange(T * K, device=experts_TK.device)
    # Stable sort by expert on top of the priority order: within an expert, priority order remains.
    order = priority_order[torch.argsort(flat_experts[priority_order], stable=True)]
    counts_E = torch.bincount(flat_experts, minlength=num_experts)
    starts_E = counts_E.cumsum(0) - counts_E
    rank_in_expert = torch.arange(T * K, device=experts_TK.device) - starts_E[flat_experts[order]]
    keep = torch.empty(T * K, dtype=torch.bool, device=experts_TK.device)
    keep[order] = rank_in_expert < capacity
    return keep.view(T, K)
