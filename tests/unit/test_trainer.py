"""Trainer pieces: LR schedules, weight-decay groups, checkpoints, token-normalised accumulation,
and an exact resume of a short run."""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from torch import nn

from data import Batch
from model import Transformer
from model.config import ModelConfig, MoEConfig
from parallel.config import ParallelConfig
from parallel.dims import ParallelDims
from parallel.parallelize import ParallelModel, parallelize
from trainer.compose import load_config
from trainer.config import OptimConfig
from trainer.optim import build_optimizer, build_scheduler, lr_factor_fn, weight_decay_split
from trainer.step import evaluate, forward_backward
from trainer.trainer import Trainer

CPU = torch.device("cpu")


def tiny_model_cfg(**kw) -> ModelConfig:
    moe = MoEConfig(num_experts=4, top_k=2, moe_ffn_hidden=16, num_shared_experts=1, aux_loss_coef=0.0)
    base = dict(
        vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden=48, max_seq_len=32
    )
    return ModelConfig(**{**base, "moe": moe, **kw})


# -- LR schedules --------------------------------------------------------------------------------


def factors(steps: int, **kw) -> list[float]:
    fn = lr_factor_fn(OptimConfig(**kw), steps)
    return [fn(i) for i in range(steps)]


def test_warmup_is_linear_to_full_lr() -> None:
    f = factors(20, warmup_steps=4, schedule="constant")
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f[4:] == pytest.approx([1.0] * 16)


def test_cosine_endpoints_and_monotone() -> None:
    f = factors(21, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    assert f[3] == pytest.approx(1.0) and f[4] == pytest.approx(1.0)
    assert f[-1] == pytest.approx(0.1)  # the last step trains at the minimum
    assert f[12] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # midpoint of decay
    assert all(a > b for a, b in zip(f[4:], f[5:]))


def test_wsd_phases() -> None:
    f = factors(20, warmup_steps=2, schedule="wsd", decay_fraction=0.25, min_lr_ratio=0.0)
    assert f[:2] == pytest.approx([0.5, 1.0])
    assert f[2:15] == pytest.approx([1.0] * 13)  # stable until the last 5 steps
    assert f[15:] == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.0])  # linear decay to the minimum


def test_scheduler_drives_optimizer_lr() -> None:
    cfg = OptimConfig(lr=1e-2, warmup_steps=2, schedule="cosine", min_lr_ratio=0.1)
    model = nn.Linear(4, 4)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, steps=6)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([1e-2 * x for x in factors(6, **vars(cfg))])


# -- weight decay --------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.norm = RMSNorm(4)
        self.proj = nn.Linear(4, 4, bias=True)
        self.experts = nn.Parameter(torch.zeros(3, 4, 8))
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight  # tied: still an embedding, no decay


def test_weight_decay_split() -> None:
    decay, no_decay = weight_decay_split(Toy())
    assert sorted(decay) == ["experts", "proj.weight"]
    assert sorted(no_decay) == ["emb.weight", "norm.weight", "proj.bias"]


def test_weight_decay_split_real_model() -> None:
    decay, no_decay = weight_decay_split(Transformer(tiny_model_cfg()))
    assert "tok_embeddings.weight" in no_decay and "norm.weight" in no_decay
    assert all(name.endswith("norm.weight") or name == "tok_embeddings.weight" for name in no_decay)
    assert "output.weight" in decay and any("experts" in n for n in decay)


def test_sampled_variance_adamw_is_adamw_when_fed_the_squared_gradient() -> None:
    """Fed grad ** 2 (or nothing), the variant follows torch's AdamW; fed another estimate, only
    the second moment changes."""
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1)
    models = [Transformer(tiny_model_cfg()) for _ in range(3)]
    for m in models:
        m.init_weights(seed=0)
    plain = build_optimizer(models[0], cfg)
    fed_square = build_optimizer(models[1], cfg, second_moments=lambda p: None if p.dim() < 2 else p.grad**2)
    fed_four_times = build_optimizer(models[2], cfg, second_moments=lambda p: 4 * p.grad**2)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    for step in range(3):
        for model, opt in zip(models, (plain, fed_square, fed_four_times)):
            model(tokens, tokens).ce_sum.backward()
            opt.step()
            opt.zero_grad()
        if step == 0:  # same gradients so far: only the second moment differs, 4x
            state = fed_four_times.state[models[2].output.weight]
            torch.testing.assert_close(
                state["exp_avg_sq"], 4 * plain.state[models[0].output.weight]["exp_avg_sq"]
            )
            torch.testing.assert_close(state["exp_avg"], plain.state[models[0].output.weight]["exp_avg"])
    # Same math as torch's for-each AdamW up to float reassociation (updates are ~1e-2).
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert set(state) == {"step", "exp_avg", "exp_avg_sq"}  # checkpoints as torch's AdamW


