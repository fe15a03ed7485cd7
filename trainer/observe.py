"""Every-N-step observability that needs all ranks: the expert-load heatmap and the straggler report.

Both use collectives over the world group, so every rank calls `Observer.after_step` after every
step; which steps do work depends only on the config and the step number, so all ranks agree.
Rank 0 renders, writes and logs; the other ranks only contribute their numbers.

Expert load (`logging.heatmap_every`): each rank writes the last step's token counts of the MoE
layers it holds into a [layers + MTP depths, experts] matrix, at the rows of their global layer
index, and one all_reduce sums the matrices over all ranks. That sums over data parallelism and
collects the pipeline stages' layers in one collective; tensor-parallel ranks route the same tokens,
which multiplies a layer's counts by tp and cancels in the per-layer fractions. Rank 0 writes
`expert_load.png` (the latest, replaced atomically) and `expert_load.json` (its numbers) in the run
directory and logs the image to wandb as `moe/expert_load`.

Stragglers (`logging.straggler_every`): in lock-step training a slow rank makes the others wait in
the step's collectives, so wall-clock step times come out equal on every rank and cannot name it.
On CPU the ranks therefore compare *busy* time, the process CPU time per step (a rank blocked in a
gloo collective uses none); on CUDA the host's CPU time says nothing about the device's work, so
they compare wall time, which only catches delays outside the collectives.
"""

from __future__ import annotations

import io
import json
import os
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from model.moe import MoE
from parallel.parallelize import ParallelModel
from trainer.config import JobConfig
from trainer.heatmap import render_expert_load
from trainer.metrics import MetricsLogger

HEATMAP_FILE = "expert_load.png"


@dataclass(frozen=True)
class StragglerReport:
    slowest_rank: int
    slowest_s: float
    median_s: float
    min_s: float

    @property
    def ratio(self) -> float:
        return self.slowest_s / self.median_s if self.median_s > 0 else 1.0


def straggler_report(seconds_per_rank: list[float]) -> StragglerReport:
    """The slowest rank and how it compares with the median rank (ties: the lowest rank)."""
    slowest = max(range(len(seconds_per_rank)), key=lambda r: (seconds_per_rank[r], -r))
    return StragglerReport(
        slowest_rank=slowest,
        slowest_s=seconds_per_rank[slowest],
        median_s=statistics.median(seconds_per_rank),
        min_s=min(seconds_per_rank),
    )


def row_labels(num_layers: int, num_mtp: int) -> list[str]:
    """Global row names of the load matrix: transformer layer indices, then the MTP depths."""
    return [str(i) for i in range(num_layers)] + [f"mtp{d + 1}" for d in range(num_mtp)]


def _global_row(module_name: str, num_layers: int) -> int:
    """Module names keep their global layer index under pipeline parallelism (model/transformer.py)."""
    if m := re.search(r"(?:^|\.)mtp\.(\d+)\.", module_name):
        return num_layers + int(m.group(1))
    m = re.search(r"(?:^|\.)layers\.(\d+)\.", module_name)
    assert m, f"MoE module outside a layer or MTP depth: {module_name}"
    return int(m.group(1))


def local_load_matrix(pm: ParallelModel, num_layers: int, num_mtp: int, device: torch.device) -> torch.Tensor:
    """[layers + MTP depths, E + 1] float64: this rank's last-step counts at their global rows; the
    last column is 1 on the rows of MoE layers this rank holds (dense layers stay all zero)."""
    moes = [(name, m) for model in pm.transformers for name, m in model.named_modules() if isinstance(m, MoE)]
    num_experts = moes[0][1].cfg.num_experts if moes else 0
    out = torch.zeros(num_layers + num_mtp, num_experts + 1, dtype=torch.float64, device=device)
    for name, moe in moes:
        row = _global_row(name, num_layers)
        out[row, :-1] += moe.last_step_counts_E.double()
        out[row, -1] = 1.0
    return out


