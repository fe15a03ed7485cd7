"""MoE layer forward+backward throughput: ours vs a naive per-expert loop vs DeepSpeed's MoE.

Run from the repository root (under a minute on 2 CPU cores, most of it importing DeepSpeed):

    python -m benchmarks.moe_layer

Options: `--tokens 4096 --dim 256 --experts 8 --top-k 2 --hidden 512 --threads 2 --warmup 3
--iters 10 --no-deepspeed`. fp32 on CPU by default; `--device cuda` runs the same on a GPU.

Three implementations of one layer (router Linear(D, E), softmax, top-k, renormalised weights,
E SwiGLU experts of hidden F), all given the same weights, so their outputs are compared too:
- ours: `model.moe.MoE` (sort tokens by expert, one GEMM per expert, index_add combine).
- naive: the textbook loop over experts, selecting each expert's tokens with a boolean mask.
- deepspeed: `deepspeed.moe.layer.MoE` (ep_size=1 on a 1-rank gloo group). Its gate differs in
  small ways: GShard top-2 gating (argmax, then the best of the rest) with `drop_tokens=False`,
  `use_rts=False` and no second-expert sampling, so it routes as ours does; but it always builds
  a dense [T, E, capacity] dispatch mask and dispatches/combines with einsum, and computes its
  aux loss in the forward. Ours computes its aux loss too (coefficient 0.01); the naive loop has
  none.
Reported: median seconds per forward+backward over `--iters` after `--warmup` (the three are
timed in turn, interleaved, so load from other processes hits all alike), tokens/s, the speed
ratio against the naive loop, and the largest output difference from the naive loop.
"""

from __future__ import annotations

import argparse
import os
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import format_table, interleaved_medians
from model.config import ModelConfig, MoEConfig
from model.layers import SwiGLU
from model.moe import MoE


class NaiveMoE(nn.Module):
    """The textbook MoE layer: for each expert, pick its tokens with a mask, run, scatter back."""

    def __init__(self, dim: int, num_experts: int, top_k: int, hidden: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(dim, hidden) for _ in range(num_experts))

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        probs_TE = F.softmax(self.gate(x_TD).float(), dim=-1)
        weights_TK, experts_TK = probs_TE.topk(self.top_k, dim=-1)
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        y_TD = torch.zeros_like(x_TD)
        for e, expert in enumerate(self.experts):
            chosen_TK = experts_TK == e
            token_mask_T = chosen_TK.any(dim=-1)
            if not token_mask_T.any():
                continue
            weight_T = (weights_TK * chosen_TK).sum(dim=-1)[token_mask_T]
            y_TD[token_mask_T] += expert(x_TD[token_mask_T]) * weight_T.unsqueeze(-1).to(x_TD.dtype)
        return y_TD.view_as(x_BSD)


def build_ours(naive: NaiveMoE, dim: int, num_experts: int, top_k: int, hidden: int) -> MoE:
    cfg = ModelConfig(dim=dim, moe=MoEConfig(num_experts=num_experts, top_k=top_k, moe_ffn_hidden=hidden))
    ours = MoE(cfg)
    with torch.no_grad():
        ours.router.gate.weight.copy_(naive.gate.weight)
        for e, expert in enumerate(naive.experts):  # nn.Linear stores [out, in]; ours [E, in, out]
            ours.experts.w1[e].copy_(expert.w1.weight.T)
            ours.experts.w3[e].copy_(expert.w3.weight.T)
            ours.experts.w2[e].copy_(expert.w2.weight.T)
    ours.reset_buffers()
    return ours


class DeepSpeedMoE(nn.Module):
    """`deepspeed.moe.layer.MoE` with the naive layer's weights; returns only the output."""

    def __init__(self, naive: NaiveMoE, dim: int, num_experts: int, top_k: int, hidden: int) -> None:
        super().__init__()
        import deepspeed
        from deepspeed.moe.layer import MoE as DSMoE

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        if not torch.distributed.is_initialized():
            deepspeed.init_distributed(dist_backend="gloo", verbose=False)
        self.moe = DSMoE(
            hidden_size=dim,
            expert=SwiGLU(dim, hidden),
            num_experts=num_experts,
            ep_size=1,
            k=top_k,
            capacity_factor=1.0,
            eval_capacity_factor=1.0,
            drop_tokens=False,
            use_rts=False,
            top2_2nd_expert_sampling=False,
        )
        with torch.no_grad():
            self.moe.deepspeed_moe.gate.wg.weight.copy_(naive.gate.weight)
            for mine, ref in zip(self.moe.deepspeed_moe.experts.deepspeed_experts, naive.experts):
                mine.load_state_dict(ref.state_dict())

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        y_BSD, _aux_loss, _counts = self.moe(x_BSD)
        return y_BSD


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-deepspeed", action="store_true")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    dims = (args.dim, args.experts, args.top_k, args.hidden)

    naive = NaiveMoE(*dims)
    for param in naive.parameters():
        nn.init.normal_(param, std=0.02)
    layers: dict[str, nn.Module] = {"ours (model.moe.MoE)": build_ours(naive, *dims), "naive loop": naive}
    if not args.no_deepspeed:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layers["deepspeed MoE"] = DeepSpeedMoE(naive, *dims)

    x_BSD = torch.randn(args.tokens // args.seq_len, args.seq_len, args.dim, device=device)
    grad_BSD = torch.randn_like(x_BSD)

    def make_step(layer: nn.Module) -> Callable[[], torch.Tensor]:
        layer.to(device).train()
        x = x_BSD.clone().requires_grad_(True)

        def step() -> torch.Tensor:
            for param in layer.parameters():
                param.grad = None
            x.grad = None
            y = layer(x)
            y.backward(grad_BSD)
            if device.type == "cuda":
                torch.cuda.synchronize()  # time the kernels, not their launch
            return y.detach()

        return step

    steps = {name: make_step(layer) for name, layer in layers.items()}
    seconds = interleaved_medians(steps, args.warmup, args.iters)
    results = {name: (seconds[name], step()) for name, step in steps.items()}

    naive_s, reference = results["naive loop"]
    rows = []
    for name, (seconds, out) in results.items():
        max_diff = (out - reference).abs().max().item()
        rows.append(
            [
                name,
                f"{seconds * 1e3:.1f}",
                f"{args.tokens / seconds:,.0f}",
                f"{naive_s / seconds:.2f}x",
                f"{max_diff:.1e}",
            ]
        )
    print(
        f"MoE layer fwd+bwd: {args.tokens} tokens, D={args.dim}, E={args.experts}, top-{args.top_k}, "
        f"F={args.hidden}, fp32, {args.device}, {args.threads} threads, median of {args.iters} "
        f"after {args.warmup} warm-up, torch {torch.__version__}"
    )
    header = ["layer", "ms/iter", "tokens/s", "vs naive", "max |y - y_naive|"]
    print(format_table(header, rows))


if __name__ == "__main__":
    main()
