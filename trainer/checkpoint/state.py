"""The parts of a checkpoint besides the model: progress counters, RNG states, and the model +
optimizer as one sharded part. Each part has `state_dict()` / `load_state_dict()`."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from parallel.compression import Compressor

if TYPE_CHECKING:
    from parallel.parallelize import ParallelModel


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


@dataclass
class TrainProgress:
    """Steps taken and tokens trained on (all ranks), as a checkpoint part. A skipped step
    (non-finite loss or gradients, `trainer/fault.py`) counts as a step, without an update."""

    step: int = 0
    tokens: int = 0
    skipped_steps: int = 0
    rollbacks: int = 0  # reloads of the last checkpoint after too many skips in a row

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "skipped_steps": self.skipped_steps,
            "rollbacks": self.rollbacks,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.step, self.tokens = int(sd["step"]), int(sd["tokens"])
        self.skipped_steps, self.rollbacks = int(sd.get("skipped_steps", 0)), int(sd.get("rollbacks", 0))


class RNGState:
    """Python, NumPy, torch CPU (and CUDA) generator states, all as tensors. Different on every
    rank: saved per rank (`per_rank`)."""

    per_rank: ClassVar[bool] = True

    def state_dict(self) -> dict[str, Any]:
        version, py_state, gauss = random.getstate()
        np_state = np.random.get_state()
        sd: dict[str, Any] = {
            "python_version": version,
            "python_state": torch.tensor(py_state, dtype=torch.int64),
            "python_gauss": gauss,
            "numpy_state": torch.from_numpy(np_state[1].astype(np.int64)),
            "numpy_pos": int(np_state[2]),
            "numpy_has_gauss": int(np_state[3]),
            "numpy_gauss": float(np_state[4]),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            sd["cuda"] = torch.cuda.get_rng_state_all()
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        random.setstate((sd["python_version"], tuple(sd["python_state"].tolist()), sd["python_gauss"]))
        np_key = sd["numpy_state"].numpy().astype(np.uint32)
        np.random.set_state(("MT19937", np_key, sd["numpy_pos"], sd["numpy_has_gauss"], sd["numpy_gauss"]))
        torch.set_rng_state(sd["torch"])
        if "cuda" in sd and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(sd["cuda"])


class CompressorState:
    """The gradient compressor's error-feedback residuals and warm-up counter, saved per rank:
    a residual is the part of *this rank's* gradients not yet sent. Residuals are keyed by
    parameter name with this layout's local shapes, so they are restored only at the layout they
    were saved at; at another layout they restart from zero (the warm-up counter is kept)."""

    per_rank: ClassVar[bool] = True

    def __init__(self, compressor: Compressor, layout: tuple[int, ...]) -> None:
        self.compressor = compressor
        self.layout = torch.tensor(layout)

    def state_dict(self) -> dict[str, Any]:
        return {**self.compressor.state_dict(), "layout": self.layout.clone()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        same_layout = torch.equal(sd["layout"], self.layout)
        self.compressor.load_state_dict({**sd, "residuals": sd["residuals"] if same_layout else {}})


class ShardedModelOptimizer:
    """The model (all of this rank's pipeline stages) and its optimizer, saved by every rank as DCP
    shards. Keys are the model's own parameter names (`layers.3.moe.experts.w1`), whatever the
    layout, and DCP reshards DTensors on load, so a checkpoint loads at another layout.

    Only tensors are sharded (`sharded_state`); the optimizer's param groups (floats, names) are a
    small replicated part (`groups_state`) saved by rank 0."""

    def __init__(self, parts: list[nn.Module], optimizer: torch.optim.Optimizer) -> None:
        self.container = nn.ModuleList(parts)
        self.optimizer = optimizer

    def sharded_state(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.container, self.optimizer)
        return {
            "model": {_strip(k): v for k, v in model_sd.items()},
            "optimizer": {_strip(k): v for k, v in optim_sd["state"].items()},
        }

    def groups_state(self) -> list[dict[str, Any]]:
        _, optim_sd = get_state_dict(self.container, self.optimizer)
        return [{**g, "params": [_strip(k) for k in g["params"]]} for g in optim_sd["param_groups"]]

    def load(self, sharded: dict[str, Any], groups: list[dict[str, Any]]) -> None:
        """`sharded` holds exactly this rank's tensors (DCP loaded them into `sharded_state()`).
        The saved groups give the hyper-parameters; which parameters are in which group comes from
        this optimizer, since at another layout rank 0 held other stages."""
        model_sd, current = get_state_dict(self.container, self.optimizer)
        to_full = {_strip(k): k for k in model_sd}
        optim_sd = {
            "state": {to_full[k]: v for k, v in sharded["optimizer"].items()},
            "param_groups": [
                {**saved, "params": now["params"]} for saved, now in zip(groups, current["param_groups"])
            ],
        }
        set_state_dict(
            self.container,
            self.optimizer,
            model_state_dict={to_full[k]: v for k, v in sharded["model"].items()},
            optim_state_dict=optim_sd,
        )


def model_optimizer_part(pm: ParallelModel, optimizer: torch.optim.Optimizer) -> ShardedModelOptimizer:
    """The checkpoint part of this layout's model and optimizer: ZeRO's partitioned optimizer state
    (`parallel.engine=deepspeed`) is gathered into the same format (`deepspeed.py`)."""
    if pm.dp_engine == "deepspeed":
        from trainer.checkpoint.deepspeed import DeepSpeedModelOptimizer

        return DeepSpeedModelOptimizer(pm.transformers, optimizer)
    return ShardedModelOptimizer(pm.parts, optimizer)


def _strip(key: str) -> str:
    return key.split(".", 1)[1]  # "0.layers.3.w" -> "layers.3.w" (drop the ModuleList index)
