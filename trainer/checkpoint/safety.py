"""Finding and verifying checkpoints that may come from elsewhere: nothing outside a checkpoint's
directory is opened and nothing is unpickled (the directory protocol is in `manager.py`).

Every path a checkpoint names (manifest `files` keys, DCP index `storage[*].path`) goes through
`contained`, every small part through `load_weights_only`, and the manifest through
`read_manifest`, which checks the type of every field the code reads. A problem is a
`CheckpointError`: one line naming the checkpoint and the entry, and what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle  # only for its exception type: nothing here unpickles
import re
import shutil
import warnings
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from trainer.errors import ConfigError

STEP_DIR = re.compile(r"^step-(\d+)$")
MANIFEST = "manifest.json"
LATEST = "latest"
SHARDED = "sharded"
GROUPS = "optimizer_groups.pt"
FORMAT_VERSION = 1
FIX = "delete it or set checkpoint.resume=false"
SHA256 = re.compile(r"^[0-9a-f]{64}$")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be read safely or is malformed (resume falls back past it), as
    opposed to a plain `ConfigError`: a checkpoint that does not fit this config."""

    def __init__(self, where: Path | str, problem: str, fix: str = FIX) -> None:
        super().__init__("checkpoint.dir", f"checkpoint.dir: {where}: {problem} ({fix})")
        self.where, self.problem, self.fix = where, " ".join(problem.split()), fix


