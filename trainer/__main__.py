"""Train a moeforge model.

    python -m trainer                                   # recipe=tiny_cpu: a small MoE on the CPU
    python -m trainer recipe=tiny_cpu train.steps=50 optim.lr=1e-3 model.moe.num_experts=16
    python -m trainer --cfg job                         # print the composed config and exit
    python -m trainer -m optim.lr=1e-3,3e-3             # a Hydra multirun sweep
    MOEFORGE_CHECK_ONLY=1 WORLD_SIZE=4 python -m trainer ...   # validate a 4-rank config, run nothing
    torchrun --nproc-per-node=4 -m trainer parallel.ep=2 parallel.tp=2   # 4 ranks: dp2 (ep2) x tp2

The config is composed from `recipes/config.yaml` (Hydra) with the command-line overrides. Before
Hydra runs the job, the same composition is done with the compose API and validated, so a bad
override or an impossible config prints one line (`moeforge: config error: ...`) and exits with
code 2, without a traceback. Runs write to `run.dir`: metrics.jsonl, wandb/, checkpoints/, and
resume from the newest checkpoint there.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from typing import IO, NoReturn

import hydra
from hydra._internal.utils import get_args_parser
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from data import DataError
from trainer.compose import compose_config, config_error, to_job_config
from trainer.config import register_configs
from trainer.errors import ConfigError
from trainer.fault import PG_TIMEOUT_MARGIN_S, FaultError
from trainer.preflight import acquire_run_lock, agree_across_ranks, check_machine, frozen_path_overrides
from trainer.validate import validate

EXIT_CONFIG = 2
EXIT_FAULT = 1


RANK0_GRACE_S = 10.0  # how long another rank waits for rank 0 to say an error they share


def _fail(err: Exception) -> NoReturn:
    kind = "data error" if isinstance(err, DataError) else "config error"
    kind = "training stopped" if isinstance(err, FaultError) else kind
    _say_once(f"moeforge: {kind}: {err}")
    sys.exit(EXIT_FAULT if isinstance(err, FaultError) else EXIT_CONFIG)


def _say_once(line: str) -> None:
    """Under torchrun every rank usually fails alike (the same config, or an error the ranks agreed
    on): rank 0 says it. Once the process group is up, another rank waits for rank 0 to have said
    it before exiting (torchrun stops the other workers as soon as one exits), and says its own
    line only if rank 0 does not within RANK0_GRACE_S: an error only this rank met."""
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    store = dist.distributed_c10d._get_default_store() if dist.is_initialized() else None
    key = "moeforge/error_said"
    if rank == 0:
        print(line, file=sys.stderr, flush=True)
        if store is not None:
            store.set(key, "1")
        return
    if store is None:
        return  # before the process group: rank 0 meets the same error in the same check
    try:
        store.wait([key], timedelta(seconds=RANK0_GRACE_S))
    except (RuntimeError, dist.DistStoreError):
        print(f"{line} (rank {rank})", file=sys.stderr, flush=True)


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def precheck(argv: list[str]) -> list[str]:
    """Compose + validate the job's config from `argv` the way Hydra will, raising `ConfigError`.

    Skipped when Hydra is asked for something other than a plain run of our root config (help,
    shell completion, another config path/name, a rerun). Overrides of Hydra's own config
    (`hydra.*`, `hydra/...`) are left to Hydra; in a multirun, sweep overrides (`a=1,2`) are left
    out here and each job validates its own values when it starts.
    """
    try:
        args = get_args_parser().parse_intermixed_args(argv)
    except SystemExit:
        return []  # a malformed flag: let Hydra print its usage message
    if (
        args.help
        or args.hydra_help
        or args.shell_completion
        or args.config_path
        or args.config_name
        or args.config_dir
        or args.experimental_rerun
        or args.info
    ):
        return []
    try:
        parsed = OverridesParser.create().parse_overrides(args.overrides)
    except Exception as e:  # noqa: BLE001 - an unparsable override is a config error
        raise config_error(e) from e
    keep = [
        text
        for text, ov in zip(args.overrides, parsed)
        if not ov.is_hydra_override() and not (args.multirun and ov.is_sweep_override())
    ]
    cfg = compose_config(keep)
    job = to_job_config(cfg)
    # Submitting to SLURM through Hydra's submitit launcher: the ranks will be cluster.nodes x
    # cluster.gpus_per_node (launch/submitit_env.py gives each task its torch env), not this process.
    slurm = any(ov.key_or_group == "hydra/launcher" and "slurm" in str(ov.value()) for ov in parsed)
    world_size = job.cluster.nodes * job.cluster.gpus_per_node if slurm else _world_size()
    validate(job, world_size)
    pinned = frozen_path_overrides(OmegaConf.to_container(cfg, resolve=False), job)
    if pinned:  # every rank checks and writes rank 0's directories
        pinned = agree_across_ranks(pinned)
        job = to_job_config(compose_config([*keep, *pinned]))
    if not (slurm or args.multirun):  # those jobs run elsewhere, each in its own run.dir
        check_machine(job, world_size)
    return pinned


@hydra.main(config_path="pkg://recipes", config_name="config", version_base=None)
def run(cfg: DictConfig) -> None:
    """The Hydra job: type and validate the composed config, then train."""
    import torch.distributed as dist

    from parallel.dims import init_distributed
    from trainer.layout import parallel_dims
    from trainer.trainer import Trainer  # heavy imports (model, data) only for a real run

    try:
        job = to_job_config(cfg)
        world_size = _world_size()
        validate(job, world_size)
        dims = parallel_dims(job, world_size)
        # The process group's timeout backs up the train loop's watchdog (trainer/fault.py).
        timeout_s = job.fault.collective_timeout_s + PG_TIMEOUT_MARGIN_S
        meshes = init_distributed(dims, job.parallel.backend, timeout_s) if dims.distributed else None
        try:
            lock = hold_run_dir(job.run.dir)  # noqa: F841 - held until the process exits
            Trainer(job, dims, meshes).train()
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    except (ConfigError, DataError, FaultError) as e:
        _fail(e)


def hold_run_dir(run_dir: str) -> IO[str] | None:
    """Rank 0 takes the run directory's lock; every rank fails alike if another job holds it."""
    import torch.distributed as dist

    lock, refusal = None, [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            lock = acquire_run_lock(run_dir)
        except ConfigError as e:
            refusal = [e]
    if dist.is_initialized():
        dist.broadcast_object_list(refusal, src=0)
    if refusal[0] is not None:
        raise refusal[0]
    return lock


def main() -> None:
    register_configs()
    try:
        sys.argv += precheck(sys.argv[1:])  # Hydra then resolves the paths the check saw
    except (ConfigError, DataError) as e:
        _fail(e)
    if os.environ.get("MOEFORGE_CHECK_ONLY") == "1":
        return  # launch scripts validate once, before torchrun starts any rank
    run()


if __name__ == "__main__":
    main()
