"""Turn text files into a tokenized dataset: a tokenizer plus Parquet token shards.

Run, training a byte-level BPE tokenizer (EOD token `<|eod|>`) on the train split:
    python -m data.prepare --input 'corpus/**/*.txt' [--input ...] --output DIR \
        [--vocab-size 4096] [--val-fraction 0.02] [--seed 0]
or with an existing tokenizer, e.g. that of a model imported from Hugging Face:
    python -m data.prepare --input ... --output DIR --tokenizer HF_MODEL_DIR [--eod-token '</s>']

--tokenizer takes a tokenizers JSON file or a transformers tokenizer dir (tokenizer.json, optionally
tokenizer_config.json / special_tokens_map.json); its EOS token ends documents unless --eod-token
names another, and the vocab is the tokenizer's (no --vocab-size). See data/tokenizer.py.

Each input file is one document. Writes DIR/tokenizer.json (and, from an existing tokenizer dir,
its other files: tokenizer_config.json, ...), DIR/train/shard-00000.parquet ...,
DIR/val/shard-00000.parquet ... (one row per document, column `tokens`: list<int32>, no EOD or
other special token inside; readers insert the EOD) and DIR/metadata.json (vocab_size, eod_token,
eod_id, tokenizer_files, splits with each shard's min/max_token_id, sources). Everything is
built in DIR.tmp-<pid> and renamed into place at the end, so a dataset dir that exists is a
complete one; a bad tokenizer or input is reported before anything is written, and any failure
(an unwritable --output, a full disk) is one line on stderr, exit code 2, with nothing left behind.

`ensure_default_corpus(cfg)` prepares the embedded default corpus (the running interpreter's
standard library) into cfg.cache_dir once, safely when several ranks call it at the same time.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import shutil
import sys
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data.config import DataConfig
from data.dataset import FORMAT_VERSION
from data.errors import DataError, OneLineArgumentParser
from data.tokenizer import EOD_TOKEN, copy_tokenizer_files, load_tokenizer, tokenizer_vocab_size

DEFAULT_VOCAB_SIZE = DataConfig.tokenizer_vocab_size  # --vocab-size when neither it nor --tokenizer is given
SHARD_TOKENS = 1 << 20  # ~4 MB of int32 per shard: a few shards for the default corpus
# A byte-level BPE holds the 256 byte tokens plus <|eod|>; BpeTrainer silently grows a smaller vocab.
MIN_VOCAB_SIZE = len(pre_tokenizers.ByteLevel.alphabet()) + 1
ENCODE_BATCH = 256  # documents per encode_batch call: parallel, yet memory stays bounded
# Left out of the default corpus to keep the quickstart fast (these are ~half the stdlib's source).
_EXCLUDED_STDLIB_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "tkinter"}


def default_corpus_files() -> list[Path]:
    """The running interpreter's standard-library `.py` files (~11 MB on CPython 3.11)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(
        p
        for p in root.rglob("*.py")
        if not _EXCLUDED_STDLIB_DIRS.intersection(p.relative_to(root).parts[:-1])
    )


def default_corpus_dir(cfg: DataConfig) -> Path:
    v = sys.version_info
    name = f"stdlib-py{v.major}{v.minor}-v{cfg.tokenizer_vocab_size}-val{cfg.val_fraction:g}"
    return Path(os.path.expanduser(cfg.cache_dir)) / name


