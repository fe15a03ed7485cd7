"""Fault tolerance inside the train loop: skip non-finite steps, turn hangs into errors, and (for
tests only) inject faults.

Non-finite steps. After the step's forward/backward and gradient norm, `all_finite` decides on
every rank alike (one tiny all-reduce over all ranks) whether the loss and the gradient norm are
finite everywhere. If not, the update is skipped: gradients are dropped, the optimizer and LR
scheduler do not step, and `TrainProgress.skipped_steps` counts it. The step counter and the data
cursor still advance (as in Megatron): `train.steps` counts batches consumed, so a skipped batch
is not retried and the LR schedule runs on optimizer updates. After `fault.max_consecutive_skips`
skips in a row the trainer rolls back to the newest checkpoint (model, optimizer, schedule, RNG)
but keeps its data cursor, so the batches that went bad are not replayed; more than
`fault.max_rollbacks` rollbacks stop the run with one line (`FaultError`).

Hangs. `Watchdog` is a thread the train loop pets with the phase it enters ("step 12:
forward/backward", "step 12: checkpoint save", "validation"). If one phase lasts longer than
`fault.collective_timeout_s` (a peer died or stopped participating in a collective), it prints
`moeforge: rank R stuck in <phase> for N s (collective timeout); aborting` and ends the process
with `os._exit(EXIT_STUCK)`; torchrun then stops the other ranks. A rank whose collective fails
instead (its peer died) prints `moeforge: rank R failed in <phase>: <error>` before the traceback. The process group's own timeout
is set `PG_TIMEOUT_MARGIN_S` longer, as a backstop, so the watchdog's line comes first.

Fault injection (tests; off unless MOEFORGE_FAULT is set). Specs separated by `;`:

    MOEFORGE_FAULT="kill@step=7,rank=1"   SIGKILL rank 1 in step 7, after its forward/backward
    MOEFORGE_FAULT="hang@step=5,rank=2"   rank 2 stops participating (sleeps forever) there
    MOEFORGE_FAULT="nan@step=3"           step 3's loss and gradients become NaN (all ranks)
    MOEFORGE_FAULT="kill@save=4"          die while writing checkpoint step 4: after this rank's
                                          files, before the manifest/rename (`install_save_hook`)
    MOEFORGE_FAULT="enospc@save=4,rank=1" the same place, but the write fails: No space left on device

`rank=` omitted means every rank. A fault fires at most once per process and only in the first
torchrun attempt (TORCHELASTIC_RESTART_COUNT=0) unless `attempt=N` is given, so a run restarted
by `torchrun --max-restarts` does not die again at the same place.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

ENV = "MOEFORGE_FAULT"
EXIT_STUCK = 3  # the watchdog's exit code (2 is a config error)
PG_TIMEOUT_MARGIN_S = 30.0  # the process group times out this much after the watchdog
PARENT_POLL_S = 0.5  # how often a torchrun worker checks that its agent still lives
_PARENT_AT_START = os.getppid()  # taken at import: the agent may die before the train loop starts

ACTIONS = {"kill": ("step", "save"), "hang": ("step", "save"), "nan": ("step",), "enospc": ("save",)}


class FaultError(RuntimeError):
    """Training cannot go on (e.g. too many rollbacks); `str(e)` is one line."""


# -- non-finite steps ------------------------------------------------------------------------------


def all_finite(loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
    """True on every rank iff `loss` and `grad_norm` are finite on every rank (the values are
    meant to be reduced already, but a rank-local NaN must not split the ranks' decisions: a rank
    that skips while another steps would leave the replicas apart). One host sync."""
    values = torch.stack([loss.detach().float().to(grad_norm.device), grad_norm.detach().float()])
    bad = (~torch.isfinite(values)).any().float().reshape(1)
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bool(bad.item())


def poison_(loss: torch.Tensor, params: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """Fault injection: NaN into this rank's gradients; returns a NaN loss of the same shape."""
    for p in params:
        if p.grad is not None:
            p.grad.mul_(float("nan"))
    return torch.full_like(loss, float("nan"))


# -- hangs -----------------------------------------------------------------------------------------


class Watchdog:
    """Ends the process with one line if a phase of the train loop outlasts `timeout_s`.

    `with watchdog:` arms it; `pet(phase)` starts a new phase (cheap: a lock and a notify). The
    thread sleeps until the current phase's deadline, so it fires within milliseconds of it."""

    def __init__(self, timeout_s: float, rank: int) -> None:
        self.timeout_s, self.rank = timeout_s, rank
        self.phase, self._deadline = "startup", float("inf")
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def start(self) -> Watchdog:
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="moeforge-watchdog", daemon=True)
        self._thread.start()
        return self

    def pet(self, phase: str) -> None:
        with self._cond:
            self.phase, self._deadline = phase, time.monotonic() + self.timeout_s
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> Watchdog:
        return self.start()

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        self.stop()
        if isinstance(exc, RuntimeError) and not isinstance(exc, FaultError):
            # E.g. a peer died mid-collective: say where this rank was before the traceback.
            first = (str(exc).splitlines() or [""])[0][:300]
            print(f"moeforge: rank {self.rank} failed in {self.phase}: {first}", file=sys.stderr, flush=True)

    def _run(self) -> None:
        with self._cond:
            while not self._stopped:
                remaining = self._deadline - time.monotonic()
                if remaining <= 0:
                    print(
                        f"moeforge: rank {self.rank} stuck in {self.phase} for {self.timeout_s:g} s "
                        "(collective timeout); aborting",
                        file=sys.stderr,
                        flush=True,
                    )
                    os._exit(EXIT_STUCK)  # no cleanup: other threads may be blocked in a collective
                self._cond.wait(None if remaining == float("inf") else remaining)


