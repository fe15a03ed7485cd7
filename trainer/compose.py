"""Compose a `JobConfig` from `recipes/` + overrides with Hydra's compose API, outside `@hydra.main`.

Used by `trainer/__main__.py` to fail fast (one line, exit 2) before Hydra runs the job, and by
tests. Hydra/OmegaConf errors are multi-line with a "Set HYDRA_FULL_ERROR" footer; `config_error`
turns them into a `ConfigError` naming the offending field.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

from hydra import compose, initialize_config_module
from hydra.errors import MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    InterpolationResolutionError,
    OmegaConfBaseException,
)

from trainer.config import JobConfig, register_configs
from trainer.errors import ConfigError
from trainer.validate import validate

CONFIG_MODULE = "recipes"
CONFIG_NAME = "config"
_AMBIGUOUS = re.compile(r"Ambiguous value for argument '([^']*)'")


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The root config with `overrides` applied, exactly as `python -m trainer` would compose it."""
    register_configs()
    try:
        with initialize_config_module(CONFIG_MODULE, version_base=None):
            return compose(CONFIG_NAME, overrides=list(overrides))
    except Exception as e:  # noqa: BLE001 - every composition failure becomes one line
        raise config_error(e) from e


def to_job_config(cfg: DictConfig) -> JobConfig:
    """Resolve interpolations and build the typed dataclasses the rest of the code uses."""
    try:
        job = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise config_error(e) from e
    assert isinstance(job, JobConfig), type(job)
    return job


def load_config(overrides: Sequence[str] = (), world_size: int = 1) -> JobConfig:
    """Compose, type, and validate: the config a job would run with, or a `ConfigError`."""
    job = to_job_config(compose_config(overrides))
    validate(job, world_size)
    return job


def config_error(exc: BaseException) -> ConfigError:
    """One line for a Hydra/OmegaConf failure: the field it concerns, what is wrong, the fix."""
    for e in _chain(exc):
        if isinstance(e, MissingConfigException) and e.missing_cfg_file:
            group, _, name = e.missing_cfg_file.rpartition("/")
            field = group or "config"
            options = ", ".join(e.options or []) or "none"
            return ConfigError(
                field, f"{field}={name}: no such config in recipes/{group} (available: {options})"
            )
        if isinstance(e, OverrideParseException):
            field = e.override.split("=", 1)[0].lstrip("+~") if e.override else "overrides"
            reason = _first_line(e.message or str(e))
            return ConfigError(
                field, f"{field}: cannot parse override '{e.override}': {reason} (see hydra override grammar)"
            )
        if isinstance(e, OmegaConfBaseException) and getattr(e, "full_key", None):
            field, msg = e.full_key, _first_line(getattr(e, "msg", None) or str(e))
            if isinstance(e, ConfigAttributeError | ConfigKeyError):
                owner = getattr(e, "object_type_str", None) or "this section"
                leaf = field.rsplit(".", 1)[-1]
                return ConfigError(
                    field,
                    f"{field}: unknown key ({owner} has no field '{leaf}'; check the spelling, or see --cfg job)",
                )
            if isinstance(e, InterpolationResolutionError):
                return ConfigError(field, f"{field}: {msg} (fix the ${{...}} reference)")
            return ConfigError(field, f"{field}: {msg} (use a value of the field's type)")
        ambiguous = _AMBIGUOUS.search(str(e))
        if ambiguous:
            override = ambiguous.group(1)
            field = override.split("=", 1)[0].lstrip("+~")
            return ConfigError(
                field,
                f"{override}: ambiguous value (quote it for a string, write [a,b] for a list, or add --multirun to sweep)",
            )
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    lines = lines[
        : next((i for i, ln in enumerate(lines) if ln.startswith("Config search path")), len(lines))
    ]
    return ConfigError("config", "config: " + "; ".join(lines or [type(exc).__name__]))


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _first_line(text: str) -> str:
    return next((ln.strip() for ln in text.splitlines() if ln.strip()), text)
