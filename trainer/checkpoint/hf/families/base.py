"""What a family adapter is, and the pieces most families share (Llama-style key names).

An adapter is mostly a table: `config_from_hf` reads `config.json` strictly into a `ModelConfig`
(refusing what moeforge cannot express), `config_to_hf` writes it back, and `links` lists where
each HF tensor lives in our model (see `mapping.Link`). Architecture knobs live in `model/`;
nothing here changes what a weight means except by the exact rules of a `Link`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict
from typing import Any, ClassVar

from model.config import ModelConfig, MoEConfig
from trainer.checkpoint.hf.hf_config import ROPE_SCALING_KEYS, HFConfig
from trainer.checkpoint.hf.mapping import Link
from trainer.checkpoint.hf.safetensors_io import conversion_error

PER_EXPERT, FUSED = "per_expert", "fused"
EXPERT_LAYOUTS = (PER_EXPERT, FUSED)


class Family(ABC):
    model_type: ClassVar[str]
    architecture: ClassVar[str]  # the transformers class `from_pretrained` builds
    native_layout: ClassVar[str] = PER_EXPERT  # the expert layout of the family's Hub checkpoints
    layouts: ClassVar[tuple[str, ...]] = EXPERT_LAYOUTS  # the expert layouts it reads and writes
    dense: ClassVar[bool] = False  # a dense family: an upcycling source

    @abstractmethod
    def config_from_hf(self, hf: HFConfig, notes: list[str]) -> ModelConfig: ...

    @abstractmethod
    def config_to_hf(self, cfg: ModelConfig, notes: list[str]) -> dict[str, Any]: ...

    @abstractmethod
    def links(self, cfg: ModelConfig, layout: str) -> list[Link]: ...


# ---- config helpers -----------------------------------------------------------------------------


def moe_layer_pattern(moe_layers: set[int], num_layers: int) -> dict[str, Any]:
    """ModelConfig placement fields (first_k_dense, moe_layer_freq, mlp_only_layers) that make
    exactly `moe_layers` MoE: 'the first k dense, then every n-th layer' where that fits, else
    every layer MoE except the listed `mlp_only_layers`."""
    for first_k in range(num_layers + 1):
        for freq in range(1, num_layers + 1):
            cfg = ModelConfig(num_layers=num_layers, first_k_dense=first_k, moe_layer_freq=freq)
            if {i for i in range(num_layers) if cfg.is_moe_layer(i)} == moe_layers:
                return {"first_k_dense": first_k, "moe_layer_freq": freq, "mlp_only_layers": []}
    dense = [i for i in range(num_layers) if i not in moe_layers]
    return {"first_k_dense": 0, "moe_layer_freq": 1, "mlp_only_layers": dense}


def aux_coef_from_hf(hf_coef: float, top_k: int, num_moe_layers: int, notes: list[str]) -> float:
    """HF pools one balancing loss over all layers with expert fractions summing to top_k; we add
    one loss per MoE layer with fractions summing to 1. The same pressure per layer needs
    coef_ours = coef_hf * top_k / num_moe_layers."""
    ours = hf_coef * top_k / max(num_moe_layers, 1)
    if hf_coef:
        notes.append(
            f"router_aux_loss_coef={hf_coef:g} -> model.moe.aux_loss_coef={ours:.6g} (transformers pools "
            f"one loss over {num_moe_layers} MoE layers with fractions summing to top_k={top_k}; moeforge "
            "adds one per layer, normalised to 1)"
        )
    return ours


def aux_coef_to_hf(cfg: ModelConfig) -> float:
    num_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
    return cfg.moe.aux_loss_coef * num_moe / cfg.moe.top_k


def sparse_step_layers(hf: HFConfig, num_layers: int, num_experts: int) -> tuple[dict[str, Any], int]:
    """Qwen-style MoE placement (Qwen2-MoE, Qwen3-MoE, Qwen3-Next): layer i is MoE when it is not
    in `mlp_only_layers` and (i + 1) % decoder_sparse_step == 0. Returns the ModelConfig placement
    fields and the number of MoE layers, or a one-line refusal."""
    step = hf.get_int("decoder_sparse_step", 1)
    if step < 1:
        raise hf.error("decoder_sparse_step", f"={step} must be >= 1; nothing was written")
    dense = hf.get("mlp_only_layers", [])
    if not isinstance(dense, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in dense):
        raise hf.error("mlp_only_layers", f"={dense!r} must be a list of layer indices; nothing was written")
    moe = {i for i in range(num_layers) if i not in dense and num_experts > 0 and (i + 1) % step == 0}
    return moe_layer_pattern(moe, num_layers), len(moe)


def qwen_moe(
    hf: HFConfig, notes: list[str], num_layers: int, num_experts: int, norm_topk_default: bool, **shared: Any
) -> tuple[MoEConfig, dict[str, Any]]:
    """(MoEConfig, placement fields: see `moe_layer_pattern`) of the Qwen MoE families: softmax top-k over
    `num_experts` with `norm_topk_prob`, placed by `decoder_sparse_step` / `mlp_only_layers`;
    `shared` holds the shared-expert fields where the family has one."""
    top_k = hf.get_int("num_experts_per_tok")
    placement, num_moe = sparse_step_layers(hf, num_layers, num_experts)
    moe = MoEConfig(
        num_experts=num_experts,
        top_k=top_k,
        moe_ffn_hidden=hf.get_int("moe_intermediate_size"),
        score_func="softmax",
        norm_topk_prob=bool(hf.get("norm_topk_prob", norm_topk_default)),
        aux_loss_coef=aux_coef_from_hf(float(hf.get("router_aux_loss_coef", 0.001)), top_k, num_moe, notes),
        **shared,
    )
    return moe, placement


def qwen_moe_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The inverse of `qwen_moe`: routed-MoE fields and layer placement of a Qwen MoE config."""
    moe = cfg.moe
    return {
        **sparse_step_to_hf(cfg),
        "intermediate_size": cfg.ffn_hidden,
        "moe_intermediate_size": moe.moe_ffn_hidden,
        "num_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "norm_topk_prob": moe.norm_topk_prob,
        "router_aux_loss_coef": aux_coef_to_hf(cfg),
    }


