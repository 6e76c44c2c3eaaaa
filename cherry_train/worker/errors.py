"""What can end an attempt, sorted by whose it is to fix (docs/contract.md §8).

A `JobError` is the user's: the job fails at once with its message, no traceback. Anything
else (a loader process killed, a CUDA error, a bug) is not the job's fault: the attempt hands
the job back with the error in its history, and `max_attempts` ends crash loops.
"""

from __future__ import annotations

from typing import NoReturn


class JobError(Exception):
    """The job cannot run as configured (missing data, unknown model, bad weights file)."""


class LoaderDied(Exception):
    """A data loader process died under training (most often killed by the kernel for memory).
    The next attempt uses half as many loader processes."""


def is_loader_death(error: BaseException) -> bool:
    # torch's words: "DataLoader worker (pid(s) ...) exited unexpectedly" or "... is killed by
    # signal: ..."
    return isinstance(error, RuntimeError) and "DataLoader worker" in str(error)


def named(error: Exception) -> Exception:
    """A dead loader process as LoaderDied (the next attempt then uses half as many); any
    other error as it is."""
    if is_loader_death(error) and not isinstance(error, LoaderDied):
        return LoaderDied(f"a data loader process died ({str(error).splitlines()[0]}); killed "
                          "for memory? The next attempt uses half as many")
    return error


def raise_named(error: Exception) -> NoReturn:
    """Raise `error` as named() calls it, chained to the original when renamed."""
    renamed = named(error)
    if renamed is error:
        raise error
    raise renamed from error


def is_cuda_error(error: BaseException) -> bool:
    """A CUDA error that leaves this process's CUDA context unusable: every later CUDA call
    fails too, so the worker process must end (out of memory is not one: it is recoverable)."""
    import torch

    if isinstance(error, torch.OutOfMemoryError):
        return False
    if type(error).__name__ == "AcceleratorError":  # torch >= 2.8 raises this for CUDA errors
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        marker in text for marker in ("CUDA error", "CUBLAS_STATUS", "cuDNN error",
                                      "CUDNN_STATUS", "NCCL error"))
