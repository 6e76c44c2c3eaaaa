"""Where everything lives under a queue root (docs/contract.md §1). The only module that spells
paths."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

QUEUE = "queue"
DONE = "done"
FAILED = "failed"
CONTROL = "control"
WORKERS = "workers"
SWEEPS = "sweeps"

_CHECKPOINT_RE = re.compile(r"^step-(\d{9})\.pt$")


def best_for_final(path: str, read_text: Callable[[str], str | None]) -> str | None:
    """A finished job keeps no final.pt when its final weights are its best (its result gives
    both the same hash): for a `.../final.pt` that is not there, the best.pt beside it when the
    result.json beside it says so; else None. `read_text(path)`: a file's text or None."""
    folder, _, name = path.rpartition("/")
    if name != "final.pt":
        return None
    raw = read_text(f"{folder}/result.json" if folder else "result.json")
    try:
        result = json.loads(raw) if raw is not None else None
    except ValueError:
        return None
    if not isinstance(result, dict) or not isinstance(result.get("final_weights_sha256"), str) \
            or result["final_weights_sha256"] != result.get("best_weights_sha256"):
        return None
    return f"{folder}/best.pt" if folder else "best.pt"


def weights_here(path: Path) -> Path:
    """A weights file on this machine: `path`, or best.pt beside a missing final.pt that its
    finished job did not keep (best_for_final)."""
    if path.exists():
        return path

    def text_or_none(name: str) -> str | None:
        try:
            return Path(name).read_text()
        except (OSError, UnicodeDecodeError):
            return None

    best = best_for_final(path.as_posix(), text_or_none)
    return Path(best) if best is not None else path


#: A request that a worker drain (finish its job, take no new one, exit): `cherry drain`
#: creates queue/<worker_id>.drain. In queue/, not control/: the one listing an idle worker
#: makes per poll (of queue/, before every claim) shows it, so watching for it costs nothing.
DRAIN_SUFFIX = ".drain"


def worker_status_path(worker_id: str) -> str:
    return f"{WORKERS}/{worker_id}.json"


def drain_request_path(worker_id: str) -> str:
    return f"{QUEUE}/{worker_id}{DRAIN_SUFFIX}"


def checkpoint_step(name: str) -> int | None:
    """The global step of a checkpoint file name, or None for other names."""
    m = _CHECKPOINT_RE.match(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class JobPaths:
    job_id: str

    @property
    def queued_manifest(self) -> str:
        return f"{QUEUE}/{self.job_id}.json"

    @property
    def failed_manifest(self) -> str:
        return f"{FAILED}/{self.job_id}.json"

    @property
    def failed_error(self) -> str:
        return f"{FAILED}/{self.job_id}.error.json"

    @property
    def cancel_request(self) -> str:
        return f"{CONTROL}/{self.job_id}.cancel"

    @property
    def dir(self) -> str:
        return f"{DONE}/{self.job_id}"

    @property
    def attempts_dir(self) -> str:
        return f"{self.dir}/attempts"

    def attempt(self, n: int) -> str:
        return f"{self.attempts_dir}/{n}.json"

    @property
    def heartbeat(self) -> str:
        return f"{self.dir}/heartbeat.json"

    @property
    def config(self) -> str:
        return f"{self.dir}/config.yaml"

    @property
    def metrics(self) -> str:
        return f"{self.dir}/metrics.jsonl"

    @property
    def log(self) -> str:
        return f"{self.dir}/worker.log"

    @property
    def tensorboard(self) -> str:
        return f"{self.dir}/tensorboard"  # one event file per attempt

    @property
    def curves(self) -> str:
        return f"{self.dir}/curves.png"

    @property
    def checkpoints_dir(self) -> str:
        return f"{self.dir}/checkpoints"

    def checkpoint(self, step: int) -> str:
        return f"{self.checkpoints_dir}/step-{step:09d}.pt"

    def checkpoint_checksum(self, step: int) -> str:
        # Written after the checkpoint itself: a checkpoint without one is unfinished.
        return self.checkpoint(step) + ".sha256"

    @property
    def compiled_kernels(self) -> str:
        # torch.compile's output, for the next attempt (usually on a fresh VM); removed at the end.
        return f"{self.dir}/compiled-kernels.bin"

    @property
    def best_weights(self) -> str:
        return f"{self.dir}/best.pt"

    @property
    def final_weights(self) -> str:
        return f"{self.dir}/final.pt"

    @property
    def onnx(self) -> str:
        return f"{self.dir}/model.onnx"

    @property
    def done_manifest(self) -> str:
        return f"{self.dir}/manifest.json"

    @property
    def result(self) -> str:
        return f"{self.dir}/result.json"

    def earlier_result(self, k: int) -> str:
        # A result that `cherry retry` put aside (the job ran again): kept as history.
        return f"{self.dir}/results/{k}.json"

    @property
    def evaluation(self) -> str:
        return f"{self.dir}/evaluation.json"

    @property
    def confusion(self) -> str:
        return f"{self.dir}/confusion.png"

    def artifact_paths(self) -> dict[str, str]:
        """What a job leaves for people: name -> path (whichever of them exist)."""
        return {"config": self.config, "metrics": self.metrics, "curves": self.curves,
                "log": self.log, "best_weights": self.best_weights,
                "final_weights": self.final_weights, "onnx": self.onnx,
                "evaluation": self.evaluation,
                "confusion_matrix": self.confusion}


@dataclass(frozen=True)
class SweepPaths:
    sweep_id: str

    @property
    def dir(self) -> str:
        return f"{SWEEPS}/{self.sweep_id}"

    @property
    def record(self) -> str:
        return f"{self.dir}/sweep.json"

    @property
    def trials_dir(self) -> str:
        return f"{self.dir}/trials"

    def trial(self, n: int) -> str:
        return f"{self.trials_dir}/{n}.json"

    @property
    def cancel_request(self) -> str:
        # No new trials once it exists; `cherry cancel` asks each trial to stop too.
        return f"{self.dir}/cancel"
