"""Planning a conversion: everything is checked here, before any tensor is read or written.

`plan_import(dir)` reads `config.json` into a `ModelConfig` through the family adapter, lists
the links, and checks them against the checkpoint's index and our model's shapes: an HF tensor
no link reads, a link whose tensor is missing or has another shape, or one of our tensors not
covered exactly once, each fails in one line. `plan_export(cfg, family)` makes the same checks
against the HF config it is about to write (re-read through the adapter, so a knob the family
cannot hold is refused rather than dropped).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from model.config import ModelConfig
from trainer.checkpoint.hf.families import FAMILIES, FUSED, PER_EXPERT, Family
from trainer.checkpoint.hf.hf_config import HFConfig
from trainer.checkpoint.hf.mapping import Link, block_numel, block_shape, hf_block_as_ours
from trainer.checkpoint.hf.safetensors_io import HFCheckpoint, conversion_error

# ModelConfig fields that say how to train, not what the weights compute: a job may set them
# freely when it starts from an imported checkpoint.
TRAINING_FIELDS = frozenset(
    {"name", "max_seq_len", "init_std", "mtp_loss_coef", "published_total_b", "published_active_b"}
)
MOE_TRAINING_FIELDS = frozenset(
    {"router_jitter", "capacity_factor", "drop_policy", "aux_loss_coef", "aux_loss_scope", "z_loss_coef", "bias_update_rate"}
)  # fmt: skip
EXPERT_BIAS = "moe.router.expert_bias"


@dataclass
class ConversionPlan:
    cfg: ModelConfig
    family: Family
    layout: str
    links: list[Link]
    notes: list[str] = field(default_factory=list)
    # In-memory source tensors besides the checkpoint's (upcycling: the replicated router).
    synthetic: dict[str, torch.Tensor] = field(default_factory=dict)

    def links_by_ours(self) -> dict[str, list[Link]]:
        grouped: dict[str, list[Link]] = defaultdict(list)
        for link in self.links:
            grouped[link.ours].append(link)
        return dict(grouped)

    def links_by_hf(self) -> dict[str, list[Link]]:
        grouped: dict[str, list[Link]] = defaultdict(list)
        for link in self.links:
            grouped[link.hf].append(link)
        return dict(grouped)


def family_of(config: dict, source: str) -> Family:
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        known = ", ".join(sorted(FAMILIES))
        raise conversion_error(
            f"{source}: model_type", f"={model_type!r} is not a family moeforge converts (known: {known})"
        )
    return FAMILIES[model_type]


def read_config(
    config: dict, source: str = "config.json", tensor_names: list[str] | None = None
) -> tuple[ModelConfig, Family, list[str]]:
    family = family_of(config, source)
    hf = HFConfig(config, family.model_type, source, tensor_names)
    notes: list[str] = []
    cfg = family.config_from_hf(hf, notes)
    hf.finish()
    return cfg, family, notes


def our_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of our state dict (parameters and persistent buffers), from a meta model."""
    from model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def required_keys(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> set[str]:
    """Our tensors a conversion must provide: all but the router's expert bias when aux-loss-free
    balancing is off (it is then all zeros and unused)."""
    return {k for k in shapes if cfg.moe.expert_bias or not k.endswith(EXPERT_BIAS)}


def check_links(plan: ConversionPlan, shapes: dict[str, tuple[int, ...]], exact_hf: bool) -> None:
    """Each link fits both tensors, each of our required tensors is covered exactly, and (for
    export, `exact_hf`) each HF tensor too: an adapter bug is a one-line error, never a silently
    missing weight."""
    covered: dict[str, int] = defaultdict(int)
    hf_covered: dict[str, int] = defaultdict(int)
    hf_shapes: dict[str, tuple[int, ...]] = {}
    for link in plan.links:
        if link.ours not in shapes:
            raise conversion_error(
                link.ours,
                f"the {plan.family.model_type} adapter maps {link.hf} to it, but the model has no such tensor",
            )
        ours = block_shape(link.our_index, shapes[link.ours])
        if ours != hf_block_as_ours(link):
            raise conversion_error(
                link.hf,
                f"block of shape {list(hf_block_as_ours(link))} does not fit {link.ours} block {list(ours)}",
            )
        covered[link.ours] += block_numel(link.our_index, shapes[link.ours])
        hf_covered[link.hf] += block_numel(link.hf_index, link.hf_shape)
        hf_shapes[link.hf] = link.hf_shape
    for key in sorted(required_keys(plan.cfg, shapes)):
        numel = int(torch.Size(shapes[key]).numel())
        if covered.get(key, 0) != numel:
            raise conversion_error(
                key,
                f"{covered.get(key, 0)} of its {numel} values come from the checkpoint (a tensor left unwritten)",
            )
    if exact_hf:
        for name, count in hf_covered.items():
            numel = int(torch.Size(hf_shapes[name]).numel())
            if count != numel:
                raise conversion_error(name, f"only {count} of its {numel} values would be written")


def detect_layout(ckpt: HFCheckpoint) -> str:
    return FUSED if any(n.endswith("experts.gate_up_proj") for n in ckpt.names()) else PER_EXPERT


def check_against_checkpoint(plan: ConversionPlan, ckpt: HFCheckpoint) -> None:
    """Every HF tensor is read by some link, every linked tensor exists with the expected shape."""
    wanted = plan.links_by_hf()
    for name in ckpt.names():
        if name not in wanted:
            raise conversion_error(
                name,
                f"in {ckpt.file_of[name]} is not read by the {plan.family.model_type} adapter (a tensor left "
                "over: the config and the weights disagree, or the checkpoint holds something moeforge "
                "does not model); nothing was written",
            )
    for name, links in wanted.items():
        if name in plan.synthetic:
            continue
        if name not in ckpt.file_of:
            raise conversion_error(
                name,
                f"missing from {ckpt.path} (the {plan.family.model_type} config needs it); nothing was written",
            )
        if ckpt.shape(name) != links[0].hf_shape:
            raise conversion_error(
                name,
                f"has shape {list(ckpt.shape(name))} in {ckpt.file_of[name]}, the config implies "
                f"{list(links[0].hf_shape)}; nothing was written",
            )


def plan_import(path: str, layout: str | None = None) -> tuple[ConversionPlan, HFCheckpoint]:
    ckpt = HFCheckpoint(path)
    cfg, family, notes = read_config(ckpt.config, str(ckpt.path / "config.json"), ckpt.names())
    layout = layout or detect_layout(ckpt)
    plan = ConversionPlan(cfg, family, layout, family.links(cfg, layout), notes)
    check_against_checkpoint(plan, ckpt)
    check_links(plan, our_shapes(cfg), exact_hf=False)
    return plan, ckpt


def _canonical(cfg: ModelConfig) -> dict[str, object]:
    """What a config computes, flattened to dotted names, with equivalent spellings made equal
    (head_dim 0 = dim / heads, the MoE layer set instead of first_k_dense + moe_layer_freq, no
    dense/MoE/MLA fields where the model has no such layer)."""
    moe_layers = [i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)]
    flat: dict[str, object] = {"moe_layers": moe_layers}
    for f in dataclasses.fields(ModelConfig):
        value = getattr(cfg, f.name)
        if f.name in TRAINING_FIELDS or f.name in ("first_k_dense", "moe_layer_freq"):
            continue
        if f.name == "moe" and not moe_layers or f.name == "mla" and cfg.attention != "mla":
            continue
        if dataclasses.is_dataclass(value):
            for sub in dataclasses.fields(value):
                if not (f.name == "moe" and sub.name in MOE_TRAINING_FIELDS):
                    flat[f"{f.name}.{sub.name}"] = getattr(value, sub.name)
        else:
            flat[f.name] = value
    flat["head_dim"] = cfg.resolved_head_dim
    if len(moe_layers) == cfg.num_layers:
        flat.pop("ffn_hidden")
    if moe_layers and cfg.moe.num_shared_experts:
        flat["moe.shared_ffn_hidden"] = (
            cfg.moe.shared_ffn_hidden or cfg.moe.num_shared_experts * cfg.moe.moe_ffn_hidden
        )
    return flat


