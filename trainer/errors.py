"""The trainer's user-facing error: a config that cannot run, reported as one actionable line.

`ConfigError(field, message)`: `field` is the dotted config path (`model.moe.top_k`), `message` is
the whole line (the field, its value, what is wrong, how to fix it). `python -m trainer` prints
`moeforge: config error: <message>` to stderr and exits with code 2, without a traceback.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value that cannot work; `str(e)` is one line naming the field and the fix."""

    def __init__(self, field: str, message: str) -> None:
        message = " ".join(message.split())  # one line, whatever the caller passed
        if field not in message:
            message = f"{field}: {message}"
        super().__init__(message)
        self.field = field
        self.message = message

    def __str__(self) -> str:
        return self.message


def bad_value(field: str, value: object, problem: str, fix: str) -> ConfigError:
    """The standard shape: `field=value <problem> (<fix>)`."""
    return ConfigError(field, f"{field}={value!s} {problem} ({fix})")