def one_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, shortened: torch's are many lines long."""
    text = str(e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def is_int(value: Any, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def contained(root: Path, rel: Any, what: str) -> Path:
    """`root / rel`, refused unless it stays inside `root`: no absolute path, no `..`, no symbolic
    link on the way (a checkpoint holds plain files only), and its real path under `root`'s."""
    where = f"{what} {rel!r}"
    if not isinstance(rel, str) or not rel or "\x00" in rel or "\\" in rel:
        raise CheckpointError(root, f"{where} is not a relative file name")
    pure = PurePosixPath(rel)
    if pure.is_absolute() or os.path.isabs(rel):
        raise CheckpointError(root, f"{where} is an absolute path, outside the checkpoint")
    if ".." in pure.parts:
        raise CheckpointError(root, f"{where} goes up with '..', outside the checkpoint")
    current = root
    for part in pure.parts:
        current = current / part
        if current.is_symlink():
            link = "" if current.relative_to(root) == Path(pure) else f": {current.relative_to(root)}"
            raise CheckpointError(root, f"{where}{link} is a symbolic link (to {os.readlink(current)})")
    real_root = Path(os.path.realpath(root))
    if not Path(os.path.realpath(current)).is_relative_to(real_root):
        raise CheckpointError(root, f"{where} resolves outside the checkpoint")
    return current


def read_json(root: Path, rel: str, what: str) -> Any:
    """A JSON file inside `root`, refusing links and reporting any parse failure in one line."""
    path = contained(root, rel, what)
    if not path.is_file():
        raise CheckpointError(root, f"{rel} is missing or not a file")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(root, f"{rel} is unreadable ({one_line(e)})") from None


def read_manifest(path: Path, manifest: str, format_version: int) -> dict[str, Any]:
    """The checkpoint's manifest, every field the code reads checked for its type."""
    obj = read_json(path, manifest, "file")
    if not isinstance(obj, dict):
        raise CheckpointError(path, f"{manifest} is not a JSON object")
    if not is_int(obj.get("format")) or obj["format"] != format_version:
        raise CheckpointError(
            path, f"{manifest} has format {obj.get('format')!r}; this moeforge reads format {format_version}"
        )
    for field, minimum in (("step", 0), ("world_size", 1)):
        if not is_int(obj.get(field), minimum):
            raise CheckpointError(
                path, f"{manifest}: {field} is {obj.get(field)!r}, not an integer >= {minimum}"
            )
    files = obj.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(path, f"{manifest}: files is not an object of file name -> size and sha256")
    for rel, meta in files.items():
        ok = isinstance(meta, dict) and is_int(meta.get("bytes"))
        if not ok or not isinstance(meta.get("sha256"), str) or not SHA256.match(meta["sha256"]):
            raise CheckpointError(
                path, f"{manifest}: files entry {rel!r} is not {{'bytes': int >= 0, 'sha256': 64 hex digits}}"
            )
    if not isinstance(obj.get("layout", {}), dict):
        raise CheckpointError(path, f"{manifest}: layout is not an object")
    return obj


def load_weights_only(path: Path, rel: str) -> Any:
    """A small part of the checkpoint at `path`, through `torch.load(weights_only=True)`."""
    file = contained(path, rel, "file")
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol before refusing it
            warnings.simplefilter("ignore")
            return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read this file is the same answer to the user
        if isinstance(e, pickle.UnpicklingError) and "weights only" in str(e).lower():
            raise CheckpointError(
                path,
                f"{rel} is not a weights-only file (it holds pickled objects); "
                "this checkpoint cannot be loaded safely",
            ) from None
        raise CheckpointError(path, f"{rel} cannot be read ({one_line(e)})") from None


def check_free_space(ckpt_dir: str | Path, needed_bytes: int) -> None:
    """Refuse, in one line, a `checkpoint.dir` whose file system has less than `needed_bytes` free
    (measured on its nearest existing ancestor, since the directory may not exist yet)."""
    probe = Path(ckpt_dir).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes:
        raise ConfigError(
            "checkpoint.dir",
            f"checkpoint.dir={ckpt_dir}: a checkpoint needs about {needed_bytes:,} bytes "
            f"({needed_bytes / 2**30:.2f} GiB) but only {free:,} bytes ({free / 2**30:.2f} GiB) are free "
            f"on {probe} (free some space, lower checkpoint.keep_last, or point checkpoint.dir elsewhere)",
        )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


# ---- finding and verifying ---------------------------------------------------------------------


def scan_step_dirs(ckpt_dir: str | Path) -> tuple[list[tuple[int, Path]], list[str]]:
    """Renamed (`step-N`) checkpoint directories, oldest first, and one line for each other
    `step-*` entry, which is ignored: `.tmp` leftovers, symbolic links, misnamed entries."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return [], []
    found, ignored = [], []
    for p in sorted(root.iterdir()):
        m = STEP_DIR.match(p.name)
        if not p.name.startswith("step-"):
            continue
        if p.name.endswith(".tmp"):
            ignored.append(f"checkpoint {p} is incomplete (a save that did not finish): ignored")
        elif p.is_symlink():
            ignored.append(f"checkpoint {p} is a symbolic link (to {os.readlink(p)}): ignored, never pruned")
        elif m is None or p.name != f"step-{int(m.group(1))}":
            ignored.append(f"{p} is not named step-<N>: ignored (rename or remove it)")
        elif not p.is_dir():
            ignored.append(f"{p} is not a directory: ignored (remove it)")
        else:
            found.append((int(m.group(1)), p))
    return sorted(found), ignored


def step_dirs(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """Renamed (`step-N`) checkpoint directories, oldest first; `.tmp` leftovers and links are not listed."""
    return scan_step_dirs(ckpt_dir)[0]


def verify(path: Path, checksums: bool = True) -> str | None:
    """None if the checkpoint at `path` is complete and intact, else what is wrong (one line).
    Reads nothing outside `path`: every entry is checked for containment before any is opened."""
    if not os.path.lexists(path / MANIFEST):
        return "no manifest.json (the save did not finish)"
    try:
        _verify(path, checksums)
    except CheckpointError as e:
        return e.problem
    except OSError as e:  # e.g. a file this user may not read
        return f"cannot be read ({e.strerror or one_line(e)}: {e.filename})"
    return None


def _verify(path: Path, checksums: bool) -> None:
    from trainer.checkpoint.storage import METADATA_FILE, storage_files  # storage imports this module

    manifest = read_manifest(path, MANIFEST, FORMAT_VERSION)
    m = STEP_DIR.match(path.name)
    if m and int(m.group(1)) != manifest["step"]:
        raise CheckpointError(
            path, f"is named {path.name} but its manifest.json says step {manifest['step']}"
        )
    files: dict[str, dict[str, Any]] = manifest["files"]
    index = f"{SHARDED}/{METADATA_FILE}"
    if index not in files:
        raise CheckpointError(path, f"manifest.json lists no {index}")
    resolved = {rel: contained(path, rel, "manifest.json entry") for rel in files}
    for rel, f in resolved.items():
        if not f.is_file():
            raise CheckpointError(path, f"{rel} is missing")
        if f.stat().st_size != files[rel]["bytes"]:
            raise CheckpointError(
                path,
                f"{rel} has {f.stat().st_size} bytes, the manifest says {files[rel]['bytes']} (truncated?)",
            )
    if checksums:
        for rel, f in resolved.items():
            if sha256_file(f) != files[rel]["sha256"]:
                raise CheckpointError(path, f"{rel} does not match its checksum (corrupted)")
    # The index is checked against the files on disk (extents); each must be in the manifest too,
    # or a rank's shards went missing from where rank 0 listed the files.
    for name in storage_files(path / SHARDED):
        if f"{SHARDED}/{name}" not in files:
            raise CheckpointError(path, f"{index} names {SHARDED}/{name}, which manifest.json does not list")
