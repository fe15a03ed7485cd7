"""Bad inputs at the data and checkpoint edges: damaged prepared datasets and Megatron files
given to `python -m trainer`, `python -m data.prepare` misused, and checkpoints that are damaged,
tampered with or incompatible, met by resume and by `python -m trainer.checkpoint`. See harness.py
for what every case must satisfy."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.edges.conftest import BASE
from tests.edges.harness import Case, case, params, run_case

STEP = "{run}/checkpoints/step-2"


def trainer(id: str, overrides: str, names: str, **kw: object) -> Case:
    return case(id, "trainer", [*BASE, *overrides.split()], names, **kw)


# ---- damaging a prepared dataset ------------------------------------------------------------------


def _meta(ws: Path) -> dict:
    return json.loads((ws / "ds" / "metadata.json").read_text())


def _edit_meta(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        meta = _meta(ws)
        edit(meta)
        (ws / "ds" / "metadata.json").write_text(json.dumps(meta))

    return setup


def _first_shard(ws: Path) -> Path:
    return ws / "ds" / "train" / _meta(ws)["splits"]["train"]["shards"][0]["file"]


def _rewrite_shard(column: Callable[[pa.Array], pa.Array]) -> Callable[[Path], None]:
    """Replace the first train shard's token column, keeping metadata.json consistent with the new
    file (bytes, recorded id range) so that only the column itself is wrong."""

    def setup(ws: Path) -> None:
        path = _first_shard(ws)
        tokens = pq.read_table(path).column("tokens").combine_chunks()
        pq.write_table(pa.table({"tokens": column(tokens)}), path)
        meta = _meta(ws)
        entry = meta["splits"]["train"]["shards"][0]
        entry["bytes"] = path.stat().st_size
        values = np.asarray(column(tokens).flatten()) if pa.types.is_list(column(tokens).type) else None
        if values is not None and values.dtype.kind == "i" and len(values):
            entry["min_token_id"], entry["max_token_id"] = int(values.min()), int(values.max())
        (ws / "ds" / "metadata.json").write_text(json.dumps(meta))

    return setup


def _with_id(value: int) -> Callable[[pa.Array], pa.Array]:
    def column(tokens: pa.Array) -> pa.Array:
        values = np.asarray(tokens.flatten()).astype(np.int64)
        values[len(values) // 2] = value
        return pa.ListArray.from_arrays(tokens.offsets, pa.array(values, pa.int64()))

    return column


def _flat(tokens: pa.Array) -> pa.Array:
    return tokens.flatten()


def _floats(tokens: pa.Array) -> pa.Array:
    return pa.ListArray.from_arrays(tokens.offsets, tokens.flatten().cast(pa.float32()))


def _truncate(ws: Path) -> None:
    path = _first_shard(ws)
    path.write_bytes(path.read_bytes()[:100])


def _empty(ws: Path) -> None:
    _first_shard(ws).write_bytes(b"")


def _remove(ws: Path) -> None:
    _first_shard(ws).unlink()


def _shard_is_dir(ws: Path) -> None:
    path = _first_shard(ws)
    path.unlink()
    path.mkdir()


def _not_json(ws: Path) -> None:
    (ws / "ds" / "metadata.json").write_text("{not json")


def _megatron_without_idx(ws: Path) -> None:
    (ws / "mega.bin").write_bytes(np.arange(100, dtype=np.int32).tobytes())


def _shard_entry(key: str, value: object) -> Callable[[dict], None]:
    return lambda meta: meta["splits"]["train"]["shards"][0].__setitem__(key, value)


DATA = [
    trainer("token-id-at-vocab", "", "train/", setup=_rewrite_shard(_with_id(512))),
    trainer("token-id-negative", "", "train/", setup=_rewrite_shard(_with_id(-3))),
    trainer("token-id-past-int32", "", "train/", setup=_rewrite_shard(_with_id(2**33))),
    trainer("token-column-flat-ints", "", "train/", setup=_rewrite_shard(_flat)),
    trainer("token-column-list-of-floats", "", "train/", setup=_rewrite_shard(_floats)),
    trainer("token-column-floats", "", "train/", setup=_rewrite_shard(lambda t: _floats(t).flatten())),
    trainer("shard-truncated", "", "train/", setup=_truncate),
    trainer("shard-zero-bytes", "", "train/", setup=_empty),
    trainer("shard-missing", "", "train/", setup=_remove),
    trainer("shard-is-a-directory", "", "train/", setup=_shard_is_dir),
    trainer("metadata-not-json", "", "metadata.json", setup=_not_json),
    trainer(
        "metadata-future-format", "", "metadata.json", setup=_edit_meta(lambda m: m.update(format_version=99))
    ),
    trainer("metadata-eod-at-vocab", "", "metadata.json", setup=_edit_meta(lambda m: m.update(eod_id=512))),
    trainer(
        "metadata-vocab-a-string", "", "metadata.json", setup=_edit_meta(lambda m: m.update(vocab_size="512"))
    ),
    trainer(
        "metadata-shard-outside", "", "metadata.json", setup=_edit_meta(_shard_entry("file", "../../file"))
    ),
    trainer(
        "metadata-shard-absolute", "", "metadata.json", setup=_edit_meta(_shard_entry("file", "/etc/passwd"))
    ),
    trainer("metadata-recorded-max-id", "", "train/", setup=_edit_meta(_shard_entry("max_token_id", 9999))),
    trainer("metadata-docs-a-float", "", "metadata.json", setup=_edit_meta(_shard_entry("num_docs", 1.5))),
    trainer("model-vocab-below-data", "model.vocab_size=100", "model.vocab_size"),
    trainer("source-is-a-file", "data.sources=[{path:'{ws}/file'}]", "data.sources[0].path"),
    trainer("source-missing", "data.sources=[{path:'{ws}/nothing'}]", "data.sources[0].path"),
    trainer(
        "megatron-without-idx",
        "data.sources=[{path:'{ws}/mega',format:megatron}]",
        "data.sources[0].path",
        setup=_megatron_without_idx,
    ),
    trainer("source-format-unknown", "data.sources=[{path:'{ds}',format:arrow}]", "data.sources[0].format"),
]


def prepare(id: str, args: str, names: str, **kw: object) -> Case:
    return case(id, "data.prepare", ["--input", "{ds}/tokenizer.json", *args.split()], names, **kw)


PREPARE = [
    prepare("prepare-vocab-zero", "--output {ws}/new --vocab-size 0", "vocab"),
    prepare("prepare-vocab-below-bytes", "--output {ws}/new --vocab-size 100", "vocab"),
    prepare("prepare-output-under-a-file", "--output {ws}/file/new", "--output"),
    prepare("prepare-output-exists", "--output {ds}", "{ds}"),
    prepare("prepare-output-unwritable", "--output /proc/moeforge/new", "--output"),
    prepare("prepare-val-fraction-above-one", "--output {ws}/new --val-fraction 1.5", "val_fraction"),
    prepare(
        "prepare-tokenizer-missing",
        "--output {ws}/new --tokenizer {ws}/no-tokenizer.json",
        "no-tokenizer.json",
    ),
    prepare("prepare-flag-misspelt", "--output {ws}/new --vocabsize 300", "--vocabsize"),
    case("prepare-input-matches-nothing", "data.prepare", "--input {ws}/*.txt --output {ws}/new", "--input"),
]


# ---- damaging the trained checkpoint -------------------------------------------------------------


def _step(ws: Path) -> Path:
    return ws / "run" / "checkpoints" / "step-2"


def _manifest(ws: Path) -> dict:
    return json.loads((_step(ws) / "manifest.json").read_text())


def _edit_manifest(edit: Callable[[dict, Path], None]) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        manifest = _manifest(ws)
        edit(manifest, ws)
        (_step(ws) / "manifest.json").write_text(json.dumps(manifest))

    return setup


def _outside_entry(rel: str) -> Callable[[dict, Path], None]:
    """A manifest entry `rel` whose size and sha256 are those of the workspace's regular file, so
    only its place (outside the checkpoint) is wrong."""

    def edit(manifest: dict, ws: Path) -> None:
        import hashlib

        data = (ws / "file").read_bytes()
        manifest["files"][rel.replace("{ws}", str(ws))] = {
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }

    return edit


def _pickled_progress(ws: Path) -> None:
    """progress.pt replaced by a pickle of an arbitrary object, its checksum updated to match."""
    import hashlib
    import pickle

    path = _step(ws) / "progress.pt"
    path.write_bytes(pickle.dumps(os.getcwd))
    manifest = _manifest(ws)
    manifest["files"]["progress.pt"] = {
        "bytes": path.stat().st_size,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }
    (_step(ws) / "manifest.json").write_text(json.dumps(manifest))


def _index_outside(ws: Path) -> None:
    """A DCP index entry pointing out of the checkpoint; the manifest updated to match the index."""
    import hashlib

    index = _step(ws) / "sharded" / ".metadata.json"
    meta = json.loads(index.read_text())
    meta["storage"][0]["path"] = "../../../../file"
    index.write_text(json.dumps(meta))
    manifest = _manifest(ws)
    data = index.read_bytes()
    manifest["files"]["sharded/.metadata.json"] = {
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    (_step(ws) / "manifest.json").write_text(json.dumps(manifest))


def _lose_shard(ws: Path) -> None:
    (_step(ws) / "sharded" / "__0_0.distcp").unlink()


def ckpt_cli(id: str, args: str, names: str, **kw: object) -> Case:
    return case(id, "trainer.checkpoint", args, names, **kw)


CHECKPOINTS = [
    trainer("resume-other-model-size", "model.dim=128", "checkpoint.dir"),
    trainer("resume-other-expert-count", "model.moe.num_experts=4", "checkpoint.dir"),
    trainer("resume-pickle-in-a-part", "", "progress.pt", setup=_pickled_progress),
    ckpt_cli("verify-missing-dir", "verify {ws}/nothing", "{ws}/nothing"),
    ckpt_cli("verify-a-file", "verify {ws}/file", "{ws}/file"),
    ckpt_cli("verify-no-checkpoints", "verify {ds}", "{ds}"),
    ckpt_cli("list-missing-dir", "list {ws}/nothing", "{ws}/nothing"),
    ckpt_cli("convert-output-exists", f"convert {STEP} {{ws}}/file", "{ws}/file"),
    ckpt_cli("convert-output-dir-missing", f"convert {STEP} {{ws}}/no/dir/model.pt", "{ws}/no/dir"),
    ckpt_cli("convert-random-files", "convert {ds} {ws}/model.pt", "{ds}"),
    ckpt_cli(
        "convert-manifest-dotdot",
        f"convert {STEP} {{ws}}/model.pt",
        "../../../file",
        setup=_edit_manifest(_outside_entry("../../../file")),
    ),
    ckpt_cli(
        "convert-manifest-absolute",
        f"convert {STEP} {{ws}}/model.pt",
        "{ws}/file",
        setup=_edit_manifest(_outside_entry("{ws}/file")),
    ),
    ckpt_cli(
        "convert-index-outside", f"convert {STEP} {{ws}}/model.pt", "../../../../file", setup=_index_outside
    ),
    ckpt_cli(
        "convert-manifest-files-a-list",
        f"convert {STEP} {{ws}}/model.pt",
        "manifest.json",
        setup=_edit_manifest(lambda m, ws: m.update(files=sorted(m["files"]))),
    ),
    ckpt_cli(
        "convert-manifest-size-a-string",
        f"convert {STEP} {{ws}}/model.pt",
        "manifest.json",
        setup=_edit_manifest(lambda m, ws: m["files"]["progress.pt"].update(bytes="12")),
    ),
    ckpt_cli("convert-shard-lost", f"convert {STEP} {{ws}}/model.pt", "__0_0.distcp", setup=_lose_shard),
    ckpt_cli("command-unknown", "inspect {ws}", "inspect"),
]


@pytest.mark.parametrize("c", params(DATA, PREPARE, CHECKPOINTS))
def test_bad_data_or_checkpoint_is_one_line_and_writes_nothing(
    c: Case, ws: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run_case(c, ws, capfd, monkeypatch)
