"""Family adapters by `model_type`."""

from __future__ import annotations

from trainer.checkpoint.hf.families.base import EXPERT_LAYOUTS, FUSED, PER_EXPERT, Family
from trainer.checkpoint.hf.families.deepseek_v2 import DeepseekV2
from trainer.checkpoint.hf.families.deepseek_v3 import DeepseekV3
from trainer.checkpoint.hf.families.dense import Llama, Mistral, Qwen2, Qwen3
from trainer.checkpoint.hf.families.llama4 import Llama4
from trainer.checkpoint.hf.families.mixtral import Mixtral
from trainer.checkpoint.hf.families.olmoe import OLMoE
from trainer.checkpoint.hf.families.qwen2_moe import Qwen2MoE
from trainer.checkpoint.hf.families.qwen3_moe import Qwen3MoE
from trainer.checkpoint.hf.families.qwen3_next import Qwen3Next

FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Mixtral(),
        Llama(),
        Mistral(),
        Qwen2(),
        Qwen3(),
        Qwen3MoE(),
        Qwen2MoE(),
        OLMoE(),
        Qwen3Next(),
        DeepseekV2(),
        DeepseekV3(),
        Llama4(),
    )
}

__all__ = ["EXPERT_LAYOUTS", "FAMILIES", "FUSED", "PER_EXPERT", "Family"]
