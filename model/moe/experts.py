"""Routed experts stored as grouped `[E, ...]` weight tensors.

Tokens arrive sorted by expert with per-expert counts. On CUDA with bf16 one grouped GEMM
(`torch._grouped_mm`) runs all experts; elsewhere a loop over *experts* (never over tokens) runs
one GEMM per expert, which is what a CPU does best anyway.
Shape legend: N routed token copies (sorted by expert), D model dim, F expert hidden, E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor


class GroupedExperts(nn.Module):
    def __init__(self, num_experts: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))  # gate projection
        self.w3 = nn.Parameter(torch.empty(num_experts, dim, hidden))  # up projection
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))  # down projection

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        # Under expert parallelism the weights are DTensors sharded over experts: compute with
        # this rank's experts (`counts_E` then counts tokens per local expert).
        w1, w3, w2 = (w.to_local() if isinstance(w, DTensor) else w for w in (self.w1, self.w3, self.w2))
        if x_ND.is_cuda and x_ND.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm"):
            offsets = counts_E.cumsum(0).to(torch.int32)
            h_NF = F.silu(torch._grouped_mm(x_ND, w1, offs=offsets))
            h_NF = h_NF * torch._grouped_mm(x_ND, w3, offs=offsets)
            return torch._grouped_mm(h_NF, w2, offs=offsets)
        # One host sync for the split sizes; the loop is over experts, not tokens. unbind() once,
        # rather than w[e] per expert, so backward builds one gradient, not E full-size zeros.
        outputs = []
        experts = zip(w1.unbind(0), w3.unbind(0), w2.unbind(0))
        for x_nD, (w1_e, w3_e, w2_e) in zip(torch.split(x_ND, counts_E.tolist()), experts):
            if x_nD.shape[0] > 0:
                outputs.append((F.silu(x_nD @ w1_e) * (x_nD @ w3_e)) @ w2_e)
        if not outputs:
            # No tokens at all: keep every weight in the graph so gradients are defined (zeros);
            # a missing one would make this rank skip collectives its replicas run on it.
            return ((F.silu(x_ND @ w1[0]) * (x_ND @ w3[0])) @ w2[0]) * 0.0
        return torch.cat(outputs)
