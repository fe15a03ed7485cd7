"""Host syncs of a training step, counted on CPU (issue 15): every place where Python reads a
tensor's value (`.item()`, `.tolist()`, `int()`, `float()`, `bool()`) would stall a CUDA stream
until the GPU catches up. Today a step has one for the token count and each MoE layer one, for
the per-expert split sizes (two with a capacity); the counts are pinned so that a new sync fails
here. Expert parallelism's all-to-all split sizes (parallel/expert.py) are not counted here."""

from __future__ import annotations

import pytest
import torch

from model import Transformer
from model.config import ModelConfig, MoEConfig
from tests.host_reads import counted_reads

SYNCS_PER_STEP = 1  # the number of labelled tokens (ModelOutput.num_tokens)
# Per MoE layer on the CPU path: the split sizes of the expert GEMM loop (the CUDA bf16 path's
# grouped GEMM takes device offsets instead), plus, with a capacity, the number of kept copies
# (the dispatched batch's length depends on the routing).
MOE_SETTINGS = {
    "dropless": ({}, 1),
    "capacity": ({"capacity_factor": 1.0}, 2),
    "aux-free-bias": ({"expert_bias": True, "aux_loss_coef": 0.0}, 1),
    "shared-expert": ({"num_shared_experts": 1}, 1),
}


def step_reads(num_layers: int, first_k_dense: int, **moe: object) -> list[str]:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=64, dim=16, num_layers=num_layers, num_heads=2, num_kv_heads=2, ffn_hidden=32,
        max_seq_len=16, first_k_dense=first_k_dense,
        moe=MoEConfig(num_experts=4, top_k=2, moe_ffn_hidden=8, **moe),
    )  # fmt: skip
    model = Transformer(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    tokens = torch.randint(0, 64, (2, 16))
    with counted_reads() as seen:
        out = model(tokens[:, :-1], tokens[:, 1:])
        (out.ce_sum / out.num_tokens).backward()
    return seen


@pytest.mark.parametrize("setting", sorted(MOE_SETTINGS))
def test_host_syncs_per_moe_layer_do_not_grow(setting: str) -> None:
    moe, per_layer = MOE_SETTINGS[setting]
    dense = step_reads(3, first_k_dense=3, **moe)  # no MoE layer: the step's own reads
    assert len(dense) == SYNCS_PER_STEP, dense
    for moe_layers in (1, 3):
        reads = step_reads(3, first_k_dense=3 - moe_layers, **moe)
        assert len(reads) == SYNCS_PER_STEP + per_layer * moe_layers, reads
