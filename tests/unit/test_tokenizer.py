"""data.prepare with an existing tokenizer (a tokenizers JSON file or a transformers tokenizer dir):
the token ids are the tokenizer's, its EOS ends documents, metadata.json carries its vocab and the
dataset dir its files; and every bad tokenizer is a one-line DataError before anything is written."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import data.prepare as prep
from data import DataError, dataset_vocab_size
from data.config import DataConfig, DataSourceConfig
from data.dataset import ParquetTokens
from data.tokenizer import TOKENIZER_FILES, copy_tokenizer_files

SPECIALS = ["<unk>", "</s>", "<s>"]  # "</s>" is id 1: not the id 0 that our own <|eod|> gets
TEXTS = [
    "def f(x):\n    return x + 1\n",
    "The quick brown fox jumps over the lazy dog. ✓ héllo\n",
    "alpha beta gamma delta\n" * 5,
    "class A:\n    pass\n",
    "",  # an empty document stays an empty row
    "return the fox to the dog; jumps over alpha\n",
]


def _hub_tokenizer() -> Tokenizer:
    """A tiny byte-level BPE with Hugging Face style special tokens (no <|eod|>)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXTS, trainer)
    return tok


def _hf_dir(root: Path, config: dict | None = None) -> Path:
    """What a Hugging Face model dir holds for its tokenizer (as transformers' save_pretrained writes)."""
    d = root / "hf_model"
    d.mkdir()
    _hub_tokenizer().save(str(d / "tokenizer.json"))
    eos = {"content": "</s>", "special": True, "lstrip": False, "rstrip": False, "normalized": False}
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": eos}
    (d / "tokenizer_config.json").write_text(json.dumps(config if config is not None else cfg))
    (d / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": "<s>"}))
    return d


def _files(root: Path) -> list[Path]:
    paths = []
    for i, text in enumerate(TEXTS):
        p = root / "corpus" / f"doc{i}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
        paths.append(p)
    return paths


def _docs(ds: Path) -> list[list[int]]:
    meta = json.loads((ds / "metadata.json").read_text())
    return [
        d
        for split, info in meta["splits"].items()
        for s in info["shards"]
        for d in pq.read_table(ds / split / s["file"]).column("tokens").to_pylist()
    ]


def _prepare(tmp_path: Path, tokenizer: Path, **kw) -> dict:
    return prep.prepare(
        _files(tmp_path), tmp_path / "ds", val_fraction=0.3, seed=0, tokenizer=tokenizer, **kw
    )


def test_hf_tokenizer_dir(tmp_path: Path) -> None:
    hf = _hf_dir(tmp_path)
    meta = _prepare(tmp_path, hf)
    ds, tok = tmp_path / "ds", Tokenizer.from_file(str(hf / "tokenizer.json"))
    # The tokenizer has no post-processor, so encode(text).ids holds no special token either.
    assert sorted(_docs(ds)) == sorted(tok.encode(t).ids for t in TEXTS)
    assert meta["eod_token"] == "</s>" and meta["eod_id"] == tok.token_to_id("</s>") == 1
    assert meta["vocab_size"] == tok.get_vocab_size() == 300 and tok.token_to_id("<|eod|>") is None
    assert meta["sources"]["eod_token_from"] == f"{hf}/tokenizer_config.json eos_token"
    assert meta["tokenizer_files"] == ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    for name in meta["tokenizer_files"]:
        assert (ds / name).read_bytes() == (hf / name).read_bytes()
    # What the trainer checks model.vocab_size against, and the EOD the readers put between documents.
    assert dataset_vocab_size(DataConfig(sources=[DataSourceConfig(path=str(ds))])) == 300
    stream = ParquetTokens(ds / "train")
    assert stream.eod_id == 1 and (stream.tokens == 1).sum() == stream.num_docs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "ds", "hf_model"]  # no tmp dir left


def test_eos_from_special_tokens_map_and_flag(tmp_path: Path) -> None:
    hf = _hf_dir(tmp_path, config={"tokenizer_class": "PreTrainedTokenizerFast"})  # no eos_token in it
    meta = _prepare(tmp_path, hf)
    assert meta["eod_token"] == "</s>" and meta["sources"]["eod_token_from"].endswith(
        "special_tokens_map.json eos_token"
    )
    meta = prep.prepare(
        _files(tmp_path), tmp_path / "ds2", val_fraction=0.3, seed=0, tokenizer=hf, eod_token="<s>"
    )
    assert (meta["eod_token"], meta["eod_id"], meta["sources"]["eod_token_from"]) == ("<s>", 2, "--eod-token")


