"""Plain single-device PyTorch model code; parallelism is applied from `parallel/`."""

from model.config import MLAConfig, ModelConfig, MoEConfig
from model.transformer import IGNORE_INDEX, ModelOutput, Transformer

__all__ = ["IGNORE_INDEX", "MLAConfig", "ModelConfig", "ModelOutput", "MoEConfig", "Transformer"]
