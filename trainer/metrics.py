"""Metrics: one `MetricsLogger` fans each record out to its sinks, on rank 0 only.

Sinks: a rich console line per log step (+ a progress bar with ETA when `logging.progress`),
`metrics.jsonl` in the run directory (one JSON object per record, `"kind": "train" | "val"`, or
`"expert_load" | "straggler"` from `trainer/observe.py`; appended to on resume), and wandb
(`logging.wandb_mode`: offline by default, so no network is needed; `disabled` skips the import
entirely). Other ranks get a logger whose methods do nothing.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from trainer.config import LoggingConfig

if TYPE_CHECKING:
    from PIL.Image import Image


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, max resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def moe_summary(stats: dict[str, float]) -> dict[str, float]:
    """The model's per-layer `moe/...` stats plus `moe/load_imbalance_max` over all layers."""
    out = dict(stats)
    loads = [v for k, v in stats.items() if k.endswith("load_max_over_mean")]
    if loads:
        out["moe/load_imbalance_max"] = max(loads)
    return out


def comm_summary(comm: dict[str, int]) -> dict[str, float]:
    """The gradient compressor's bytes on the wire this step (this rank), the uncompressed fp32
    all-reduce's, and their ratio; empty when gradients are not synced through a compressor."""
    if not comm:
        return {}
    ratio = comm["comm_bytes"] / max(comm["comm_bytes_uncompressed"], 1)
    return {**comm, "comm_ratio": ratio}


def throughput(tokens: int, seconds: float, flops_per_token: float, peak: float | None) -> dict[str, float]:
    """tokens/s, achieved TFLOP/s and (when the device's peak is known) MFU, for one process."""
    tps = tokens / max(seconds, 1e-9)
    out = {"tokens_per_s": tps, "tflops": tps * flops_per_token / 1e12}
    if peak:
        out["mfu"] = tps * flops_per_token / peak
    return out


def _forget_after(path: Path, step: int) -> None:
    """Drop the records a run resumed from step `step` writes again: every step after it, and the
    validation at it (a run validates where it starts). Rewritten atomically."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _kept(line, step)]
    if len(kept) == len(lines):
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def _kept(line: str, resumed_at: int) -> bool:
    try:
        record = json.loads(line)
        step = int(record["step"])
    except (ValueError, KeyError, TypeError):
        return False  # a torn last line from a killed run
    return step < resumed_at or (step == resumed_at and record.get("kind") != "val")


class MetricsLogger:
    def __init__(
        self,
        cfg: LoggingConfig,
        run_dir: Path,
        *,
        total_steps: int,
        start_step: int,
        run_name: str,
        config: dict[str, Any],
        rank: int = 0,
    ) -> None:
        self.enabled = rank == 0
        self.metrics_path: Path | None = None
        self.wandb_path: Path | None = None
        self._file = self._wandb = self._progress = None
        if not self.enabled:
            return
        self.console = Console(highlight=False)
        run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.jsonl:
            self.metrics_path = run_dir / "metrics.jsonl"
            _forget_after(self.metrics_path, start_step)
            self._file = self.metrics_path.open("a", buffering=1)  # line-buffered: readable mid-run
        if cfg.wandb_mode != "disabled":
            import wandb

            self._wandb = wandb.init(
                mode=cfg.wandb_mode,
                dir=str(run_dir),
                project=cfg.wandb_project,
                name=run_name,
                config=config,
                settings=wandb.Settings(silent=True, console="off"),
            )
            self.wandb_path = Path(self._wandb.settings.sync_dir)
        if cfg.progress:
            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step)
            self._progress.start()

    def advance(self, step: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def log(self, step: int, metrics: dict[str, float], total_steps: int) -> None:
        """One training record: console line, jsonl, wandb."""
        if not self.enabled:
            return
        self.print(_console_line(step, total_steps, metrics))
        self._write({"kind": "train", "step": step, **metrics}, step)

    def log_validation(self, step: int, val_loss: float) -> None:
        if not self.enabled:
            return
        self.print(f"[cyan]val  step {step}: loss {val_loss:.4f}")
        self._write({"kind": "val", "step": step, "val/loss": val_loss}, step)

    def log_event(self, step: int, kind: str, metrics: dict[str, float], line: str | None = None) -> None:
        """A record that is not a training step (e.g. `"straggler"`): console line, jsonl, wandb."""
        if not self.enabled:
            return
        if line:
            self.print(line)
        self._write({"kind": kind, "step": step, **metrics}, step)

    def log_image(self, step: int, key: str, image: Image, caption: str) -> None:
        """An image, to wandb only (the jsonl holds numbers)."""
        if self._wandb is not None:
            import wandb

            self._wandb.log({key: wandb.Image(image, caption=caption)}, step=step)

    def print(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, soft_wrap=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def _write(self, record: dict[str, Any], step: int) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k not in ("kind", "step")}, step=step)


def _console_line(step: int, total: int, m: dict[str, float]) -> str:
    parts = [
        f"step {step}/{total}",
        f"loss {m['loss']:.4f}",
        f"ce {m['ce_loss']:.4f}",
        f"aux {m['aux_loss']:.4f}",
    ]
    if m.get("mtp_loss"):
        parts.append(f"mtp {m['mtp_loss']:.4f}")
    parts += [f"lr {m['lr']:.2e}", f"gnorm {m['grad_norm']:.3f}", f"{m['tokens_per_s'] / 1e3:.1f}k tok/s"]
    parts.append(f"{m['tflops']:.2f} TFLOP/s")
    parts.append(f"MFU {100 * m['mfu']:.1f}%" if "mfu" in m else "MFU n/a")  # n/a: device peak unknown
    if "moe/load_imbalance_max" in m:
        parts.append(f"imbalance {m['moe/load_imbalance_max']:.2f}")
    if "comm_bytes" in m:
        parts.append(f"comm {m['comm_bytes'] / 2**20:.2f} MiB ({100 * m['comm_ratio']:.1f}%)")
    parts.append(f"mem {m['peak_mem_gib']:.2f} GiB")
    return " | ".join(parts)
