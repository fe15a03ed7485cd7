"""The MoE feed-forward layer, as named phases: route -> dispatch -> experts -> combine (+ shared).

Communication (under expert parallelism) lives only in the dispatcher; this module stays plain
single-device PyTorch. Shape legend: B batch, S sequence, T = B*S tokens, D model dim, E experts,
K experts per token, X = T*K routed token copies, N copies after dispatch.
"""

from __future__ import annotations

import torch
from torch import nn

from model.config import ModelConfig
from model.layers import SwiGLU
from model.moe.dispatch import LocalDispatcher, capacity_keep_mask, expert_capacity
from model.moe.experts import GroupedExperts
from model.moe.losses import AuxLossInjector, CountsReducer, load_balancing_loss, router_z_loss
from model.moe.router import Router, Routing


class MoE(nn.Module):
    def __init__(self, model_cfg: ModelConfig) -> None:
        super().__init__()
        cfg = self.cfg = model_cfg.moe
        self.router = Router(model_cfg.dim, cfg)
        self.experts = GroupedExperts(cfg.num_experts, model_cfg.dim, cfg.moe_ffn_hidden)
        self.shared_experts = None
        if cfg.num_shared_experts > 0:
            shared_hidden = cfg.shared_ffn_hidden or cfg.num_shared_experts * cfg.moe_ffn_hidden
            self.shared_experts = SwiGLU(model_cfg.dim, shared_hidden)
        # Qwen2-MoE / Qwen3-Next: a per-token sigmoid gate on the shared experts' output.
        self.shared_expert_gate = nn.Linear(model_cfg.dim, 1, bias=False) if cfg.shared_expert_gate else None
        # Replaced by parallel/ under expert parallelism (all-to-all) and data parallelism
        # (token counts summed over the data-parallel group).
        self.dispatcher = LocalDispatcher(cfg.num_experts)
        self.reduce_counts: CountsReducer | None = None
        # Weight of this micro-batch's aux loss in the step's gradient; set by the trainer.
        self.aux_loss_scale = 1.0
        # Per-step expert load and aux loss, accumulated over micro-batches (training only).
        self.register_buffer("step_counts_E", torch.zeros(cfg.num_experts), persistent=False)
        self.register_buffer("step_dropped", torch.zeros(()), persistent=False)
        self.register_buffer("step_aux_loss", torch.zeros(()), persistent=False)
        # This rank's expert load of the last completed step (the trainer's expert-load heatmap).
        self.register_buffer("last_step_counts_E", torch.zeros(cfg.num_experts), persistent=False)
        self.last_step_stats: dict[str, float] = {}

    def reset_buffers(self) -> None:
        self.router.reset_buffers()
        self.step_counts_E.zero_()
        self.step_dropped.zero_()
        self.step_aux_loss.zero_()
        self.last_step_counts_E.zero_()

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(-1, D)

        routing = self.router(x_TD)  # 1. route
        keep_TK = None
        if cfg.capacity_factor > 0:
            capacity = expert_capacity(x_TD.shape[0], cfg.top_k, cfg.num_experts, cfg.capacity_factor)
            keep_TK = capacity_keep_mask(
                routing.experts_TK, routing.weights_TK, cfg.num_experts, capacity, cfg.drop_policy
            )
        if cfg.weights_on_input:
            y_TD = self._experts_weighted_on_input(x_TD, routing, keep_TK)  # 2.-4.
        else:
            x_ND, counts_local, state = self.dispatcher.dispatch(x_TD, routing.experts_TK, keep_TK)  # 2.
            y_ND = self.experts(x_ND, counts_local)  # 3. experts
            y_TD = self.dispatcher.combine(y_ND, routing.weights_TK, state)  # 4. combine
        if self.shared_experts is not None:
            shared_TD = self.shared_experts(x_TD)  # 5. shared experts see every token
            if self.shared_expert_gate is not None:
                shared_TD = shared_TD * torch.sigmoid(self.shared_expert_gate(x_TD))
            y_TD = y_TD + shared_TD

        if self.training:
            self._record_load(routing.experts_TK, keep_TK)
            if torch.is_grad_enabled() and (cfg.aux_loss_coef > 0 or cfg.z_loss_coef > 0):
                aux_loss = self._aux_loss(routing.probs_TE, routing.logits_TE, routing.experts_TK, S)
                self.step_aux_loss += aux_loss.detach()
                y_TD = AuxLossInjector.apply(y_TD, aux_loss, self.aux_loss_scale)
        return y_TD.view(B, S, D)

    def _experts_weighted_on_input(
        self, x_TD: torch.Tensor, routing: Routing, keep_TK: torch.Tensor | None
    ) -> torch.Tensor:
        """Phases 2-4 with the routing weight on each expert's *input* (Llama 4): the T*K weighted
        copies are dispatched as tokens with one expert each (in the order of the K copies of each
        token, so any dispatcher sends the same rows to the same experts) and combined with weight
        1, then each token's K outputs are summed."""
        experts_TK, weights_TK = routing.experts_TK, routing.weights_TK
        T, K = experts_TK.shape
        copies_XD = (x_TD.unsqueeze(1) * weights_TK.unsqueeze(-1).to(x_TD.dtype)).flatten(0, 1)
        keep_X1 = keep_TK.reshape(-1, 1) if keep_TK is not None else None
        x_ND, counts_local, state = self.dispatcher.dispatch(copies_XD, experts_TK.reshape(-1, 1), keep_X1)
        y_ND = self.experts(x_ND, counts_local)
        ones_X1 = weights_TK.new_ones(T * K, 1)
        return self.dispatcher.combine(y_ND, ones_X1, state).view(T, K, -1).sum(dim=1)

    def _aux_loss(
        self, probs_TE: torch.Tensor, logits_TE: torch.Tensor, experts_TK: torch.Tensor, seq_len: int
    ) -> torch.Tensor:
        cfg = self.cfg
        loss = probs_TE.new_zeros(())
        if cfg.aux_loss_coef > 0:
            balance = load_balancing_loss(
                probs_TE, experts_TK, cfg.aux_loss_scope, seq_len, self.reduce_counts
            )
            loss = loss + cfg.aux_loss_coef * balance
        if cfg.z_loss_coef > 0:
            loss = loss + cfg.z_loss_coef * router_z_loss(logits_TE)
        return loss

    @torch.no_grad()
    def _record_load(self, experts_TK: torch.Tensor, keep_TK: torch.Tensor | None) -> None:
        self.step_counts_E += torch.bincount(experts_TK.reshape(-1), minlength=self.cfg.num_experts)
        if keep_TK is not None:
            self.step_dropped += (~keep_TK).sum()

    @torch.no_grad()
    def end_of_step(self) -> None:
        """Once per optimizer step: snapshot load stats, update the expert bias, reset counters."""
        counts_E = self.step_counts_E.clone()
        self.last_step_counts_E.copy_(counts_E)
        total = counts_E.sum().clamp(min=1)
        self.last_step_stats = {
            "load_max_over_mean": float(counts_E.max() / counts_E.mean().clamp(min=1e-9)),
            "dropped_frac": float(self.step_dropped / total),
        }
        if self.cfg.expert_bias:
            if self.reduce_counts is not None:
                counts_E = self.reduce_counts(counts_E)
            # Overloaded experts (above the mean) get a lower bias, underloaded a higher one.
            self.router.expert_bias += self.cfg.bias_update_rate * torch.sign(counts_E.mean() - counts_E)
        self.step_counts_E.zero_()
        self.step_dropped.zero_()
        self.step_aux_loss.zero_()
