"""Which device and precision a job trains with, and how to describe them in results."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from cherry_train.schemas import Amp
from cherry_train.schemas.requires import Capabilities


@dataclass(frozen=True)
class Precision:
    name: str  # "bf16" | "fp16" | "off": what result.json records
    dtype: torch.dtype | None

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    @property
    def needs_scaler(self) -> bool:
        # fp16 has too little range for small gradients; bf16 has fp32's exponent.
        return self.dtype == torch.float16


def pick_device() -> torch.device:
    """The first GPU if there is one; CHERRY_DEVICE=cpu forces the CPU (tests on a GPU host)."""
    forced = os.environ.get("CHERRY_DEVICE")
    if forced:
        return torch.device(forced)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def native_bf16() -> bool:
    """bf16 in the GPU's hardware: compute capability 8.0 and newer (A100, L4, H100). torch's
    is_bf16_supported() says True on a T4 (7.5) too, where bf16 is emulated, several times
    slower than its fp16 tensor cores."""
    return torch.cuda.get_device_capability()[0] >= 8


def resolve_precision(amp: Amp, device: torch.device) -> Precision:
    if amp == Amp.off or (amp == Amp.auto and device.type != "cuda"):
        return Precision("off", None)
    if amp == Amp.bf16 or (amp == Amp.auto and native_bf16()):
        return Precision("bf16", torch.bfloat16)
    return Precision("fp16", torch.float16)  # T4 and older: fp16 with a GradScaler


def describe(device: torch.device, ranks: int = 1) -> str:
    """"NVIDIA L4", "2x NVIDIA H200" (a job over two GPUs), "CPU (2 threads)"."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({torch.get_num_threads()} threads)"
    return f"{ranks}x {name}" if ranks > 1 else name


def seed_and_determinism(seed: int, deterministic: bool, device: torch.device) -> None:
    """The initial weights come from the seed (later randomness is restored from checkpoints);
    `deterministic` trades speed for bitwise repeatable kernels."""
    if deterministic and device.type == "cuda":
        # cuBLAS is only deterministic with a fixed workspace; read when its handle is created.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cuda.matmul.allow_tf32 = not deterministic
        torch.backends.cudnn.allow_tf32 = not deterministic
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def capabilities(gpus: int | None = None) -> Capabilities:
    """What this worker offers the jobs' `requires:` (published in its status file): the device
    pick_device() chooses, and on CUDA its first GPU's name, memory and bf16 support, and how
    many GPUs each job trains over (`gpus`, the --gpus option; None: every visible one)."""
    device = pick_device()
    if device.type != "cuda":
        return Capabilities(device=device.type)
    props = torch.cuda.get_device_properties(device)
    count = torch.cuda.device_count()
    return Capabilities(device="cuda", gpu_name=props.name,
                        gpu_memory_gb=round(props.total_memory / 1e9, 1),
                        bf16=native_bf16(),
                        gpus=min(gpus, count) if gpus else count)
