"""Loader processes: where they start, how many the VM can hold, and how they end.

Colab VMs have 2 cores on a standard runtime and a runtime stopped by signals to the whole
process group, so loader processes are sized to the cores and RAM this process may use, start
from a fork server with the stop signals ignored, and are ended by the main process.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
from contextlib import contextmanager, suppress

import torch
from torch.utils.data import DataLoader

from cherry_train.schemas import AttemptEnd
from cherry_train.worker.signals import STOP_SIGNALS

#: The pid of the worker that starts the fork server, in the server's environment only while
#: it starts (read by cherry_train.worker.inputs.loaderserver).
SERVER_PARENT = "CHERRY_LOADER_SERVER_PARENT"


def ignore_stop_signals(_worker_id: int | None = None) -> None:
    """Loader processes ignore stop signals (a DataLoader worker_init_fn). The main process
    ends them when it is done with them, and they die with the fork server, their parent."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    end_with_parent()


def end_with_parent(parent: int | None = None) -> None:
    """Have Linux SIGKILL this process when the thread that started it ends (prctl's
    PR_SET_PDEATHSIG); and exit now if `parent` is given and is no longer this process's
    parent (it died before the request was made). Elsewhere than Linux: nothing.

    A worker killed with SIGKILL (the OOM killer, `kill -9`) runs no exit hook, and Python's
    fork server and its loader processes then kept each other alive for good: each loader
    holds the server's liveness pipe open, and watches only its own parent, the server. They
    held RAM (about 350 MB each) and the dead worker's stdout, which hung whatever waited for
    its output to end."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) != 0:
        return  # not allowed here (a sandbox): the worker's exit hook is still the net
    if parent is not None and os.getppid() != parent:
        os._exit(0)


def start_server_early(device: torch.device) -> None:
    """On a GPU worker's start, the loader processes' fork server (worker_context) begins its
    imports while the first job is claimed and set up. Started with the job's loader
    processes instead, a job whose first batch is streamed (nothing decoded first to overlap
    them) waited for those imports on 2 cores before its first step. If it cannot start now,
    the first job starts it, and says why if it cannot either."""
    if device.type == "cuda":
        with suppress(OSError):
            worker_context()


def loader_processes(num_workers: int) -> dict:
    """DataLoader arguments for `num_workers` loader processes: where they start, and that
    they leave stopping to the main process."""
    if not num_workers:
        return {}
    return {"multiprocessing_context": worker_context(), "worker_init_fn": ignore_stop_signals}


def shut_down(loader: DataLoader) -> None:
    """End a DataLoader's persistent loader processes (each gets its end-of-work message and
    exits by itself; torch's own shutdown, which its iterator otherwise runs when collected)."""
    iterator = getattr(loader, "_iterator", None)
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    loader._iterator = None


def worker_context() -> multiprocessing.context.BaseContext | None:
    """Where loader processes start: a fork server, never a fork of this process (its heartbeat
    thread could hold a lock at fork time and deadlock the child).

    The server imports torch and the data modules once, so each loader process starts in a
    fraction of a second instead of importing them itself (on the 2-core dev VM: a second pair
    of loader processes 0.1 s instead of 6-8 s; eight of them on a small Colab VM would import
    torch eight times over on two cores). The first call starts the server, whose imports then
    run while the job builds its model and decodes its images.

    The server is started with the stop signals ignored, which it keeps across its exec and
    hands to every process it forks: a signal to the process group then neither kills it (no
    loader could start after that) nor a loader between its fork and its worker_init_fn.
    Started from the main thread, it dies with this process (see end_with_parent); from
    another thread it could not (the signal would come when that thread ends)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    from multiprocessing import forkserver

    context = multiprocessing.get_context("forkserver")
    # loaderserver first: the server asks to die with this process before its imports.
    context.set_forkserver_preload(["cherry_train.worker.inputs.loaderserver",
                                    "cherry_train.worker.inputs.data"])  # and the pipelines
    with _stop_signals_ignored(), _server_parent():
        forkserver.ensure_running()
    return context


@contextmanager
def _server_parent():
    """This process's pid in the environment while the body starts the fork server (which
    takes its environment at that moment), when on the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    os.environ[SERVER_PARENT] = str(os.getpid())
    try:
        yield
    finally:
        os.environ.pop(SERVER_PARENT, None)


@contextmanager
def _stop_signals_ignored():
    """Ignore the stop signals in this process while the body starts a child. A signal that
    arrives meanwhile is lost, which for starting one process is a few milliseconds."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal.signal only works there; the notebook and the CLI train on it
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def usable_cores() -> int:
    """The cores this process may run on (a container or `taskset` may allow fewer than the
    machine has: os.cpu_count() would count them all)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


#: What one loader process costs in RAM besides its batches: a forked Python with torch,
#: PIL and numpy imported (about 350 MB resident measured on the dev VM), with headroom.
LOADER_PROCESS_BYTES = 500 << 20


def available_memory() -> int | None:
    """RAM this process may still use: the kernel's MemAvailable, or less if a cgroup limit
    (a container) leaves less. None where neither can be read."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        if limit != "max":
            found.append(int(limit) - used)
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def size_loader_pool(configured: int | None, on_gpu: bool, batch_size: int, image_size: int,
                     cores: int, free: int | None) -> tuple[int, str]:
    """How many loader processes, and why: on a GPU as many as the cores this process may use
    (at most 8), on the CPU none (training needs the cores); never more than the cores (a
    Colab VM has 2: eight decoders there only fight over them), nor more than half the
    available RAM (`free` bytes) holds: each is a whole Python with torch, plus its prefetched
    batches."""
    if configured is not None:
        wanted, why = configured, "data.num_workers"
    elif on_gpu:
        wanted, why = min(8, cores), f"{cores} usable cores"
    else:
        return 0, "training on the CPU needs its cores"
    if wanted > cores:
        wanted, why = cores, f"capped at the {cores} cores this process may use"
    if wanted and free is not None:
        each = LOADER_PROCESS_BYTES + 2 * batch_size * 3 * image_size * image_size  # prefetch 2
        fits = max(1, int(free / 2 // each))
        if fits < wanted:
            wanted, why = fits, (f"capped by RAM: {free / 2**30:.1f} GiB available, about "
                                 f"{each / 2**20:.0f} MiB each")
    return wanted, why


def loader_cap(previous: AttemptEnd | None) -> int | None:
    """Half the previous attempt's loader processes when one of them died (killed for memory,
    most likely: fewer processes need less of it); else no cap."""
    if previous is None or previous.error is None or previous.error.type != "LoaderDied":
        return None
    return (previous.loader_processes or 0) // 2


def end_loader_processes() -> None:
    """At exit: kill loader processes still alive (an attempt's own are shut down when it
    ends; this is the safety net). They ignore SIGTERM, which is all multiprocessing's exit
    hook sends them before it waits for them without a timeout: the worker would never exit."""
    for child in multiprocessing.active_children():
        child.kill()
        child.join(timeout=5)
