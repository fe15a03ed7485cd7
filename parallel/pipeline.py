"""Pipeline parallelism: split the model into stages and run them with `torch.distributed.pipelining`.

How the model is split. The model is built once on the meta device; `split_model` deep-copies it
for each stage this rank runs and prunes the copy: transformer blocks outside the stage are deleted
from `model.layers` (a ModuleDict keyed by *global* layer index, so the kept parameters keep their
names, their layout-independent initial values and their checkpoint keys), the embedding is kept
only on the first stage, the final norm and the output projection only on the last. Without labels
`Transformer.forward` is a stage: it embeds if it has an embedding, runs the blocks it has, applies
the final norm if it has one, and returns the hidden state [B, S, D]. The output projection and the
loss run in the schedule's loss function (`TokenNormalizedLoss`), on the last stage's own `output`
module, so its weight gets gradients and the tensor sent between ranks is never [B, S, V].

Layers per stage: even by default; when `num_layers % num_stages = r != 0` the r extra layers go
to the middle stages first, then the last, and the first stage last of all: under 1F1B the first
stage holds the most micro-batches' activations in flight, and the last stage also runs the
output projection and the loss. An explicit `pp_layers_per_stage` overrides this.

Stage placement: "loop" order (stage s on rank s % pp) for gpipe, 1f1b, interleaved_1f1b,
looped_bfs and interleaved_zero_bubble; "V" order (rank r holds stages r and 2 * pp - 1 - r) for
zbv and dualpipev, which need exactly 2 stages per rank. All of these give the single-process
gradients on gloo (tests/distributed/test_pipeline.py).

Why `scale_grads=False`: torch's schedules by default divide every gradient by the number of
micro-batches, which is right for a loss averaged per micro-batch. Our loss is a sum over tokens
divided by the step's *global* label-token count (`TokenNormalizedLoss.denominator`, set by the
trainer before each step), so the micro-batch losses already add up to the step's mean and the
gradients must not be scaled again. MoE aux losses need nothing from the schedule: `MoE` injects
their gradient in its own backward (scaled by `aux_loss_scale`, which the trainer sets to
1 / micro-batches on every stage model), so stages that never see the loss still train routers.

Not supported here (rejected by the trainer's layout validation before anything is built):
multi-token prediction (`mtp_depth > 0`) and tied embeddings with pp > 1, since both need the
embedding on the last stage.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleLoopedBFS,
    ScheduleZBVZeroBubble,
)
from torch.distributed.pipelining.schedules import PipelineScheduleMulti, PipelineScheduleSingle

from model.transformer import Transformer, cross_entropy_sum
from parallel.config import ParallelConfig

# Config name -> (schedule class, stage placement style).
SCHEDULES: dict[str, tuple[type, str]] = {
    "gpipe": (ScheduleGPipe, "loop"),
    "1f1b": (Schedule1F1B, "loop"),
    "interleaved_1f1b": (ScheduleInterleaved1F1B, "loop"),
    "looped_bfs": (ScheduleLoopedBFS, "loop"),
    "interleaved_zero_bubble": (ScheduleInterleavedZeroBubble, "loop"),
    "zbv": (ScheduleZBVZeroBubble, "v"),
    "dualpipev": (ScheduleDualPipeV, "v"),
}
SINGLE_STAGE_SCHEDULES = {"gpipe", "1f1b"}


def stage_layers(
    num_layers: int, num_stages: int, layers_per_stage: list[int] | None = None
) -> list[list[int]]:
    """Global layer indices of each stage: the explicit `layers_per_stage` (one count >= 1 per
    stage, summing to `num_layers`) or the default even split (module docstring)."""
    if layers_per_stage:
        if len(layers_per_stage) != num_stages:
            raise ValueError(
                f"parallel.pp_layers_per_stage has {len(layers_per_stage)} entries, need pp * "
                f"pp_stages_per_rank = {num_stages}"
            )
        if any(n < 1 for n in layers_per_stage) or sum(layers_per_stage) != num_layers:
            raise ValueError(
                f"parallel.pp_layers_per_stage={list(layers_per_stage)} must be positive and sum to "
                f"model.num_layers={num_layers}"
            )
        counts = list(layers_per_stage)
    else:
        if num_layers < num_stages:
            raise ValueError(f"model.num_layers={num_layers} < {num_stages} pipeline stages")
        base, extra = divmod(num_layers, num_stages)
        counts = [base] * num_stages
        # Middle stages first, then the last, then the first.
        order = list(range(1, num_stages - 1)) + [num_stages - 1, 0][: min(2, num_stages)]
        for s in order[:extra]:
            counts[s] += 1
    starts = [sum(counts[:s]) for s in range(num_stages)]
    return [list(range(start, start + n)) for start, n in zip(starts, counts)]


def stage_ids_for_rank(pp_rank: int, pp_size: int, stages_per_rank: int, schedule: str) -> list[int]:
    """Stage indices run by `pp_rank`, in increasing order."""
    if schedule not in SCHEDULES:
        raise ValueError(f"parallel.pp_schedule={schedule!r}: expected one of {sorted(SCHEDULES)}")
    if SCHEDULES[schedule][1] == "v":
        if stages_per_rank != 2:
            raise ValueError(f"parallel.pp_schedule={schedule} needs parallel.pp_stages_per_rank=2")
        return [pp_rank, 2 * pp_size - 1 - pp_rank]
    if schedule in SINGLE_STAGE_SCHEDULES and stages_per_rank != 1:
        raise ValueError(f"parallel.pp_schedule={schedule} needs parallel.pp_stages_per_rank=1")
    return [pp_rank + v * pp_size for v in range(stages_per_rank)]


def split_model(
    model: Transformer, pp_rank: int, pp_size: int, pcfg: ParallelConfig
) -> list[tuple[int, Transformer]]:
    """(stage index, pruned copy of `model`) for each stage on this rank. `model` is normally on
    the meta device; materialise each copy afterwards (`to_empty` + `init_weights`)."""
    cfg = model.cfg
    num_stages = pp_size * pcfg.pp_stages_per_rank
    if num_stages > 1:
        assert cfg.mtp_depth == 0 and not cfg.tie_embeddings, "rejected with pp > 1 by layout validation"
    layers = stage_layers(cfg.num_layers, num_stages, pcfg.pp_layers_per_stage)
    stages = []
    for stage_id in stage_ids_for_rank(pp_rank, pp_size, pcfg.pp_stages_per_rank, pcfg.pp_schedule):
        stage = copy.deepcopy(model)
        keep = {str(i) for i in layers[stage_id]}
        for key in [k for k in stage.layers if k not in keep]:
            del stage.layers[key]
        if stage_id != 0:
            stage.tok_embeddings = None
        if stage_id != num_stages - 1:
            stage.norm = None
            stage.output = None
        stages.append((stage_id, stage))
    return stages


class TokenNormalizedLoss:
    """The last stage's loss: summed cross-entropy of the micro-batch over the step's global label
    count, so the micro-batch losses add up to the step's mean loss (hence `scale_grads=False`).

    `output_owner` is the last stage's module (None on ranks without it: the schedule still needs a
    loss function to run backward, but only calls it on the last stage). The trainer sets
    `denominator` (label tokens of the whole step, summed over data-parallel ranks) before each
    step. With FSDP2, `output` must be its own `fully_shard` unit, since it runs after the stage's
    forward (torchtitan groups [norm, output]); with tensor parallelism the loss runs under the
    lead's `loss_parallel` context when the logits are vocab-sharded.
    """

    def __init__(self, output_owner: Transformer | None) -> None:
        self.output_owner = output_owner
        self.denominator: float | torch.Tensor = 1.0

    def __call__(self, h_BSD: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
        assert self.output_owner is not None, "loss called on a rank without the last stage"
        return cross_entropy_sum(self.output_owner.logits(h_BSD), labels_BS) / self.denominator


class _Stage(PipelineStage):
    """`PipelineStage` with two fixes for how torch 2.13's schedules drive it.

    1. Shape inference leaves the module's buffers alone. On its first step (and on each
       train <-> eval switch) the stage runs one forward of its module to learn the shapes it
       sends, on the first micro-batch or on uninitialised tensors. That forward would add to the
       MoE layers' per-step buffers (expert counts, aux loss), which feed the load metrics and the
       expert-bias update, and break equality with the single-process run; so every buffer it
       changed is restored (a few small tensors, once per switch).
    2. Forward-only `schedule.eval()` skips the backward actions: the schedules still walk them,
       and V-shaped ones (zbv, dualpipev) hand gradients between a rank's two stages, which
       asserts without a backward; and every schedule ends with REDUCE_GRAD, which under FSDP
       would run the post-backward gradient reduction after a forward-only pass.
    """

    def _prepare_forward_infra(self, *args, **kwargs):
        saved = [(buf, buf.clone()) for buf in self.submod.buffers()]
        try:
            return super()._prepare_forward_infra(*args, **kwargs)
        finally:
            with torch.no_grad():
                for buf, value in saved:
                    # Only the changed ones: an in-place write to a buffer the inference graph
                    # saved (the RoPE tables) would fail the backward half of shape inference.
                    if not torch.equal(buf, value):
                        buf.copy_(value)

    def get_local_bwd_output(self, mb_index: int):
        return super().get_local_bwd_output(mb_index) if self.has_backward else None

    def set_local_bwd_input(self, next_stage_bwd_outputs, mb_index: int) -> None:
        if self.has_backward:
            super().set_local_bwd_input(next_stage_bwd_outputs, mb_index)

    def perform_reduce_grad(self, grad_scale_factor: int) -> None:
        if self.has_backward:
            super().perform_reduce_grad(grad_scale_factor)


def build_schedule(
    stages: list[tuple[int, nn.Module]],
    num_stages: int,
    pp_mesh_or_group: DeviceMesh | dist.ProcessGroup,
    pcfg: ParallelConfig,
    n_microbatches: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device: torch.device | str,
) -> PipelineScheduleSingle | PipelineScheduleMulti:
    """Wrap this rank's stage modules in `PipelineStage`s and build `pcfg.pp_schedule` over them."""
    group = pp_mesh_or_group.get_group() if isinstance(pp_mesh_or_group, DeviceMesh) else pp_mesh_or_group
    device = torch.device(device)
    pipeline_stages = [_Stage(module, sid, num_stages, device, group=group) for sid, module in stages]
    schedule_cls, _ = SCHEDULES[pcfg.pp_schedule]
    if pcfg.pp_schedule in SINGLE_STAGE_SCHEDULES:
        assert len(pipeline_stages) == 1
        return schedule_cls(pipeline_stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=False)
    return schedule_cls(pipeline_stages, n_microbatches, loss_fn=loss_fn, scale_grads=False)


