"""The SLURM side of launching, checked by content for a 4-node x 8-GPU `mixtral_8x7b` job: the
sbatch script `python -m launch.sbatch` writes, the submitit launcher config
(recipes/hydra/launcher/submitit_slurm.yaml) and the sbatch file submitit renders from it, the
dry run printing both, and the per-job run directories of a Hydra multirun."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from launch.commands import load_job, sbatch_script, split_overrides, submitit_preview

pytestmark = pytest.mark.slow  # whole-recipe plans and CLI processes: not in the quick subset

REPO = Path(__file__).resolve().parents[2]
# The recipe's own layout is for 64 GPUs; on 32, pp 2 leaves dp 8 for ep 8 (launch.plan --suggest
# picks pp1 dp32 ep8; any valid layout serves for these content checks).
ARGS = [
    "recipe=mixtral_8x7b",
    "parallel.pp=2",
    "parallel.dp=-1",
    "optim.lr=2e-4",
    "cluster.nodes=4",
    "cluster.gpus_per_node=8",
    "cluster.time=48:00:00",
    "cluster.partition=gpu",
    "cluster.cpus_per_gpu=12",
]


def test_split_overrides_keeps_cluster_settings_out_of_the_trainer_line() -> None:
    trainer, cluster = split_overrides(["recipe=x", "cluster.nodes=2", "+cluster.foo=1", "optim.lr=1"])
    assert trainer == ["recipe=x", "optim.lr=1"] and cluster == ["cluster.nodes=2", "+cluster.foo=1"]


def test_sbatch_script_content() -> None:
    job = load_job(ARGS)
    script = sbatch_script(job, split_overrides(ARGS)[0])
    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)$", script, re.M))
    assert sbatch == {
        "job-name": "mixtral_8x7b",
        "nodes": "4",
        "ntasks-per-node": "1",  # one torchrun agent per node ...
        "gpus-per-node": "8",  # ... starting one rank per GPU
        "cpus-per-task": "96",
        "time": "48:00:00",
        "partition": "gpu",
        "output": "%x-%j.out",
    }
    assert script.startswith("#!/bin/bash\n")
    assert 'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
    overrides = "recipe=mixtral_8x7b parallel.pp=2 parallel.dp=-1 optim.lr=2e-4"
    # LOCAL_WORLD_SIZE: the memory check splits one node's memory over its 8 ranks, not all 32
    assert f"MOEFORGE_CHECK_ONLY=1 WORLD_SIZE=32 LOCAL_WORLD_SIZE=8 python -m trainer {overrides}" in script
    srun = " ".join(script.split("srun ", 1)[1].replace("\\\n", " ").split())
    assert srun == (
        "--kill-on-bad-exit=1 torchrun --nnodes=$SLURM_NNODES --nproc-per-node=8 --rdzv-backend=c10d "
        f"--rdzv-endpoint=$head_node:29500 --rdzv-id=$SLURM_JOB_ID -m trainer {overrides}"
    )
    assert "cluster." not in srun  # launch settings stay out of the job's overrides
    # The check runs before srun: a bad config fails the job in one line, before any rank starts.
    assert script.index("MOEFORGE_CHECK_ONLY") < script.index("srun ")
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_sbatch_cli_writes_the_script_and_refuses_a_bad_layout(tmp_path: Path) -> None:
    out = tmp_path / "job.sbatch"
    ok = subprocess.run(
        [sys.executable, "-m", "launch.sbatch", "-o", str(out), *ARGS],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert out.read_text() == sbatch_script(load_job(ARGS), split_overrides(ARGS)[0])
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.sbatch",
            "recipe=mixtral_8x7b",
            "cluster.nodes=4",
            "cluster.gpus_per_node=8",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip() == (
        "moeforge: config error: parallel.dp=8 * tp=2 * pp=4 must equal the world size 32 (set parallel.dp=-1)"
    )


@pytest.mark.filterwarnings("ignore:.*validated against ConfigStore schema")
def test_submitit_launcher_config_follows_cluster_settings() -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from trainer.config import register_configs

    register_configs()
    with initialize_config_module("recipes", version_base=None):
        cfg = compose("config", overrides=["hydra/launcher=submitit_slurm", *ARGS], return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (4, 8, 8)
    assert (launcher["cpus_per_task"], launcher["timeout_min"], launcher["partition"]) == (12, 2880, "gpu")
    assert launcher["name"] == "mixtral_8x7b" and launcher["account"] is None
    assert cfg.hydra.callbacks.slurm_torch_env._target_ == "launch.submitit_env.SlurmTorchEnv"

    script = submitit_preview(ARGS)
    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)$", script, re.M))
    assert {k: sbatch[k] for k in ("nodes", "ntasks-per-node", "gpus-per-node", "cpus-per-task", "time")} == {
        "nodes": "4",
        "ntasks-per-node": "8",  # one task per GPU: each task is a rank
        "gpus-per-node": "8",
        "cpus-per-task": "12",
        "time": "2880",
    }
    assert sbatch["partition"] == "gpu" and sbatch["job-name"] == "mixtral_8x7b"
    assert "export SUBMITIT_EXECUTOR=slurm" in script and "srun --unbuffered" in script


def test_submitit_task_gets_torch_rank_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the callback exports in task 11 of a 4 x 8 job (SLURM variables as srun sets them)."""
    pytest.importorskip("submitit")
    from launch.submitit_env import slurm_torch_env

    slurm = {
        "SUBMITIT_EXECUTOR": "slurm",
        "SLURM_JOB_ID": "77",
        "SLURM_JOB_NODELIST": "gpu[003-006]",
        "SLURM_JOB_NUM_NODES": "4",
        "SLURM_NODEID": "1",
        "SLURM_NTASKS": "32",
        "SLURM_PROCID": "11",
        "SLURM_LOCALID": "3",
    }
    for k, v in slurm.items():
        monkeypatch.setenv(k, v)
    env = slurm_torch_env(slurm, 29500)
    assert env == {
        "MASTER_ADDR": "gpu003",
        "MASTER_PORT": "29500",
        "RANK": "11",
        "WORLD_SIZE": "32",
        "LOCAL_RANK": "3",
        "LOCAL_WORLD_SIZE": "8",
    }


