"""The all-to-all dispatcher gives the single-process MoE's outputs and gradients exactly."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from model.config import ModelConfig, MoEConfig
from model.moe import MoE
from parallel.expert import apply_expert_parallel
from tests.distributed.harness import run_ranks

pytestmark = pytest.mark.slow


def make_layer(capacity_factor: float, weights_on_input: bool) -> tuple[MoE, torch.Tensor]:
    cfg = ModelConfig(
        dim=8,
        num_heads=2,
        num_kv_heads=2,
        moe=MoEConfig(
            num_experts=4,
            top_k=2,
            moe_ffn_hidden=6,
            aux_loss_coef=0.1,
            capacity_factor=capacity_factor,
            weights_on_input=weights_on_input,
        ),
    )
    torch.manual_seed(0)
    layer = MoE(cfg)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return layer, torch.randn(4, 6, 8)  # 4 sequences: one per rank at world size 4


def ep_forward_backward(ep: int, capacity_factor: float, weights_on_input: bool) -> dict:
    layer, x = make_layer(capacity_factor, weights_on_input)
    rank = dist.get_rank()
    apply_expert_parallel(layer, init_device_mesh("cpu", (ep,)))
    x_local = x[rank : rank + 1].clone().requires_grad_()
    layer(x_local).pow(2).sum().backward()
    return {
        "y": layer(x_local).detach(),
        "x_grad": x_local.grad,
        "w1_grad": layer.experts.w1.grad.full_tensor(),
        "gate_grad": layer.router.gate.weight.grad,
    }


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """fp32 sums in another order: 1e-5 relative to the tensor's scale (cancellation leaves some
    elements near zero, where an element-wise relative bound means nothing)."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize(
    "capacity_factor, weights_on_input",
    [(0.0, False), (1.0, False), (1.0, True)],
    ids=["dropless", "capacity", "weights_on_input"],  # Llama 4: routing weights on the expert input
)
def test_all_to_all_matches_local_moe(capacity_factor, weights_on_input):
    ep = 4
    results = run_ranks(ep, ep_forward_backward, ep, capacity_factor, weights_on_input)
    layer, x = make_layer(capacity_factor, weights_on_input)
    w1_grad = torch.zeros_like(layer.experts.w1)
    for rank, res in enumerate(results):
        layer.zero_grad()
        x_local = x[rank : rank + 1].clone().requires_grad_()
        y = layer(x_local)
        y.pow(2).sum().backward()
        assert_close(res["y"], y.detach())
        assert_close(res["x_grad"], x_local.grad)
        assert_close(res["gate_grad"], layer.router.gate.weight.grad)
        w1_grad += layer.experts.w1.grad
    # Each rank's expert shard received the gradient of every rank's tokens routed to it.
    assert_close(results[0]["w1_grad"], w1_grad)


def ep_reads(ep: int) -> dict:
    from tests.host_reads import counted_reads

    layer, x = make_layer(0.0, False)
    apply_expert_parallel(layer, init_device_mesh("cpu", (ep,)))
    x_local = x[dist.get_rank() : dist.get_rank() + 1].clone().requires_grad_()
    with counted_reads() as seen:
        layer(x_local).pow(2).sum().backward()
    return {"reads": torch.tensor(len(seen))}


def test_expert_parallel_layer_reads_the_host_twice() -> None:
    """Under ep the MoE layer reads the host once for both all-to-all split lists and once for
    the local experts' split sizes (tests/unit/test_host_syncs.py counts the one-process step)."""
    assert [int(r["reads"]) for r in run_ranks(2, ep_reads, 2)] == [2, 2]
