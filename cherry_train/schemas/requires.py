"""What a job needs of its worker (the config's `requires:`), what a worker has (published in
its workers/<id>.json), and how the two are compared: a worker claims only the jobs whose
requirements it meets, and `cherry status` names what no live worker has."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: A GPU meets `gpu_memory_gb: N` with at least this share of N GB: cards are sold by nominal
#: size and report a little less (a "16 GB" T4 shows about 15.8 GB, a "24 GB" L4 about 23.7).
MEMORY_SLACK = 0.95


class Capabilities(BaseModel):
    """What a worker can run jobs on, measured once at its start (worker/training/device.py)."""

    model_config = ConfigDict(extra="ignore")  # a newer worker's fields are left alone

    device: str  # "cuda" | "cpu"
    gpu_name: str | None = None
    gpu_memory_gb: float | None = None  # of each GPU (its first one), in GB (10^9 bytes)
    bf16: bool = False
    gpus: int = 0  # the GPUs each job trains over (--gpus; all visible by default)

    def describe(self) -> str:
        """"1x Tesla T4 15.8 GB", "CPU"."""
        if self.device != "cuda":
            return "CPU"
        memory = f" {self.gpu_memory_gb:.1f} GB" if self.gpu_memory_gb is not None else ""
        return f"{self.gpus}x {(self.gpu_name or 'GPU').replace('NVIDIA ', '')}{memory}"


class RequiresSection(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    device: Literal["cuda", "cpu"] | None = Field(
        None, description="cuda: a GPU worker only; cpu: a worker without one (or CHERRY_DEVICE="
                          "cpu). Unset: any.")
    gpus: int | None = Field(None, ge=1, le=64, description="At least this many GPUs for each "
                             "job (a worker's --gpus, all it has by default).")
    gpu_memory_gb: float | None = Field(
        None, gt=0, le=1024, description=f"At least this much memory per GPU, in GB as sold (a "
        f"GPU with {MEMORY_SLACK:.0%} of it qualifies: a 16 GB T4 reports about 15.8).")
    bf16: bool = Field(False, description="true: a GPU with bfloat16 (A100, L4, H100; not T4).")

    @model_validator(mode="after")
    def _gpu_needs_cuda(self) -> RequiresSection:
        if self.device == "cpu" and (self.gpus or self.gpu_memory_gb or self.bf16):
            raise ValueError("gpus, gpu_memory_gb and bf16 need a GPU; they "
                             "contradict device: cpu")
        return self

    def wanted(self) -> list[str]:
        """Each requirement in words, as status shows them: "gpu_memory_gb >= 24"."""
        return [words for words, _ in self._checks()]

    def unmet(self, has: Capabilities) -> list[str]:
        """The requirements `has` does not meet, in words; [] if it can run the job."""
        return [words for words, met in self._checks() if not met(has)]

    def _checks(self):
        """(words, whether a worker meets it) for each requirement set. gpus, memory and
        bf16 are a GPU's: a CPU worker meets none of them."""
        if self.device is not None:
            yield f"device {self.device}", lambda has: has.device == self.device
        if self.gpus is not None:
            yield f"gpus >= {self.gpus}", lambda has: _gpu(has) and has.gpus >= self.gpus
        if self.gpu_memory_gb is not None:
            yield f"gpu_memory_gb >= {self.gpu_memory_gb:g}", lambda has: (
                _gpu(has) and has.gpu_memory_gb is not None
                and has.gpu_memory_gb >= MEMORY_SLACK * self.gpu_memory_gb)
        if self.bf16:
            yield "bf16", lambda has: _gpu(has) and has.bf16


def _gpu(has: Capabilities) -> bool:
    return has.device == "cuda"
