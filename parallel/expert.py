"""Expert parallelism: experts sharded over the "ep" mesh, tokens exchanged with all-to-all.

Each rank routes its own tokens, then `AllToAllDispatcher`:
  1. sorts its token copies by global expert id (the local dispatcher),
  2. exchanges per-(rank, local expert) counts with a fixed-size all-to-all,
  3. sends the tokens with an uneven, autograd-aware `all_to_all_single`,
  4. regroups what arrived (by source rank, then expert) into expert-contiguous order,
and `combine` runs the same steps backwards. Expert weights become DTensors sharded on dim 0
over "ep", so checkpoints and init see the full [E, ...] tensors.
Shape legend: T tokens, K experts per token, E experts, L local experts, P ep ranks, N token copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor

from model.moe import MoE
from model.moe.dispatch import DispatchState, LocalDispatcher


@dataclass
class AllToAllState:
    local: DispatchState
    regroup_N: torch.Tensor  # received order (source rank, expert) -> expert-contiguous order
    send_splits: list[int]
    recv_splits: list[int]


class AllToAllDispatcher:
    def __init__(self, num_experts: int, ep_mesh: DeviceMesh) -> None:
        self.local = LocalDispatcher(num_experts)
        self.group = ep_mesh.get_group()
        self.ep_size = ep_mesh.size()
        self.num_local_experts = num_experts // self.ep_size

    def dispatch(
        self, x_TD: torch.Tensor, experts_TK: torch.Tensor, keep_TK: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, AllToAllState]:
        x_ND, counts_E, local_state = self.local.dispatch(x_TD, experts_TK, keep_TK)
        send_counts_PL = counts_E.view(self.ep_size, self.num_local_experts)
        recv_counts_PL = torch.empty_like(send_counts_PL)
        dist.all_to_all_single(recv_counts_PL, send_counts_PL, group=self.group)
        # One host sync: split sizes must be Python ints (both read in one copy).
        send_splits, recv_splits = torch.stack([send_counts_PL.sum(1), recv_counts_PL.sum(1)]).tolist()
        x_recv = _exchange(x_ND, send_splits, recv_splits, self.group)
        local_expert_N = torch.arange(self.num_local_experts, device=x_TD.device).repeat(self.ep_size)
        # output_size: known on the host already, so CUDA need not sync to size the result.
        local_expert_N = local_expert_N.repeat_interleave(
            recv_counts_PL.flatten(), output_size=sum(recv_splits)
        )
        regroup_N = torch.argsort(local_expert_N, stable=True)
        state = AllToAllState(local_state, regroup_N, send_splits, recv_splits)
        return x_recv[regroup_N], recv_counts_PL.sum(0), state

    def combine(self, y_ND: torch.Tensor, weights_TK: torch.Tensor, state: AllToAllState) -> torch.Tensor:
        y_recv = torch.empty_like(y_ND).index_copy(0, state.regroup_N, y_ND)  # undo the regrouping
        y_sent = _exchange(y_recv, state.recv_splits, state.send_splits, self.group)
        return self.local.combine(y_sent, weights_TK, state.local)


def _exchange(x_ND: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
    return all_to_all_single_autograd(x_ND.contiguous(), recv_splits, send_splits, group)


def apply_expert_parallel(module: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Shard every MoE layer's experts over `ep_mesh` and install the all-to-all dispatcher."""
    for moe in (m for m in module.modules() if isinstance(m, MoE)):
        experts = moe.experts
        for name, param in list(experts.named_parameters(recurse=False)):
            sharded = distribute_tensor(param.data, ep_mesh, [Shard(0)], src_data_rank=None)
            experts.register_parameter(name, nn.Parameter(sharded))
        moe.dispatcher = AllToAllDispatcher(moe.cfg.num_experts, ep_mesh)
