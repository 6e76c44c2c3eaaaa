"""Checkpoints that cannot be half-written or trusted blindly.

Each is written under a temp name, fsynced and renamed into `checkpoints/step-<N>.pt`, then its
sha256 goes beside it; a checkpoint without a matching checksum is unfinished or corrupt and is
skipped (and pruned) on resume. Loading uses weights_only=True, so RNG states are stored as
tensors and plain tuples.
"""

from __future__ import annotations

import contextvars
import copy
import hashlib
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch

from cherry_train import faults, logs
from cherry_train.backoff import Stopped
from cherry_train.checksums import file_sha256
from cherry_train.jobqueue import layout
from cherry_train.jobqueue.owner import Fenced, Owner

log = structlog.get_logger(__name__)


def weights_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """A hash of a model's tensors in state-dict order (names, dtypes, shapes and bytes), so
    two runs can be compared for bit-identical weights."""
    h = hashlib.sha256()
    for name, t in state_dict.items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _truncate_to_half(path: Path) -> None:
    """What a kill in the middle of torch.save leaves behind (for the fault hook)."""
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class StateCopier:
    """Copies of the training state on the CPU, taken without waiting for the GPU.

    A plain `.cpu()` per tensor first waits for every kernel already queued, then copies
    through pageable memory. Here each CUDA tensor is copied into a pinned buffer kept from one
    checkpoint to the next, queued on its stream behind the current step (so it is exactly this
    step's state) and ahead of the next one; whoever writes the copy waits for it to land
    (`Copy.wait`). CPU tensors are cloned. The buffers are reused: one copy at a time."""

    def __init__(self):
        self._pinned: dict[tuple, tuple] = {}  # key -> (shape, strides, dtype), buffer

    def copy(self, obj: Any) -> Copy:
        devices: set[torch.device] = set()
        payload = self._copy(obj, (), devices)
        events = []
        for device in devices:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            events.append(event)
        return Copy(payload, events)

    def _copy(self, obj: Any, key: tuple, devices: set) -> Any:
        if isinstance(obj, torch.Tensor):
            t = obj.detach()
            if t.device.type != "cuda":
                return t.to("cpu", copy=True)
            like = (t.shape, t.stride(), t.dtype)
            kept = self._pinned.get(key)
            if kept is None or kept[0] != like:
                # empty_like keeps the live tensor's layout: optimizer states of channels_last
                # weights must come back channels_last (fused Adam refuses mixed layouts).
                kept = like, torch.empty_like(t, device="cpu", pin_memory=True)
                self._pinned[key] = kept
            buffer = kept[1]
            buffer.copy_(t, non_blocking=True)
            devices.add(t.device)
            return buffer
        if isinstance(obj, dict):
            return {k: self._copy(v, (*key, k), devices) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return type(obj)(self._copy(v, (*key, i), devices) for i, v in enumerate(obj))
        return copy.deepcopy(obj)


class Copy:
    """A state copy in flight: its payload (CPU tensors) is complete once `wait` returns."""

    def __init__(self, payload: Any, events: list):
        self.payload, self.events = payload, events

    def wait(self) -> Any:
        """The copied state, once every queued copy has landed."""
        for event in self.events:
            event.synchronize()
        return self.payload


class Checkpoints:
    """The checkpoints of one job in a queue root, written by the attempt that owns it.

    `save_in_background` returns once the state's copy is queued; writing, publishing and the
    checksum happen on a thread, one checkpoint at a time. `before_write(payload)` runs on that
    thread first (metrics that must be stored before the checkpoint, files derived from the
    same state). `on_durable(step, path)` is called when a checkpoint is complete (only then
    may the heartbeat name it). `wait()` blocks until the last write is done and raises
    Fenced if a later attempt took over.

    Any other failure (Drive full, a mount down for longer than its retries, local disk full)
    does not end training: the state is still in memory, and a failed job would lose hours
    of it. The failure is logged and passed to `on_failed(step, error)`; the next checkpoint
    tries again, and until one succeeds a resume starts from the newest durable one."""

    def __init__(self, owner: Owner, scratch: Path, keep_last: int,
                 on_durable: Callable[[int, str], None] | None = None,
                 on_failed: Callable[[int, str], None] | None = None):
        # Reads through the read-only view; every write and delete through the fenced owner.
        self.owner, self.storage, self.paths = owner, owner.reader, owner.claim.paths
        self.scratch, self.keep_last = scratch, keep_last
        self.on_durable, self.on_failed = on_durable, on_failed
        self.requested_step: int | None = None  # the newest checkpoint asked for
        self.durable_step: int | None = None  # the newest one known to be safe
        self._copier = StateCopier()
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None
        # On a mount that uploads later, confirmation can take minutes: it runs on its own
        # thread, so that training (and the next checkpoint) never waits for it.
        self._confirming: list[threading.Thread] = []

    def save_in_background(self, step: int, collect: Callable[[], dict[str, Any]],
                           before_write: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Checkpoint `step`: `collect()` gives the live state, called once the previous
        checkpoint is written (its `before_write` may have updated what is collected)."""
        self.wait(confirmations=False)  # one write at a time; a failed one stops training here
        self.requested_step = step
        copied = self._copier.copy(collect())
        context = contextvars.copy_context()  # the job's log fields (job_id, attempt)
        self._writer = threading.Thread(target=context.run,
                                        args=(self._write, step, copied, before_write),
                                        name="cherry-checkpoint", daemon=True)
        self._writer.start()

    def _write(self, step: int, copied: Copy, before_write) -> None:
        try:
            started = time.perf_counter()
            payload = copied.wait()
            if before_write is not None:
                before_write(payload)
            path = self.save(step, payload)
            log.info("checkpoint written", job_id=self.owner.claim.job_id, step=step,
                     seconds=round(time.perf_counter() - started, 3))
            if not self.storage.confirms_later:
                self._durable(step, path)
                return
            context = contextvars.copy_context()
            confirm = threading.Thread(target=context.run, args=(self._confirm, step, path),
                                       name="cherry-confirm", daemon=True)
            self._confirming.append(confirm)
            confirm.start()
        except Fenced as e:  # handed to the training thread by wait(): it must stop
            self._error = e
        except Stopped:  # the worker's stop allowed no longer: storage did not take it
            log.warning("stopping: gave up on writing the checkpoint; the next attempt resumes "
                        "from the newest one written", job_id=self.owner.claim.job_id,
                        step=step, resume_would_start_at=self.durable_step or 0)
        except Exception as e:
            self._failed(step, e)
        except BaseException as e:
            self._error = e

    def _failed(self, step: int, e: Exception) -> None:
        error = logs.brief(e)
        log.error("checkpoint not written; training goes on and the next checkpoint tries again",
                  job_id=self.owner.claim.job_id, step=step, error=error,
                  resume_would_start_at=self.durable_step or 0)
        if self.on_failed is not None:
            self.on_failed(step, error)

    def _confirm(self, step: int, path: str) -> None:
        started = time.perf_counter()
        if self.storage.confirm_durable(path) and \
                self.storage.confirm_durable(self.paths.checkpoint_checksum(step)):
            log.info("checkpoint confirmed in Drive", job_id=self.owner.claim.job_id, step=step,
                     seconds=round(time.perf_counter() - started, 1))
            self._durable(step, path)

    def _durable(self, step: int, path: str) -> None:
        if self.durable_step is not None and step <= self.durable_step:
            return  # confirmations may finish out of order: the newest one counts
        self.durable_step = step
        if self.on_durable is not None:
            self.on_durable(step, path)
        self.prune()

    def wait(self, confirmations: bool = True) -> None:
        """Until the last write is done (and, by default, confirmed or given up on); raises
        the write's error, if it failed (for instance Fenced)."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if confirmations:
            while self._confirming:
                self._confirming.pop(0).join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def steps(self) -> list[int]:
        names = self.storage.list_dir(self.paths.checkpoints_dir)
        return sorted(s for n in names if (s := layout.checkpoint_step(n)) is not None)

    def save(self, step: int, payload: dict[str, Any]) -> str:
        """Write checkpoint `step`: a temp file in scratch, published by rename (fenced), then
        its checksum. A kill at any point leaves the previous checkpoints as they were."""
        self.scratch.mkdir(parents=True, exist_ok=True)
        tmp = self.scratch / f"step-{step:09d}.pt.partial"
        try:
            torch.save(payload, tmp)
            faults.point("checkpoint-write", before_kill=lambda: _truncate_to_half(tmp))
            digest = file_sha256(tmp)
            self.owner.upload(tmp, self.paths.checkpoint(step), sha256=digest)
        finally:
            tmp.unlink(missing_ok=True)  # hundreds of MB: never left behind, even on failure
        faults.point("checkpoint-before-checksum")
        self.owner.write(self.paths.checkpoint_checksum(step), f"{digest}\n".encode())
        return self.paths.checkpoint(step)

    def prune(self) -> None:
        """Keep the newest keep_last checkpoints, and never one newer than or equal to the
        newest durable one (on a mount, those may be all that survives the VM)."""
        steps = self.steps()
        for step in steps[: -self.keep_last]:
            if self.durable_step is None or step < self.durable_step:
                self._delete(step)

    def _delete(self, step: int) -> None:
        self.owner.delete(self.paths.checkpoint_checksum(step))
        self.owner.delete(self.paths.checkpoint(step))

    def load_latest(self) -> tuple[int, dict[str, Any]] | None:
        """The newest checkpoint that verifies; corrupt or unfinished ones are skipped and
        removed (a resume must never build on them)."""
        for step in reversed(self.steps()):
            payload = self._load_verified(step)
            if payload is not None:
                return step, payload
            self._delete(step)
        return None

    def _load_verified(self, step: int) -> dict[str, Any] | None:
        expected = self.storage.read_text_or_none(self.paths.checkpoint_checksum(step))
        if expected is None:
            log.warning("checkpoint without checksum skipped", step=step)
            return None
        local = self.storage.local_path(self.paths.checkpoint(step))
        if local is None:
            local = self.scratch / f"step-{step:09d}.pt.download"
            self.storage.download(self.paths.checkpoint(step), local)
        actual = file_sha256(local)
        if actual != expected.strip():
            log.warning("corrupt checkpoint skipped", step=step, expected=expected.strip(),
                        actual=actual)
            return None
        return torch.load(local, map_location="cpu", weights_only=True)
