"""Import: for every family, a tiny transformers model saved with `save_pretrained` (per-expert
keys, the Hub layout) and as its in-memory fused tensors, imported through
`import_checkpoint` (what `checkpoint.init_from=hf:` and the CLI use): same logits, same
cross-entropy gradients and the same experts for every token as transformers' own model.
Export: our model written back and loaded by `from_pretrained` gives the same logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from model.transformer import Transformer
from tests.hf.cases import CASES
from tests.hf.reference import hf_logits_and_experts, o1_init_, our_logits_and_experts
from trainer.checkpoint.hf import export_state_dict, import_checkpoint
from trainer.checkpoint.hf.convert import load_full
from trainer.checkpoint.hf.families import FAMILIES, FUSED
from trainer.checkpoint.hf.plan import ConversionPlan

SEQ = 12
# transformers runs Qwen3-Next's Gated DeltaNet core in fp32 whatever the model's dtype
# (`torch_chunk_gated_delta_rule` casts to float32), so its fp64 gradients are fp32-accurate
# there: they are compared at the fp32 tolerance. The logits still agree within 1e-5, and
# tests/unit/test_gated_deltanet.py checks the layer itself in fp64.
GRAD_ATOL = {"qwen3_next": 1e-4}


class DictSource:
    """An in-memory 'checkpoint' (name -> tensor) for the reader: HF gradients in HF names."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def read(self, name: str, index: tuple[slice, ...] = ()) -> torch.Tensor:
        return self.tensors[name][index]

    def close(self) -> None:
        pass


def disk_layouts(family: str) -> list[str]:
    """Sources on disk: "hub" is `save_pretrained` (the family's native layout), FUSED the
    in-memory tensors where they are another layout the family reads (Llama 4's are the Hub's)."""
    adapter = FAMILIES[CASES[family].config_class.model_type]
    return ["hub"] + ([FUSED] if FUSED in adapter.layouts and adapter.native_layout != FUSED else [])


def build_reference(family: str, seed: int = 0):
    case = CASES[family]
    # Eager kernels: the grouped-mm experts path has no fp64.
    config = case.config(experts_implementation="eager", attn_implementation="eager")
    torch.manual_seed(seed)
    model = case.model_class(config).eval()
    return o1_init_(model, seed), config


def save(model, path, layout: str) -> None:
    if layout == FUSED:  # transformers' in-memory tensors, as some tools save them
        path.mkdir()
        model.config.save_pretrained(path)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    else:
        model.save_pretrained(path)


def ours_from(path, dtype=torch.float64) -> tuple[Transformer, list[str]]:
    cfg, state, notes = import_checkpoint(path, dtype)
    model = Transformer(cfg).to(dtype)
    model.load_state_dict(state, strict=False)  # rope tables and unused expert-bias stay as built
    return model.eval(), notes


@pytest.mark.parametrize(
    ("family", "layout"), [(f, layout) for f in sorted(CASES) for layout in disk_layouts(f)]
)
def test_import_matches_transformers(family: str, layout: str, tmp_path) -> None:
    ref, _ = build_reference(family)
    save(ref, tmp_path / "hf", layout)
    ref = ref.double()
    ours, _ = ours_from(tmp_path / "hf")
    ids = torch.randint(0, ref.config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, ref.config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(2))

    ref_logits, ref_experts = hf_logits_and_experts(ref, ids)
    our_logits, our_experts = our_logits_and_experts(ours, ids)
    assert len(our_experts) == len(ref_experts) > 0
    for layer, (a, b) in enumerate(zip(our_experts, ref_experts)):
        assert torch.equal(a, b), f"MoE layer {layer}: different experts chosen"
    torch.testing.assert_close(our_logits, ref_logits, atol=1e-5, rtol=1e-5)

    # Cross-entropy gradients, compared in our layout: transformers' in-memory (fused) gradients
    # go through the same links as a fused checkpoint would.
    F.cross_entropy(ref_logits.flatten(0, 1), labels.flatten()).backward()
    F.cross_entropy(our_logits.flatten(0, 1), labels.flatten()).backward()
    cfg = ours.cfg
    plan = ConversionPlan(cfg, FAMILIES[cfg_family(ref)], FUSED, FAMILIES[cfg_family(ref)].links(cfg, FUSED))
    # Buffers (DeepSeek-V3's expert bias) are read like any tensor; they have no gradient.
    source = DictSource({**dict(ref.named_buffers()), **{n: p.grad for n, p in ref.named_parameters()}})
    ref_grads = load_full(plan, source, torch.float64)
    our_grads = {n: p.grad for n, p in ours.named_parameters()}
    assert set(ref_grads) == set(our_grads) | {n for n, _ in ours.named_buffers() if n in ref_grads}
    tol = GRAD_ATOL.get(family, 1e-5)
    for name, grad in our_grads.items():
        torch.testing.assert_close(
            grad, ref_grads[name], atol=tol, rtol=tol, msg=lambda m, n=name: f"{n}: {m}"
        )


def cfg_family(ref) -> str:
    return ref.config.model_type


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(CASES))
def test_import_fp32_within_1e4(family: str, tmp_path) -> None:
    ref, _ = build_reference(family, seed=3)
    save(ref, tmp_path / "hf", "hub")
    ours, _ = ours_from(tmp_path / "hf", torch.float32)
    ids = torch.randint(0, ref.config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(ours.logits(ours(ids)), ref(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", sorted(CASES))
def test_export_loads_in_transformers(family: str, tmp_path) -> None:
    """Import, export back in the family's Hub layout, `from_pretrained`: the same logits."""
    ref, _ = build_reference(family, seed=5)
    save(ref, tmp_path / "hf", "hub")
    cfg, state, _ = import_checkpoint(tmp_path / "hf")
    export_state_dict(cfg, state, tmp_path / "out", cfg_family(ref), max_shard_bytes=20_000)  # several shards
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 1
    back = (
        CASES[family]
        .model_class.from_pretrained(
            tmp_path / "out", attn_implementation="eager", experts_implementation="eager"
        )
        .eval()
    )
    ids = torch.randint(0, ref.config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, ref(input_ids=ids).logits, atol=0, rtol=0)
