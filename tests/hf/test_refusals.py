"""Bad conversions fail in one line naming the field, file or tensor, with exit code 2 from the
command line, and nothing written: no recipe, no export directory, no run directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.config import ModelConfig, MoEConfig
from tests.fault.launch import ROOT
from tests.hf.cases import CASES
from tests.hf.reference import o1_init_
from trainer.checkpoint.hf import export_state_dict, plan_import
from trainer.checkpoint.hf.__main__ import main as hf_cli
from trainer.errors import ConfigError

WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mixtral") / "hf"
    torch.manual_seed(0)
    o1_init_(CASES["mixtral"].model_class(CASES["mixtral"].config())).save_pretrained(path)
    return path


def broken_copy(src: Path, dst: Path, config=None, tensors=None) -> Path:
    """A copy of `src` with config.json and/or the tensors edited by the given functions."""
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(config(cfg) or cfg if config else cfg))
    weights = load_file(str(src / WEIGHTS))
    save_file(tensors(weights) or weights if tensors else weights, str(dst / WEIGHTS))
    return dst


def set_field(key, value):
    def edit(cfg):
        cfg[key] = value

    return edit


def drop(name):
    return lambda w: {k: v for k, v in w.items() if k != name}


EXPERT0 = "model.layers.0.block_sparse_moe.experts.0.w1.weight"
CASES_BAD = {
    "unknown model_type": (dict(config=set_field("model_type", "gpt_oss")), "model_type"),
    "dynamic rope scaling": (
        dict(config=set_field("rope_parameters", {"rope_type": "dynamic", "rope_theta": 1e6, "factor": 4.0})),
        "rope_parameters.rope_type",
    ),
    "sliding window not an integer": (dict(config=set_field("sliding_window", "wide")), "sliding_window"),
    "unknown config field": (dict(config=set_field("attention_sink", True)), "attention_sink"),
    "non-SwiGLU activation": (dict(config=set_field("hidden_act", "gelu")), "hidden_act"),
    "config that is not an integer": (dict(config=set_field("num_local_experts", "8")), "num_local_experts"),
    "MoE layer missing": (dict(config=set_field("num_hidden_layers", 4)), "model.layers.3"),
    "tensor missing": (dict(tensors=drop(EXPERT0)), EXPERT0),
    "tensor left over": (
        dict(
            tensors=lambda w: {**w, "model.layers.0.block_sparse_moe.experts.8.w1.weight": w[EXPERT0].clone()}
        ),
        "experts.8.w1.weight",
    ),
    "shape mismatch": (dict(tensors=lambda w: {**w, EXPERT0: w[EXPERT0][:-1]}), EXPERT0),
    "more experts in the config than on disk": (
        dict(config=set_field("num_local_experts", 9)),
        "implies [9, 32]",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES_BAD))
def test_bad_checkpoint_is_one_line_and_nothing_is_written(case, mixtral_dir, tmp_path, capsys) -> None:
    edits, named = CASES_BAD[case]
    bad = broken_copy(mixtral_dir, tmp_path / "bad", **edits)
    recipe = tmp_path / "recipe.yaml"
    assert hf_cli(["import", str(bad), "--recipe-out", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("moeforge: conversion error: ") and named in err, err
    assert not recipe.exists()


def test_missing_shard_corrupt_files_and_not_a_model_dir(mixtral_dir, tmp_path) -> None:
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((mixtral_dir / "config.json").read_text())
    weights = load_file(str(mixtral_dir / WEIGHTS))
    save_file(weights, str(sharded / "model-00001-of-00002.safetensors"))
    index = {
        "weight_map": {
            **dict.fromkeys(weights, "model-00001-of-00002.safetensors"),
            "lm_head.weight": "model-00002-of-00002.safetensors",
        }
    }
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match="model-00002-of-00002.safetensors: missing"):
        plan_import(str(sharded))

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: is not valid JSON"):
        plan_import(str(corrupt))
    (corrupt / "config.json").write_text((mixtral_dir / "config.json").read_text())
    (corrupt / WEIGHTS).write_bytes(b"\x00" * 64)
    with pytest.raises(ConfigError, match="model.safetensors: is not a readable safetensors file"):
        plan_import(str(corrupt))
    with pytest.raises(ConfigError, match="not a directory"):
        plan_import(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="config.json: missing"):
        plan_import(str(tmp_path / "empty"))


def test_export_refuses_what_the_family_cannot_hold(tmp_path) -> None:
    cfg = ModelConfig(
        vocab_size=64,
        dim=16,
        num_layers=2,
        num_heads=2,
        num_kv_heads=2,
        qk_norm=True,
        moe=MoEConfig(num_experts=4, moe_ffn_hidden=8),
    )
    for bad, named in (
        (cfg, "model.qk_norm"),
        (ModelConfig(moe=MoEConfig(num_shared_experts=1)), "model.moe.num_shared_experts"),
    ):
        with pytest.raises(ConfigError, match=named):
            export_state_dict(bad, {}, tmp_path / "out", "mixtral")
    with pytest.raises(ConfigError, match="--family"):
        export_state_dict(cfg, {}, tmp_path / "out", "gpt2")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


@pytest.mark.slow
def test_trainer_refuses_a_mismatched_init_from_before_any_work(mixtral_dir, tmp_path) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "recipe=tiny_cpu", f"run.dir={run_dir}", f"checkpoint.init_from=hf:{mixtral_dir}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "moeforge: config error: model." in proc.stderr, proc.stderr
    assert "differs from" in proc.stderr and not run_dir.exists()


def test_import_writes_a_recipe_that_reads_back_as_the_same_model(mixtral_dir, tmp_path, capsys) -> None:
    """The `import` command's recipe, merged onto the schema the way Hydra composes `model=<name>`,
    is the imported config; the command says what it converted and how to train from it."""
    from omegaconf import OmegaConf

    recipe = tmp_path / "mx.yaml"
    assert hf_cli(["import", str(mixtral_dir), "--recipe-out", str(recipe), "--name", "mx"]) == 0
    out = capsys.readouterr().out
    assert "router_aux_loss_coef=0.02 -> model.moe.aux_loss_coef=0.0133333" in out
    assert f"model=mx checkpoint.init_from=hf:{mixtral_dir}" in out
    merged = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(recipe)))
    expected = plan_import(str(mixtral_dir))[0].cfg
    assert merged == ModelConfig(**{**expected.__dict__, "name": "mx"})
    assert hf_cli(["import", str(mixtral_dir), "--recipe-out", str(recipe)]) == 2  # never overwritten


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"init_from": "/models/x"}, "checkpoint.init_from"),  # not hf:DIR
        ({"init_from": "hf:/nowhere"}, "/nowhere"),
        ({"export_hf": "OUT"}, "checkpoint.export_hf_family"),  # no family, no init_from
        (
            {"export_hf": "OUT", "export_hf_family": "mixtral", "export_hf_dtype": "fp8"},
            "checkpoint.export_hf_dtype",
        ),
        (
            {"export_hf": "OUT", "export_hf_family": "mixtral", "export_hf_layout": "stacked"},
            "checkpoint.export_hf_layout",
        ),
        ({"export_hf": "OUT", "export_hf_family": "gpt2"}, "--family"),
        # The default model has no shared expert; every Qwen2-MoE layer has a gated one.
        ({"export_hf": "OUT", "export_hf_family": "qwen2_moe"}, "model.moe.num_shared_experts"),
    ],
)
def test_hf_checkpoint_fields_are_validated_before_any_work(fields, named, tmp_path) -> None:
    from trainer.config import JobConfig
    from trainer.validate import validate

    job = JobConfig()
    job.data.cache_dir = str(tmp_path)
    for key, value in fields.items():
        setattr(job.checkpoint, key, value.replace("OUT", str(tmp_path / "out")))
    with pytest.raises(ConfigError, match=named):
        validate(job)
    assert not (tmp_path / "out").exists()