def test_submit_side_precheck_validates_at_the_cluster_world_size() -> None:
    """`python -m trainer -m hydra/launcher=submitit_slurm` checks the layout for nodes x GPUs before
    submitting anything (MOEFORGE_CHECK_ONLY stops right after the check)."""

    def run(args: list[str]) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "trainer", "-m", "hydra/launcher=submitit_slurm", *args]
        env = {"PATH": "/usr/bin:/bin", "MOEFORGE_CHECK_ONLY": "1"}
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)

    assert run(ARGS).returncode == 0
    bad = run(["recipe=mixtral_8x7b", "cluster.nodes=4", "cluster.gpus_per_node=8"])
    assert bad.returncode == 2 and "must equal the world size 32" in bad.stderr


@pytest.mark.slow
def test_multirun_jobs_get_their_own_run_dirs(tmp_path: Path, small_dataset: Path) -> None:
    """Two sweep jobs (basic launcher, in-process) write to runs/multirun/<name>/<job num>."""
    args = [
        "-m",
        "recipe=tiny_cpu",
        "run.name=sweep",
        "model.vocab_size=512",
        "model.num_layers=1",
        "data.seq_len=16",
        "data.micro_batch_size=2",
        "data.val_batches=1",
        "train.global_batch_size=2",
        "train.steps=1",
        "optim.warmup_steps=1",
        "logging.progress=false",
        "logging.wandb_mode=disabled",
        f"data.sources=[{{path:'{small_dataset}'}}]",
        "optim.lr=1e-3,2e-3",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", *args], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = tmp_path / "runs" / "multirun" / "sweep"
    for num in ("0", "1"):
        assert (sweep / num / "metrics.jsonl").is_file(), sorted(p.name for p in sweep.iterdir())
        assert (sweep / num / "checkpoints" / "latest").read_text().strip() == "step-1"
    assert (sweep / "0" / "metrics.jsonl").read_text() != (sweep / "1" / "metrics.jsonl").read_text()
    assert not (tmp_path / "runs" / "sweep").exists()  # nothing in the single-run directory
