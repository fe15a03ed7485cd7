"""The one exception type of `data/`: missing or corrupt data, or a config the data cannot serve.

Every message is one line that names the file and says what to do; the trainer prints it as is
and exits with code 2, so no raw pyarrow/OSError may escape from a reading path.
"""

from __future__ import annotations

import argparse
from typing import NoReturn


class DataError(ValueError):
    """Missing/corrupt data or an impossible data config; `str(e)` is one actionable line."""


def reprepare_hint(dataset_dir: object) -> str:
    """The standard remedy for a damaged prepared dataset."""
    return f"delete {dataset_dir} and re-run python -m data.prepare"


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, like every other error of our CLIs (its default
    prints the whole usage first); exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"moeforge: {self.prog}: {message}; see --help\n")