def run_step(
    schedule: PipelineScheduleSingle | PipelineScheduleMulti,
    tokens_BS: torch.Tensor,
    labels_BS: torch.Tensor,
    is_first: bool,
    is_last: bool,
) -> list[torch.Tensor]:
    """One forward + backward over the step's micro-batches (tokens and labels [K * B, S], split
    along the batch dim). `is_first` / `is_last`: this rank runs the first / last stage (both for
    V-shaped layouts). Returns the K micro-batch losses on the last stage's rank, [] elsewhere;
    the gradients are left in the stage modules' `.grad`."""
    return _run(schedule.step, tokens_BS, labels_BS, is_first, is_last)


@torch.no_grad()
def run_eval(
    schedule: PipelineScheduleSingle | PipelineScheduleMulti,
    tokens_BS: torch.Tensor,
    labels_BS: torch.Tensor,
    is_first: bool,
    is_last: bool,
) -> list[torch.Tensor]:
    """Forward only (`schedule.eval`) over K micro-batches, same arguments as `run_step`; returns the
    K micro-batch losses on the last stage's rank (with the same `denominator` as training, so set
    it for the evaluation batch first), [] elsewhere. Put the stage modules in eval mode first.

    The micro-batch count is the schedule's K. The stages size their receive buffers on the first
    micro-batch after each train <-> eval switch, so all evaluation batches must share one shape;
    each switch re-runs that shape inference (one extra forward per stage).
    """
    return _run(schedule.eval, tokens_BS, labels_BS, is_first, is_last)


def _run(method, tokens_BS: torch.Tensor, labels_BS: torch.Tensor, is_first: bool, is_last: bool):
    """Call `schedule.step` or `schedule.eval` with what this rank's stages take: the inputs on the
    first stage, the targets (and a list collecting the losses) on the last."""
    losses: list[torch.Tensor] = []
    args = (tokens_BS,) if is_first else ()
    method(
        *args, target=labels_BS if is_last else None, losses=losses if is_last else None, return_outputs=False
    )
    return [loss.detach() for loss in losses]
