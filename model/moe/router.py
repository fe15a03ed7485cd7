"""Top-k router: scores every token against every expert and picks k experts per token.

Shape legend: T tokens, D model dim, E experts, K experts per token, G expert groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from model.config import MoEConfig


@dataclass
class Routing:
    experts_TK: torch.Tensor  # chosen expert ids (int64)
    weights_TK: torch.Tensor  # combine weights of the chosen experts (fp32)
    probs_TE: torch.Tensor  # per-token distribution over experts, used by the balancing loss
    logits_TE: torch.Tensor  # raw router logits (fp32), used by the z-loss


class Router(nn.Module):
    def __init__(self, dim: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.gate = nn.Linear(dim, cfg.num_experts, bias=False)
        # Aux-loss-free balancing (DeepSeek-V3): a per-expert bias that shifts *which* experts are
        # chosen, never their weights. Updated outside autograd once per optimizer step.
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts), persistent=True)

    def reset_buffers(self) -> None:
        self.expert_bias.zero_()

    def forward(self, x_TD: torch.Tensor) -> Routing:
        cfg = self.cfg
        if self.training and cfg.router_jitter > 0:
            noise = torch.empty_like(x_TD).uniform_(1.0 - cfg.router_jitter, 1.0 + cfg.router_jitter)
            x_TD = x_TD * noise
        logits_TE = self.gate(x_TD).float()
        if cfg.score_func == "softmax":
            scores_TE = logits_TE.softmax(dim=-1)
            probs_TE = scores_TE
        else:
            scores_TE = logits_TE.sigmoid()
            probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)

        selection_TE = scores_TE.detach()
        if cfg.expert_bias:
            selection_TE = selection_TE + self.expert_bias
        if cfg.num_groups > 1:
            selection_TE = self._mask_to_best_groups(selection_TE)
        experts_TK = selection_TE.topk(cfg.top_k, dim=-1).indices
        weights_TK = scores_TE.gather(1, experts_TK)
        if cfg.norm_topk_prob:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        weights_TK = weights_TK * cfg.routed_scaling_factor
        return Routing(experts_TK, weights_TK, probs_TE, logits_TE)

    def _mask_to_best_groups(self, selection_TE: torch.Tensor) -> torch.Tensor:
        """Group-limited routing: keep only experts in the `topk_groups` best groups per token.
        A group's score is its best expert (softmax) or the sum of its best two (sigmoid, V3)."""
        cfg = self.cfg
        T, E = selection_TE.shape
        grouped_TGX = selection_TE.view(T, cfg.num_groups, E // cfg.num_groups)
        if cfg.score_func == "sigmoid" and grouped_TGX.shape[-1] >= 2:
            group_scores_TG = grouped_TGX.topk(2, dim=-1).values.sum(dim=-1)
        else:
            group_scores_TG = grouped_TGX.amax(dim=-1)
        best_groups_TG = group_scores_TG.topk(cfg.topk_groups, dim=-1).indices
        keep_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter_(1, best_groups_TG, True)
        return grouped_TGX.masked_fill(~keep_TG.unsqueeze(-1), float("-inf")).view(T, E)