def test_tokenizers_json_file(tmp_path: Path, capsys) -> None:
    """Case (a): a bare tokenizers JSON file, under any name; it is copied as tokenizer.json."""
    tok_file = tmp_path / "my-tok.json"
    _hub_tokenizer().save(str(tok_file))
    _files(tmp_path)
    argv = ["--input", str(tmp_path / "corpus" / "*.txt"), "--output", str(tmp_path / "ds")]
    assert prep.main([*argv, "--tokenizer", str(tok_file)]) == 2  # no <|eod|>, no config, no flag
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tok_file) in err and "--eod-token" in err
    assert prep.main([*argv, "--tokenizer", str(tok_file), "--eod-token", "</s>"]) == 0
    meta = json.loads((tmp_path / "ds" / "metadata.json").read_text())
    assert (meta["eod_id"], meta["vocab_size"], meta["tokenizer_files"]) == (1, 300, ["tokenizer.json"])
    assert (tmp_path / "ds" / "tokenizer.json").read_bytes() == tok_file.read_bytes()
    tok = Tokenizer.from_file(str(tok_file))
    assert sorted(_docs(tmp_path / "ds")) == sorted(tok.encode(t).ids for t in TEXTS)
    with pytest.raises(SystemExit) as e:  # the vocab is the tokenizer's
        prep.main([*argv, "--tokenizer", str(tok_file), "--vocab-size", "300"])
    assert e.value.code == 2 and "--vocab-size" in capsys.readouterr().err


def test_own_tokenizer_file_and_prepared_dataset_dir(tmp_path: Path) -> None:
    """Our own tokenizers end documents with <|eod|>; a dataset dir serves as a tokenizer dir."""
    first = prep.prepare(_files(tmp_path), tmp_path / "a", vocab_size=300, val_fraction=0.3, seed=0)
    assert (
        first["eod_token"] == "<|eod|>"
        and first["eod_id"] == 0
        and first["tokenizer_files"] == ["tokenizer.json"]
    )
    again = prep.prepare(_files(tmp_path), tmp_path / "b", val_fraction=0.3, seed=0, tokenizer=tmp_path / "a")
    assert (again["eod_id"], again["vocab_size"]) == (0, first["vocab_size"])
    assert _docs(tmp_path / "b") == _docs(tmp_path / "a")
    hf = _hf_dir(tmp_path)
    _prepare(tmp_path, hf, eod_token="<s>")
    # From a dataset dir, the EOD its data was made with wins over the config's eos_token.
    again = prep.prepare(
        _files(tmp_path), tmp_path / "c", val_fraction=0.3, seed=0, tokenizer=tmp_path / "ds"
    )
    assert again["eod_token"] == "<s>" and again["sources"]["eod_token_from"].endswith(
        "metadata.json eod_token"
    )


def test_copy_tokenizer_files(tmp_path: Path) -> None:
    hf = _hf_dir(tmp_path)
    (hf / "chat_template.jinja").write_text("{{ messages }}")
    (hf / "config.json").write_text("{}")  # the model's, not the tokenizer's
    assert set(TOKENIZER_FILES) >= {
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
        "merges.txt",
    }
    names = copy_tokenizer_files(hf, tmp_path / "out" / "export")
    assert names == [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
    ]
    assert sorted(p.name for p in (tmp_path / "out" / "export").iterdir()) == sorted(names)
    assert copy_tokenizer_files(hf / "tokenizer.json", tmp_path / "one") == ["tokenizer.json"]
    (tmp_path / "x.json").write_text("{}")
    assert copy_tokenizer_files(tmp_path / "x.json", tmp_path / "two") == ["tokenizer.json"]
    (tmp_path / "empty").mkdir()
    assert copy_tokenizer_files(tmp_path / "empty", tmp_path / "three") == []
    with pytest.raises(DataError, match=str(tmp_path / "nope")):
        copy_tokenizer_files(tmp_path / "nope", tmp_path / "four")


