"""TensorBoard event files for a job, in `done/<job_id>/tensorboard/`: every metrics line as
scalars (train loss, learning rate and images/s per logging window; losses and accuracies per
epoch), and the resolved config as hparams for the HParams tab.

Each attempt writes a file of its own in local scratch and stores it, fenced like every write of
the owner, whenever metrics.jsonl is stored. A resumed attempt starts its file with a purge at
the step after its checkpoint (TensorBoard's `purge_step`): the steps an earlier attempt logged
past that checkpoint are dropped when TensorBoard reads the run, so no step shows twice or out
of order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import structlog

from cherry_train import logs
from cherry_train.jobqueue.claims import Claim
from cherry_train.jobqueue.owner import Fenced, Owner
from cherry_train.schemas import Mode

log = structlog.get_logger(__name__)

#: metrics.jsonl's fields -> scalar tags, per kind of line.
TAGS = {
    "train": {"loss": "train/loss", "lr": "train/learning_rate",
              "images_per_second": "train/images_per_second"},
    "epoch": {"train_loss": "epoch/train_loss", "train_accuracy": "epoch/train_accuracy",
              "val_loss": "epoch/val_loss", "val_accuracy": "epoch/val_accuracy"},
}
#: What the HParams tab compares runs by (latest value of each, per run).
HPARAM_METRICS = {"best/val_accuracy": 0.0, "best/val_loss": 0.0}


class Board:
    """This attempt's event file: written in `folder` (local scratch), stored at `store_dir`
    through `upload(local, path)`. Off, with one warning, where tensorboard is not installed."""

    def __init__(self, folder: Path, store_dir: str, upload, config: dict[str, Any],
                 purge_step: int | None):
        self.folder, self.store_dir, self.upload = folder, store_dir, upload
        self.config, self.purge_step = config, purge_step
        self._writer = None
        self._off = False
        self._failed = False  # a store failed: said once
        self._best: dict[str, float] = {}

    def add(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl line, as scalars at its global step."""
        writer = self._open()
        if writer is None or "step" not in record:
            return
        step = int(record["step"])
        for field, tag in TAGS.get(record.get("kind"), {}).items():
            if isinstance(record.get(field), int | float):
                writer.add_scalar(tag, record[field], step)
        if record.get("kind") == "epoch":
            self._best_so_far(writer, record, step)

    def store(self) -> None:
        """Flush and store the event file (its whole content: a few kB per epoch). A failure is
        logged, never raised (a fenced write is): the event files are a view of the run."""
        if self._writer is None:
            return
        try:
            self._writer.flush()
            for path in sorted(self.folder.iterdir()):
                self.upload(path, f"{self.store_dir}/{path.name}")
        except Fenced:
            raise
        except Exception as e:
            if not self._failed:
                log.warning("could not store the TensorBoard events; training goes on",
                            error=logs.brief(e))
            self._failed = True

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def _open(self):
        if self._writer is not None or self._off:
            return self._writer
        try:
            from torch.utils.tensorboard import SummaryWriter
            from torch.utils.tensorboard.summary import hparams
        except ImportError as e:
            self._off = True
            log.warning("no TensorBoard event files: tensorboard is not installed here "
                        "(pip install tensorboard)", error=logs.brief(e))
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(str(self.folder), purge_step=self.purge_step)
        file_writer = self._writer._get_file_writer()
        for summary in hparams(_flat(self.config), HPARAM_METRICS):
            file_writer.add_summary(summary)
        return self._writer

    def _best_so_far(self, writer, record: dict[str, Any], step: int) -> None:
        self._update_best(record)
        for tag, value in self._best.items():
            writer.add_scalar(tag, value, step)

    def seed_best(self, epochs: list[dict[str, Any]]) -> None:
        """The best values of the epochs kept from earlier attempts (a resume)."""
        for record in epochs:
            self._update_best(record)

    def _update_best(self, record: dict[str, Any]) -> None:
        for tag, field, better in (("best/val_accuracy", "val_accuracy", max),
                                   ("best/val_loss", "val_loss", min)):
            if field in record:
                self._best[tag] = better(self._best.get(tag, record[field]), record[field])


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The config as TensorBoard's hparams take it: dotted keys, numbers, strings and bools."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        elif isinstance(value, bool | int | float | str):
            flat[f"{prefix}{key}"] = value
        elif value is not None:
            flat[f"{prefix}{key}"] = json.dumps(value)
    return flat


def job_board(claim: Claim, owner: Owner, scratch: Path) -> Board | None:
    """The attempt's Board, written in its scratch folder; None where the config turns it off
    (and for an evaluation, which has no curves)."""
    config = claim.manifest.config
    if not config.tensorboard or config.mode == Mode.evaluation:
        return None
    return Board(scratch / "tensorboard", claim.paths.tensorboard, owner.upload,
                 config.model_dump(mode="json"), purge_step=None)
