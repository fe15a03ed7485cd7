"""Checks of the machine a job is about to run on, before any process group, write or allocation:
the directories it will write (each exists as a writable directory or can be created), the memory
its model needs (the planner's estimate against this machine's RAM or GPU), and whether another
live job holds its run directory.

`validate()` (trainer/validate.py) judges the config alone; these read the file system and the
machine, so `python -m launch.plan` (which plans for another machine) does not run them.

One writer per run: the job's rank 0 holds an exclusive `flock` on `<run.dir>/.lock` for as long
as it lives, and writes its pid, host and command there. The kernel releases the lock when the
holder dies, however it dies, so a stale lock from a dead job is simply taken over.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import IO, Any

from trainer.config import JobConfig
from trainer.errors import ConfigError, bad_value

LOCK_FILE = ".lock"
GIB = 2**30


def output_dirs(cfg: JobConfig) -> list[tuple[str, str]]:
    """(field, path) of every directory the job may write."""
    dirs = [("run.dir", cfg.run.dir), ("checkpoint.dir", cfg.checkpoint.dir)]
    if not cfg.data.sources:
        dirs.append(("data.cache_dir", cfg.data.cache_dir))
    if cfg.checkpoint.export_hf:
        dirs.append(("checkpoint.export_hf", str(Path(cfg.checkpoint.export_hf).parent)))
    return dirs


def check_writable_dir(field: str, path: str) -> None:
    """`path` is a writable directory, or can be created as one; nothing is left behind."""
    p = Path(os.path.expanduser(path))
    if p.is_symlink() and not p.exists():
        raise bad_value(
            field, path, f"is a symlink to {os.readlink(p)}, which does not exist", "fix or remove the link"
        )
    if p.exists() and not p.is_dir():
        raise bad_value(field, path, "is not a directory", "point it at a directory")
    existing = p
    while not existing.exists():
        if existing.is_symlink():
            raise bad_value(
                field, path, f"runs through the dangling symlink {existing}", "fix or remove the link"
            )
        existing = existing.parent
    if not existing.is_dir():
        raise bad_value(field, path, f"cannot be created: {existing} is a file", "choose another directory")
    try:  # os.access says yes to root on a read-only directory; only a real write can tell
        fd, probe = tempfile.mkstemp(prefix=".moeforge-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        where = "" if existing == p else f" (in {existing})"
        raise bad_value(
            field, path, f"is not writable{where}: {e.strerror}", "choose a writable directory"
        ) from None


def check_memory(cfg: JobConfig, world_size: int) -> None:
    """Refuse a model whose estimated peak memory per rank exceeds what this machine has free."""
    import torch

    from launch.memory import estimate, worst_rank
    from trainer.layout import parallel_dims

    cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    peak = worst_rank(estimate(cfg, parallel_dims(cfg, world_size), "cuda" if cuda else "cpu")).peak
    if cuda:
        free, where = torch.cuda.mem_get_info()[1], "GPU memory"
    else:  # the ranks of this node share its RAM
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        free, where = _available_ram() // max(local, 1), f"available RAM per rank ({local} on this node)"
    if peak > free:
        raise ConfigError(
            "model",
            f"model: {cfg.model.name} needs an estimated {peak / GIB:.1f} GiB per rank but this machine has "
            f"{free / GIB:.1f} GiB of {where} (python -m launch.plan shows the breakdown; shrink the model "
            "or spread it over more ranks)",
        )


def _available_ram() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_machine(cfg: JobConfig, world_size: int) -> None:
    """Every check of this module except taking the lock; raises `ConfigError`."""
    for field, path in output_dirs(cfg):
        check_writable_dir(field, path)
    check_run_dir_free(cfg.run.dir)
    check_memory(cfg, world_size)
    check_data(cfg)
    check_resume(cfg)
    if cfg.logging.wandb_mode == "online":
        check_wandb_online()


def check_data(cfg: JobConfig) -> None:
    """Open the job's data as training will (schema, token id range against model.vocab_size, the
    special ids): the opened streams are kept for the run. The default corpus, when it is not
    prepared yet, is left to the run: preparing it is a write."""
    from data.prepare import default_corpus_dir
    from trainer.setup import build_data

    if not cfg.data.sources and not (default_corpus_dir(cfg.data) / "metadata.json").is_file():
        return
    build_data(cfg, seed=cfg.train.seed)


def check_resume(cfg: JobConfig) -> None:
    """checkpoint.dir has room for the next checkpoint (weights + AdamW moments), and the one a
    run would resume from loads (its small parts weights-only, as the run reads them) and fits
    the model (saved shapes against the config's, on the meta device): the run's own resume, minus
    the tensors."""
    import torch

    from model import Transformer
    from model.params import count_params
    from trainer.checkpoint import check_free_space
    from trainer.checkpoint.manager import check_model_shapes, first_loadable, saved_shapes
    from trainer.checkpoint.safety import load_weights_only

    total, _ = count_params(cfg.model, include_mtp=True)
    check_free_space(cfg.checkpoint.dir, total * 3 * 4)
    if not cfg.checkpoint.resume:
        return
    with torch.device("meta"):
        expected = Transformer(cfg.model).state_dict()

    def dry_run(path: Path) -> None:
        for part in sorted(path.glob("*.pt")):
            load_weights_only(path, part.name)
        check_model_shapes(expected, saved_shapes(path), path)

    first_loadable(cfg.checkpoint.dir, report=lambda _: None, checksums=False, load=dry_run)


def check_wandb_online(host: str = "api.wandb.ai", timeout_s: float = 3.0) -> None:
    """`logging.wandb_mode=online` needs credentials and a route to W&B; without them wandb.init
    fails (or waits) after the model is built."""
    netrc = Path(os.environ.get("NETRC", "~/.netrc")).expanduser()
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (netrc.is_file() and host in netrc.read_text())
    fix = "run `wandb login` or set WANDB_API_KEY, or use logging.wandb_mode=offline (sync later)"
    if not has_key:
        raise bad_value("logging.wandb_mode", "online", "but no W&B credentials were found", fix)
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
    except OSError as e:
        raise bad_value("logging.wandb_mode", "online", f"but {host} cannot be reached ({e})", fix) from None


# ---- one writer per run --------------------------------------------------------------------------


def check_run_dir_free(run_dir: str) -> None:
    """Refuse if a live job holds `run_dir`'s lock (probed without creating anything)."""
    path = Path(os.path.expanduser(run_dir)) / LOCK_FILE
    try:
        f = open(path)  # noqa: SIM115 - closed below; opening read-only creates nothing
    except OSError:
        return  # no lock file: no job has run here, or it cannot be read (the lock will tell)
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _held(path, f.read()) from None


def acquire_run_lock(run_dir: str) -> IO[str]:
    """Take `run_dir`'s lock for this process's lifetime (keep the returned file open)."""
    path = Path(os.path.expanduser(run_dir)) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")  # noqa: SIM115 - held open: closing it releases the lock
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read()
        f.close()
        raise _held(path, holder) from None
    f.seek(0)
    f.truncate()
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "argv": sys.argv}
    f.write(json.dumps(holder) + "\n")
    f.flush()
    return f


