"""The training job's side of HF interop: `checkpoint.init_from=hf:DIR` (checked before any rank
starts, loaded at any layout) and `checkpoint.export_hf=DIR` (an HF copy of the final model)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from model.config import ModelConfig
from trainer.checkpoint.hf.convert import dcp_tensor_source, export, load_into
from trainer.checkpoint.hf.families import EXPERT_LAYOUTS, FAMILIES
from trainer.checkpoint.hf.plan import ConversionPlan, architecture_differences, plan_export, plan_import
from trainer.checkpoint.hf.safetensors_io import CONFIG, INDEX, HFCheckpoint, conversion_error
from trainer.checkpoint.hf.upcycle import check_upcycle, upcycle_plan

PREFIX = "hf:"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def init_path(value: str) -> Path:
    if not value.startswith(PREFIX):
        raise conversion_error(
            "checkpoint.init_from", f"={value!r} must be hf:DIR (a Hugging Face model directory)"
        )
    return Path(value[len(PREFIX) :]).expanduser()


def plan_for_model(model_cfg: ModelConfig, hf_dir: Path) -> tuple[ConversionPlan, HFCheckpoint]:
    """The import plan of `hf_dir` into a model built from `model_cfg`: the same architecture
    (training fields aside), or a MoE upcycled from a dense checkpoint."""
    plan, ckpt = plan_import(str(hf_dir))
    has_moe = any(model_cfg.is_moe_layer(i) for i in range(model_cfg.num_layers))
    if plan.family.dense and has_moe:
        return upcycle_plan(plan, model_cfg, check_upcycle(model_cfg, plan.cfg, str(hf_dir))), ckpt
    diffs = architecture_differences(plan.cfg, model_cfg)
    if diffs:
        raise conversion_error(
            diffs[0],
            f"differs from {hf_dir / CONFIG} (start from the recipe `python -m trainer.checkpoint.hf import "
            f"{hf_dir}` writes)",
        )
    return plan, ckpt


def export_family(init_from: str, family: str) -> str:
    """The family to export as: the one given, else that of `init_from` (an upcycled dense
    model exports as the dense family's MoE counterpart)."""
    if family:
        return family
    if not init_from:
        raise conversion_error(
            "checkpoint.export_hf_family", "is empty: name the HF family (e.g. mixtral, qwen3_moe)"
        )
    source = FAMILIES[json.loads((init_path(init_from) / CONFIG).read_text())["model_type"]]
    return source.moe_counterpart if source.dense else source.model_type


def check_job(ckpt_cfg, model_cfg: ModelConfig) -> None:
    """Every HF-related field of the job, before any work: one line on the first problem."""
    if ckpt_cfg.init_from:
        plan_for_model(model_cfg, init_path(ckpt_cfg.init_from))
    if ckpt_cfg.export_hf:
        if ckpt_cfg.export_hf_dtype not in DTYPES:
            raise conversion_error(
                "checkpoint.export_hf_dtype", f"={ckpt_cfg.export_hf_dtype!r}: use one of {', '.join(DTYPES)}"
            )
        if ckpt_cfg.export_hf_layout and ckpt_cfg.export_hf_layout not in EXPERT_LAYOUTS:
            raise conversion_error(
                "checkpoint.export_hf_layout",
                f"={ckpt_cfg.export_hf_layout!r}: use one of {', '.join(EXPERT_LAYOUTS)}",
            )
        out = Path(ckpt_cfg.export_hf).expanduser()
        if out.exists() and not (out / INDEX).is_file():
            raise conversion_error(
                "checkpoint.export_hf", f"={out} exists and is not an HF export (choose a new directory)"
            )
        plan_export(
            model_cfg,
            export_family(ckpt_cfg.init_from, ckpt_cfg.export_hf_family),
            ckpt_cfg.export_hf_layout or None,
        )


def load_hf(models: list[torch.nn.Module], model_cfg: ModelConfig, init_from: str) -> int:
    plan, ckpt = plan_for_model(model_cfg, init_path(init_from))
    return load_into(models, plan, ckpt)


def export_run(ckpt_cfg, model_cfg: ModelConfig, step_dir: Path, tokenizer_from: Path | None = None) -> Path:
    """Write the HF copy of the checkpoint at `step_dir` (one process: it reads the DCP shards)."""
    plan, hf_config = plan_export(
        model_cfg,
        export_family(ckpt_cfg.init_from, ckpt_cfg.export_hf_family),
        ckpt_cfg.export_hf_layout or None,
    )
    out = Path(ckpt_cfg.export_hf).expanduser()
    if tokenizer_from is None and ckpt_cfg.init_from:
        tokenizer_from = init_path(ckpt_cfg.init_from)
    export(
        plan,
        hf_config,
        dcp_tensor_source(step_dir / "sharded"),
        out,
        DTYPES[ckpt_cfg.export_hf_dtype],
        tokenizer_from=tokenizer_from,
        replace=True,
    )
    return out