def sparse_step_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    freq = cfg.moe_layer_freq
    return {
        "decoder_sparse_step": freq,
        "mlp_only_layers": [
            i for i in range(cfg.num_layers) if (i + 1) % freq == 0 and not cfg.is_moe_layer(i)
        ],
    }


def num_experts_of(hf: HFConfig) -> int:
    """`num_experts`, which transformers 5 may save under its alias `num_local_experts`."""
    values = {k: hf.get_int(k) for k in ("num_experts", "num_local_experts") if hf.raw.get(k) is not None}
    hf.ignore("num_experts", "num_local_experts")
    if not values:
        raise hf.error("num_experts", f"missing; a {hf.family} config.json needs it")
    if len(set(values.values())) > 1:
        raise hf.error(
            "num_local_experts",
            f"={values['num_local_experts']} disagrees with num_experts={values['num_experts']} (its alias); "
            "nothing was written",
        )
    return next(iter(values.values()))


def gated_shared_expert(hf: HFConfig) -> dict[str, Any]:
    """MoEConfig fields of the one shared expert with a sigmoid gate that every Qwen2-MoE and
    Qwen3-Next MoE layer has (`shared_expert_intermediate_size` wide)."""
    hidden = hf.get_int("shared_expert_intermediate_size")
    if hidden < 1:
        raise hf.error(
            "shared_expert_intermediate_size",
            f"={hidden}: the gated shared expert needs a hidden size >= 1; nothing was written",
        )
    return dict(num_shared_experts=1, shared_ffn_hidden=hidden, shared_expert_gate=True)


def gated_shared_expert_to_hf(cfg: ModelConfig, family: Family) -> dict[str, Any]:
    moe = cfg.moe
    if moe.num_shared_experts == 0 and any(cfg.is_moe_layer(i) for i in range(cfg.num_layers)):
        raise conversion_error(
            "model.moe.num_shared_experts",
            f"=0 has no {family.model_type} equivalent (each of its MoE layers has a gated shared "
            "expert); nothing was written",
        )
    return {
        "shared_expert_intermediate_size": moe.shared_ffn_hidden
        or moe.num_shared_experts * moe.moe_ffn_hidden
    }


def refuse_sliding_window(hf: HFConfig) -> None:
    """Qwen's `use_sliding_window` switch: off, the window fields have no effect."""
    hf.expect("use_sliding_window", (False,), "sliding-window attention is not supported yet")
    hf.ignore("sliding_window", "max_window_layers")


