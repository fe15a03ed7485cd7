"""Reading a Hugging Face `config.json` strictly: every field is either understood, known to have
no effect on the weights' meaning, or refused in one line. Nothing is ignored by accident."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from trainer.checkpoint.hf.safetensors_io import conversion_error

# Fields every transformers config carries that do not change what the weights compute.
NO_EFFECT = frozenset(
    {
        "_name_or_path", "architectures", "transformers_version", "dtype", "torch_dtype", "model_type",
        "output_hidden_states", "output_attentions", "return_dict", "use_cache", "chunk_size_feed_forward",
        "is_encoder_decoder", "problem_type", "id2label", "label2id", "pad_token_id", "bos_token_id",
        "eos_token_id", "initializer_range", "output_router_logits", "auto_map", "tokenizer_class",
        "pretraining_tp", "use_return_dict", "num_labels",
    }
)  # fmt: skip
_MISSING = object()


class HFConfig:
    """`config.json` as read by one family adapter; `finish()` refuses what nobody read."""

    def __init__(
        self,
        raw: dict[str, Any],
        family: str,
        source: str = "config.json",
        tensor_names: Iterable[str] | None = None,
    ) -> None:
        self.raw, self.family, self.source = raw, family, source
        self.used: set[str] = set(NO_EFFECT)
        # The checkpoint's tensor names, where the config alone cannot say what the weights hold
        # (DeepSeek-V3's MTP layers, which transformers does not save); None when exporting.
        self.tensor_names = frozenset(tensor_names) if tensor_names is not None else None

    def error(self, key: str, message: str):
        return conversion_error(f"{self.source}: {key}", message)

    def get(self, key: str, default: Any = _MISSING) -> Any:
        self.used.add(key)
        if key in self.raw and self.raw[key] is not None:
            return self.raw[key]
        if default is _MISSING:
            raise self.error(key, f"missing; a {self.family} config.json needs it")
        return default

    def get_int(self, key: str, default: Any = _MISSING) -> int:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"must be an integer, got {value!r}")
        return value

    def expect(self, key: str, allowed: tuple[Any, ...], why: str) -> Any:
        """A field moeforge supports only at the values `allowed` (None = absent is always fine)."""
        self.used.add(key)
        value = self.raw.get(key)
        if value is not None and value not in allowed:
            raise self.error(key, f"={value!r} cannot be expressed in moeforge ({why}); nothing was written")
        return value

    def ignore(self, *keys: str) -> None:
        """Fields with no effect on the forward pass (training-only or inference-only)."""
        self.used.update(keys)

    def rope(self, default_theta: float) -> tuple[float, float]:
        """(RoPE base, partial rotary factor) from `rope_parameters` (transformers 5) or the older
        `rope_theta` + `rope_scaling`. Only plain RoPE: YaRN, llama3, linear or dynamic scaling
        are refused."""
        params = self.get("rope_parameters", None) or {}
        scaling = self.get("rope_scaling", None) or {}
        for where, block in (("rope_parameters", params), ("rope_scaling", scaling)):
            kind = block.get("rope_type", block.get("type", "default"))
            if kind != "default":
                raise self.error(
                    f"{where}.rope_type",
                    f"={kind!r} (RoPE scaling) cannot be expressed in moeforge yet: only plain RoPE is "
                    "supported; nothing was written",
                )
        unknown = set(params) - {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
        if unknown:
            raise self.error(f"rope_parameters.{sorted(unknown)[0]}", "is not understood by moeforge")
        theta = float(params.get("rope_theta", self.get("rope_theta", default_theta)))
        partial = float(params.get("partial_rotary_factor", self.get("partial_rotary_factor", 1.0)))
        return theta, partial

    def finish(self) -> None:
        unread = sorted(set(self.raw) - self.used)
        if unread:
            key = unread[0]
            raise self.error(
                key,
                f"={self.raw[key]!r} is not understood by the {self.family} adapter, so its effect "
                "would be lost; remove it from config.json if it has none; nothing was written",
            )
