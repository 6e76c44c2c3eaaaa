"""One job over several GPUs of one host (or, to test it, several CPU processes): torch.distributed
with the worker's own process as rank 0.

Rank 0 stays the only queue client: it claims, beats, checkpoints and commits through the same
fenced owner as a single-GPU job, so none of the queue's guarantees change. It starts the other
ranks (followers.py) with torch.multiprocessing's spawn and meets them through a c10d TCPStore
that listens on the loopback only (a socket bound here, handed to it): torch's own rendezvous,
nothing home-made. Rank 0's state reaches the others as bytes loaded with weights_only=True
(tensors and plain containers), never unpickled. Gradients go over NCCL on CUDA
(gloo on the CPU); the few control words (stop after this step? end here?) go over a second,
gloo group on the CPU, so asking costs no CUDA synchronisation. Where the ranks ask them is
written once, in lockstep.py.

A rank that dies ends the attempt on every rank (gloo says so at once; the watcher names the
rank), and the job is handed back and resumed from its newest checkpoint like after any other
fault. Every collective also has a timeout (the job's lease, at least followers.py's floor):
with gloo it raises here; with NCCL torch's watchdog ends the processes at it
(TORCH_NCCL_ASYNC_ERROR_HANDLING's default), and the job is taken back after the lease as after
any crash. Either way no hang outlives the lease for long.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import structlog
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cherry_train.worker.errors import JobError

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: NVLink multicast (NVLS) off, in this process and in every rank it starts: the lent multi-GPU
#: machines fault with it, and plain NCCL rings lose nothing measurable at these sizes.
NCCL_SETTINGS = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                 "NVSHMEM_DISABLE_NVLS": "1"}
#: gloo (the CPU backend, and the control words' group) listens on the interface this names,
#: else on whatever the host name resolves to (a network address on many hosts): every rank
#: is on this host, so the loopback is enough, and nobody else can reach the group.
GLOO_INTERFACE = "GLOO_SOCKET_IFNAME"
NCCL_INTERFACE = "NCCL_SOCKET_IFNAME"
#: How long rank 0 waits for a follower to exit after the last collective.
JOIN_SECONDS = 60.0


class RankDied(RuntimeError):
    """A rank of a multi-GPU attempt exited or stopped answering: not the job's fault."""


class OutOfStep(RuntimeError):
    """The ranks asked different questions at one agreement: a bug in the loop they run
    (lockstep.py), never the job's fault (the job is handed back, as after a worker's fault)."""


def world_size(requested: int | None, device: torch.device, batch_size: int) -> int:
    """How many ranks train a job: the GPUs asked for (`--gpus`; all visible ones by default),
    at most those there are; on the CPU only as many processes as asked for (tests). Fewer
    where the global batch does not split evenly: each rank must get the same share."""
    if device.type == "cuda":
        available = torch.cuda.device_count()
        wanted = available if requested is None else min(requested, available)
        if requested is not None and requested > available:
            log.warning("fewer GPUs than asked for", asked=requested, visible=available)
    else:
        wanted = requested or 1
    ranks = max(1, wanted)
    while batch_size % ranks:
        ranks -= 1
    if ranks != max(1, wanted):
        log.warning("training.batch_size does not split evenly over the GPUs: using fewer",
                    batch_size=batch_size, gpus=wanted, ranks=ranks)
    return ranks


@dataclass
class RankSpec:
    """What a follower needs to start: plain data, picklable for spawn."""

    rank: int
    ranks: int
    port: int
    device_type: str
    manifest_json: bytes
    train_dir: str
    val_dir: str
    max_workers: int | None
    timeout_seconds: float
    parent_pid: int
    threads: int
    heard: Callable[[str, bool], None] | None = None  # a test's record: lockstep.Agreement


