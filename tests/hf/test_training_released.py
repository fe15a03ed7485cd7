"""The released architectures, scaled down, through the whole interop path: a tiny random
Qwen3-Next (Gated DeltaNet + gated attention, zero-centred norms, gated shared expert) and a tiny
Llama 4 (iRoPE with temperature tuning, chunked attention, weights on the expert input), built by
transformers' own classes with the released knob values, are imported with
`checkpoint.init_from=hf:`, trained on the embedded corpus by `python -m trainer`, and exported
at the end (`checkpoint.export_hf`). The loss falls, and transformers loads the export and
computes the same logits as our model built from it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T

from model.transformer import Transformer
from tests.fault.launch import ROOT
from tests.hf.cases import CASES
from tests.hf.reference import o1_init_
from trainer.checkpoint.hf import import_checkpoint
from trainer.checkpoint.hf.__main__ import recipe_overrides
from trainer.checkpoint.hf.plan import plan_import

pytestmark = pytest.mark.slow

STEPS = 24
VOCAB = 4096  # the embedded corpus's tokenizer
SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
RELEASED = {"qwen3_next": "qwen3_next", "llama4": "llama4_text"}


def build(family: str, path: Path) -> None:
    case = CASES[RELEASED[family]]
    config = case.config(**SIZES, head_dim=16)
    torch.manual_seed(0)
    model = case.model_class(config)
    # O(1) weights would make a 4096-way softmax start far from uniform; train from a sane scale.
    o1_init_(model, seed=0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(0.5)
    model.save_pretrained(path)


def train(family: str, root: Path, corpus_cache: Path) -> Path:
    hf_dir, run_dir = root / f"{family}_hf", root / f"{family}_run"
    build(family, hf_dir)
    plan, _ = plan_import(str(hf_dir))
    args = [
        "recipe=tiny_cpu",
        *recipe_overrides(plan.cfg),
        f"checkpoint.init_from=hf:{hf_dir}",
        f"checkpoint.export_hf={run_dir / 'hf_export'}",
        f"data.cache_dir={corpus_cache}",
        f"run.dir={run_dir}",
        f"train.steps={STEPS}",
        "data.seq_len=64",
        "data.micro_batch_size=4",
        "train.global_batch_size=8",
        "train.log_every=1",
        "train.val_every=0",
        "optim.lr=3e-3",
        "optim.warmup_steps=2",
        "logging.progress=false",
        "logging.wandb_mode=disabled",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", *args], cwd=root, capture_output=True, text=True, timeout=600,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"},
    )  # fmt: skip
    assert proc.returncode == 0, f"{family}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return run_dir


@pytest.mark.parametrize("family", sorted(RELEASED))
def test_released_architecture_trains_and_round_trips(family, tmp_path, default_corpus_cache) -> None:
    run_dir = train(family, tmp_path, default_corpus_cache)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert len(losses) == STEPS
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses  # nats

    export = run_dir / "hf_export"
    theirs = T.AutoModelForCausalLM.from_pretrained(
        export, attn_implementation="eager", experts_implementation="eager"
    )
    cfg, state, _ = import_checkpoint(export, torch.float32)
    ours = Transformer(cfg)
    ours.load_state_dict(state, strict=False)  # rope tables stay as built
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            ours.logits(ours.eval()(ids)), theirs.eval()(input_ids=ids).logits, atol=1e-4, rtol=1e-4
        )
