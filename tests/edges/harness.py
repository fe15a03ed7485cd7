"""The bad-input table's runner: each case runs one of our CLIs on a workspace of real files (a
prepared dataset, a trained checkpoint, a regular file, a dangling symlink) and must end with
exit code 2, exactly one stderr line naming the field or file and the fix, no traceback, and every
file of the workspace byte-for-byte as before.

The CLIs run in this process (seconds for the whole table instead of minutes of interpreter
start-ups); warnings they raise count as stderr lines, as they would print in a real process.
`python -m trainer` runs with MOEFORGE_CHECK_ONLY=1: a bad input must be refused by the check that
runs before Hydra writes anything, so a case that gets past it fails here (exit 0), as it should.
A few cases run as real subprocesses (`subprocess=True`) to pin that the in-process run is faithful.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.sampling import quick_sample

ROOT = Path(__file__).resolve().parents[2]
# Words of the remedy half of a message ("... (set a value >= 1)", "...; delete it and ...").
FIX_WORDS = (
    "set ", "use ", "delete", "choose", "point", "fix", "remove", "re-run", "rerun", "wait", "run ",
    "lower", "raise", "shrink", "give", "check", "pick", "create", "add", "prepare", "shorten",
    "hold out", "drop", "stop", "spread", "move", "change", "see ",
)  # fmt: skip


# `python -m <cli>` -> the function its __main__ calls with the arguments.
ENTRY_POINTS = {
    "data.prepare": ("data.prepare", "main"),
    "trainer.checkpoint": ("trainer.checkpoint.__main__", "main"),
    "launch.plan": ("launch.plan", "plan"),
    "launch.sbatch": ("launch.sbatch", "main"),
}


@dataclass(frozen=True)
class Case:
    id: str
    cli: str  # trainer | data.prepare | trainer.checkpoint | launch.plan | launch.sbatch | bash
    args: tuple[str, ...]  # "{ws}" is the workspace, "{ds}" its dataset, "{run}" its trained run
    names: str  # the field or file the line must name ("{ws}" allowed)
    setup: Callable[[Path], None] | None = None  # damages the workspace before the snapshot
    env: dict[str, str] = field(default_factory=dict)
    subprocess: bool = False


def case(id: str, cli: str, args: list[str] | str, names: str, **kw: object) -> Case:
    args = args.split() if isinstance(args, str) else args
    return Case(id, cli, tuple(args), names, **kw)  # type: ignore[arg-type]


def params(*groups: list[Case]) -> list[object]:
    """The cases as pytest params: the first of each group in the quick subset, the rest slow."""
    return [p for group in groups for p in quick_sample(group, [c.id for c in group], every=len(group))]


def fill(text: str, ws: Path) -> str:
    """`{ws}`, `{ds}`, `{run}` -> the workspace, its dataset, its trained run (other braces stay)."""
    return text.replace("{ds}", str(ws / "ds")).replace("{run}", str(ws / "run")).replace("{ws}", str(ws))


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under `root`: file contents (sha256), link targets, directories."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _in_process(c: Case, args: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[int, list[str]]:
    """(exit code, the warnings that would have printed)."""
    if c.cli == "trainer":  # reads sys.argv, and only checks (see the module docstring)
        from trainer.__main__ import main as trainer_main

        monkeypatch.setenv("MOEFORGE_CHECK_ONLY", "1")
        monkeypatch.setattr(sys, "argv", ["trainer", *args])

        def call() -> int | None:
            trainer_main()
            return 0
    else:
        module, name = ENTRY_POINTS[c.cli]
        entry = getattr(importlib.import_module(module), name)

        def call() -> int | None:
            return entry(args)

    for key, value in c.env.items():
        monkeypatch.setenv(key, value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        try:
            code = call()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    shown = [
        f"{w.category.__name__}: {w.message}"
        for w in caught
        if not issubclass(w.category, DeprecationWarning)
    ]
    return (0 if code is None else code), shown


def run_case(c: Case, ws: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    if c.setup is not None:
        c.setup(ws)
    args, names = [fill(a, ws) for a in c.args], fill(c.names, ws)
    before = snapshot(ws)
    capfd.readouterr()
    if c.subprocess:
        cmd = ["bash", *args] if c.cli == "bash" else [sys.executable, "-m", c.cli, *args]
        env = {**os.environ, "PYTHONPATH": str(ROOT), **c.env}
        if c.cli == "trainer":
            env["MOEFORGE_CHECK_ONLY"] = "1"
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        code, stderr, extra = proc.returncode, proc.stderr, []
    else:
        code, extra = _in_process(c, args, monkeypatch)
        stderr = capfd.readouterr().err
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, f"exit code {code}; stderr: {stderr[-2000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    assert len(lines) == 1 and not extra, f"{len(lines)} stderr lines, warnings {extra}: {stderr[-2000:]}"
    line = lines[0]
    assert line.startswith("moeforge: "), line
    assert names in line, f"the line does not name {names!r}: {line}"
    assert any(word in line.lower() for word in FIX_WORDS), f"the line says no fix: {line}"
    assert snapshot(ws) == before, "the workspace changed"
