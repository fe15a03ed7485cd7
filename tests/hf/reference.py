"""The reference side of the interop tests: transformers' own model classes, built from their
config classes at tiny sizes, with weights that give O(1) activations.

transformers initialises with std 0.02, under which every projection is nearly zero and a
swapped or transposed weight still lands inside the tolerance; here each matrix gets std
1/sqrt(fan_in), norms 1 + noise, so a mapping bug moves the logits by O(1).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from torch import nn

from model.transformer import Transformer


@torch.no_grad()
def o1_init_(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            # Norms keep the centre they were built with: 1 for `w * x`, 0 for zero-centred
            # `(1 + w) * x` (Qwen3-Next); biases 0.
            base = 1.0 if "norm" in name and "bias" not in name and bool(p.eq(1).all()) else 0.0
            p.copy_(base + 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        elif "embed" in name:
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
        else:
            # Fused / stacked expert banks: the input dim is the smaller of the last two for
            # [E, 2F, D] (in = D, last) and [E, D, 2F] (in = D, second to last); plain Linear: last.
            fan_in = p.shape[-1] if p.dim() == 2 or "down_proj" in name or "gate_up" in name else p.shape[-2]
            if p.dim() == 3 and "gate_up" in name:
                fan_in = min(p.shape[-1], p.shape[-2])
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) / math.sqrt(fan_in))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.1 * torch.randn(b.shape, generator=g, dtype=b.dtype))
    return model


def hf_logits_and_experts(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits of an HF causal LM, and the experts each MoE layer chose ([T, K] per layer, sorted)."""
    chosen: list[torch.Tensor] = []

    def grab(_module, args, kwargs):
        index = kwargs["top_k_index"] if "top_k_index" in kwargs else args[1]
        chosen.append(index.reshape(-1, index.shape[-1]).sort(dim=-1).values)

    def grab_router(module, _args, out):  # Llama 4: its experts see every token (weight 0 if not chosen)
        chosen.append(out[1].topk(module.top_k, dim=-1).indices.sort(dim=-1).values)

    handles = [
        m.register_forward_pre_hook(grab, with_kwargs=True)
        for name, m in model.named_modules()
        if name.endswith("mlp.experts") or name.endswith("block_sparse_moe.experts")
    ]
    handles += [
        m.register_forward_hook(grab_router)
        for n, m in model.named_modules()
        if n.endswith("feed_forward.router")
    ]
    try:
        logits = model(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()
    return logits, chosen


def our_logits_and_experts(model: Transformer, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    chosen: list[torch.Tensor] = []
    handles = [
        moe.router.register_forward_hook(
            lambda _m, _i, out: chosen.append(out.experts_TK.sort(dim=-1).values)
        )
        for moe in model.moe_layers()
    ]
    try:
        logits = model.logits(model(ids))
    finally:
        for h in handles:
            h.remove()
    return logits, chosen


def save_families(tmp_path_factory, families) -> dict[str, Path]:
    """One `save_pretrained` directory per family's test case (copied before each edit)."""
    from tests.hf.cases import CASES

    out = {}
    for family in families:
        case = CASES[family]
        path = tmp_path_factory.mktemp(family) / "hf"
        case.model_class(case.config()).save_pretrained(path)
        out[family] = path
    return out


def edited(src: Path, dst: Path, edits: dict[str, object]) -> Path:
    """A copy of the HF directory `src` with config.json fields set (None: removed)."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    for key, value in edits.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def assert_refused(path: Path, named: str) -> None:
    """Importing `path` fails with one line that contains `named`."""
    from trainer.checkpoint.hf import plan_import
    from trainer.errors import ConfigError

    try:
        plan_import(str(path))
    except ConfigError as err:
        assert named in str(err) and "\n" not in str(err), str(err)
        return
    raise AssertionError(f"{path} imported; expected a refusal naming {named}")
