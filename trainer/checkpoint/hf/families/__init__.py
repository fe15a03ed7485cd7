"""Family adapters by `model_type`."""

from __future__ import annotations

from trainer.checkpoint.hf.families.base import EXPERT_LAYOUTS, FUSED, PER_EXPERT, Family
from trainer.checkpoint.hf.families.mixtral import Mixtral

FAMILIES: dict[str, Family] = {f.model_type: f for f in (Mixtral(),)}

__all__ = ["EXPERT_LAYOUTS", "FAMILIES", "FUSED", "PER_EXPERT", "Family"]
