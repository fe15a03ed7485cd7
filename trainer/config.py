"""The job config: one dataclass per component, composed into `JobConfig` and registered in
Hydra's ConfigStore, so YAML recipes and CLI overrides are type-checked and unknown keys fail.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from data.config import DataConfig, DataSourceConfig
from model.config import MLAConfig, ModelConfig, MoEConfig
from parallel.config import ParallelConfig


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 = no clipping
    schedule: str = "cosine"  # cosine | wsd | constant (each after linear warmup)
    warmup_steps: int = 20
    decay_fraction: float = 0.2  # wsd: share of the steps spent in the final decay


@dataclass
class TrainConfig:
    steps: int = 300
    global_batch_size: int = 16  # sequences per optimizer step, over all data-parallel ranks
    seed: int = 1234
    device: str = "auto"  # auto | cpu | cuda
    log_every: int = 10
    val_every: int = 100  # 0 = only at the start and the end


@dataclass
class CheckpointConfig:
    dir: str = "${run.dir}/checkpoints"
    save_every: int = 0  # 0 = only at the end of training
    resume: bool = True  # continue from the newest valid checkpoint in `dir` if there is one
    keep_last: int = 2
    async_save: bool = False  # write on a background thread while training continues
    verify: str = "full"  # before resuming: full (sizes + sha256 of every file) | size
    # Start from a Hugging Face checkpoint: "hf:DIR" (model weights only; a checkpoint in `dir` to
    # resume from takes precedence). A dense DIR with a MoE model config is upcycled.
    init_from: str = ""
    export_hf: str = ""  # at the end of training, also write the model as an HF directory here
    export_hf_family: str = ""  # its model_type; "" = the family of init_from
    export_hf_layout: str = ""  # per_expert | fused; "" = the family's Hub layout
    export_hf_dtype: str = "float32"  # float32 | bfloat16 | float16


@dataclass
class FaultConfig:
    """Fault tolerance in the train loop (`trainer/fault.py`)."""

    max_consecutive_skips: int = 3  # non-finite steps in a row before a rollback; 0 = never roll back
    max_rollbacks: int = 2  # rollbacks to the last checkpoint before the run stops with an error
    collective_timeout_s: float = 600.0  # a phase (step, save, validation) blocked longer aborts the job


@dataclass
class LoggingConfig:
    progress: bool = True  # rich progress bar on rank 0
    jsonl: bool = True  # metrics.jsonl in the run directory
    wandb_mode: str = "offline"  # offline | online | disabled
    wandb_project: str = "moeforge"
    # Expert-load heatmap (layer x expert) every N steps: expert_load.png in the run dir + a wandb
    # image (trainer/observe.py); 0 = off.
    heatmap_every: int = 50
    straggler_every: int = 50  # slowest rank's step-time ratio to the median, every N steps; 0 = off


@dataclass
class RunConfig:
    name: str = "tiny_cpu"
    dir: str = "runs/${run.name}"


@dataclass
class ClusterConfig:
    """Where a job runs; read only by `launch/` (torchrun lines, sbatch, the submitit launcher, the
    dry-run planner `python -m launch.plan`). The trainer itself takes its world size from torchrun."""

    nodes: int = 1
    gpus_per_node: int = 8  # ranks per node (torchrun --nproc-per-node)
    gpu_memory_gb: float = 80.0  # the planner refuses layouts whose estimate exceeds this
    cpus_per_gpu: int | None = None  # SLURM CPU cores per rank; None = the cluster's default
    time: str = "24:00:00"  # SLURM wall-clock limit: minutes, HH:MM:SS or D-HH:MM:SS
    partition: str | None = None  # SLURM partition; None = the cluster's default
    account: str | None = None  # SLURM account; None = none
    rdzv_port: int = 29500  # c10d rendezvous port on the head node
    max_restarts: int = 0  # torchrun --max-restarts: failed ranks restart from the last checkpoint
    suggest: bool = False  # planner: search (pp, dp, tp, ep) for a layout that fits


@dataclass
class JobConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


def register_configs() -> None:
    """Register the schema; YAML files in `recipes/` are merged on top of it."""
    cs = ConfigStore.instance()
    cs.store(name="job_schema", node=JobConfig)
    if not OmegaConf.has_resolver("moeforge_run_dir"):
        OmegaConf.register_new_resolver("moeforge_run_dir", run_dir)
    if not OmegaConf.has_resolver("moeforge_minutes"):
        OmegaConf.register_new_resolver("moeforge_minutes", slurm_minutes)


def run_dir(name: str) -> str:
    """`run.dir` in recipes/config.yaml: `runs/<name>`, except in a Hydra multirun, where each job
    gets its own directory (hydra.sweep.dir/subdir = `runs/multirun/<name>/<job num>`) so that
    sweep jobs do not share checkpoints and metrics."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN and hydra_cfg.runtime.output_dir:
            return str(hydra_cfg.runtime.output_dir)
    return f"runs/{name}"


def slurm_minutes(time: str | int) -> int:
    """A SLURM time limit (`90`, `HH:MM:SS`, `D-HH:MM:SS`, `MM:SS`) in whole minutes, rounded up."""
    text = str(time)
    days, _, clock = text.rpartition("-")
    parts = [int(x) for x in clock.split(":")]
    if len(parts) == 1:
        hours, minutes, seconds = 0, parts[0], 0
    elif len(parts) == 2:
        hours, minutes, seconds = (parts[0], parts[1], 0) if days else (0, parts[0], parts[1])
    else:
        hours, minutes, seconds = parts
    return int(days or 0) * 1440 + hours * 60 + minutes + (1 if seconds else 0)


__all__ = [
    "CheckpointConfig",
    "ClusterConfig",
    "DataConfig",
    "DataSourceConfig",
    "FaultConfig",
    "JobConfig",
    "LoggingConfig",
    "MLAConfig",
    "MoEConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "RunConfig",
    "TrainConfig",
    "register_configs",
]
