"""Small checks shared by `trainer/validate.py` and `trainer/layout.py`; each raises a one-line
`ConfigError` of the form `field=value <problem> (<fix>)`."""

from __future__ import annotations

from trainer.errors import bad_value


def one_of(field: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise bad_value(field, value, "is not a known option", f"use one of: {' | '.join(choices)}")


def divides(field: str, value: int, by_field: str, by: int, fix: str) -> None:
    if by > 0 and value % by != 0:
        raise bad_value(field, value, f"must be divisible by {by_field}={by}", fix)


def fraction(field: str, value: float, low_open: bool = False) -> None:
    if not (0.0 < value <= 1.0 if low_open else 0.0 <= value <= 1.0):
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise bad_value(field, value, f"must be in {interval}", f"pick a value in {interval}")