def ensure_default_corpus(cfg: DataConfig) -> Path:
    """Return the prepared default corpus, preparing it on first use.

    Ranks race here on a fresh machine: an exclusive flock serialises them, the first prepares and
    the others then find metadata.json in place. (flock on network file systems is only as good
    as the file system's lock support.)
    """
    out = default_corpus_dir(cfg)
    if (out / "metadata.json").exists():
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        lock = open(out.parent / f"{out.name}.lock", "w")
    except OSError as e:
        raise DataError(
            f"data: cannot create the default corpus cache in {out.parent} ({e.strerror or e}); "
            "set data.cache_dir to a writable directory"
        ) from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        if not (out / "metadata.json").exists():
            # Left by a preparer that was killed; we hold the lock, so nobody is writing them.
            for stale in out.parent.glob(f"{out.name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            stdlib = sysconfig.get_paths()["stdlib"]
            prepare(
                default_corpus_files(),
                out,
                vocab_size=cfg.tokenizer_vocab_size,
                val_fraction=cfg.val_fraction,
                seed=0,
                inputs=[f"{stdlib}/**/*.py (Python standard library, minus {sorted(_EXCLUDED_STDLIB_DIRS)})"],
            )
    return out


def _read_text(path: Path) -> str:
    try:
        # A stray non-UTF-8 byte should not sink a whole corpus; it becomes U+FFFD.
        return path.read_bytes().decode("utf-8", errors="replace")
    except OSError as e:
        raise DataError(f"data: cannot read input file {path} ({e.strerror}); fix or remove it") from None


def train_tokenizer(files: Sequence[Path], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (any byte sequence is encodable) with <|eod|> reserved as id 0."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((_read_text(p) for p in files), trainer, length=len(files))
    return tok


def split_of(rel_path: str, seed: int, val_fraction: float) -> str:
    """'val' for about val_fraction of documents, decided by a hash so it never depends on order."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{rel_path}".encode()).digest()[:8], "big")
    return "val" if h / 2**64 < val_fraction else "train"


class _ShardWriter:
    """Buffers documents of one split and writes a Parquet shard every ~shard_tokens tokens."""

    def __init__(self, split_dir: Path, shard_tokens: int) -> None:
        self.dir, self.shard_tokens = split_dir, shard_tokens
        self.dir.mkdir(parents=True)
        self.docs: list[np.ndarray] = []
        self.shards: list[dict] = []

    def add(self, ids: np.ndarray) -> None:
        self.docs.append(ids)
        if sum(len(d) for d in self.docs) >= self.shard_tokens:
            self._flush()

    def _flush(self) -> None:
        if not self.docs:
            return
        offsets = np.zeros(len(self.docs) + 1, dtype=np.int32)
        np.cumsum([len(d) for d in self.docs], out=offsets[1:])
        flat = np.concatenate(self.docs)
        tokens = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.int32()))
        name = f"shard-{len(self.shards):05d}.parquet"
        pq.write_table(pa.table({"tokens": tokens}), self.dir / name)
        self.shards.append(
            {
                "file": name,
                "bytes": (self.dir / name).stat().st_size,
                "num_docs": len(self.docs),
                "num_tokens": int(offsets[-1]),
                # Readers check these against the vocab on open (null: a shard of empty documents).
                "min_token_id": int(flat.min()) if len(flat) else None,
                "max_token_id": int(flat.max()) if len(flat) else None,
            }
        )
        self.docs = []

    def close(self) -> dict:
        self._flush()
        return {
            "num_docs": sum(s["num_docs"] for s in self.shards),
            "num_tokens": sum(s["num_tokens"] for s in self.shards),
            "shards": self.shards,
        }


def _batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _check_vocab_size(vocab_size: int | None, output: Path) -> None:
    if vocab_size is None:
        raise DataError(
            f"data: no vocab size for the tokenizer of {output}; pass --vocab-size or --tokenizer"
        )
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise DataError(
            f"data: vocab size {vocab_size} for the tokenizer of {output} is too small: a byte-level BPE needs "
            f"at least {MIN_VOCAB_SIZE} (256 byte tokens + {EOD_TOKEN}); pass --vocab-size {MIN_VOCAB_SIZE} or "
            "more (data.tokenizer_vocab_size for the default corpus)"
        )


def _make_dir(tmp: Path, output: Path) -> list[Path]:
    """Create `tmp` (and its missing parents, which are returned, deepest first, for cleanup)."""
    missing, ancestor = [], tmp.parent
    while not ancestor.exists():
        missing.append(ancestor)
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise DataError(
            f"data: --output {output}: {ancestor} is a file, not a directory; choose another --output"
        )
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        _remove_dirs(missing)
        raise DataError(
            f"data: --output {output} cannot be created ({e.strerror or e}: {e.filename or ancestor}); "
            "choose a writable --output"
        ) from None
    return missing


def _remove_dirs(dirs: list[Path]) -> None:
    for d in dirs:  # deepest first; only the empty ones we made
        try:
            d.rmdir()
        except OSError:
            break


def _save_tokenizer(tok: Tokenizer, path: Path) -> None:
    try:
        tok.save(str(path))
    except Exception as e:  # tokenizers raises plain Exception on an I/O error
        raise OSError(f"cannot write {path}: {e}") from None


def prepare(
    files: Sequence[Path],
    output: Path,
    *,
    vocab_size: int | None = None,
    val_fraction: float,
    seed: int,
    tokenizer: Path | None = None,
    eod_token: str | None = None,
    inputs: Sequence[str] = (),
    shard_tokens: int = SHARD_TOKENS,
) -> dict:
    """Tokenize `files` (one document each) into the dataset dir `output`; returns its metadata.

    Trains a BPE tokenizer of `vocab_size` tokens unless `tokenizer` (a file or dir, see
    data/tokenizer.py) is given; then `vocab_size` is ignored and `eod_token` overrides its EOS.
    """
    output = Path(output)
    if not files:
        raise DataError(f"data: no input files for {output}; check the --input globs {list(inputs)}")
    if output.exists():
        raise DataError(f"data: output {output} already exists; delete it or choose another --output")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(
            f"data: val_fraction (--val-fraction) must be in [0, 1), got {val_fraction}; use e.g. 0.02"
        )
    if tokenizer is None:
        _check_vocab_size(vocab_size, output)
    existing = load_tokenizer(tokenizer, eod_token) if tokenizer is not None else None
    files = sorted(Path(f).resolve() for f in files)
    root = Path(os.path.commonpath([f.parent for f in files]))
    rel = [f.relative_to(root).as_posix() for f in files]
    splits = [split_of(r, seed, val_fraction) for r in rel]
    if val_fraction > 0 and "val" not in splits and len(files) > 1:
        # Tiny corpora: still hold out one document (the one the hash put closest to val).
        keys = [hashlib.sha256(f"{seed}:{r}".encode()).digest() for r in rel]
        splits[keys.index(min(keys))] = "val"

    tmp = output.with_name(f"{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    made = _make_dir(tmp, output)
    try:
        if existing is not None:
            tok, eod, eod_id = existing.tokenizer, existing.eod_token, existing.eod_id
            tokenizer_files = copy_tokenizer_files(tokenizer, tmp)
            if existing.converted:  # from a sentencepiece model: the tokenizer.json we read is ours
                _save_tokenizer(tok, tmp / "tokenizer.json")
                tokenizer_files.insert(0, "tokenizer.json")
        else:
            tok = train_tokenizer([f for f, s in zip(files, splits) if s == "train"], vocab_size)
            _save_tokenizer(tok, tmp / "tokenizer.json")
            tokenizer_files, eod, eod_id = ["tokenizer.json"], EOD_TOKEN, tok.token_to_id(EOD_TOKEN)
        writers = {s: _ShardWriter(tmp / s, shard_tokens) for s in ("train", "val")}
        for batch in _batches(list(zip(files, splits)), ENCODE_BATCH):
            encodings = tok.encode_batch([_read_text(f) for f, _ in batch], add_special_tokens=False)
            for (_, split), enc in zip(batch, encodings):
                writers[split].add(np.asarray(enc.ids, dtype=np.int32))
        meta = {
            "format": "moeforge-tokens",
            "format_version": FORMAT_VERSION,
            "tokenizer": "tokenizer.json",
            "tokenizer_files": tokenizer_files,  # what an exported model ships (copy_tokenizer_files)
            "vocab_size": tokenizer_vocab_size(tok),
            "eod_token": eod,
            "eod_id": eod_id,
            "splits": {s: w.close() for s, w in writers.items()},
            "sources": {
                "inputs": list(inputs),
                "root": str(root),
                "num_files": len(files),
                "num_bytes": sum(f.stat().st_size for f in files),
                "val_fraction": val_fraction,
                "split_seed": seed,
                "tokenizer": str(tokenizer)
                if existing
                else f"byte-level BPE trained on the train split, vocab {vocab_size}",
                "eod_token_from": existing.eod_from if existing else "the trained tokenizer",
            },
        }
        (tmp / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
        os.rename(tmp, output)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_dirs(made)
        if isinstance(e, OSError):  # disk full, permissions changed underneath, output appeared meanwhile...
            where = f": {e.filename}" if e.filename else ""
            raise DataError(
                f"data: preparing --output {output} failed ({e.strerror or e}{where}); nothing was written, "
                "fix that and re-run"
            ) from None
        raise
    return meta


def main(argv: Sequence[str] | None = None) -> int:
    p = OneLineArgumentParser(prog="python -m data.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--input", action="append", required=True, help="glob of text files (** recurses); repeatable"
    )
    p.add_argument("--output", required=True, type=Path, help="dataset dir to create (must not exist)")
    p.add_argument(
        "--vocab-size",
        type=int,
        help=f"BPE vocab to train (default {DEFAULT_VOCAB_SIZE}); not with --tokenizer",
    )
    p.add_argument("--val-fraction", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0, help="salts the hash that assigns documents to train/val")
    p.add_argument(
        "--tokenizer",
        type=Path,
        help="use this tokenizer instead of training one: a tokenizers JSON file or a transformers tokenizer dir",
    )
    p.add_argument(
        "--eod-token", help="with --tokenizer: the end-of-document token (default: the tokenizer's eos_token)"
    )
    args = p.parse_args(argv)
    if args.tokenizer is not None and args.vocab_size is not None:
        p.error("--vocab-size cannot be used with --tokenizer: the vocab is the tokenizer's")
    if args.tokenizer is None and args.eod_token is not None:
        p.error("--eod-token needs --tokenizer: a trained tokenizer's end-of-document token is <|eod|>")
    files = sorted(
        {Path(f) for pattern in args.input for f in glob.glob(pattern, recursive=True) if Path(f).is_file()}
    )
    try:
        meta = prepare(
            files,
            args.output,
            vocab_size=DEFAULT_VOCAB_SIZE if args.vocab_size is None else args.vocab_size,
            val_fraction=args.val_fraction,
            seed=args.seed,
            tokenizer=args.tokenizer,
            eod_token=args.eod_token,
            inputs=args.input,
        )
    except DataError as e:
        print(f"moeforge: {e}", file=sys.stderr)  # e: "data: <what>; <fix>"
        return 2
    sp = meta["splits"]
    print(
        f"data: wrote {args.output}: vocab {meta['vocab_size']}, "
        f"train {sp['train']['num_docs']} docs / {sp['train']['num_tokens']} tokens, "
        f"val {sp['val']['num_docs']} docs / {sp['val']['num_tokens']} tokens"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