def _held(path: Path, text: str) -> ConfigError:
    try:
        holder = json.loads(text)
        who = f"pid {holder['pid']} on {holder['host']}"
    except (ValueError, KeyError, TypeError):
        who = "another process"
    return ConfigError(
        "run.dir",
        f"run.dir: {path.parent} is in use by a live job ({who} holds {path}); wait for it to finish, "
        "stop it, or choose another run.name",
    )


# ---- one run, one set of paths -------------------------------------------------------------------

TIME_DEPENDENT = ("${now:",)  # interpolations that resolve differently in each process
FROZEN_FIELDS = ("run.dir", "checkpoint.dir")


def frozen_path_overrides(raw: dict[str, Any], job: JobConfig) -> list[str]:
    """`run.dir=...` overrides pinning each path field whose unresolved value is time-dependent
    (`runs/x_${now:%H%M%S}`) to the value resolved here, so that Hydra, every rank and a restart
    agree on one directory. `raw` is the composed config, unresolved."""
    out = []
    for field in FROZEN_FIELDS:
        section, name = field.split(".")
        if any(marker in str(raw[section][name]) for marker in TIME_DEPENDENT):
            value = getattr(getattr(job, section), name)
            out.append(f"{field}='{value}'" if "'" not in value else f'{field}="{value}"')
    return out


def agree_across_ranks(overrides: list[str]) -> list[str]:
    """Rank 0's `overrides`, on every rank of a torchrun job (through the job's TCP store, before
    any process group or write); unchanged in a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or "MASTER_ADDR" not in os.environ:  # one process, or a launcher's check-only run
        return overrides
    from torch.distributed import TCPStore

    rank = int(os.environ.get("RANK", "0"))
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    # Without torchrun's agent store, rank 0 hosts the store that init_process_group reuses.
    store = TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size=world,
        is_master=rank == 0 and not agent_store,
        multi_tenant=True,
        wait_for_workers=False,
        timeout=timedelta(seconds=300),
    )
    _STORES.append(store)  # the process group may reuse this server: keep it alive
    attempt = (os.environ.get("TORCHELASTIC_RUN_ID", ""), os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    key = "moeforge/paths/" + "/".join(attempt)
    if rank == 0:
        store.set(key, json.dumps(overrides))
        return overrides
    return json.loads(store.get(key))


_STORES: list[Any] = []
