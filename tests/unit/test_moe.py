"""MoE layer behaviour: routing, balancing losses, capacity, dropless equivalence, expert bias."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.config import ModelConfig, MoEConfig
from model.moe import GroupedExperts, MoE, Router
from model.moe.dispatch import capacity_keep_mask, expert_capacity
from model.moe.losses import load_balancing_loss, router_z_loss


def moe_config(**moe_overrides) -> ModelConfig:
    moe = dict(num_experts=4, top_k=2, moe_ffn_hidden=8, aux_loss_coef=0.0)
    moe.update(moe_overrides)
    return ModelConfig(dim=6, num_heads=2, num_kv_heads=2, moe=MoEConfig(**moe))


def initialised_moe(cfg: ModelConfig, seed: int = 0) -> MoE:
    torch.manual_seed(seed)
    layer = MoE(cfg)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return layer


def test_topk_routing_picks_highest_scores_and_renormalises():
    router = Router(3, MoEConfig(num_experts=4, top_k=2))
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(4, 3))  # logits = first 3 inputs, expert 3 gets 0
    routing = router(torch.tensor([[3.0, 1.0, 2.0], [0.0, -1.0, -2.0]]))
    assert routing.experts_TK.tolist() == [[0, 2], [0, 3]]
    probs = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.0, -1.0, -2.0, 0.0]]).softmax(-1)
    expected0 = probs[0, [0, 2]] / probs[0, [0, 2]].sum()
    torch.testing.assert_close(routing.weights_TK[0], expected0)
    torch.testing.assert_close(routing.weights_TK.sum(-1), torch.ones(2))


def test_sigmoid_scores_without_renormalisation_keep_raw_scores_scaled():
    cfg = MoEConfig(
        num_experts=4, top_k=2, score_func="sigmoid", norm_topk_prob=False, routed_scaling_factor=2.5
    )
    router = Router(4, cfg)
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(4))
    x = torch.tensor([[0.5, -1.0, 2.0, 0.0]])
    routing = router(x)
    assert routing.experts_TK.tolist() == [[2, 0]]
    torch.testing.assert_close(routing.weights_TK, 2.5 * torch.sigmoid(torch.tensor([[2.0, 0.5]])))
    torch.testing.assert_close(routing.probs_TE.sum(-1), torch.ones(1))


def test_expert_bias_changes_selection_but_not_weights():
    cfg = MoEConfig(num_experts=4, top_k=1, score_func="sigmoid", norm_topk_prob=False, expert_bias=True)
    router = Router(4, cfg)
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(4))
        router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))
    routing = router(torch.tensor([[3.0, 0.0, 0.0, -1.0]]))
    assert routing.experts_TK.tolist() == [[3]]
    torch.testing.assert_close(routing.weights_TK, torch.sigmoid(torch.tensor([[-1.0]])))


def test_group_limited_routing_only_picks_from_best_groups():
    cfg = MoEConfig(num_experts=8, top_k=2, num_groups=4, topk_groups=1, score_func="softmax")
    router = Router(8, cfg)
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(8))
    # Best single expert is 0 (group 0); second best overall is 4 (group 2) but only group 0 allowed.
    routing = router(torch.tensor([[5.0, 1.0, 0.0, 0.0, 4.0, 0.0, 0.0, 0.0]]))
    assert sorted(routing.experts_TK.tolist()[0]) == [0, 1]


def test_micro_batch_balancing_loss_matches_hand_computation():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.25, 0.25], [0.2, 0.2, 0.6]])
    experts = torch.tensor([[0], [1], [0], [2]])
    # f = [2/4, 1/4, 1/4], P = column means = [0.375, 0.3125, 0.3125]
    expected = 3 * (0.5 * 0.375 + 0.25 * 0.3125 + 0.25 * 0.3125)
    loss = load_balancing_loss(probs, experts, "micro_batch", seq_len=2)
    assert loss.item() == pytest.approx(expected)


def test_sequence_balancing_loss_averages_per_sequence():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.25, 0.25], [0.2, 0.2, 0.6]])
    experts = torch.tensor([[0], [1], [0], [2]])
    seq0 = 3 * (0.5 * 0.4 + 0.5 * 0.4 + 0.0 * 0.2)  # f=[.5,.5,0], P=[.4,.4,.2]
    seq1 = 3 * (0.5 * 0.35 + 0.0 * 0.225 + 0.5 * 0.425)  # f=[.5,0,.5], P=[.35,.225,.425]
    loss = load_balancing_loss(probs, experts, "sequence", seq_len=2)
    assert loss.item() == pytest.approx((seq0 + seq1) / 2)


def test_global_batch_loss_uses_reduced_counts():
    probs = torch.full((2, 2), 0.5)
    experts = torch.tensor([[0], [0]])
    local = load_balancing_loss(probs, experts, "global_batch", seq_len=2, reduce_counts=None)
    assert local.item() == pytest.approx(2 * (1.0 * 0.5))
    # Another rank routed its two tokens to expert 1: the global f is balanced.
    reduced = load_balancing_loss(
        probs, experts, "global_batch", seq_len=2, reduce_counts=lambda c: c + torch.tensor([0.0, 2.0])
    )
    assert reduced.item() == pytest.approx(2 * (0.5 * 0.5 + 0.5 * 0.5))


def test_z_loss_matches_hand_computation():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    expected = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected)


def test_capacity_drops_lowest_weights_or_latest_positions():
    experts = torch.tensor([[0], [0], [0], [1]])
    weights = torch.tensor([[0.2], [0.9], [0.5], [0.4]])
    assert expert_capacity(4, 1, 2, 1.0) == 2
    by_probs = capacity_keep_mask(experts, weights, num_experts=2, capacity=2, policy="probs")
    assert by_probs.flatten().tolist() == [False, True, True, True]
    by_position = capacity_keep_mask(experts, weights, num_experts=2, capacity=2, policy="position")
    assert by_position.flatten().tolist() == [True, True, False, True]


def naive_moe(layer: MoE, x_TD: torch.Tensor, keep_TK: torch.Tensor | None = None) -> torch.Tensor:
    """Textbook per-token loop: y_t = sum_k w_tk * expert_{e_tk}(x_t) (+ shared)."""
    routing = layer.router(x_TD)
    ex = layer.experts
    out = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for k in range(routing.experts_TK.shape[1]):
            if keep_TK is not None and not keep_TK[t, k]:
                continue
            e = int(routing.experts_TK[t, k])
            h = F.silu(x_TD[t] @ ex.w1[e]) * (x_TD[t] @ ex.w3[e])
            out[t] += routing.weights_TK[t, k] * (h @ ex.w2[e])
    if layer.shared_experts is not None:
        out = out + layer.shared_experts(x_TD)
    return out


@pytest.mark.parametrize("num_shared", [0, 1])
def test_dropless_moe_equals_naive_per_token_reference(num_shared):
    layer = initialised_moe(moe_config(num_shared_experts=num_shared)).eval()
    x = torch.randn(2, 5, 6)
    expected = naive_moe(layer, x.view(-1, 6)).view(2, 5, 6)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_capacity_moe_equals_naive_reference_with_dropped_copies_zeroed():
    layer = initialised_moe(moe_config(capacity_factor=0.5, drop_policy="probs"))
    x = torch.randn(1, 12, 6)
    out = layer(x)
    routing = layer.router(x.view(-1, 6))
    keep = capacity_keep_mask(
        routing.experts_TK, routing.weights_TK, 4, expert_capacity(12, 2, 4, 0.5), "probs"
    )
    assert (~keep).any(), "capacity 0.5 must drop something"
    torch.testing.assert_close(out.view(-1, 6), naive_moe(layer, x.view(-1, 6), keep), rtol=1e-5, atol=1e-6)
    layer.end_of_step()
    assert layer.last_step_stats["dropped_frac"] == pytest.approx((~keep).float().mean().item())


def test_aux_loss_gradient_reaches_router_through_injection():
    layer = initialised_moe(moe_config(aux_loss_coef=1.0))
    layer.aux_loss_scale = 0.5
    x = torch.randn(2, 4, 6)
    (layer(x) * 0.0).sum().backward()  # the main loss contributes nothing
    injected = layer.router.gate.weight.grad.clone()
    assert injected.abs().sum() > 0

    layer.zero_grad()
    routing = layer.router(x.view(-1, 6))
    (0.5 * load_balancing_loss(routing.probs_TE, routing.experts_TK, "micro_batch", 4)).backward()
    torch.testing.assert_close(injected, layer.router.gate.weight.grad)


def test_expert_bias_update_favours_underloaded_experts():
    layer = initialised_moe(moe_config(expert_bias=True, bias_update_rate=0.1, score_func="sigmoid"))
    layer.step_counts_E.copy_(torch.tensor([10.0, 2.0, 4.0, 4.0]))
    layer.end_of_step()
    torch.testing.assert_close(layer.router.expert_bias, torch.tensor([-0.1, 0.1, 0.1, 0.1]))
    assert layer.step_counts_E.sum() == 0
    assert layer.last_step_stats["load_max_over_mean"] == pytest.approx(2.0)


def test_experts_without_tokens_still_get_zero_gradients_for_every_weight():
    """An expert-parallel rank whose experts get no token must still produce (zero) gradients for
    w1, w2 and w3: its replicas sync those gradients, and a missing one desynchronises the ranks."""
    experts = GroupedExperts(num_experts=2, dim=4, hidden=3)
    for w in experts.parameters():
        torch.nn.init.normal_(w)
    experts(torch.zeros(0, 4, requires_grad=True), torch.zeros(2, dtype=torch.long)).sum().backward()
    assert all(w.grad is not None and not w.grad.any() for w in (experts.w1, experts.w2, experts.w3))
