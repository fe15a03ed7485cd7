"""Activation checkpointing (parallel/activation_checkpoint.py) through `parallelize()` on one
process: the same parameter names, initial weights, losses, gradients and MoE step statistics as
without it, and fewer bytes saved for backward."""

from __future__ import annotations

import pytest
import torch

from model.config import ModelConfig, MoEConfig
from model.moe import MoE
from parallel.activation_checkpoint import AC_MODES, is_checkpointed
from parallel.config import ParallelConfig
from parallel.dims import ParallelDims
from parallel.parallelize import ParallelModel, parallelize
from trainer.compose import load_config
from trainer.errors import ConfigError

SEED, SEQ = 3, 16


def model_config() -> ModelConfig:
    # Router jitter draws random numbers (the recompute must replay them), capacity dropping and
    # both aux losses touch every MoE step buffer, and MTP adds a block outside `layers`.
    moe = MoEConfig(
        num_experts=4,
        top_k=2,
        moe_ffn_hidden=16,
        num_shared_experts=1,
        capacity_factor=1.0,
        router_jitter=0.1,
        aux_loss_coef=0.01,
        z_loss_coef=1e-3,
        expert_bias=True,
    )
    return ModelConfig(
        vocab_size=64,
        dim=32,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        ffn_hidden=48,
        max_seq_len=SEQ,
        first_k_dense=1,
        mtp_depth=1,
        init_std=0.1,
        moe=moe,
    )


def build(mode: str) -> ParallelModel:
    pcfg = ParallelConfig(activation_checkpointing=mode)
    return parallelize(model_config(), pcfg, ParallelDims(), None, torch.device("cpu"), SEED, 2)


def train_two_micro_batches(pm: ParallelModel) -> tuple[list[float], int]:
    """Forward + backward of two micro-batches; returns the losses and the bytes autograd saved."""
    model = pm.transformers[0]
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (2, 2, SEQ + 1), generator=g)
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    torch.manual_seed(1)  # router jitter
    losses = []
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for t in tokens:
            out = model(t[:, :-1], t[:, 1:])
            loss = (out.ce_sum + 0.3 * out.mtp_ce_sum) / out.num_tokens
            loss.backward()
            losses.append(float(loss.detach()))
    return losses, saved


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_same_names_weights_losses_grads_and_moe_stats_as_without(mode: str) -> None:
    ref, ac = build("none"), build(mode)
    ref_sd, ac_sd = ref.transformers[0].state_dict(), ac.transformers[0].state_dict()
    assert list(ac_sd) == list(ref_sd)
    assert [n for n, _ in ac.transformers[0].named_parameters()] == [
        n for n, _ in ref.transformers[0].named_parameters()
    ]
    for name, value in ref_sd.items():
        assert torch.equal(ac_sd[name], value), name

    ref_losses, ref_saved = train_two_micro_batches(ref)
    ac_losses, ac_saved = train_two_micro_batches(ac)
    assert ac_losses == ref_losses
    assert ac_saved < ref_saved  # the checkpointed blocks kept only their inputs
    for (name, p_ref), (_, p_ac) in zip(
        ref.transformers[0].named_parameters(), ac.transformers[0].named_parameters()
    ):
        assert torch.equal(p_ac.grad, p_ref.grad), name
    # The recompute in backward must not count the micro-batch's expert load or aux loss again.
    ref_moe = [m for m in ref.transformers[0].modules() if isinstance(m, MoE)]
    ac_moe = [m for m in ac.transformers[0].modules() if isinstance(m, MoE)]
    assert len(ac_moe) == 3  # layers 1, 2 and the MTP block
    for m_ref, m_ac in zip(ref_moe, ac_moe):
        assert m_ref.step_counts_E.sum() == 2 * 2 * SEQ * 2  # micro-batches x batch x seq x top_k
        for buf in ("step_counts_E", "step_dropped", "step_aux_loss"):
            assert torch.equal(getattr(m_ac, buf), getattr(m_ref, buf)), buf


def test_selective_checkpoints_every_second_block() -> None:
    assert [i for i in range(6) if is_checkpointed("selective", i)] == [1, 3, 5]
    assert all(is_checkpointed("full", i) for i in range(6))
    assert not any(is_checkpointed("none", i) for i in range(6))
    assert AC_MODES == ("none", "full", "selective")


def test_config_validates_the_mode() -> None:
    assert load_config(["parallel.activation_checkpointing=full"]).parallel.activation_checkpointing == "full"
    with pytest.raises(ConfigError) as err:
        load_config(["parallel.activation_checkpointing=op"])
    assert err.value.field == "parallel.activation_checkpointing"


def test_two_backward_passes_recompute_twice_without_counting_twice() -> None:
    """Zero-bubble pipeline schedules take input gradients and weight gradients in two passes over
    one graph, so a checkpointed block is recomputed twice."""
    ref, ac = build("none"), build("full")
    tokens = torch.randint(0, 64, (2, SEQ + 1), generator=torch.Generator().manual_seed(0))
    grad_h = {}
    for name, pm in (("ref", ref), ("ac", ac)):
        model = pm.transformers[0]
        torch.manual_seed(1)  # router jitter
        h = model.tok_embeddings(tokens[:, :-1]).detach().requires_grad_()
        out = model.layers["1"](h, model.rope_cos[:SEQ], model.rope_sin[:SEQ])
        (grad_h[name],) = torch.autograd.grad(out.square().sum(), h, retain_graph=True)
        out.square().sum().backward()
    assert torch.equal(grad_h["ac"], grad_h["ref"])
    ac_moe, ref_moe = ac.transformers[0].layers["1"].moe, ref.transformers[0].layers["1"].moe
    assert ref_moe.step_counts_E.sum() == 2 * SEQ * 2
    assert torch.equal(ac_moe.step_counts_E, ref_moe.step_counts_E)
    assert torch.equal(ac_moe.step_aux_loss, ref_moe.step_aux_loss)