# -- token-normalised loss with gradient accumulation ------------------------------------------


def single_process(cfg, num_microbatches: int = 1) -> ParallelModel:
    return parallelize(
        cfg, ParallelConfig(), ParallelDims(), None, CPU, seed=3, num_microbatches=num_microbatches
    )


def make_batches(B: int, S: int, vocab: int) -> list[Batch]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (B, S), generator=g)
    labels = torch.randint(0, vocab, (B, S), generator=g)
    labels[0, : S // 2] = -100  # uneven: micro-batches hold different numbers of label tokens
    labels[3, :3] = -100
    return [Batch(tokens[i : i + 2], labels[i : i + 2]) for i in range(0, B, 2)]


@pytest.mark.parametrize("mtp_depth", [0, 1])
def test_accumulation_equals_full_batch(mtp_depth: int) -> None:
    cfg = tiny_model_cfg(mtp_depth=mtp_depth)
    micro = make_batches(6, 16, cfg.vocab_size)
    full = [Batch(torch.cat([b.tokens for b in micro]), torch.cat([b.labels for b in micro]))]
    results = []
    for batches in (full, micro):
        pm = single_process(cfg)
        losses = forward_backward(pm, batches, mtp_coef=0.3, device=CPU, autocast=nullcontext)
        results.append(
            (losses, {n: p.grad.clone() for n, p in pm.parts[0].named_parameters() if p.grad is not None})
        )
    (l_full, g_full), (l_micro, g_micro) = results
    assert l_micro.num_label_tokens == l_full.num_label_tokens == 6 * 16 - 8 - 3
    assert float(l_micro.ce) == pytest.approx(float(l_full.ce), abs=1e-6)
    assert float(l_micro.mtp) == pytest.approx(float(l_full.mtp), abs=1e-6)
    assert g_full.keys() == g_micro.keys()
    for name in g_full:
        torch.testing.assert_close(g_micro[name], g_full[name], atol=1e-6, rtol=1e-5, msg=name)
    # and it is the mean CE per label token of the full batch, as evaluate() reports it
    assert evaluate(single_process(cfg), full, device=CPU, autocast=nullcontext) == pytest.approx(
        float(l_full.ce), abs=1e-5
    )


# -- a short run resumes exactly -----------------------------------------------------------------


def run_cfg(tmp_path: Path, dataset: Path, steps: int):
    return load_config(
        [
            f"data.sources=[{{path:'{dataset}'}}]",
            "data.seq_len=32",
            "data.micro_batch_size=2",
            "data.val_batches=1",
            "train.global_batch_size=4",
            f"train.steps={steps}",
            "train.log_every=1",
            "optim.warmup_steps=1",
            "model.vocab_size=512",
            "model.dim=32",
            "model.num_layers=2",
            "model.ffn_hidden=64",
            "model.moe.num_experts=4",
            "model.moe.moe_ffn_hidden=16",
            "model.moe.expert_bias=true",
            "logging.wandb_mode=disabled",
            "logging.progress=false",
            f"run.dir={tmp_path}",
        ]
    )


@pytest.mark.slow
def test_resume_is_exact(tmp_path: Path, small_dataset: Path) -> None:
    straight = Trainer(run_cfg(tmp_path / "a", small_dataset, 4))
    summary = straight.train()
    assert summary.final_step == 4 and summary.final_val_loss < summary.first_val_loss

    Trainer(run_cfg(tmp_path / "b", small_dataset, 2)).train()
    resumed = Trainer(run_cfg(tmp_path / "b", small_dataset, 4))
    summary_b = resumed.train()
    assert summary_b.start_step == 2 and summary_b.resumed_from.name == "step-2"
    assert summary_b.final_train_loss == summary.final_train_loss
    straight_state = straight.pm.parts[0].state_dict()
    for (name, a), b in zip(straight_state.items(), resumed.pm.parts[0].state_dict().values()):
        assert torch.equal(a, b), name
    records = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert sum('"kind": "train"' in r for r in records) == 4


def test_resumed_metrics_do_not_repeat_steps(tmp_path: Path) -> None:
    """A run killed at step 7 after checkpointing step 5 resumes at 5 and redoes 6 and 7: their
    records, the validation at 5 (done again at the start) and a torn last line are dropped."""
    from trainer.metrics import _forget_after

    records = [{"kind": "train", "step": s} for s in range(1, 8)] + [{"kind": "val", "step": 5}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"kind": "tra')
    _forget_after(path, 5)
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert kept == [{"kind": "train", "step": s} for s in range(1, 6)]
