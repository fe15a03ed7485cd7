"""Tensor (+ sequence) parallelism over 2 ranks gives the single-process loss and gradients.

All cases run in one spawned pair of processes (start-up dominates); each case then compares
the loss and every parameter's full gradient with the plain model built from the same seed.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from model.config import MLAConfig, ModelConfig, MoEConfig
from model.transformer import Transformer
from parallel.tensor import apply_tensor_parallel
from tests.distributed.harness import run_ranks

pytestmark = pytest.mark.slow

SEED = 3
TP = 2


def make_config(case: str) -> ModelConfig:
    moe = MoEConfig(
        num_experts=4,
        top_k=2,
        moe_ffn_hidden=16,
        num_shared_experts=1,
        aux_loss_coef=0.1,
        z_loss_coef=0.01 if case.startswith("aux") else 0.0,
        aux_loss_scope="sequence" if case.startswith("aux") else "micro_batch",
    )
    cfg = ModelConfig(
        vocab_size=64,
        dim=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        ffn_hidden=48,
        max_seq_len=16,
        qk_norm=True,
        first_k_dense=1,
        moe=moe,
        init_std=0.1,
    )
    if case.startswith("mla"):
        cfg.attention = "mla"
        q_lora_rank = 12 if case == "mla_sp" else 0
        cfg.mla = MLAConfig(
            q_lora_rank=q_lora_rank, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8
        )
    if case.startswith("mtp"):
        cfg.mtp_depth = 1
    if case.startswith("knobs"):  # the architecture knobs of released HF models, all at once
        cfg.qkv_bias = cfg.attention_output_gate = cfg.norm_zero_centered = True
        cfg.partial_rotary_factor = 0.5
        cfg.moe.shared_expert_gate = cfg.moe.weights_on_input = True
    return cfg


# case -> sequence parallel
CASES = {
    "gqa_sp": True,
    "gqa": False,
    "mla_sp": True,  # with the low-rank query (wq_a / q_norm / wq_b)
    "mla": False,  # direct query projection
    "mtp_sp": True,
    "mtp": False,
    "aux_sp": True,  # sequence-scope balancing loss + z-loss: router gradients through the injector
    "knobs_sp": True,  # q/k/v biases, gated attention, partial RoPE, zero-centered norms,
    "knobs": False,  # shared-expert gate, routing weights on the expert input
    "stage_sp": True,  # a last pipeline stage: no embedding, layer 1 only, hidden-state input
}


def batch(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 17), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def build(case: str) -> Transformer:
    model = Transformer(make_config(case))
    if case.startswith("stage"):
        model.tok_embeddings = None
        del model.layers["0"]
    return model


def forward_backward(model: Transformer, inputs: torch.Tensor | None = None) -> torch.Tensor:
    """`inputs`: the hidden state of a pipeline stage without embedding (else the batch's tokens)."""
    model.set_aux_loss_scale(1.0)
    tokens, labels = batch(model.cfg)
    out = model(tokens if inputs is None else inputs, labels)
    loss = (out.ce_sum + model.cfg.mtp_loss_coef * out.mtp_ce_sum) / out.num_tokens
    loss.backward()
    return loss.detach()


def stage_input(cfg: ModelConfig) -> torch.Tensor:
    tokens, _ = batch(cfg)
    return torch.randn(*tokens.shape, cfg.dim, generator=torch.Generator().manual_seed(1))


def tp_run(cases: dict[str, bool]) -> dict:
    tp_mesh = init_device_mesh("cpu", (TP,), mesh_dim_names=("tp",))
    results = {}
    for case, sequence_parallel in cases.items():
        with torch.device("meta"):
            model = build(case)
        apply_tensor_parallel(model, tp_mesh, sequence_parallel)
        model.to_empty(device="cpu")
        model.init_weights(SEED)
        inputs = None
        if model.tok_embeddings is None:
            # Under SP a stage receives (and sends) this rank's chunk of the sequence.
            inputs = stage_input(model.cfg)
            if sequence_parallel:
                inputs = inputs.chunk(TP, dim=1)[tp_mesh.get_local_rank()]
            inputs = inputs.clone().requires_grad_()
        loss = forward_backward(model, inputs)
        grads = {
            name: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            for name, p in model.named_parameters()
        }
        num_dtensors = sum(isinstance(p, DTensor) for p in model.parameters())
        results[case] = {"loss": loss, "grads": grads, "num_dtensors": num_dtensors}
        if inputs is not None:
            results[case]["input_grad"] = inputs.grad
    return results


@pytest.fixture(scope="module")
def tp_results() -> list[dict]:
    return run_ranks(TP, tp_run, CASES)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """fp32 sums in another order: 1e-5 relative to the tensor's scale."""
    torch.testing.assert_close(
        actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item(), msg=lambda m: f"{name}: {m}"
    )


@pytest.mark.parametrize("case", list(CASES))
def test_tensor_parallel_matches_single_process(tp_results, case):
    model = build(case)
    model.init_weights(SEED)
    inputs = None if model.tok_embeddings is not None else stage_input(model.cfg).requires_grad_()
    loss = forward_backward(model, inputs)
    expected = {name: p.grad for name, p in model.named_parameters()}
    for rank, res in enumerate(r[case] for r in tp_results):
        if inputs is not None:
            input_grad = inputs.grad.chunk(TP, dim=1)[rank] if CASES[case] else inputs.grad
            assert_close(res["input_grad"], input_grad, "input")
        assert res["num_dtensors"] > 0
        torch.testing.assert_close(res["loss"], loss, rtol=1e-5, atol=0.0)
        assert res["grads"].keys() == expected.keys()
        for name, grad in expected.items():
            assert grad is not None and grad.abs().max() > 0, name
            assert_close(res["grads"][name], grad, name)