def load_fractions(total_RE1: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """From the summed matrix: (row indices of MoE layers, their load fractions [R, E], rows sum to 1)."""
    rows = torch.nonzero(total_RE1[:, -1] > 0).flatten()
    counts_RE = total_RE1[rows, :-1]
    frac_RE = counts_RE / counts_RE.sum(dim=1, keepdim=True).clamp(min=1e-12)
    return rows.cpu().numpy(), frac_RE.cpu().numpy()


def write_atomic(path: Path, data: bytes) -> None:
    """Readers (a browser tab, `watch`) never see a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class Observer:
    """Per-run state of the two reports; made on every rank just before the first step."""

    def __init__(
        self, cfg: JobConfig, pm: ParallelModel, metrics: MetricsLogger, device: torch.device
    ) -> None:
        self.cfg, self.pm, self.metrics, self.device = cfg, pm, metrics, device
        self.run_dir = Path(cfg.run.dir)
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        # Time since the last straggler report: wall clock, and this process's CPU time.
        self._window_start = (time.perf_counter(), time.process_time())
        self._window_steps = 0

    def after_step(self, step: int) -> None:
        """Call on every rank after every optimizer step."""
        lg = self.cfg.logging
        self._window_steps += 1
        if lg.heatmap_every and step % lg.heatmap_every == 0:
            self.expert_load(step)
        if lg.straggler_every and step % lg.straggler_every == 0 and self.world > 1:
            self.stragglers(step)

    def expert_load(self, step: int) -> None:
        m = self.cfg.model
        total = local_load_matrix(self.pm, m.num_layers, m.mtp_depth, self.device)
        if self.world > 1:
            dist.all_reduce(total)
        rows, frac_RE = load_fractions(total)
        if self.rank != 0 or not len(rows):
            return
        all_labels = row_labels(m.num_layers, m.mtp_depth)
        labels = [all_labels[r] for r in rows]
        image = render_expert_load(frac_RE, labels, step)
        path = self.run_dir / HEATMAP_FILE
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        write_atomic(path, buffer.getvalue())
        numbers = {"step": step, "layers": labels, "fraction": frac_RE.round(6).tolist()}
        write_atomic(path.with_suffix(".json"), json.dumps(numbers).encode())
        worst = frac_RE.max(axis=1) * frac_RE.shape[1]  # max over mean, per layer
        layer = labels[int(worst.argmax())]
        self.metrics.log_event(
            step,
            "expert_load",
            {"moe/global_load_imbalance_max": float(worst.max())},
            line=f"expert load: {path} (worst max/mean {worst.max():.2f}, layer {layer})",
        )
        self.metrics.log_image(step, "moe/expert_load", image, caption=f"expert load at step {step}")

    def stragglers(self, step: int) -> None:
        wall0, cpu0 = self._window_start
        wall, cpu = time.perf_counter(), time.process_time()
        steps = self._window_steps  # >= 1: after_step counts the step before reporting
        mine = torch.tensor([(wall - wall0) / steps, (cpu - cpu0) / steps], device=self.device)
        gathered = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(gathered, mine)
        self._window_start, self._window_steps = (time.perf_counter(), time.process_time()), 0
        if self.rank != 0:
            return
        busy = self.device.type == "cpu"
        per_rank = [float(t[1 if busy else 0]) for t in gathered]
        rep = straggler_report(per_rank)
        what = "busy (CPU time, collective waits excluded)" if busy else "wall"
        line = (
            f"straggler: rank {rep.slowest_rank} mean step {rep.slowest_s:.3f} s {what}, "
            f"{rep.ratio:.2f}x the median (min {rep.min_s:.3f} s, max {rep.slowest_s:.3f} s)"
        )
        if busy:
            line += f"; wall {float(gathered[0][0]):.3f} s/step"
        record = {
            "straggler/slowest_rank": rep.slowest_rank,
            "straggler/ratio": rep.ratio,
            "straggler/slowest_s": rep.slowest_s,
            "straggler/median_s": rep.median_s,
        }
        self.metrics.log_event(step, "straggler", record, line=line)
