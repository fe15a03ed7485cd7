"""Long tables of cases in the quick subset: every `every`-th row runs there (the first always),
the others are marked slow and run in the whole suite. The tables are many config compositions
(~0.1 s each with Hydra), which would otherwise be most of the quick subset's time."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest


def quick_sample(rows: Sequence[Any], ids: Sequence[str] | None = None, every: int = 8) -> list[Any]:
    return [
        pytest.param(*(row if isinstance(row, tuple) else (row,)), id=None if ids is None else ids[i],
                     marks=() if i % every == 0 else pytest.mark.slow)
        for i, row in enumerate(rows)
    ]  # fmt: skip
