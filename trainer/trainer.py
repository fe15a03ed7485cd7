"""The training loop. `Trainer(cfg).train()` builds everything from the config, resumes from the
newest checkpoint if there is one, trains, validates, checkpoints, and returns a `RunSummary`.

`train()` only sequences the phases; each phase is a method or a function in `trainer/setup.py`,
`trainer/step.py`, `trainer/optim.py`, `trainer/checkpoint/`, `trainer/metrics.py`.
Data-parallel rank/size are passed in (no global state), so the distributed setup can wrap it.
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from model.params import count_params
from parallel.dims import Meshes, ParallelDims
from parallel.parallelize import parallelize
from trainer import checkpoint
from trainer.checkpoint import (
    CheckpointWriter,
    CompressorState,
    RNGState,
    Stateful,
    TrainProgress,
    model_optimizer_part,
)
from trainer.config import JobConfig
from trainer.fault import (
    FaultError,
    Preemption,
    Watchdog,
    all_finite,
    install_save_hook,
    maybe_inject,
    poison_,
)
from trainer.flops import flops_per_token, peak_flops
from trainer.layout import num_microbatches
from trainer.metrics import MetricsLogger, comm_summary, moe_summary, peak_memory_gib, throughput
from trainer.observe import Observer
from trainer.optim import apply_config, build_optimizer, build_scheduler
from trainer.setup import autocast_for, build_data, resolve_device
from trainer.step import StepLosses, evaluate, forward_backward


@dataclass
class StepResult:
    losses: StepLosses
    lr: float
    grad_norm: torch.Tensor
    seconds: float
    skipped: bool = False  # non-finite loss or gradient norm: no update
    comm: dict[str, int] = dataclasses.field(default_factory=dict)  # compressor's bytes on the wire


@dataclass
class RunSummary:
    start_step: int = 0
    final_step: int = 0
    final_train_loss: float | None = None
    first_val_loss: float | None = None
    final_val_loss: float | None = None
    tokens_per_s: float = 0.0
    wall_s: float = 0.0
    checkpoint: Path | None = None
    resumed_from: Path | None = None
    preempted: bool = False  # stopped early by SIGTERM, after checkpointing
    metrics_path: Path | None = None
    wandb_path: Path | None = None

    def lines(self) -> list[str]:
        def fmt(x: float | None) -> str:
            return "n/a" if x is None else f"{x:.4f}"

        return [
            "moeforge run summary",
            f"  steps            {self.start_step} -> {self.final_step}"
            + (f" (resumed from {self.resumed_from})" if self.resumed_from else "")
            + (" (preempted by SIGTERM: rerun to continue)" if self.preempted else ""),
            f"  train loss       {fmt(self.final_train_loss)} (final)",
            f"  val loss         {fmt(self.first_val_loss)} (first) -> {fmt(self.final_val_loss)} (final)",
            f"  throughput       {self.tokens_per_s:,.0f} tokens/s",
            f"  wall time        {self.wall_s:.1f} s",
            f"  checkpoint       {self.checkpoint}",
            f"  metrics          {self.metrics_path or 'off'}",
            f"  wandb            {self.wandb_path or 'off'}",
        ]


class Trainer:
    def __init__(
        self, cfg: JobConfig, dims: ParallelDims | None = None, meshes: Meshes | None = None
    ) -> None:
        """`dims`/`meshes` describe the parallel layout (default: one process, no process group)."""
        self.cfg, self.dims, self.meshes = cfg, dims or ParallelDims(), meshes
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        dp_rank, dp_size = (meshes.dp_rank if meshes else 0), self.dims.dp
        self.device = resolve_device(cfg.train.device)
        self.autocast = autocast_for(self.device)
        seed = cfg.train.seed
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        self.train_loader, self.val_batches = build_data(cfg, seed=seed, dp_rank=dp_rank, dp_size=dp_size)
        self.num_microbatches = num_microbatches(cfg, dp_size)
        # An HF import sets every parameter (the plan checks it), so none is initialised first.
        from_hf = bool(cfg.checkpoint.init_from)
        self.pm = parallelize(
            cfg.model, cfg.parallel, self.dims, meshes, self.device, seed, self.num_microbatches,
            init_params=not from_hf,
        )  # fmt: skip
        if from_hf:  # before the optimizer: DeepSpeed keeps its own copy of the weights
            from trainer.checkpoint.hf.job import load_hf

            load_hf(self.pm.transformers, cfg.model, cfg.checkpoint.init_from)
        self.optimizer = self.pm.wrap_optimizer(
            build_optimizer(
                nn.ModuleList(self.pm.parts),
                cfg.optim,
                self.device.type,
                second_moments=self.pm.second_moment_source(),
            )
        )
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.steps)
        self.progress = TrainProgress()
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)
        self.peak_flops = peak_flops(self.device)
        self.ckpt_dir = Path(cfg.checkpoint.dir)
        self.ckpt_writer = CheckpointWriter(
            self.ckpt_dir, cfg.checkpoint.keep_last, cfg.checkpoint.async_save
        )
        self._saved_step = -1
        install_save_hook()  # MOEFORGE_FAULT=kill@save=N (tests)
        self.watchdog = Watchdog(cfg.fault.collective_timeout_s, self.rank)
        self.preemption = Preemption()
        self._consecutive_skips = 0

    def state(self) -> dict[str, Stateful]:
        """Everything a bitwise resume needs, as named `state_dict()`-able parts."""
        state: dict[str, Stateful] = {
            "model_optimizer": model_optimizer_part(self.pm, self.optimizer),
            "scheduler": self.scheduler,
            "data": self.train_loader,
            "rng": RNGState(),
            "progress": self.progress,
        }
        if self.pm.compressor is not None:
            d = self.dims
            state["compressor"] = CompressorState(self.pm.compressor, (d.dp, d.tp, d.pp, d.ep))
        return state

    def train(self) -> RunSummary:
        with self.watchdog:  # each phase names itself to it: a hang becomes an error (fault.py)
            return self._train()

    def _train(self) -> RunSummary:
        cfg, steps = self.cfg, self.cfg.train.steps
        self.watchdog.pet("resume")
        summary = RunSummary(resumed_from=self.resume())
        self.check_free_space()  # before training, not at the first save after it
        summary.start_step = self.progress.step
        metrics = self.open_metrics()
        summary.metrics_path, summary.wandb_path = metrics.metrics_path, metrics.wandb_path
        wall_start, train_seconds, train_tokens = time.perf_counter(), 0.0, 0
        interval_seconds, interval_tokens = 0.0, 0
        try:
            if summary.resumed_from:
                metrics.print(f"resumed from {summary.resumed_from} (step {self.progress.step})")
            self.watchdog.pet("validation")
            summary.first_val_loss = self.validate(metrics)
            observer = Observer(cfg, self.pm, metrics, self.device)  # heatmap, stragglers
            while self.progress.step < steps:
                result = self.train_step()
                step = self.progress.step
                tokens = result.losses.num_input_tokens
                train_seconds, train_tokens = train_seconds + result.seconds, train_tokens + tokens
                interval_seconds += result.seconds
                interval_tokens += tokens
                metrics.advance(step)
                if result.skipped and self.after_skipped_step(metrics):
                    continue  # rolled back to the last checkpoint
                if step % cfg.train.log_every == 0 or step == steps or step == summary.start_step + 1:
                    record = self.step_metrics(result, interval_tokens, interval_seconds)
                    metrics.log(step, record, steps)
                    summary.final_train_loss = record["loss"]
                    interval_seconds, interval_tokens = 0.0, 0
                observer.after_step(step)  # every rank: it has collectives
                if cfg.train.val_every and step % cfg.train.val_every == 0 and step < steps:
                    self.watchdog.pet("validation")
                    self.validate(metrics)
                # Not while skipping: a rollback must land before the non-finite streak.
                if cfg.checkpoint.save_every and step % cfg.checkpoint.save_every == 0 and step < steps:
                    if not self._consecutive_skips:
                        self.watchdog.pet(f"step {step}: checkpoint save")
                        self.save()
                if step < steps and self.preemption.requested():
                    summary.preempted = True
                    metrics.print(f"SIGTERM: checkpointing step {step} and stopping (preempted)")
                    break
            if not summary.preempted:
                self.watchdog.pet("validation")
                summary.final_val_loss = self.validate(metrics)
            self.watchdog.pet(f"step {self.progress.step}: checkpoint save")
            summary.checkpoint = self.save()
            self.ckpt_writer.wait()  # an async save must be complete before the run ends
            if cfg.checkpoint.export_hf:
                self.watchdog.pet("export to Hugging Face format")
                metrics.print(f"exported {self.export_hf(summary.checkpoint)} (Hugging Face format)")
        finally:
            metrics.close()
        summary.final_step = self.progress.step
        summary.tokens_per_s = train_tokens / train_seconds if train_seconds else 0.0
        summary.wall_s = time.perf_counter() - wall_start
        if self.rank == 0:
            metrics.console.print("\n".join(summary.lines()), markup=False)
        return summary

    def train_step(self) -> StepResult:
        """One optimizer step: accumulate gradients over the micro-batches, clip, step, then let the
        MoE layers update their expert bias from the step's counts. If the loss or gradient norm is
        non-finite on any rank, the update is skipped on every rank; the step and the data cursor
        still advance (`trainer/fault.py`)."""
        start = time.perf_counter()
        step = self.progress.step + 1
        self.watchdog.pet(f"step {step}: forward/backward")
        batches = [next(self.train_loader) for _ in range(self.num_microbatches)]
        losses = forward_backward(
            self.pm,
            batches,
            mtp_coef=self.cfg.model.mtp_loss_coef,
            device=self.device,
            autocast=self.autocast,
        )
        if maybe_inject("step", step):  # tests only: MOEFORGE_FAULT=nan@step=N (kill/hang act inside)
            losses.ce = poison_(losses.ce, self.pm.parameters())
        self.watchdog.pet(f"step {step}: grad norm/optimizer")
        grad_norm = self.pm.clip_grads_(self.cfg.optim.grad_clip)
        lr = self.scheduler.get_last_lr()[0]  # the lr this step uses
        skipped = not all_finite(losses.total, grad_norm)  # the same decision on every rank
        if not skipped:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        comm = self.pm.compressor.step() if self.pm.compressor is not None else {}
        # Every rank, skipped or not (it has collectives); the expert-bias update it makes is
        # driven by token counts, which stay finite.
        self.pm.end_of_step()
        self.progress.step += 1
        self.progress.skipped_steps += skipped
        self._consecutive_skips = self._consecutive_skips + 1 if skipped else 0
        self.progress.tokens += losses.num_input_tokens * self.dims.dp
        if self.device.type == "cuda":
            # Time the GPU work, not the kernel launches. Cheap: the MoE layers already read their
            # aux loss on the host once per micro-batch, so the queue is short here.
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        return StepResult(losses, lr, grad_norm, seconds, skipped, comm)

    def after_skipped_step(self, metrics: MetricsLogger) -> bool:
        """Report a skipped step; after `fault.max_consecutive_skips` in a row, roll back. Returns
        True when it rolled back."""
        p, limit = self.progress, self.cfg.fault.max_consecutive_skips
        metrics.print(
            f"[yellow]step {p.step}: non-finite loss or gradient norm, update skipped "
            f"({self._consecutive_skips} in a row, {p.skipped_steps} in all)"
        )
        if not limit or self._consecutive_skips < limit:
            return False
        self.watchdog.pet(f"step {p.step}: rollback")
        path = self.rollback()
        metrics.print(f"[yellow]rolled back to {path} (step {p.step}), rollback {p.rollbacks}")
        return True

    def rollback(self) -> Path:
        """Reload the newest checkpoint (model, optimizer, schedule, RNG) through `resume()`, but keep
        the data cursor, so the batches that went bad are not replayed, and the fault counters."""
        p, limit = self.progress, self.cfg.fault.max_rollbacks
        what = f"{self._consecutive_skips} non-finite steps in a row at step {p.step}"
        if p.rollbacks >= limit:
            raise FaultError(
                f"{what} after {p.rollbacks} rollbacks (fault.max_rollbacks={limit}); stopping "
                "(lower optim.lr, check the data, or raise fault.max_rollbacks)"
            )
        cursor, skipped, rollbacks = self.train_loader.state_dict(), p.skipped_steps, p.rollbacks
        self.ckpt_writer.wait()  # an async save in flight may be the one to go back to
        path = self.resume()
        if path is None:
            raise FaultError(
                f"{what} and no checkpoint in {self.ckpt_dir} to roll back to; stopping "
                "(set checkpoint.save_every, and checkpoint.resume=true)"
            )
        self.train_loader.load_state_dict(cursor)
        p.skipped_steps, p.rollbacks = skipped, rollbacks + 1
        self._consecutive_skips = 0
        return path

    def step_metrics(self, result: StepResult, tokens: int, seconds: float) -> dict[str, float]:
        """The log record of a step; throughput is over the interval since the previous record."""
        losses = result.losses
        return {
            "loss": float(losses.total),
            "ce_loss": float(losses.ce),
            "aux_loss": float(losses.aux),
            "mtp_loss": float(losses.mtp),
            "lr": result.lr,
            "grad_norm": float(result.grad_norm),
            "tokens": self.progress.tokens,
            "skipped_steps": self.progress.skipped_steps,
            "rollbacks": self.progress.rollbacks,
            **throughput(tokens, seconds, self.flops_per_token, self.peak_flops),
            **moe_summary(self.pm.moe_stats()),
            **comm_summary(result.comm),
            "peak_mem_gib": peak_memory_gib(self.device),
        }

    def validate(self, metrics: MetricsLogger) -> float | None:
        if not self.val_batches:
            return None
        loss = evaluate(self.pm, self.val_batches, device=self.device, autocast=self.autocast)
        metrics.log_validation(self.progress.step, loss)
        return loss

    def resume(self) -> Path | None:
        """Load the newest valid checkpoint in `checkpoint.dir` when `checkpoint.resume`; newer ones
        that are incomplete or corrupt are reported and skipped."""
        found = None
        if self.cfg.checkpoint.resume:  # one that fails to load is reported and the previous one tried
            found = checkpoint.restore_latest(
                self.state(), self.ckpt_dir, self._report, checksums=self.cfg.checkpoint.verify == "full"
            )
        if found is None:
            return None
        step, path = found
        apply_config(self.optimizer, self.scheduler, self.cfg.optim)
        self._saved_step = step
        return path

    def save(self) -> Path:
        """Checkpoint the current step (once); with `checkpoint.async_save` it completes in the
        background and `ckpt_writer.wait()` (at the next save, or the end) joins it."""
        path = self.ckpt_dir / f"step-{self.progress.step}"
        if self._saved_step != self.progress.step:
            d = self.dims
            extra = {
                "tokens": self.progress.tokens,
                "layout": {"dp": d.dp, "tp": d.tp, "pp": d.pp, "ep": d.ep},
                "config": dataclasses.asdict(self.cfg),
            }
            self.check_free_space()
            path = self.ckpt_writer.save(self.progress.step, self.state(), extra)
            self._saved_step = self.progress.step
        return path

    def check_free_space(self) -> None:
        """Refuse (every rank, one line) a save that the checkpoint directory cannot hold."""
        checkpoint.check_free_space(self.ckpt_dir, checkpoint.state_bytes(self.state()))

    def export_hf(self, step_dir: Path) -> Path:
        """Rank 0 writes the HF copy from the checkpoint just saved (it reads every rank's shards,
        so the export is the same at any layout); the others wait for it."""
        from trainer.checkpoint.hf.job import export_run

        out = Path(self.cfg.checkpoint.export_hf)
        if self.rank == 0:
            from data.prepare import default_corpus_dir

            sources = [Path(s.path) for s in self.cfg.data.sources] or [default_corpus_dir(self.cfg.data)]
            tokenizer = next((p for p in sources if (p / "tokenizer.json").is_file()), None)
            out = export_run(self.cfg.checkpoint, self.cfg.model, step_dir, tokenizer)
        if dist.is_initialized():
            dist.barrier()
        return out

    def _report(self, message: str) -> None:
        if self.rank == 0:
            print(f"moeforge: {message}", flush=True)

    def open_metrics(self) -> MetricsLogger:
        logger = MetricsLogger(
            self.cfg.logging,
            Path(self.cfg.run.dir),
            total_steps=self.cfg.train.steps,
            start_step=self.progress.step,
            run_name=self.cfg.run.name,
            config=dataclasses.asdict(self.cfg),
            rank=self.rank,
        )
        total, active = count_params(self.cfg.model, include_mtp=True)
        d = self.dims
        logger.print(
            f"moeforge: {self.cfg.run.name} | {total / 1e6:.2f}M params ({active / 1e6:.2f}M active) | "
            f"device {self.device} | layout dp={d.dp} ep={d.ep} tp={d.tp} pp={d.pp} | "
            f"{self.num_microbatches} micro-batches/step/rank | run dir {self.cfg.run.dir}"
        )
        return logger
