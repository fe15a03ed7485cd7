"""Shared fixtures: small prepared datasets, built once per test session through `data/`'s API.

`small_dataset`: a parquet dataset from ~40 standard-library files (vocab 512), seconds to build.
`default_corpus_cache`: a `data.cache_dir` holding the embedded default corpus (the whole stdlib,
~15 s to prepare on 2 cores). Set MOEFORGE_TEST_DATA_CACHE to a persistent directory to reuse it
across sessions.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import pytest

SMALL_VOCAB = 512


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from data.prepare import prepare

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted((stdlib / "json").glob("*.py")) + sorted((stdlib / "email").glob("*.py"))[:30]
    out = tmp_path_factory.mktemp("small_dataset") / "ds"
    prepare(files, out, vocab_size=SMALL_VOCAB, val_fraction=0.1, seed=0)
    return out


@pytest.fixture(scope="session")
def default_corpus_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from data.config import DataConfig
    from data.prepare import ensure_default_corpus

    cache = Path(os.environ.get("MOEFORGE_TEST_DATA_CACHE") or tmp_path_factory.mktemp("data_cache"))
    ensure_default_corpus(DataConfig(cache_dir=str(cache)))
    return cache