def _bad_dir(tmp_path: Path, damage: str) -> tuple[Path, str, dict]:
    """(--tokenizer path, the file the error must name, extra prepare() kwargs)"""
    if damage == "missing path":
        return tmp_path / "no_such_model", "no_such_model", {}
    hf = _hf_dir(tmp_path)
    if damage == "empty dir":
        for p in hf.iterdir():
            p.unlink()
        return hf, "hf_model", {}
    if damage == "corrupt tokenizer.json":
        (hf / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": ')
        return hf, "hf_model/tokenizer.json", {}
    if damage == "corrupt tokenizer_config.json":
        (hf / "tokenizer_config.json").write_text("{not json")
        return hf, "hf_model/tokenizer_config.json", {}
    if damage == "no eos anywhere":
        (hf / "tokenizer_config.json").write_text("{}")
        (hf / "special_tokens_map.json").unlink()
        return hf, "hf_model/tokenizer_config.json", {}
    if damage == "eos not in vocab":
        (hf / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
        return hf, "hf_model/tokenizer.json", {}
    if damage == "--eod-token not in vocab":
        return hf, "hf_model/tokenizer.json", {"eod_token": "<eos>"}
    assert damage == "corrupt tokenizer file"
    (tmp_path / "tok.json").write_text("garbage")
    return tmp_path / "tok.json", "tok.json", {}


@pytest.mark.parametrize(
    "damage",
    [
        "missing path",
        "empty dir",
        "corrupt tokenizer.json",
        "corrupt tokenizer_config.json",
        "no eos anywhere",
        "eos not in vocab",
        "--eod-token not in vocab",
        "corrupt tokenizer file",
    ],
)
def test_bad_tokenizer_is_one_line_data_error_before_writing(tmp_path: Path, damage: str) -> None:
    path, named, kw = _bad_dir(tmp_path, damage)
    files, out = _files(tmp_path), tmp_path / "out"
    with pytest.raises(DataError) as e:
        prep.prepare(files, out, val_fraction=0.3, seed=0, tokenizer=path, **kw)
    msg = str(e.value)
    assert "\n" not in msg and f"{tmp_path}/{named}" in msg, msg
    if damage in ("no eos anywhere", "eos not in vocab", "--eod-token not in vocab"):
        assert "--eod-token" in msg
    assert not list(tmp_path.glob("out*"))  # neither the dataset nor its tmp dir


def test_sentencepiece_only_dir(tmp_path: Path, monkeypatch) -> None:
    hf = _hf_dir(tmp_path)
    hub = Tokenizer.from_file(str(hf / "tokenizer.json"))
    (hf / "tokenizer.json").unlink()
    (hf / "tokenizer.model").write_bytes(b"\x0a\x03spm")  # never parsed here
    monkeypatch.setitem(sys.modules, "transformers", None)  # not installed
    with pytest.raises(DataError) as e:
        _prepare(tmp_path, hf)
    assert (
        "\n" not in str(e.value)
        and f"{hf}/tokenizer.model" in str(e.value)
        and "tokenizer.json" in str(e.value)
    )

    class AutoTokenizer:  # transformers' conversion, faked: its fast tokenizer wraps a tokenizers one
        @staticmethod
        def from_pretrained(path: str, local_files_only: bool) -> object:
            assert path == str(hf) and local_files_only
            return types.SimpleNamespace(backend_tokenizer=hub, eos_token="</s>")

    monkeypatch.setitem(sys.modules, "transformers", types.SimpleNamespace(AutoTokenizer=AutoTokenizer))
    meta = _prepare(tmp_path, hf)
    ds = tmp_path / "ds"
    assert meta["tokenizer_files"] == [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.model",
    ]
    assert Tokenizer.from_file(str(ds / "tokenizer.json")).to_str() == hub.to_str()
    assert (ds / "tokenizer.model").read_bytes() == (hf / "tokenizer.model").read_bytes()
    assert meta["eod_id"] == 1 and sorted(_docs(ds)) == sorted(hub.encode(t).ids for t in TEXTS)


def test_transformers_saved_dir(tmp_path: Path) -> None:
    """The directory transformers itself writes (save_pretrained) for a Hugging Face tokenizer."""
    transformers = pytest.importorskip("transformers")
    hub = _hub_tokenizer()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=hub, eos_token="</s>", bos_token="<s>")
    fast.save_pretrained(str(tmp_path / "saved"))
    meta = _prepare(tmp_path, tmp_path / "saved")
    assert meta["eod_id"] == hub.token_to_id("</s>") and meta["vocab_size"] == len(fast) == 300
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(meta["tokenizer_files"])
    assert sorted(_docs(tmp_path / "ds")) == sorted(
        fast(t, add_special_tokens=False)["input_ids"] for t in TEXTS
    )
