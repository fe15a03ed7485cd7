"""Inspect and convert checkpoints.

    python -m trainer.checkpoint list    runs/tiny_cpu/checkpoints
    python -m trainer.checkpoint verify  runs/tiny_cpu/checkpoints        # exit 1 if any is not valid
    python -m trainer.checkpoint convert runs/tiny_cpu/checkpoints/step-200 model.pt

`convert` consolidates the sharded model into one weights-only file of full tensors, keyed by
parameter name: `torch.load("model.pt", weights_only=True)` loads it into a plain `Transformer`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from trainer.checkpoint.manager import LATEST, MANIFEST, SHARDED, step_dirs, verify
from trainer.checkpoint.storage import JsonFileSystemReader, read_json_metadata


def _checkpoints(target: Path) -> list[Path]:
    """`target` is a checkpoint directory or a directory of them."""
    if (target / MANIFEST).is_file() or (target / SHARDED).is_dir():
        return [target]
    return [path for _, path in step_dirs(target)]


def cmd_list(target: Path) -> int:
    latest = (target / LATEST).read_text().strip() if (target / LATEST).is_file() else ""
    paths = _checkpoints(target)
    for stale in sorted(target.glob("step-*.tmp")):
        print(f"{stale.name:<14} incomplete (a save that did not finish)")
    for path in paths:
        problem = verify(path, checksums=False)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        if problem:
            print(f"{path.name:<14} NOT VALID: {problem}")
            continue
        manifest = json.loads((path / MANIFEST).read_text())
        layout = " ".join(f"{k}={v}" for k, v in manifest.get("layout", {}).items())
        mark = "  <- latest" if path.name == latest else ""
        print(
            f"{path.name:<14} {size / 2**20:8.1f} MiB  tokens {manifest.get('tokens', '?'):>12}  {layout}{mark}"
        )
    if not paths:
        print(f"no checkpoints in {target}")
    return 0


def cmd_verify(target: Path) -> int:
    bad = 0
    for path in _checkpoints(target):
        problem = verify(path, checksums=True)
        print(f"{path}: {'ok' if problem is None else problem}")
        bad += problem is not None
    return 1 if bad else 0


def cmd_convert(path: Path, out: Path) -> int:
    problem = verify(path, checksums=True)
    if problem:
        print(f"moeforge: {path} is not a valid checkpoint: {problem}", file=sys.stderr)
        return 1
    metadata = read_json_metadata(path / SHARDED)
    model = {
        fqn: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        for fqn, meta in metadata.state_dict_metadata.items()
        if fqn.startswith("model.")
    }
    dcp.load(model, storage_reader=JsonFileSystemReader(path / SHARDED), no_dist=True)
    torch.save({fqn.removeprefix("model."): t for fqn, t in model.items()}, out)
    print(f"wrote {out}: {len(model)} tensors, {sum(t.numel() for t in model.values()):,} parameters")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.checkpoint", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="checkpoints in a directory, with status").add_argument("dir", type=Path)
    sub.add_parser("verify", help="check sizes and checksums").add_argument("dir", type=Path)
    convert = sub.add_parser("convert", help="consolidate a checkpoint's model into one weights-only file")
    convert.add_argument("checkpoint", type=Path)
    convert.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    if args.command == "list":
        return cmd_list(args.dir)
    if args.command == "verify":
        return cmd_verify(args.dir)
    return cmd_convert(args.checkpoint, args.out)


if __name__ == "__main__":
    sys.exit(main())
