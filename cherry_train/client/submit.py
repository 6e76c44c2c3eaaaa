"""`cherry submit`: read and validate a config, run a quick pre-flight, queue the job."""

from __future__ import annotations

import getpass
import importlib.util
import socket
from dataclasses import dataclass, field
from pathlib import Path

from cherry_train import __version__
from cherry_train.jobqueue.clock import age_seconds
from cherry_train.jobqueue.protocol import JobQueue
from cherry_train.jobqueue.roots import PathMappingError, map_data_path
from cherry_train.schemas import ConfigError, Manifest, TrainingConfig, parse_config

#: A worker that wrote its status this recently is taken to be alive (it polls every <= 30 s).
WORKER_FRESH_SECONDS = 120


def load_config_file(path: Path, name: str | None = None,
                     priority: int | None = None) -> TrainingConfig:
    """The config at `path`, validated, with --name/--priority applied; ConfigError if not."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"(file): {path} does not exist"]) from None
    except IsADirectoryError:
        raise ConfigError([f"(file): {path} is a folder, not a YAML file"]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"(file): cannot read {path}: {e}"]) from None
    if not text.strip():
        raise ConfigError([f"(file): {path} is empty"])
    config = parse_config(text, default_name=Path(path).stem)
    overrides = {k: v for k, v in (("name", name), ("priority", priority)) if v is not None}
    if overrides:
        from cherry_train.schemas import validate_config

        config = validate_config({**config.model_dump(exclude_none=True), **overrides})
    return config


def check_model_name(config: TrainingConfig) -> str:
    """Check the model against torchvision, when it is installed here. Returns what was done."""
    if importlib.util.find_spec("torchvision") is None:
        return "model name: not checked (no torchvision here; the worker checks it)"
    from cherry_train.worker.errors import JobError
    from cherry_train.worker.model import check_model_name as check

    try:
        check(config.model.name)
    except JobError as e:
        raise ConfigError([str(e)]) from None
    return f"model name: {config.model.name} is a torchvision classification model"


@dataclass
class Preflight:
    checks: list[str] = field(default_factory=list)


def preflight(config: TrainingConfig, root_path: Path | None) -> Preflight:
    """Quick checks that catch most broken jobs before they reach the GPU queue."""
    report = Preflight()
    problems = []
    classes = {}
    for field_name in ("train_path", "val_path"):
        raw = getattr(config.data, field_name)
        try:
            path = map_data_path(raw, root_path)
        except PathMappingError as e:
            problems.append(f"data.{field_name}: {e}")
            continue
        if not path.is_dir():
            problems.append(f"data.{field_name}: folder {path} does not exist (pass "
                            "--no-preflight if only the worker can see it)")
            continue
        classes[field_name] = sorted(p.name for p in path.iterdir()
                                     if p.is_dir() and not p.name.startswith("."))
        report.checks.append(f"data.{field_name}: {path} ({len(classes[field_name])} classes)")
    if len(classes) == 2 and classes["train_path"] != classes["val_path"]:
        problems.append(f"data.val_path: class folders {classes['val_path']} differ from "
                        f"data.train_path's {classes['train_path']}")
    if "train_path" in classes and len(classes["train_path"]) != config.model.num_classes:
        problems.append(f"model.num_classes: is {config.model.num_classes}, but data.train_path "
                        f"has {len(classes['train_path'])} class folders")
    if problems:
        raise ConfigError(problems)
    return report


def submit(queue: JobQueue, config: TrainingConfig, config_file: str) -> Manifest:
    who = f"{getpass.getuser()}@{socket.gethostname()}"
    return queue.submit(config, config_file=config_file, submitted_by=who,
                        client_version=__version__)


def live_workers(queue: JobQueue) -> list[str]:
    return [w.worker_id for w in queue.workers()
            if w.state != "stopped" and age_seconds(queue.clock, w.at) < WORKER_FRESH_SECONDS]