def common_config(hf: HFConfig, default_theta: float) -> dict[str, Any]:
    """The fields every Llama-style family shares, as ModelConfig keyword arguments."""
    hf.expect("hidden_act", ("silu",), "experts and MLPs are SwiGLU")
    hf.expect("attention_dropout", (0, 0.0), "moeforge has no attention dropout")
    hf.expect("mlp_bias", (False,), "linear layers have no bias")
    theta, partial, scaling = hf.rope(default_theta)
    kwargs = dict(
        vocab_size=hf.get_int("vocab_size"),
        dim=hf.get_int("hidden_size"),
        num_layers=hf.get_int("num_hidden_layers"),
        num_heads=hf.get_int("num_attention_heads"),
        num_kv_heads=hf.get_int("num_key_value_heads", hf.get("num_attention_heads")),
        head_dim=hf.get_int("head_dim", 0),
        max_seq_len=hf.get_int("max_position_embeddings"),
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=float(hf.get("rms_norm_eps")),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    if partial != 1.0:
        kwargs["partial_rotary_factor"] = partial
    return kwargs


def common_config_to_hf(cfg: ModelConfig, family: Family) -> dict[str, Any]:
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.partial_rotary_factor != 1.0:
        rope["partial_rotary_factor"] = cfg.partial_rotary_factor
    rope.update(rope_scaling_to_hf(cfg))
    return {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.resolved_head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rope_parameters": rope,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
    }


def rope_scaling_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """`rope_parameters` entries of cfg.rope_scaling (the inverse of HFConfig.rope)."""
    rs = cfg.rope_scaling
    if rs.type == "none":
        return {}
    original = rs.original_max_seq_len or cfg.max_seq_len / rs.factor
    if not float(original).is_integer():  # validation refuses this config; a caller may not have run it
        raise conversion_error(
            "model.rope_scaling.original_max_seq_len",
            f"max_seq_len / factor = {original:g} is not a whole context",
        )
    values = {**asdict(rs), "original_max_seq_len": int(original)}
    out = {hf: values[ours] for hf, ours in ROPE_SCALING_KEYS[rs.type].items()}
    return {"rope_type": rs.type, **{k: v for k, v in out.items() if k != "attention_factor" or v}}


# ---- link helpers (our key names are model/'s; HF names are Llama-style) -----------------------


def rope_halves_perm(rotary_dim: int) -> tuple[int, ...]:
    """Interleaved rotary pairs (x0, y0, x1, y1, ...) -> our halves (x0, x1, ..., y0, y1, ...):
    our row i is HF row perm[i]. Applied to q and k alike, attention scores are unchanged."""
    return tuple(range(0, rotary_dim, 2)) + tuple(range(1, rotary_dim, 2))


def embedding_links(cfg: ModelConfig) -> list[Link]:
    v, d = cfg.vocab_size, cfg.dim
    links = [
        Link("tok_embeddings.weight", "model.embed_tokens.weight", (v, d)),
        Link("norm.weight", "model.norm.weight", (d,)),
    ]
    if not cfg.tie_embeddings:
        links.append(Link("output.weight", "lm_head.weight", (v, d)))
    return links


def block_norm_links(
    cfg: ModelConfig, i: int, attn: str = "input_layernorm", ffn: str = "post_attention_layernorm"
):
    d = cfg.dim
    return [
        Link(f"layers.{i}.attention_norm.weight", f"model.layers.{i}.{attn}.weight", (d,)),
        Link(f"layers.{i}.ffn_norm.weight", f"model.layers.{i}.{ffn}.weight", (d,)),
    ]


def gqa_links(cfg: ModelConfig, i: int, interleaved_rope: bool = False) -> list[Link]:
    """q/k/v/o projections (+ qkv biases, + q/k norms). With `interleaved_rope` (the checkpoint
    rotates adjacent pairs, as complex-number RoPE does) each head's rows are permuted. With
    `attention_output_gate` q_proj holds [query_h, gate_h] per head, our wq's layout too."""
    d, hd = cfg.dim, cfg.resolved_head_dim
    hq, hkv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    wq_rows = 2 * hq if cfg.attention_output_gate else hq
    assert not (interleaved_rope and wq_rows != hq), "no family has both"
    ours, hf = f"layers.{i}.attention", f"model.layers.{i}.self_attn"
    links = []
    for name, proj, rows in (("wq", "q_proj", wq_rows), ("wk", "k_proj", hkv)):
        if interleaved_rope:
            perm = rope_halves_perm(hd)
            for h in range(rows // hd):
                block = (slice(h * hd, (h + 1) * hd),)
                links.append(
                    Link(f"{ours}.{name}.weight", f"{hf}.{proj}.weight", (rows, d), block, block, perm=perm)
                )
        else:
            links.append(Link(f"{ours}.{name}.weight", f"{hf}.{proj}.weight", (rows, d)))
    links += [
        Link(f"{ours}.wv.weight", f"{hf}.v_proj.weight", (hkv, d)),
        Link(f"{ours}.wo.weight", f"{hf}.o_proj.weight", (d, hq)),
    ]
    if cfg.qkv_bias:
        for name, proj, rows in (("wq", "q_proj", wq_rows), ("wk", "k_proj", hkv), ("wv", "v_proj", hkv)):
            links.append(Link(f"{ours}.{name}.bias", f"{hf}.{proj}.bias", (rows,)))
    if cfg.qk_norm:
        per_projection = cfg.qk_norm_scope == "projection"
        q_size, k_size = (hq, hkv) if per_projection else (hd, hd)
        links += [
            Link(f"{ours}.q_norm.weight", f"{hf}.q_norm.weight", (q_size,)),
            Link(f"{ours}.k_norm.weight", f"{hf}.k_norm.weight", (k_size,)),
        ]
    return links


def swiglu_links(ours: str, hf: str, dim: int, hidden: int, names=("gate_proj", "up_proj", "down_proj")):
    """A dense SwiGLU (our w1/w3/w2 are nn.Linear, the same [out, in] orientation as HF)."""
    gate, up, down = names
    return [
        Link(f"{ours}.w1.weight", f"{hf}.{gate}.weight", (hidden, dim)),
        Link(f"{ours}.w3.weight", f"{hf}.{up}.weight", (hidden, dim)),
        Link(f"{ours}.w2.weight", f"{hf}.{down}.weight", (dim, hidden)),
    ]


def expert_links(
    cfg: ModelConfig,
    i: int,
    hf: str,
    layout: str,
    names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
    fused_in_out: bool = False,
) -> list[Link]:
    """Routed experts: our banks w1/w3 [E, D, F], w2 [E, F, D].
    per_expert: `{hf}.{e}.{gate}.weight` [F, D] etc. (nn.Linear orientation: transposed).
    fused: `{hf}.gate_up_proj` [E, 2F, D] (gate rows first) and `{hf}.down_proj` [E, D, F];
    with `fused_in_out` (Llama 4) [E, D, 2F] and [E, F, D], our own orientation."""
    E, d, f = cfg.moe.num_experts, cfg.dim, cfg.moe.moe_ffn_hidden
    ours = f"layers.{i}.moe.experts"
    gate, up, down = names
    if layout == PER_EXPERT:
        links = []
        for e in range(E):
            links += [
                Link(f"{ours}.w1", f"{hf}.{e}.{gate}.weight", (f, d), (e,), transpose=True),
                Link(f"{ours}.w3", f"{hf}.{e}.{up}.weight", (f, d), (e,), transpose=True),
                Link(f"{ours}.w2", f"{hf}.{e}.{down}.weight", (d, f), (e,), transpose=True),
            ]
        return links
    all_e = slice(None)
    if fused_in_out:
        return [
            Link(f"{ours}.w1", f"{hf}.gate_up_proj", (E, d, 2 * f), hf_index=(all_e, all_e, slice(0, f))),
            Link(f"{ours}.w3", f"{hf}.gate_up_proj", (E, d, 2 * f), hf_index=(all_e, all_e, slice(f, 2 * f))),
            Link(f"{ours}.w2", f"{hf}.down_proj", (E, f, d)),
        ]
    return [
        Link(
            f"{ours}.w1", f"{hf}.gate_up_proj", (E, 2 * f, d), hf_index=(all_e, slice(0, f)), transpose=True
        ),
        Link(
            f"{ours}.w3",
            f"{hf}.gate_up_proj",
            (E, 2 * f, d),
            hf_index=(all_e, slice(f, 2 * f)),
            transpose=True,
        ),
        Link(f"{ours}.w2", f"{hf}.down_proj", (E, d, f), transpose=True),
    ]


def mlp_links(cfg: ModelConfig, i: int, layout: str, shared_expert: bool = False) -> list[Link]:
    """`model.layers.{i}.mlp`: a dense SwiGLU, or the sparse block (router `gate`, `experts`, and
    for Qwen2-MoE / Qwen3-Next a `shared_expert` with its sigmoid `shared_expert_gate`)."""
    hf = f"model.layers.{i}.mlp"
    if not cfg.is_moe_layer(i):
        return swiglu_links(f"layers.{i}.feed_forward", hf, cfg.dim, cfg.ffn_hidden)
    moe = cfg.moe
    links = [Link(f"layers.{i}.moe.router.gate.weight", f"{hf}.gate.weight", (moe.num_experts, cfg.dim))]
    links += expert_links(cfg, i, f"{hf}.experts", layout)
    if shared_expert:
        hidden = moe.shared_ffn_hidden or moe.num_shared_experts * moe.moe_ffn_hidden
        links += swiglu_links(f"layers.{i}.moe.shared_experts", f"{hf}.shared_expert", cfg.dim, hidden)
        links.append(
            Link(f"layers.{i}.moe.shared_expert_gate.weight", f"{hf}.shared_expert_gate.weight", (1, cfg.dim))
        )
    return links
