"""Pydantic models of everything cherry-train reads or writes. No I/O, no torch."""

from __future__ import annotations

import json
from typing import Any

import yaml
from pydantic import ValidationError

from cherry_train.schemas.config import (
    Amp,
    AugmentationSection,
    CheckpointSection,
    DataSection,
    EvaluateSection,
    Mode,
    ModelConfig,
    TrainingConfig,
    TrainingSection,
)
from cherry_train.schemas.errors import ConfigError, format_validation_error
from cherry_train.schemas.records import (
    Artifact,
    Attempt,
    AttemptEnd,
    AttemptReason,
    BestEpoch,
    ErrorInfo,
    FailedManifest,
    Heartbeat,
    JobState,
    Manifest,
    Phase,
    Result,
    SweepRecord,
    TrialRecord,
    WorkerState,
    WorkerStatus,
)

__all__ = [
    "Amp", "Artifact", "Attempt", "AttemptEnd", "AttemptReason", "AugmentationSection",
    "BestEpoch", "CheckpointSection",
    "ConfigError", "DataSection", "ErrorInfo", "EvaluateSection", "FailedManifest", "Heartbeat",
    "JobState", "Manifest", "Mode", "ModelConfig", "Phase", "Result", "TrainingConfig",
    "TrainingSection",
    "SweepRecord", "TrialRecord", "WorkerState", "WorkerStatus",
    "config_json_schema", "parse_config", "validate_config",
]


def validate_config(data: Any, default_name: str | None = None) -> TrainingConfig:
    """Validate an already-parsed mapping; raise ConfigError with `field: problem` lines."""
    if not isinstance(data, dict):
        shape = "empty" if data is None else f"a {type(data).__name__}"
        raise ConfigError([f"(top level): expected a mapping of sections "
                           f"(model, training, data, ...), got {shape}"])
    try:
        config = TrainingConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, TrainingConfig)) from None
    if config.name is None and default_name:
        config.name = _safe_name(default_name)
    return config


def parse_config(text: str, default_name: str | None = None) -> TrainingConfig:
    """Parse YAML text into a TrainingConfig."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError([f"(file): not valid YAML{where}: {problem}"]) from None
    return validate_config(data, default_name)


def config_json_schema() -> str:
    return json.dumps(TrainingConfig.model_json_schema(), indent=2)


def _safe_name(stem: str) -> str:
    """A config file's stem made into a valid experiment name."""
    import re

    name = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-._")[:64]
    return name or "job"
