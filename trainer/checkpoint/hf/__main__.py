"""Hugging Face checkpoints in and out of moeforge.

    python -m trainer.checkpoint.hf import  HF_DIR [--recipe-out FILE] [--name NAME]
    python -m trainer.checkpoint.hf upcycle DENSE_HF_DIR --num-experts 8 --top-k 2 [--granularity 1]
    python -m trainer.checkpoint.hf export  CHECKPOINT OUT_DIR [--family F] [--layout L] [--dtype D]

`import` checks everything a training start needs (config fields, every tensor's name and shape)
and writes the model recipe (default: recipes/model/<name>.yaml, so `model=<name>` picks it);
train with `python -m trainer recipe=tiny_cpu model=<name> checkpoint.init_from=hf:HF_DIR`.
`upcycle` writes the recipe of a MoE made from a dense checkpoint (init_from upcycles it).
`export` turns a moeforge checkpoint (a step directory, or a checkpoint directory: its newest
valid step), saved at any layout, into a directory `from_pretrained` loads.
A problem is one line on stderr (`moeforge: conversion error: ...`), exit code 2, nothing written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

import recipes
from model.config import ModelConfig
from model.params import format_params
from trainer.checkpoint.hf.job import DTYPES
from trainer.checkpoint.hf.plan import plan_export, plan_import
from trainer.checkpoint.hf.safetensors_io import conversion_error
from trainer.checkpoint.hf.upcycle import check_upcycle
from trainer.errors import ConfigError

EXIT_ERROR = 2


def recipe_yaml(cfg: ModelConfig, header: str) -> str:

    return f"# {header}\n" + OmegaConf.to_yaml(OmegaConf.structured(cfg))


def recipe_overrides(cfg: ModelConfig) -> list[str]:
    """The same model as command-line overrides (`model.dim=...`), for scripts and tests."""
    out = []
    for key, value in dataclasses.asdict(cfg).items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for sub, v in items:
            name = f"model.{key}" + (f".{sub}" if sub else "")
            out.append(
                f"{name}={json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else v}"
            )
    return out


def _write_recipe(cfg: ModelConfig, out: str | None, header: str) -> Path:
    path = Path(out) if out else Path(recipes.__file__).parent / "model" / f"{cfg.name}.yaml"
    if path.exists():
        raise conversion_error(str(path), "exists already (pass --recipe-out elsewhere, or --name)")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(recipe_yaml(cfg, header))
    return path


def cmd_import(args: argparse.Namespace) -> int:
    plan, ckpt = plan_import(args.hf_dir)
    cfg = dataclasses.replace(plan.cfg, name=args.name or Path(args.hf_dir).resolve().name)
    for note in plan.notes:
        print(f"note: {note}")
    path = _write_recipe(
        cfg, args.recipe_out, f"imported from {ckpt.path} ({plan.family.model_type}, {plan.layout} experts)"
    )
    print(f"{ckpt.path}: {plan.family.model_type}, {format_params(cfg)}, {len(ckpt.names())} tensors checked")
    print(f"wrote {path}")
    print(f"train: python -m trainer recipe=tiny_cpu model={cfg.name} checkpoint.init_from=hf:{ckpt.path}")
    return 0


def cmd_upcycle(args: argparse.Namespace) -> int:
    plan, ckpt = plan_import(args.hf_dir)
    if not plan.family.dense:
        raise conversion_error(
            f"{ckpt.path}/config.json: model_type",
            f"={plan.family.model_type!r} is not dense: nothing to upcycle",
        )
    dense = plan.cfg
    moe = dataclasses.replace(
        dense.moe,
        num_experts=args.num_experts,
        top_k=args.top_k,
        moe_ffn_hidden=dense.ffn_hidden // args.granularity,
        num_shared_experts=0,
        score_func="softmax",
        norm_topk_prob=True,
    )
    name = args.name or f"{Path(args.hf_dir).resolve().name}_{args.num_experts}x"
    cfg = dataclasses.replace(dense, name=name, moe=moe, first_k_dense=args.first_k_dense)
    check_upcycle(cfg, dense, str(ckpt.path))
    path = _write_recipe(cfg, args.recipe_out, f"upcycled from {ckpt.path} (granularity {args.granularity})")
    print(f"{ckpt.path}: {plan.family.model_type} -> {format_params(cfg)}")
    print(f"wrote {path}")
    print(f"train: python -m trainer recipe=tiny_cpu model={cfg.name} checkpoint.init_from=hf:{ckpt.path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from trainer.checkpoint.hf.convert import dcp_tensor_source, export
    from trainer.checkpoint.hf.job import export_family
    from trainer.checkpoint.manager import MANIFEST, SHARDED, step_dirs, verify

    step_dir = Path(args.checkpoint)
    if not (step_dir / MANIFEST).is_file():
        found = [p for _, p in step_dirs(step_dir) if verify(p, checksums=False) is None]
        if not found:
            raise conversion_error(str(step_dir), "holds no complete moeforge checkpoint")
        step_dir = found[-1]
    problem = verify(step_dir, checksums=True)
    if problem:
        raise conversion_error(str(step_dir), f"is not a valid checkpoint: {problem}")
    job = json.loads((step_dir / MANIFEST).read_text())["config"]
    cfg = model_config_from_dict(job["model"], step_dir)
    init_from = job.get("checkpoint", {}).get("init_from", "")
    family = export_family(init_from, args.family)
    plan, hf_config = plan_export(cfg, family, args.layout)
    out = Path(args.out_dir)
    if out.exists():
        raise conversion_error(str(out), "exists already (choose a new directory); nothing was written")
    tokenizer = Path(args.tokenizer) if args.tokenizer else None
    shards = export(
        plan,
        hf_config,
        dcp_tensor_source(step_dir / SHARDED),
        out,
        DTYPES[args.dtype],
        tokenizer_from=tokenizer,
    )
    print(
        f"wrote {out}: {family}, {plan.layout} experts, {len(shards)} shards, {sum(shards.values()) / 2**20:.1f} MiB"
    )
    return 0


def model_config_from_dict(d: dict, source: Path) -> ModelConfig:
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), d))
    except (TypeError, KeyError, OmegaConfBaseException) as e:
        raise conversion_error(
            f"{source}/manifest.json: config.model", f"does not fit this moeforge version ({e})"
        ) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.checkpoint.hf", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("import", help="check an HF model directory and write its model recipe")
    p.add_argument("hf_dir")
    p.add_argument("--recipe-out")
    p.add_argument("--name")
    p = sub.add_parser("upcycle", help="write the recipe of a MoE upcycled from a dense HF model")
    p.add_argument("hf_dir")
    p.add_argument("--num-experts", type=int, required=True)
    p.add_argument("--top-k", type=int, required=True)
    p.add_argument("--granularity", type=int, default=1, help="experts per dense MLP (fine-grained experts)")
    p.add_argument("--first-k-dense", type=int, default=0)
    p.add_argument("--recipe-out")
    p.add_argument("--name")
    p = sub.add_parser("export", help="write a moeforge checkpoint as an HF model directory")
    p.add_argument("checkpoint")
    p.add_argument("out_dir")
    p.add_argument("--family", default="", help="HF model_type (default: that of checkpoint.init_from)")
    p.add_argument("--layout", choices=("per_expert", "fused"))
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--tokenizer", help="copy the tokenizer files from here (a prepared dataset or HF dir)")
    args = parser.parse_args(argv)
    try:
        return {"import": cmd_import, "upcycle": cmd_upcycle, "export": cmd_export}[args.command](args)
    except ConfigError as e:
        print(f"moeforge: conversion error: {e}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
