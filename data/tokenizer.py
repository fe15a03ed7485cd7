"""An existing tokenizer for `python -m data.prepare --tokenizer PATH`: load it, find its
end-of-document token, and copy its files into the dataset dir so a model exported later can ship
the tokenizer its data was made with.

PATH is a `tokenizers` JSON file, or a directory holding a transformers tokenizer (a Hugging Face
model's tokenizer.json, optionally with tokenizer_config.json / special_tokens_map.json) or a
dataset dir made by data.prepare. Only `tokenizers` is needed; a directory with just a
sentencepiece tokenizer.model is converted with transformers when that is installed.

The end-of-document (EOD) token is the first of: `--eod-token`; the eod_token a prepared dataset's
metadata.json records; `eos_token` in tokenizer_config.json, then in special_tokens_map.json; our
own `<|eod|>` if the vocab has it. It must already be in the vocab: adding one would give the data
a token id that the model's own tokenizer does not know.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from data.errors import DataError

EOD_TOKEN = "<|eod|>"  # the EOD of the tokenizers data.prepare trains
# What a transformers tokenizer dir can hold (tokenizer.json first: the one data.prepare reads).
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)
_FLAG_HINT = "pass --eod-token TEXT, a token of its vocab (e.g. its EOS token)"


@dataclass(frozen=True)
class ExistingTokenizer:
    tokenizer: Tokenizer  # truncation and padding off: documents are encoded whole
    eod_token: str
    eod_id: int
    vocab_size: int  # the id range, which the model's embedding must cover
    eod_from: str  # where eod_token was found, for metadata.json
    converted: bool  # tokenizer.json was made from a sentencepiece model, so is not among the files


def tokenizer_vocab_size(tok: Tokenizer) -> int:
    """Ids the tokenizer can emit: max id + 1 (a token count would undercount a vocab with holes)."""
    ids = tok.get_vocab(with_added_tokens=True).values()
    return max(tok.get_vocab_size(with_added_tokens=True), max(ids, default=-1) + 1)


def _one_line(e: Exception) -> str:
    text, kind = str(e).strip(), type(e).__name__
    if not text:
        return kind
    return text.splitlines()[0] if kind == "Exception" else f"{kind}: {text.splitlines()[0]}"


def _from_file(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exception on a bad file
        raise DataError(
            f"data: cannot load tokenizer {path} ({_one_line(e)}); pass a valid tokenizers JSON file "
            "(transformers: AutoTokenizer.from_pretrained(...).save_pretrained(DIR) writes one)"
        ) from None


def _from_sentencepiece(directory: Path) -> tuple[Tokenizer, str | None]:
    """tokenizer.model converted by transformers (its fast tokenizer) and the EOS it knows of."""
    model = directory / "tokenizer.model"
    fix = f"or write {directory}/tokenizer.json with AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)"
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise DataError(
            f"data: {model} is a sentencepiece model and {directory} has no tokenizer.json; "
            f"pip install transformers sentencepiece to convert it, {fix}"
        ) from None
    try:
        fast = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        tok = Tokenizer.from_str(fast.backend_tokenizer.to_str())
    except Exception as e:  # transformers fails in many ways here (missing extras, bad files)
        raise DataError(f"data: cannot convert {model} with transformers ({_one_line(e)}); {fix}") from None
    return tok, fast.eos_token


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
        if not isinstance(d, dict):
            raise ValueError("expected a JSON object")
        return d
    except (OSError, ValueError) as e:
        raise DataError(f"data: cannot read {path} ({_one_line(e)}); fix it or delete it") from None


def _eos_in(path: Path) -> str | None:
    eos = _read_json(path).get("eos_token") if path.is_file() else None
    if isinstance(eos, dict):  # transformers' AddedToken form
        eos = eos.get("content")
    return eos if isinstance(eos, str) and eos else None


def _eod_candidates(directory: Path) -> list[tuple[str | None, str]]:
    """(token or None, where it was looked for) from the files of a tokenizer dir, by precedence."""
    out: list[tuple[str | None, str]] = []
    meta_path = directory / "metadata.json"
    meta = _read_json(meta_path) if meta_path.is_file() else {}
    if meta.get("format") == "moeforge-tokens":  # a prepared dataset: the EOD its data was made with
        out.append((meta.get("eod_token"), f"{meta_path} eod_token"))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        out.append((_eos_in(directory / name), f"{directory / name} eos_token"))
    return out


def load_tokenizer(path: Path, eod_token: str | None = None) -> ExistingTokenizer:
    """The tokenizer at `path` (a tokenizers JSON file or a tokenizer dir) with its EOD token.

    Raises a one-line DataError naming the file for a missing path, a dir without a usable
    tokenizer, a corrupt file, or an EOD token that is not given, not found or not in the vocab.
    """
    path = Path(path)
    candidates: list[tuple[str | None, str]] = [(eod_token, "--eod-token")]
    converted = False
    if path.is_dir():
        tok_file = path / "tokenizer.json"
        if tok_file.is_file():
            tok = _from_file(tok_file)
            candidates += _eod_candidates(path)
        elif (path / "tokenizer.model").is_file():
            tok_file, converted = path / "tokenizer.model", True
            tok, eos = _from_sentencepiece(path)
            candidates += [*_eod_candidates(path), (eos, f"{tok_file} (transformers' eos_token)")]
        else:
            raise DataError(
                f"data: tokenizer dir {path} has no tokenizer.json (nor a sentencepiece tokenizer.model); "
                "pass a tokenizers JSON file or a dir holding one"
            )
        not_found = (
            f"{path / 'tokenizer_config.json'} (or special_tokens_map.json) names no eos_token "
            f"and {tok_file} has no {EOD_TOKEN}; {_FLAG_HINT}"
        )
    elif path.is_file():
        tok_file, tok = path, _from_file(path)
        not_found = (
            f"{path} has no {EOD_TOKEN}; {_FLAG_HINT}, or pass its dir if a tokenizer_config.json "
            "there names eos_token"
        )
    else:
        raise DataError(
            f"data: tokenizer {path} does not exist; pass --tokenizer a tokenizers JSON file or a "
            "transformers tokenizer dir (tokenizer.json [+ tokenizer_config.json])"
        )
    if tok.token_to_id(EOD_TOKEN) is not None:
        candidates.append((EOD_TOKEN, f"{tok_file} ({EOD_TOKEN})"))
    found = next(((t, where) for t, where in candidates if t), None)
    if found is None:
        raise DataError(f"data: no end-of-document token: {not_found}")
    eod, eod_from = found
    eod_id, size = tok.token_to_id(eod), tokenizer_vocab_size(tok)
    if eod_id is None or not 0 <= eod_id < size:
        raise DataError(
            f"data: end-of-document token {eod!r} (from {eod_from}) is not in the vocab of {tok_file}; "
            f"{_FLAG_HINT}"
        )
    tok.no_truncation()  # a hub tokenizer.json may carry the model's max length; documents stay whole
    tok.no_padding()
    return ExistingTokenizer(tok, eod, eod_id, size, eod_from, converted)


def copy_tokenizer_files(src_dir_or_file: Path, dst_dir: Path) -> list[str]:
    """Copy the TOKENIZER_FILES present in `src_dir_or_file` (a tokenizer dir or a prepared
    dataset dir) into `dst_dir` (created if missing); returns their names, [] if none is there.

    A single file keeps its name if it is one of TOKENIZER_FILES, else it is taken for a tokenizers
    JSON and copied as tokenizer.json.
    """
    src, dst = Path(src_dir_or_file), Path(dst_dir)
    if src.is_dir():
        pairs = [(src / name, name) for name in TOKENIZER_FILES if (src / name).is_file()]
    elif src.is_file():
        pairs = [(src, src.name if src.name in TOKENIZER_FILES else "tokenizer.json")]
    else:
        raise DataError(
            f"data: tokenizer source {src} does not exist; pass a tokenizer dir, file or dataset dir"
        )
    dst.mkdir(parents=True, exist_ok=True)
    for path, name in pairs:
        shutil.copyfile(path, dst / name)
    return [name for _, name in pairs]
