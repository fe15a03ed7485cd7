"""Hugging Face checkpoints in and out: import (also as a training start at any layout), export
(from a model or a sharded DCP checkpoint), and upcycling of dense checkpoints into MoE.

    python -m trainer.checkpoint.hf import  HF_DIR [--recipe-out FILE]   # config -> recipe, checks
    python -m trainer.checkpoint.hf export  runs/x/checkpoints/step-200 OUT_DIR [--family mixtral]
    python -m trainer model=<recipe> checkpoint.init_from=hf:HF_DIR        # train from it

Layout: `families/` (one adapter per `model_type`, mostly tables), `mapping.py` (the `Link`
rule), `plan.py` (all checks, before any read or write), `convert.py` (the tensor streams),
`safetensors_io.py` (the directory format).
"""

from __future__ import annotations

from pathlib import Path

import torch

from model.config import ModelConfig
from trainer.checkpoint.hf.convert import dcp_tensor_source, export, load_full, load_into
from trainer.checkpoint.hf.plan import ConversionPlan, plan_export, plan_import
from trainer.checkpoint.hf.safetensors_io import HFCheckpoint


def import_checkpoint(
    path: str | Path, dtype: torch.dtype = torch.float32
) -> tuple[ModelConfig, dict[str, torch.Tensor], list[str]]:
    """(model config, our full state dict, conversion notes) of an HF model directory."""
    plan, ckpt = plan_import(str(path))
    return plan.cfg, load_full(plan, ckpt, dtype), plan.notes


def export_state_dict(
    cfg: ModelConfig,
    state: dict[str, torch.Tensor],
    out_dir: str | Path,
    family: str,
    layout: str | None = None,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int = 5 * 2**30,
) -> dict[str, int]:
    """Write our model (a full state dict) as an HF directory of `family`."""
    plan, hf_config = plan_export(cfg, family, layout)
    return export(plan, hf_config, lambda key: state[key], Path(out_dir), dtype, max_shard_bytes)


__all__ = [
    "ConversionPlan",
    "HFCheckpoint",
    "dcp_tensor_source",
    "export",
    "export_state_dict",
    "import_checkpoint",
    "load_into",
    "plan_export",
    "plan_import",
]