def architecture_differences(expected: ModelConfig, actual: ModelConfig) -> list[str]:
    """Dotted fields where two model configs compute different things (training fields aside)."""
    a, b = _canonical(expected), _canonical(actual)
    return [f"model.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def plan_export(cfg: ModelConfig, model_type: str, layout: str | None = None) -> tuple[ConversionPlan, dict]:
    if model_type not in FAMILIES:
        raise conversion_error(
            "--family",
            f"={model_type!r} is not a family moeforge converts (known: {', '.join(sorted(FAMILIES))})",
        )
    family = FAMILIES[model_type]
    notes: list[str] = []
    hf_config = family.config_to_hf(cfg, notes)
    # Read back what we are about to write: a knob the family cannot hold shows up as a difference.
    reread, _, _ = read_config(hf_config, f"{model_type} config.json")
    diffs = [
        d
        for d in architecture_differences(reread, cfg)
        if d != "model.moe.expert_bias" or cfg.moe.expert_bias
    ]
    if diffs:
        field_name = diffs[0]
        value = _canonical(cfg).get(field_name.removeprefix("model."))
        raise conversion_error(
            field_name,
            f"={value!r} has no {model_type} equivalent: exporting would change what the model computes; nothing was written",
        )
    layout = layout or family.native_layout
    plan = ConversionPlan(cfg, family, layout, family.links(cfg, layout), notes)
    check_links(plan, our_shapes(cfg), exact_hf=True)
    return plan, hf_config
