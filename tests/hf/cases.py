"""One tiny transformers model per family, with the released values of every architecture knob
moeforge supports (sizes shrunk). Each case: the transformers config class, causal-LM class and
config keyword arguments."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import transformers as T


@dataclass(frozen=True)
class Case:
    config_class: type
    model_class: type
    kwargs: dict[str, Any]

    def config(self, **overrides: Any):
        return self.config_class(**{**self.kwargs, **overrides})


TINY = dict(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)

CASES: dict[str, Case] = {
    # mistralai/Mixtral-8x7B-v0.1: 8 experts, top-2, theta 1e6, eps 1e-5, no sliding window.
    "mixtral": Case(
        T.MixtralConfig,
        T.MixtralForCausalLM,
        dict(
            TINY,
            intermediate_size=48,
            num_local_experts=8,
            num_experts_per_tok=2,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
            router_aux_loss_coef=0.02,
            max_position_embeddings=256,
        ),
    ),
}