class Group:
    """Rank 0's side of the process group, and the collectives every rank calls in the same
    order (the one loop of lockstep.py, run by train.py and followers.py alike)."""

    def __init__(self, rank: int, ranks: int, device: torch.device, timeout_seconds: float):
        self.rank, self.ranks, self.device = rank, ranks, device
        self.timeout = timedelta(seconds=timeout_seconds)
        self.control: Any = None
        self.followers: list = []
        self.store: Any = None
        self._died: Exception | None = None  # what a follower's early exit ends the attempt with

    # -- starting -------------------------------------------------------------------------------

    def start(self, follow: Callable[[RankSpec], None], spec: Callable[[int, int], RankSpec]):
        """Rank 0: start the store and the followers (`follow(spec(rank, port))` each), then
        join the group with them."""
        os.environ.update(NCCL_SETTINGS)  # inherited by the spawned ranks
        loopback = _loopback_interface()
        if loopback is not None:
            os.environ[GLOO_INTERFACE] = loopback
            # NCCL's own bootstrap sockets too (a user's own choice of interface stands).
            os.environ.setdefault(NCCL_INTERFACE, loopback)
        store, port = _loopback_store(self.ranks, self.timeout)
        context = mp.get_context("spawn")
        for rank in range(1, self.ranks):
            process = context.Process(target=follow, args=(spec(rank, port),), daemon=True,
                                      name=f"cherry-rank-{rank}")
            process.start()
            self.followers.append(process)
        log.info("ranks started", ranks=self.ranks, backend=self.backend,
                 pids=[p.pid for p in self.followers])
        threading.Thread(target=self._watch, name="cherry-rank-watch", daemon=True).start()
        self._join(store)

    def join_as_follower(self, port: int) -> None:
        store = dist.TCPStore("127.0.0.1", port, self.ranks, is_master=False,
                              timeout=self.timeout)
        self._join(store)

    def _join(self, store) -> None:
        self.store = store
        dist.init_process_group(self.backend, store=store, rank=self.rank,
                                world_size=self.ranks, timeout=self.timeout)
        # The control words: on the CPU, so asking never waits for the GPU's queue of work.
        self.control = dist.new_group(backend="gloo", timeout=self.timeout)

    @property
    def backend(self) -> str:
        return "nccl" if self.device.type == "cuda" else "gloo"

    # -- the collectives ------------------------------------------------------------------------

    def agree(self, flag: bool, question: int = 0, names: Sequence[str] = ()) -> bool:
        """Whether any rank says yes (rank 0: stop, or end here). Every rank asks at the same
        points (lockstep.py), and sends the number of its `question` with its word: ranks that
        ask different questions raise OutOfStep at once instead of reading one another's
        answers (`names`: the questions' names, for its message)."""
        # One all-reduce (MAX) of (word, question, -question): any rank's yes, and the highest
        # and the lowest question asked, equal when every rank asked the same.
        words = torch.tensor([int(flag), question, -question])
        self.collective(lambda: dist.all_reduce(words, op=dist.ReduceOp.MAX,
                                                 group=self.control))
        highest, lowest = int(words[1]), -int(words[2])
        if highest != lowest:
            other = highest if highest != question else lowest
            name = dict(enumerate(names))
            raise OutOfStep(f"rank {self.rank} asked {name.get(question, question)!r} while "
                            f"another rank asked {name.get(other, other)!r}")
        return bool(words[0])

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """The ranks' `values` summed (validation: each rank saw its share of the images)."""
        self.collective(lambda: dist.all_reduce(values))
        return values

    def share_state(self, payload: dict[str, Any] | None) -> dict[str, Any]:
        """Rank 0's training state (model, optimizer, scheduler, scaler, where it stands), as
        every rank continues from it: after a resume the followers start where rank 0 does.
        Sent as bytes in a tensor (broadcast_object_list would unpickle what arrives)."""
        size = torch.zeros(1, dtype=torch.int64)
        data = torch.empty(0, dtype=torch.uint8)
        if self.rank == 0:
            buffer = io.BytesIO()
            torch.save(payload, buffer)
            data = torch.frombuffer(bytearray(buffer.getbuffer()), dtype=torch.uint8)
            size[0] = data.numel()
        self.collective(lambda: dist.broadcast(size, src=0, group=self.control))
        if self.rank != 0:
            data = torch.empty(int(size.item()), dtype=torch.uint8)
        self.collective(lambda: dist.broadcast(data, src=0, group=self.control))
        return load_state(data.numpy().tobytes(), self.device)

    def sync_buffers(self, model: torch.nn.Module) -> None:
        """BatchNorm statistics as rank 0 has them (each rank updated its own with its share
        of the last batch), so every rank validates the same model."""
        def broadcast():
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)
        self.collective(broadcast)

    def collective(self, run: Callable[[], T]) -> T:
        """run() (collectives), or raise why a rank is gone: RankDied, or the JobError a
        follower failed with (the job's own fault, e.g. out of memory at this batch size)."""
        if self._died is not None:
            raise self._died
        try:
            return run()
        except RuntimeError as e:  # a peer gone: gloo says so at once, NCCL at the timeout
            raise self._died or self._dead_follower(wait=5.0) or RankDied(
                f"a rank stopped answering ({str(e).splitlines()[0]})") from e

    def report(self, error: BaseException) -> None:
        """A follower: say why it ends, for rank 0 to put in the job's history."""
        if self.store is None:
            return
        text = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        with contextlib.suppress(Exception):  # rank 0 is gone too: nobody to tell
            self.store.set(f"cherry/error/{self.rank}",
                           json.dumps({"error": text, "job": isinstance(error, JobError)}))

    # -- ending ---------------------------------------------------------------------------------

    def _watch(self) -> None:
        """Rank 0: notice a follower that exits before the end (killed for memory, a crash)."""
        while self.followers and self._died is None:
            self._died = self._dead_follower()
            if self._died is not None:
                log.error("a rank died; the attempt ends on every rank", detail=str(self._died))
                return
            time.sleep(0.5)

    def _dead_follower(self, wait: float = 0.0) -> Exception | None:
        """Why a follower exited early, if one did (`wait`: give a dying one that long)."""
        deadline = time.monotonic() + wait
        for rank, process in enumerate(list(self.followers), start=1):
            process.join(timeout=max(0.0, deadline - time.monotonic()))
            if process.exitcode not in (None, 0):
                return self.failure(f"rank {rank} (pid {process.pid}) exited with code "
                                    f"{process.exitcode}", self._report_of(rank))
        return None

    def _report_of(self, rank: int) -> dict | None:
        key = f"cherry/error/{rank}"
        try:
            return json.loads(self.store.get(key)) if self.store.check([key]) else None
        except Exception:
            return None

    @staticmethod
    def failure(what: str, report: dict | None) -> Exception:
        """A follower's end as rank 0 raises it: its JobError fails the job (every attempt
        would meet it), anything else hands the job back."""
        if report is None:
            return RankDied(what)
        if report.get("job"):
            return JobError(f"{what}: {report['error'].removeprefix('JobError: ')}")
        return RankDied(f"{what}: {report['error']}")

    def close(self, finished: bool) -> None:
        """Leave the group. Rank 0 waits for followers that finished with it, and kills those
        that did not (an attempt that ended by an error leaves them blocked in a collective)."""
        followers, self.followers = self.followers, []
        deadline = time.monotonic() + (JOIN_SECONDS if finished else 0)
        for process in followers:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(timeout=10)
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception as e:  # a broken group: its processes are gone anyway
                log.warning("could not leave the process group cleanly", error=str(e)[:200])
        self.store = self.control = None  # the store's server thread goes now, not at exit


def load_state(data: bytes, device: torch.device) -> dict[str, Any]:
    """A shared training state: tensors and plain containers only (weights_only=True), so bytes
    from anyone who reached the port run no code here (pickle.UnpicklingError instead)."""
    return torch.load(io.BytesIO(data), map_location=device, weights_only=True)


def _loopback_interface() -> str | None:
    names = {name for _, name in socket.if_nameindex()}
    return next((n for n in ("lo", "lo0") if n in names), None)


def _loopback_store(ranks: int, timeout: timedelta) -> tuple[Any, int]:
    """Rank 0's TCPStore, listening on 127.0.0.1 only. Given a port alone, torch's server binds
    every interface (`*:port`), where anyone on the network could join the group; so the socket
    is bound and listening here first and handed over (master_listen_fd; the store owns it)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(max(128, ranks))
        port = sock.getsockname()[1]
        store = dist.TCPStore("127.0.0.1", port, ranks, is_master=True, timeout=timeout,
                              wait_for_workers=False, master_listen_fd=sock.fileno())
    except BaseException:
        sock.close()
        raise
    sock.detach()  # the store's server closes it
    return store, port
