"""DeepSeek-V2 and V2-Lite (deepseek-ai/DeepSeek-V2, DeepSeek-V2-Lite): MLA attention, the first
`first_k_dense_replace` layers dense, then softmax-routed experts (greedy, or group-limited with
the group scored by its best expert) plus shared experts.

transformers' DeepseekV2 rotates q_pe / k_pe as complex numbers, i.e. adjacent pairs: those rows
of q_(b_)proj (per head) and kv_a_proj_with_mqa are permuted into our two-halves layout. The MLA
pieces here (`mla_links`, `mlp_links`, the config readers) are DeepSeek-V3's too.
"""

from __future__ import annotations

from typing import Any, ClassVar

from model.config import MLAConfig, ModelConfig, MoEConfig
from trainer.checkpoint.hf.families import base
from trainer.checkpoint.hf.hf_config import HFConfig
from trainer.checkpoint.hf.mapping import Link

# DeepSeek's q_a / kv_a RMSNorms are built without an eps argument (1e-6 in transformers and in
# DeepSeek's own code); ours use model.norm_eps like every other norm.
LATENT_NORM_EPS = 1e-6


def mla_config(hf: HFConfig) -> tuple[dict[str, Any], MLAConfig]:
    """(ModelConfig keyword arguments, MLAConfig) of a DeepSeek config.json, checked."""
    common = base.common_config(hf, default_theta=10000.0)
    hf.expect("attention_bias", (False,), "MLA projections have no bias")
    if common.pop("partial_rotary_factor", 1.0) != 1.0:
        raise hf.error(
            "rope_parameters.partial_rotary_factor", "MLA rotates qk_rope_head_dim dims of each head"
        )
    if "q_lora_rank" not in hf.raw:  # absent, transformers would build a 1536-rank bottleneck
        raise hf.error("q_lora_rank", "missing (null: queries projected directly)")
    q_lora = hf.get_int("q_lora_rank", 0)
    nope, rope = hf.get_int("qk_nope_head_dim"), hf.get_int("qk_rope_head_dim")
    mla = MLAConfig(
        q_lora_rank=q_lora,
        kv_lora_rank=hf.get_int("kv_lora_rank"),
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope,
        v_head_dim=hf.get_int("v_head_dim"),
    )
    # transformers saves head_dim = qk_rope_head_dim (its RoPE size) and qk_head_dim = nope + rope.
    if common["head_dim"] not in (0, rope):
        raise hf.error(
            "head_dim", f"={common['head_dim']} must equal qk_rope_head_dim={rope} (the RoPE size)"
        )
    hf.expect("qk_head_dim", (nope + rope,), "it is qk_nope_head_dim + qk_rope_head_dim")
    if common["num_kv_heads"] != common["num_heads"]:
        raise hf.error(
            "num_key_value_heads",
            f"={common['num_kv_heads']} must equal num_attention_heads={common['num_heads']} (MLA expands "
            "its latent into every head); nothing was written",
        )
    if common["norm_eps"] != LATENT_NORM_EPS:
        raise hf.error(
            "rms_norm_eps",
            f"={common['norm_eps']!r}: DeepSeek's q_a/kv_a norms always use {LATENT_NORM_EPS}, moeforge's MLA "
            "norms use model.norm_eps, so only 1e-6 can be expressed; nothing was written",
        )
    common.update(head_dim=0, attention="mla")
    return common, mla


def moe_layer_placement(hf: HFConfig, num_layers: int, default_first_k: int) -> dict[str, Any]:
    """ModelConfig placement fields (see `base.moe_layer_pattern`). transformers makes every layer from first_k_dense_replace
    on MoE and ignores moe_layer_freq; DeepSeek's own code also needs `i % moe_layer_freq == 0`:
    only a value on which both agree is accepted."""
    first_k = hf.get_int("first_k_dense_replace", default_first_k)
    freq = hf.get_int("moe_layer_freq", 1)
    moe = {i for i in range(num_layers) if i >= first_k}
    deepseek = {i for i in moe if freq >= 1 and i % freq == 0}
    if deepseek != moe:
        raise hf.error(
            "moe_layer_freq",
            f"={freq}: DeepSeek's code makes layers {sorted(deepseek)} MoE, transformers (which ignores it) "
            f"layers {sorted(moe)}: the checkpoint is ambiguous; nothing was written",
        )
    return base.moe_layer_pattern(moe, num_layers)