# -- fault injection (tests) -----------------------------------------------------------------------


class Preemption:
    """SIGTERM (a scheduler preempting the job; torchrun forwards it to every rank) asks the run to
    checkpoint and stop at the next step boundary. Ranks may see the signal at different steps,
    so `requested()` agrees across ranks with a one-element all-reduce each step.

    The death of the torchrun agent asks the same: a SIGKILLed agent forwards nothing, and its
    orphaned workers would otherwise train on alone, beside any job started to replace it."""

    def __init__(self) -> None:
        self._flag = False
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_signal)
        if os.environ.get("TORCHELASTIC_RUN_ID"):  # a torchrun worker: its parent is the agent
            threading.Thread(target=self._watch_parent, args=(_PARENT_AT_START,), daemon=True).start()

    def _on_signal(self, signum: int, frame: object) -> None:
        self._flag = True

    def _watch_parent(self, parent: int) -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        print(
            f"moeforge: rank {dist.get_rank() if dist.is_initialized() else 0}: the torchrun agent "
            f"(pid {parent}) is gone; checkpointing and stopping at the next step",
            file=sys.stderr,
            flush=True,
        )
        self._flag = True

    def requested(self) -> bool:
        if not dist.is_initialized():
            return self._flag
        flag = torch.tensor([1.0 if self._flag else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


@dataclass(frozen=True)
class Fault:
    action: str  # kill | hang | nan | enospc (a full disk: the save's write fails)
    point: str  # step | save
    at: int  # the step number
    rank: int | None = None  # None: every rank
    attempt: int = 0  # torchrun restart count it fires in


def parse_faults(text: str) -> list[Fault]:
    """`kill@step=7,rank=1;nan@step=3` -> [Fault, ...]; a bad spec is a one-line ValueError."""
    faults = []
    for spec in filter(None, (s.strip() for s in text.split(";"))):
        try:
            action, _, rest = spec.partition("@")
            fields = dict(kv.split("=", 1) for kv in rest.split(","))
            (point,) = [k for k in fields if k in ("step", "save")]
            fault = Fault(
                action,
                point,
                int(fields.pop(point)),
                int(fields.pop("rank")) if "rank" in fields else None,
                int(fields.pop("attempt", 0)),
            )
            assert action in ACTIONS and point in ACTIONS[action] and not fields
        except (ValueError, AssertionError):
            raise ValueError(
                f"{ENV}={text!r}: cannot read {spec!r} (use e.g. kill@step=7,rank=1 | hang@step=5 | "
                "nan@step=3 | kill@save=4 | enospc@save=4)"
            ) from None
        faults.append(fault)
    return faults


_parsed: tuple[str, list[Fault]] = ("", [])
_fired: set[Fault] = set()


def maybe_inject(point: str, step: int) -> bool:
    """The injection hook. The trainer calls `maybe_inject("step", step)` after a step's
    forward/backward; the checkpoint writer calls `maybe_inject("save", step)` (through
    `install_save_hook`) once this rank's files of checkpoint `step` are written, before the
    manifest/rename. Kills or hangs this
    process, or returns True when the caller should make the step non-finite; False (and no cost
    beyond an env lookup) when MOEFORGE_FAULT is unset."""
    global _parsed
    text = os.environ.get(ENV, "")
    if not text:
        return False
    if text != _parsed[0]:
        _parsed = (text, parse_faults(text))
    rank = int(os.environ.get("RANK", "0"))
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    for fault in _parsed[1]:
        if (
            fault in _fired
            or (fault.point, fault.at, fault.attempt) != (point, step, attempt)
            or fault.rank not in (None, rank)
        ):
            continue
        _fired.add(fault)
        print(
            f"moeforge: injecting fault {fault.action}@{point}={step} on rank {rank}",
            file=sys.stderr,
            flush=True,
        )
        if fault.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if fault.action == "hang":
            while True:
                time.sleep(3600)
        if fault.action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return True
    return False


def _save_hook(step: int) -> None:
    maybe_inject("save", step)


def install_save_hook() -> None:
    """Let `kill@save=N` / `hang@save=N` reach the checkpoint writer, which calls its
    `after_shards_written` hooks once a rank's files are written, before the manifest (idempotent)."""
    from trainer.checkpoint import manager

    if _save_hook not in manager.after_shards_written:
        manager.after_shards_written.append(_save_hook)


def reset_injection() -> None:
    """Forget which faults fired (tests that reuse one process)."""
    _fired.clear()
