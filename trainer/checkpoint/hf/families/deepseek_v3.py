"""DeepSeek-V3 and R1 (deepseek-ai/DeepSeek-V3, DeepSeek-R1): DeepSeek-V2's MLA and MoE layers
with sigmoid routing, the aux-loss-free correction bias (`e_score_correction_bias` -> our
`moe.router.expert_bias`, used for selection only), groups scored by the sum of their best two.

MTP: transformers' DeepseekV3ForCausalLM saves no multi-token-prediction layer (it drops
`model.layers.{num_hidden_layers}.*` on load), so such checkpoints import with mtp_depth=0. A
checkpoint that holds one is refused: our MTP module reads the main model's hidden state before
the final norm, DeepSeek-V3's (as transformers' MtpModel and vLLM run it) the normed one, so
the same weights would compute something else.
"""

from __future__ import annotations

import re
from typing import Any

from model.config import ModelConfig
from trainer.checkpoint.hf.families.deepseek_v2 import DeepseekV2, group_limits
from trainer.checkpoint.hf.hf_config import HFConfig

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class DeepseekV3(DeepseekV2):
    model_type = "deepseek_v3"
    architecture = "DeepseekV3ForCausalLM"
    defaults = dict(first_k_dense_replace=3, routed_scaling_factor=2.5)
    expert_bias = True

    def config_from_hf(self, hf: HFConfig, notes: list[str]) -> ModelConfig:
        # Absent, transformers interleaves too (DeepSeek's checkpoints rotate adjacent pairs).
        hf.expect("rope_interleave", (True,), "only the interleaved RoPE layout of DeepSeek's checkpoints")
        return super().config_from_hf(hf, notes)

    def routing_from_hf(self, hf: HFConfig, num_experts: int, top_k: int) -> dict[str, Any]:
        hf.expect("scoring_func", ("sigmoid",), "DeepSeek-V3 routes by sigmoid scores")
        hf.expect(
            "topk_method",
            ("noaux_tc",),
            "transformers' DeepseekV3 always routes noaux_tc: group-limited, by score + correction bias",
        )
        num_groups, topk_groups = group_limits(hf, num_experts, top_k, defaults=(8, 4), min_size=2)
        return dict(
            score_func="sigmoid",
            norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
            num_groups=num_groups,
            topk_groups=topk_groups,
            expert_bias=True,
        )

    def mtp_from_hf(self, hf: HFConfig, num_layers: int, notes: list[str]) -> int:
        depth = hf.get_int("num_nextn_predict_layers", 1)
        names = hf.tensor_names or frozenset()
        extra = sorted(n for n in names if (m := _LAYER.match(n)) and int(m.group(1)) >= num_layers)
        if extra:
            raise hf.error(
                "num_nextn_predict_layers",
                f"={depth}: the checkpoint holds a multi-token-prediction layer ({extra[0]}, ...) that moeforge "
                "cannot import yet: its MTP module reads the hidden state before the final norm, DeepSeek-V3's "
                "the normed one; nothing was written",
            )
        if depth:
            notes.append(
                f"num_nextn_predict_layers={depth}, but the checkpoint holds no MTP layer (model.layers."
                f"{num_layers}.*; transformers does not save one): imported with model.mtp_depth=0"
            )
        return 0

    def config_to_hf(self, cfg: ModelConfig, notes: list[str]) -> dict[str, Any]:
        # num_nextn_predict_layers 0: a model with MTP modules shows as a difference on re-read.
        return {**super().config_to_hf(cfg, notes), "rope_interleave": True, "num_nextn_predict_layers": 0}

    def routing_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        return {
            "scoring_func": "sigmoid",
            "topk_method": "noaux_tc",
            "norm_topk_prob": cfg.moe.norm_topk_prob,
        }