def group_limits(
    hf: HFConfig, num_experts: int, top_k: int, defaults: tuple[Any, Any] = (None, None), min_size: int = 1
) -> tuple[int, int]:
    """(n_group, topk_group) of group-limited routing, or a one-line refusal."""
    num_groups = hf.get_int("n_group", defaults[0])
    topk_groups = hf.get_int("topk_group", defaults[1])
    if num_groups < 1 or num_experts % num_groups:
        raise hf.error("n_group", f"={num_groups} must divide n_routed_experts={num_experts}")
    if num_groups > 1 and num_experts // num_groups < min_size:
        raise hf.error(
            "n_group", f"={num_groups}: each group needs >= {min_size} experts (its score sums the best two)"
        )
    if not 1 <= topk_groups <= num_groups:
        raise hf.error("topk_group", f"={topk_groups} must be in [1, n_group={num_groups}]")
    reachable = topk_groups * (num_experts // num_groups)
    if top_k > reachable:
        raise hf.error(
            "num_experts_per_tok",
            f"={top_k} exceeds the {reachable} experts of topk_group={topk_groups} groups",
        )
    return num_groups, topk_groups


def aux_from_hf(hf: HFConfig, notes: list[str]) -> dict[str, Any]:
    """DeepSeek adds alpha * E * sum_i f_i P_i per MoE layer, per sequence with seq_aux: our
    balancing loss at scope sequence (else micro_batch), the same coefficient."""
    alpha = float(hf.get("aux_loss_alpha", 0.0))
    scope = "sequence" if hf.get("seq_aux", False) else "micro_batch"
    hf.ignore("ep_size")  # expert parallelism of DeepSeek's own trainer
    if alpha:
        notes.append(f"aux_loss_alpha={alpha:g} -> model.moe.aux_loss_coef={alpha:g}, aux_loss_scope={scope}")
    return dict(aux_loss_coef=alpha, aux_loss_scope=scope)


def mla_links(cfg: ModelConfig, i: int) -> list[Link]:
    """MLA projections; the rotary rows (interleaved pairs in the checkpoint) are permuted."""
    mla, d, heads = cfg.mla, cfg.dim, cfg.num_heads
    nope, rope, kv = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.kv_lora_rank
    qk = nope + rope
    ours, hf = f"layers.{i}.attention", f"model.layers.{i}.self_attn"
    halves = base.rope_halves_perm(rope)
    head_perm = tuple(range(nope)) + tuple(nope + r for r in halves)
    q_in, wq, q_proj = (mla.q_lora_rank, "wq_b", "q_b_proj") if mla.q_lora_rank else (d, "wq", "q_proj")
    links = []
    for h in range(heads):  # per head, so a tensor-parallel rank reads only its heads
        rows = (slice(h * qk, (h + 1) * qk),)
        links.append(
            Link(
                f"{ours}.{wq}.weight", f"{hf}.{q_proj}.weight", (heads * qk, q_in), rows, rows, perm=head_perm
            )
        )
    if mla.q_lora_rank:
        links += [
            Link(f"{ours}.wq_a.weight", f"{hf}.q_a_proj.weight", (mla.q_lora_rank, d)),
            Link(f"{ours}.q_norm.weight", f"{hf}.q_a_layernorm.weight", (mla.q_lora_rank,)),
        ]
    latent_perm = tuple(range(kv)) + tuple(kv + r for r in halves)
    return links + [
        Link(f"{ours}.wkv_a.weight", f"{hf}.kv_a_proj_with_mqa.weight", (kv + rope, d), perm=latent_perm),
        Link(f"{ours}.kv_norm.weight", f"{hf}.kv_a_layernorm.weight", (kv,)),
        Link(f"{ours}.wkv_b.weight", f"{hf}.kv_b_proj.weight", (heads * (nope + mla.v_head_dim), kv)),
        Link(f"{ours}.wo.weight", f"{hf}.o_proj.weight", (d, heads * mla.v_head_dim)),
    ]


def mlp_links(cfg: ModelConfig, i: int, layout: str, expert_bias: bool) -> list[Link]:
    """`model.layers.{i}.mlp`: a dense SwiGLU, or router `gate` (+ its `e_score_correction_bias`),
    routed `experts` and `shared_experts`."""
    hf = f"model.layers.{i}.mlp"
    if not cfg.is_moe_layer(i):
        return base.swiglu_links(f"layers.{i}.feed_forward", hf, cfg.dim, cfg.ffn_hidden)
    moe = cfg.moe
    links = [Link(f"layers.{i}.moe.router.gate.weight", f"{hf}.gate.weight", (moe.num_experts, cfg.dim))]
    if expert_bias:
        links.append(
            Link(
                f"layers.{i}.moe.router.expert_bias", f"{hf}.gate.e_score_correction_bias", (moe.num_experts,)
            )
        )
    links += base.expert_links(cfg, i, f"{hf}.experts", layout)
    shared = moe.shared_ffn_hidden or moe.num_shared_experts * moe.moe_ffn_hidden
    return links + base.swiglu_links(
        f"layers.{i}.moe.shared_experts", f"{hf}.shared_experts", cfg.dim, shared
    )


class DeepseekV2(base.Family):
    model_type = "deepseek_v2"
    architecture = "DeepseekV2ForCausalLM"
    # transformers' defaults for the fields a config.json may leave out
    defaults: ClassVar[dict[str, Any]] = dict(first_k_dense_replace=0, routed_scaling_factor=1.0)
    expert_bias: ClassVar[bool] = False  # the router holds an e_score_correction_bias

    def config_from_hf(self, hf: HFConfig, notes: list[str]) -> ModelConfig:
        common, mla = mla_config(hf)
        num_layers = common["num_layers"]
        placement = moe_layer_placement(hf, num_layers, self.defaults["first_k_dense_replace"])
        num_experts, top_k = hf.get_int("n_routed_experts"), hf.get_int("num_experts_per_tok")
        moe_hidden, num_shared = hf.get_int("moe_intermediate_size"), hf.get_int("n_shared_experts")
        if num_shared < 1:  # transformers builds zero-width shared experts; we would build none
            raise hf.error("n_shared_experts", f"={num_shared}: a DeepSeek MoE layer has shared experts")
        moe = MoEConfig(
            num_experts=num_experts,
            top_k=top_k,
            moe_ffn_hidden=moe_hidden,
            num_shared_experts=num_shared,
            routed_scaling_factor=float(
                hf.get("routed_scaling_factor", self.defaults["routed_scaling_factor"])
            ),
            **self.routing_from_hf(hf, num_experts, top_k),
            **aux_from_hf(hf, notes),
        )
        return ModelConfig(
            name=self.model_type,
            ffn_hidden=hf.get_int("intermediate_size"),
            mla=mla,
            moe=moe,
            **placement,
            mtp_depth=self.mtp_from_hf(hf, num_layers, notes),
            **common,
        )

    def routing_from_hf(self, hf: HFConfig, num_experts: int, top_k: int) -> dict[str, Any]:
        hf.expect("scoring_func", ("softmax",), "DeepSeek-V2 routes with a softmax")
        hf.expect(
            "norm_topk_prob",
            (False,),
            "transformers' DeepseekV2 never renormalises the top-k weights, DeepSeek's own code does when it "
            "is set: the checkpoint is ambiguous",
        )
        method = hf.get("topk_method", "greedy")
        if method == "greedy":
            hf.ignore("n_group", "topk_group")  # unused by greedy routing
            groups = (1, 1)
        elif method == "group_limited_greedy":
            groups = group_limits(hf, num_experts, top_k)
        else:
            raise hf.error(
                "topk_method",
                f"={method!r} cannot be expressed in moeforge (DeepSeek-V2 routes 'greedy' or "
                "'group_limited_greedy'); nothing was written",
            )
        return dict(score_func="softmax", norm_topk_prob=False, num_groups=groups[0], topk_groups=groups[1])

    def mtp_from_hf(self, hf: HFConfig, num_layers: int, notes: list[str]) -> int:
        return 0

    def config_to_hf(self, cfg: ModelConfig, notes: list[str]) -> dict[str, Any]:
        mla, moe = cfg.mla, cfg.moe
        moe_layers = [i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)]
        shared = moe.shared_ffn_hidden or moe.num_shared_experts * moe.moe_ffn_hidden
        return {
            **base.common_config_to_hf(cfg, self),
            "head_dim": mla.qk_rope_head_dim,
            "num_key_value_heads": cfg.num_heads,
            "attention_bias": False,
            "q_lora_rank": mla.q_lora_rank or None,
            "kv_lora_rank": mla.kv_lora_rank,
            "qk_nope_head_dim": mla.qk_nope_head_dim,
            "qk_rope_head_dim": mla.qk_rope_head_dim,
            "v_head_dim": mla.v_head_dim,
            "intermediate_size": cfg.ffn_hidden,
            "moe_intermediate_size": moe.moe_ffn_hidden,
            "n_routed_experts": moe.num_experts,
            "num_experts_per_tok": moe.top_k,
            "n_shared_experts": shared // moe.moe_ffn_hidden,  # re-read: a remainder shows as a difference
            "first_k_dense_replace": moe_layers[0] if moe_layers else cfg.num_layers,
            "moe_layer_freq": 1,
            "routed_scaling_factor": moe.routed_scaling_factor,
            "n_group": moe.num_groups,
            "topk_group": moe.topk_groups,
            "aux_loss_alpha": moe.aux_loss_coef,
            "seq_aux": moe.aux_loss_scope == "sequence",
            **self.routing_to_hf(cfg),
        }

    def routing_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        return {
            "scoring_func": "softmax",
            "norm_topk_prob": False,
            "topk_method": "group_limited_greedy" if cfg.moe.num_groups > 1 else "greedy",
        }

    def links(self, cfg: ModelConfig, layout: str) -> list[Link]:
        links = base.embedding_links(cfg)
        for i in range(cfg.num_layers):
            links += base.block_norm_links(cfg, i) + mla_links(cfg, i)
            links += mlp_links(cfg, i, layout, expert_bias=self.expert_bias)
        return links
