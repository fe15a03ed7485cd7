"""The DeepSpeed engine (`parallel.engine=deepspeed`) trains the tiny MoE of `test_layouts.py` on 4
gloo ranks (dp4, experts over ep2) exactly like the native engine (DDP, experts synced over "edp").

Through the production path (`parallelize` -> `wrap_optimizer` -> `forward_backward` ->
`clip_grads_` -> step -> LR schedule -> `end_of_step`), 5 steps with ZeRO-1 and ZeRO-2 must give
the native engine's per-step losses within 1e-4 and its parameters within 1e-5, with gradient
clipping active. Also: a step made non-finite on purpose (as `MOEFORGE_FAULT=nan@step=N` does) is
skipped on both engines alike, and checkpoints interchange: DeepSpeed saves after 3 steps and the
native engine resumes (and the other way round), continuing as the uninterrupted run does.
Every case shares one spawned job (process start-up and DeepSpeed's import dominate on 2 cores).
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from parallel.config import ParallelConfig
from parallel.dims import ParallelDims, build_meshes
from parallel.parallelize import ParallelModel, parallelize
from tests.distributed.harness import run_ranks
from tests.distributed.test_layouts import (
    MICRO_BATCHES,
    OPTIM,
    SEED,
    STEPS,
    full,
    global_batches,
    model_config,
)
from trainer import checkpoint
from trainer.fault import all_finite, poison_
from trainer.optim import apply_config, build_optimizer, build_scheduler
from trainer.step import forward_backward

pytestmark = pytest.mark.slow

DP, EP, K = 4, 2, MICRO_BATCHES // 4
ENGINES = {"native": ("native", 1), "zero1": ("deepspeed", 1), "zero2": ("deepspeed", 2)}
POISONED_STEP, SAVED_AFTER = 2, 3
CPU = torch.device("cpu")


class Run:
    """One engine's model, optimizer and LR schedule, stepped like `Trainer.train_step`."""

    def __init__(self, name: str) -> None:
        engine, zero_stage = ENGINES[name]
        dims = ParallelDims(dp=DP, ep=EP)
        meshes = build_meshes(dims, "cpu")
        pcfg = ParallelConfig(dp=DP, ep=EP, dp_engine="ddp", engine=engine, zero_stage=zero_stage)
        self.pm: ParallelModel = parallelize(model_config(0.0), pcfg, dims, meshes, CPU, SEED, K)
        self.optimizer = self.pm.wrap_optimizer(build_optimizer(torch.nn.ModuleList(self.pm.parts), OPTIM))
        self.scheduler = build_scheduler(self.optimizer, OPTIM, STEPS)  # warm-up: lr changes every step
        self.dp_rank = meshes.dp_rank

    def train(self, steps: range, poisoned_step: int | None = None) -> list[float]:
        losses = []
        for step in steps:
            batches = global_batches()[step]
            mine = [batches[i * DP + self.dp_rank] for i in range(K)]
            out = forward_backward(self.pm, mine, mtp_coef=0.0, device=CPU, autocast=nullcontext)
            if step == poisoned_step:
                out.ce = poison_(out.ce, self.pm.parameters())
            norm = self.pm.clip_grads_(OPTIM.grad_clip)
            if all_finite(out.total, norm):
                self.optimizer.step()
                self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.pm.compressor.step()
            self.pm.end_of_step()
            losses.append(float(out.total))
        return losses

    def params(self) -> dict[str, torch.Tensor]:
        return {n: full(p.detach()).clone() for n, p in self.pm.transformers[0].named_parameters()}

    def state(self) -> dict:
        return {
            "model_optimizer": checkpoint.model_optimizer_part(self.pm, self.optimizer),
            "scheduler": self.scheduler,
        }

    def save(self, directory: Path, step: int) -> Path:
        return checkpoint.CheckpointWriter(directory, keep_last=1).save(step, self.state(), {})

    def resume(self, path: Path) -> None:
        checkpoint.restore(self.state(), path)
        apply_config(self.optimizer, self.scheduler, OPTIM)  # as Trainer.resume does


def train_all(ckpt_root: str) -> dict:
    results = {}
    for name in ENGINES:
        run = Run(name)
        results[name] = {"losses": run.train(range(STEPS)), "params": run.params()}
        results[f"{name}-skip"] = {"losses": Run(name).train(range(STEPS), POISONED_STEP)}
    for saver, loader in (("zero1", "native"), ("native", "zero2")):
        first = Run(saver)
        losses = first.train(range(SAVED_AFTER))
        path = first.save(Path(ckpt_root) / f"{saver}-to-{loader}", SAVED_AFTER)
        second = Run(loader)
        second.resume(path)
        losses += second.train(range(SAVED_AFTER, STEPS))
        results[f"{saver}-to-{loader}"] = {"losses": losses, "params": second.params()}
    dist.barrier()
    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return run_ranks(DP, train_all, str(tmp_path_factory.mktemp("deepspeed_ckpt")))


def assert_same_run(got: dict, want: dict, loss_atol: float = 1e-4, param_atol: float = 1e-5) -> None:
    torch.testing.assert_close(
        torch.tensor(got["losses"]), torch.tensor(want["losses"]), rtol=0, atol=loss_atol
    )
    assert got["params"].keys() == want["params"].keys()
    for name, value in want["params"].items():
        torch.testing.assert_close(got["params"][name], value, rtol=0, atol=param_atol, msg=name)


@pytest.mark.parametrize("zero", ["zero1", "zero2"])
def test_zero_trains_like_the_native_engine(results, zero):
    native = results[0]["native"]
    assert_same_run(results[0][zero], native)
    for rank_result in results[1:]:  # ZeRO's all-gather leaves every data-parallel replica equal
        for name, value in rank_result[zero]["params"].items():
            assert torch.equal(value, results[0][zero]["params"][name]), name


@pytest.mark.parametrize("zero", ["zero1", "zero2"])
def test_a_non_finite_step_is_skipped_like_on_the_native_engine(results, zero):
    got = torch.tensor(results[0][f"{zero}-skip"]["losses"])
    want = torch.tensor(results[0]["native-skip"]["losses"])
    assert got[POISONED_STEP].isnan() and want[POISONED_STEP].isnan()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4, equal_nan=True)


@pytest.mark.parametrize("case", ["zero1-to-native", "native-to-zero2"])
def test_checkpoints_interchange_with_the_native_engine(results, case):
    """Model, AdamW state and LR schedule survive the trip: the resumed run continues exactly."""
    assert_same_run(results[0][case], results[0]["native"])
