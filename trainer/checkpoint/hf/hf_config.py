"""Reading a Hugging Face `config.json` strictly: every field is either understood, known to have
no effect on the weights' meaning, or refused in one line. Nothing is ignored by accident."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from model.config import RopeScalingConfig
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
# transformers' rope_parameters keys -> RopeScalingConfig fields, per RoPE scaling type.
_ORIGINAL = {"factor": "factor", "original_max_position_embeddings": "original_max_seq_len"}
ROPE_SCALING_KEYS = {
    "linear": {"factor": "factor"},
    "llama3": {**_ORIGINAL, "low_freq_factor": "low_freq_factor", "high_freq_factor": "high_freq_factor"},
    "yarn": {**_ORIGINAL, **{k: k for k in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim")}}
    | {k: k for k in ("attention_factor", "truncate")},
}
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

    def rope(self, default_theta: float) -> tuple[float, float, RopeScalingConfig]:
        """(RoPE base, partial rotary factor, scaling) from `rope_parameters` (transformers 5) or the
        older `rope_theta` + `rope_scaling`. Linear, llama3 and yarn scaling are read; dynamic,
        longrope and other types are refused."""
        params = self.get("rope_parameters", None) or {}
        legacy = self.get("rope_scaling", None) or {}
        clash = sorted(k for k in set(params) & set(legacy) if params[k] != legacy[k])
        if clash:
            raise self.error(f"rope_scaling.{clash[0]}", f"disagrees with rope_parameters.{clash[0]}")
        block = {**legacy, **params}
        kind = block.get("rope_type", block.get("type", "default"))
        if kind not in ("default", *ROPE_SCALING_KEYS):
            raise self.error(
                "rope_parameters.rope_type",
                f"={kind!r} (RoPE scaling) cannot be expressed in moeforge: only default, linear, llama3 "
                "and yarn are supported; nothing was written",
            )
        keys = ROPE_SCALING_KEYS.get(kind, {})
        unknown = set(block) - {"rope_type", "type", "rope_theta", "partial_rotary_factor", *keys}
        if unknown:
            raise self.error(f"rope_parameters.{sorted(unknown)[0]}", f"is not understood for {kind} RoPE")
        theta = float(block.get("rope_theta", self.get("rope_theta", default_theta)))
        partial = float(block.get("partial_rotary_factor", self.get("partial_rotary_factor", 1.0)))
        if kind == "default":
            return theta, partial, RopeScalingConfig()
        fields = {ours: block[hf] for hf, ours in keys.items() if block.get(hf) is not None}
        if kind != "linear" and "original_max_seq_len" not in fields:
            raise self.error("rope_parameters.original_max_position_embeddings", f"missing; {kind} needs it")
        original = fields.get("original_max_seq_len", 0)
        if isinstance(original, bool) or not float(original).is_integer():
            raise self.error(
                "rope_parameters.original_max_position_embeddings", f"={original!r} must be an integer"
            )
        fields["original_max_seq_len"] = int(original)
        if "factor" not in fields and kind == "yarn":  # transformers: the context's growth
            fields["factor"] = self.get_int("max_position_embeddings") / fields["original_max_seq_len"]
        if "factor" not in fields:
            raise self.error("rope_parameters.factor", f"missing; {kind} needs it")
        if kind == "yarn":  # transformers treats 0 as unset here
            fields.update(beta_fast=fields.get("beta_fast") or 32.0, beta_slow=fields.get("beta_slow") or 1.0)
            if fields.get("attention_factor", 1.0) <= 0:  # ours: 0 = derived
                raise self.error("rope_parameters.attention_factor", "must be > 0")
        return theta, partial, RopeScalingConfig(type=kind, **fields)

    def finish(self) -> None:
        unread = sorted(set(self.raw) - self.used)
        if unread:
            key = unread[0]
            raise self.error(
                key,
                f"={self.raw[key]!r} is not understood by the {self.family} adapter, so its effect "
                "would be lost; remove it from config.json if it has none; nothing was written",
            )
