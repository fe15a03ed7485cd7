"""Inspect and convert checkpoints.

    python -m trainer.checkpoint list    runs/tiny_cpu/checkpoints
    python -m trainer.checkpoint verify  runs/tiny_cpu/checkpoints
    python -m trainer.checkpoint convert runs/tiny_cpu/checkpoints/step-200 model.pt

`convert` consolidates the sharded model into one weights-only file of full tensors, keyed by
parameter name: `torch.load("model.pt", weights_only=True)` loads it into a plain `Transformer`.
It writes through a temporary file, so a failure leaves nothing at the output path.

A checkpoint is read as untrusted (it may come from elsewhere): nothing outside its directory is
opened and nothing is unpickled. Exit codes: 0 done (for `verify`: every checkpoint is valid);
1 `verify` checked a checkpoint and it is not valid; 2 bad input (a target that does not exist,
is a file or holds no checkpoint, a checkpoint `convert` cannot use, an output that exists or whose
directory does not) or a failure to write.
Every problem is one line on stderr, `moeforge: <what>`.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from data.errors import OneLineArgumentParser
from trainer.checkpoint.safety import (
    FORMAT_VERSION,
    LATEST,
    MANIFEST,
    SHARDED,
    CheckpointError,
    one_line,
    read_manifest,
    scan_step_dirs,
    verify,
)
from trainer.checkpoint.storage import JsonFileSystemReader, read_json_metadata
from trainer.errors import ConfigError


class BadInput(Exception):
    """A target or output the command cannot work with: one line, exit code 2."""


def _directory(target: Path) -> None:
    what = "name a checkpoint directory (step-N) or a directory of them"
    if not target.exists():
        raise BadInput(f"{target} does not exist ({what})")
    if not target.is_dir():
        raise BadInput(f"{target} is a file, not a checkpoint directory ({what})")


def _is_checkpoint(target: Path) -> bool:
    return os.path.lexists(target / MANIFEST) or os.path.lexists(target / SHARDED)


def _checkpoints(target: Path) -> tuple[list[Path], list[str]]:
    """`target` is a checkpoint directory or a directory of them; also the lines for what is ignored."""
    if _is_checkpoint(target):
        return [target], []
    found, ignored = scan_step_dirs(target)
    return [path for _, path in found], ignored


def _latest(target: Path) -> str:
    file = target / LATEST
    if file.is_symlink() or not file.is_file():
        return ""
    with open(file, "rb") as f:
        return f.read(256).decode(errors="replace").strip()


def cmd_list(target: Path) -> int:
    _directory(target)
    latest = _latest(target)
    paths, ignored = _checkpoints(target)
    for line in ignored:
        print(line)
    for path in paths:
        problem = verify(path, checksums=False)
        if problem:
            print(f"{path.name:<14} NOT VALID: {problem}")
            continue
        manifest = read_manifest(path, MANIFEST, FORMAT_VERSION)
        size = sum(f["bytes"] for f in manifest["files"].values())
        layout = " ".join(f"{k}={v}" for k, v in manifest.get("layout", {}).items())
        mark = "  <- latest" if path.name == latest else ""
        tokens = str(manifest.get("tokens", "?"))
        print(f"{path.name:<14} {size / 2**20:8.1f} MiB  tokens {tokens:>12}  {layout}{mark}")
    if not paths:
        print(f"no checkpoints in {target}")
    return 0


def cmd_verify(target: Path) -> int:
    _directory(target)
    paths, ignored = _checkpoints(target)
    for line in ignored:
        print(line)
    if not paths:
        raise BadInput(
            f"no checkpoints in {target} (expected step-N directories, or one holding manifest.json)"
        )
    bad = 0
    for path in paths:
        problem = verify(path, checksums=True)
        print(f"{path}: {'ok' if problem is None else problem}")
        bad += problem is not None
    return 1 if bad else 0


def cmd_convert(path: Path, out: Path) -> int:
    _directory(path)
    if not _is_checkpoint(path):
        inside = _checkpoints(path)[0]
        hint = f"; it holds checkpoints: name one, e.g. {inside[-1]}" if inside else ""
        raise BadInput(f"{path} is not a checkpoint directory (it has no {MANIFEST}){hint}")
    if os.path.lexists(out):
        raise BadInput(f"{out} exists and is not overwritten (delete it or choose another output path)")
    if not out.absolute().parent.is_dir():
        raise BadInput(f"{out.absolute().parent} does not exist (create it or choose another output path)")
    problem = verify(path, checksums=True)
    if problem:
        raise BadInput(
            f"{path} is not a valid checkpoint: {problem} (convert a valid one: `list` shows them)"
        )
    metadata = read_json_metadata(path / SHARDED)
    model = {
        fqn: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        for fqn, meta in metadata.state_dict_metadata.items()
        if fqn.startswith("model.")
    }
    if not model:
        raise BadInput(
            f"{path} holds no model tensors: nothing to convert (check that it is a moeforge checkpoint)"
        )
    with warnings.catch_warnings():  # "torch.distributed is disabled ...": one process is the intent
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(model, storage_reader=JsonFileSystemReader(path / SHARDED), no_dist=True)
    _save_atomic({fqn.removeprefix("model."): t for fqn, t in model.items()}, out)
    print(f"wrote {out}: {len(model)} tensors, {sum(t.numel() for t in model.values()):,} parameters")
    return 0


def _save_atomic(obj: Any, out: Path) -> None:
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "xb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def run(args: argparse.Namespace) -> int:
    if args.command == "list":
        return cmd_list(args.dir)
    if args.command == "verify":
        return cmd_verify(args.dir)
    return cmd_convert(args.checkpoint, args.out)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(prog="python -m trainer.checkpoint", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="checkpoints in a directory, with status").add_argument("dir", type=Path)
    sub.add_parser("verify", help="check sizes and checksums").add_argument("dir", type=Path)
    convert = sub.add_parser("convert", help="consolidate a checkpoint's model into one weights-only file")
    convert.add_argument("checkpoint", type=Path)
    convert.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    invalid = 1 if args.command == "verify" else 2  # verify's answer, or a refusal to convert
    try:
        return run(args)
    except CheckpointError as e:  # checked, and not valid
        print(f"moeforge: {e.where}: {e.problem} ({e.fix})", file=sys.stderr)
        return invalid
    except CheckpointException as e:  # DCP's, a BaseException: the shards could not be read
        inner = next(iter(e.failures.values()), (e, None))[0]
        print(
            f"moeforge: the sharded tensors cannot be read ({one_line(inner)}); check the checkpoint with `verify`",
            file=sys.stderr,
        )
        return invalid
    except (BadInput, ConfigError) as e:
        print(f"moeforge: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"moeforge: {e.filename or 'I/O'}: {e.strerror or one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
