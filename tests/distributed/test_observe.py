"""Observability on 2 gloo ranks: the straggler report names the rank that does more work per step
(even though lock-step collectives make every rank's wall-clock step equally long), and the
expert-load heatmap on rank 0 covers the layers held by both "pipeline" ranks."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist

from model import Transformer
from model.config import ModelConfig, MoEConfig
from tests.distributed.harness import run_ranks
from trainer.config import JobConfig, LoggingConfig
from trainer.metrics import MetricsLogger
from trainer.observe import Observer

pytestmark = pytest.mark.slow


def busy(n: int) -> int:
    """CPU work that takes the same CPU time however contended the cores are."""
    return sum(i * i for i in range(n))


def observe_case(run_dir: str) -> dict:
    rank = dist.get_rank()
    moe = MoEConfig(num_experts=4, top_k=2, moe_ffn_hidden=8)
    model_cfg = ModelConfig(
        vocab_size=32,
        dim=16,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        ffn_hidden=24,
        max_seq_len=8,
        moe=moe,
    )
    model = Transformer(model_cfg)
    del model.layers[str(1 - rank)]  # rank r holds layer r, as pipeline stages would
    (layer,) = [m for m in model.modules() if hasattr(m, "last_step_counts_E")]
    layer.last_step_counts_E.copy_(torch.tensor([1.0, 1.0, 1.0, 1.0]) + 7 * torch.eye(4)[2 * rank])
    cfg = JobConfig()
    cfg.model, cfg.run.dir = model_cfg, run_dir
    cfg.logging.straggler_every, cfg.logging.heatmap_every = 3, 4
    logging_cfg = LoggingConfig(progress=False, wandb_mode="disabled")
    metrics = MetricsLogger(
        logging_cfg, Path(run_dir), total_steps=4, start_step=0, run_name="t", config={}, rank=rank
    )
    observer = Observer(cfg, SimpleNamespace(transformers=[model]), metrics, torch.device("cpu"))
    for step in range(1, 5):
        if rank == 1:
            busy(300_000)  # the straggler: rank 0 waits for it in the all_reduce below
        dist.all_reduce(torch.ones(1))
        observer.after_step(step)
    metrics.close()
    if rank:
        return {}
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return {
        "records": [json.loads(line) for line in lines],
        "heatmap": json.loads((Path(run_dir) / "expert_load.json").read_text()),
        "png": (Path(run_dir) / "expert_load.png").stat().st_size,
    }


def test_straggler_and_heatmap_on_two_ranks() -> None:
    with tempfile.TemporaryDirectory() as run_dir:
        out = run_ranks(2, observe_case, run_dir)[0]
    (straggler,) = [r for r in out["records"] if r["kind"] == "straggler"]
    assert straggler["step"] == 3 and straggler["straggler/slowest_rank"] == 1
    assert straggler["straggler/ratio"] > 1.5  # of 2 ranks, the median is halfway: at most 2
    (load,) = [r for r in out["records"] if r["kind"] == "expert_load"]
    assert load["step"] == 4 and load["moe/global_load_imbalance_max"] == pytest.approx(4 * 8 / 11)
    assert out["heatmap"]["layers"] == ["0", "1"]
    expected = [[8 / 11, 1 / 11, 1 / 11, 1 / 11], [1 / 11, 1 / 11, 8 / 11, 1 / 11]]  # layer r: expert 2r
    np.testing.assert_allclose(out["heatmap"]["fraction"], expected, atol=1e-6)
    assert out["png"] > 1000
