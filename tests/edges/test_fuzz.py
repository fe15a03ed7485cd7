"""Fuzzing the edges (issue 14): random config overrides given to `python -m trainer`, and random
mutations of a real checkpoint's manifest.json and DCP index and of a dataset's metadata.json
given to resume, `verify`, `convert` and the data readers. Whatever the input, nothing ends in a
traceback: a config is accepted (exit 0) or refused in one line (exit 2), a checkpoint verifies or
is refused in one line, and nothing is written outside the one output `convert` may create.

A bounded number of examples per run (hypothesis' database is off: every run draws afresh)."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.edges.conftest import BASE
from tests.edges.harness import case, fill, snapshot
from trainer.validate_fields import FIELD_RANGES

FUZZ = settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
# Paths a hostile file may name, next to random text.
paths = st.sampled_from(["../x", "../../file", "/etc/passwd", "sharded/../../x", "", ".", "a/b"]) | st.text(
    max_size=10
)


@contextmanager
def copied(template: Path) -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="fuzz-"))
    try:
        ws = root / "ws"
        shutil.copytree(template, ws, symlinks=True)
        yield ws
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ---- config overrides --------------------------------------------------------------------------

FIELDS = sorted(k for k in FIELD_RANGES if "." in k and not k.startswith("data.sources"))
FIELDS += [
    "model.attention",
    "optim.schedule",
    "parallel.dp_engine",
    "run.dir",
    "checkpoint.dir",
    "cluster.time",
]
override_values = (
    st.integers(-(2**40), 2**40).map(str)
    | st.floats().map(repr)
    | st.sampled_from(["nan", "inf", "-inf", "''", "null", "true", "[]", "{}", "${now:%f}", "a b", "1e999"])
    | st.text(max_size=8)
)


@pytest.mark.slow
@FUZZ
@given(overrides=st.lists(st.tuples(st.sampled_from(FIELDS), override_values), min_size=1, max_size=3))
def test_random_overrides_are_accepted_or_refused_in_one_line(
    overrides: list[tuple[str, str]],
    workspace_template: Path,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.edges.harness import _in_process

    with copied(workspace_template) as ws:
        args = [fill(a, ws) for a in BASE] + [f"{k}={v}" for k, v in overrides]
        before = snapshot(ws)
        capfd.readouterr()
        code, warned = _in_process(case("fuzz", "trainer", args, ""), args, monkeypatch)
        err = capfd.readouterr().err
        assert "Traceback" not in err, err[-3000:]
        lines = [line for line in err.splitlines() if line.strip()]
        if code == 0:
            assert not lines, err
        else:
            assert code == 2 and len(lines) == 1 and lines[0].startswith("moeforge: "), (code, err[-2000:])
        assert snapshot(ws) == before


# ---- checkpoint and dataset JSON ---------------------------------------------------------------


def mutate(data: st.DataObject, obj: Any, depth: int = 0) -> Any:
    """`obj` with one place changed: a value replaced (by random JSON or a hostile path), a key
    dropped or added, or a list entry removed."""
    if isinstance(obj, dict) and obj and depth < 4 and data.draw(st.booleans()):
        key = data.draw(st.sampled_from(sorted(obj)))
        return {**obj, key: mutate(data, obj[key], depth + 1)}
    if isinstance(obj, list) and obj and depth < 4 and data.draw(st.booleans()):
        i = data.draw(st.integers(0, len(obj) - 1))
        return [*obj[:i], mutate(data, obj[i], depth + 1), *obj[i + 1 :]]
    action = data.draw(st.sampled_from(["replace", "path", "drop", "add"]))
    if action == "drop" and isinstance(obj, (dict, list)) and obj:
        if isinstance(obj, dict):
            key = data.draw(st.sampled_from(sorted(obj)))
            return {k: v for k, v in obj.items() if k != key}
        return obj[1:]
    if action == "add" and isinstance(obj, dict):
        return {**obj, data.draw(paths): data.draw(json_values)}
    return data.draw(paths if action == "path" else json_values)


TARGETS = ["manifest.json", "sharded/.metadata.json"]


@pytest.mark.slow
@FUZZ
@given(data=st.data())
def test_mutated_checkpoint_json_is_verified_or_refused_in_one_line(
    data: st.DataObject,
    workspace_template: Path,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.edges.harness import _in_process
    from trainer.checkpoint import latest_valid, verify

    with copied(workspace_template) as ws:
        step = ws / "run" / "checkpoints" / "step-2"
        target = step / data.draw(st.sampled_from(TARGETS))
        target.write_text(json.dumps(mutate(data, json.loads(target.read_text()))))
        problem = verify(step)
        assert problem is None or "\n" not in problem
        found = latest_valid(step.parent, report=lambda line: None)
        assert (found is None) == (problem is not None)
        before = snapshot(ws)
        capfd.readouterr()
        args = ["convert", str(step), str(ws / "model.pt")]
        code, warned = _in_process(case("fuzz", "trainer.checkpoint", args, ""), args, monkeypatch)
        err = capfd.readouterr().err
        assert "Traceback" not in err and not warned, err[-3000:]
        after = snapshot(ws)
        if code == 0:  # a mutation that changed nothing the checkpoint relies on
            assert problem is None and set(after) - set(before) == {"model.pt"}
        else:
            assert code == 2 and len(err.strip().splitlines()) == 1, (code, err[-2000:])
            assert after == before


@pytest.mark.slow
@FUZZ
@given(data=st.data())
def test_mutated_dataset_metadata_opens_or_is_refused_in_one_line(
    data: st.DataObject, workspace_template: Path
) -> None:
    from data import DataError
    from data.dataset import ParquetTokens

    with copied(workspace_template) as ws:
        meta = ws / "ds" / "metadata.json"
        meta.write_text(json.dumps(mutate(data, json.loads(meta.read_text()))))
        before = snapshot(ws)
        try:
            ParquetTokens(ws / "ds" / "train")
        except DataError as e:
            assert "\n" not in str(e) and str(e).startswith("data: "), str(e)
        assert snapshot(ws) == before
