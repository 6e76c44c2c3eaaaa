"""The training config a user writes in YAML: every field, its default and its bounds.

Unknown keys are rejected (a typo must not silently fall back to a default), and every error
names the dotted field. No I/O beyond parsing text, no torch: the laptop client imports this.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from cherry_train.schemas.requires import RequiresSection
from cherry_train.schemas.sweep import SweepSection

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
#: Job and sweep ids (jobqueue/ids.py makes them): each is a file or folder name in the queue
#: folder and on the laptop (`cherry fetch`), so never a path, '..', or empty.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class Mode(str, Enum):
    development = "development"  # a small subset, few batches: does the job run at all?
    training = "training"
    evaluation = "evaluation"  # no training: measure a trained model (see `evaluate`)


class Amp(str, Enum):
    auto = "auto"  # bf16 where the GPU supports it, fp16 + GradScaler otherwise, off on CPU
    bf16 = "bf16"
    fp16 = "fp16"
    off = "off"


class _Section(BaseModel):
    # extra="forbid" is what turns a typo such as `learnig_rate` into an error, not a default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name: str = Field("resnet50", min_length=1, max_length=64,
                      description="A torchvision classification model, e.g. resnet50, resnet18, "
                                  "mobilenet_v3_small, efficientnet_b0; or timm/<name>, e.g. "
                                  "timm/convnext_tiny (pip install 'cherry-train[timm]').")
    num_classes: int = Field(ge=2, le=100_000, description="Number of class folders.")
    pretrained: bool | str = Field(
        False,
        description="true: torchvision's default ImageNet weights (downloaded on the worker); "
                    "a path: a weights file (a state dict); false: random init. Layers whose "
                    "shape differs (the classifier head) are left freshly initialised.")

    @field_validator("name")
    @classmethod
    def _lowercase_identifier(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z][a-z0-9_]*|timm/[a-z0-9_]+(\.[a-z0-9_]+)?", v):
            raise ValueError("must be a torchvision model name such as resnet50 (lowercase "
                             "letters, digits and underscores) or timm/<name> such as "
                             "timm/convnext_tiny")
        return v

    @field_validator("pretrained", mode="before")
    @classmethod
    def _bool_or_path(cls, v: object) -> object:
        if isinstance(v, bool) or (isinstance(v, str) and v.strip()):
            return v
        raise ValueError("must be true, false or the path of a weights file")


class TrainingSection(_Section):
    epochs: int = Field(ge=1, le=100_000)
    batch_size: int = Field(ge=1, le=65_536, description="Images per optimizer step.")
    learning_rate: float = Field(gt=0, le=10)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    weight_decay: float = Field(0.0, ge=0, le=1, description="L2 penalty (decoupled for adamw).")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD only.")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="cosine: anneal to 0 over all epochs, per step.")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Cross-entropy label smoothing.")


class DataSection(_Section):
    train_path: str | None = Field(
        None, min_length=1,
        description="ImageFolder root: one folder per class (required unless mode is "
                    "evaluation). /content/drive/MyDrive/... is mapped off Colab; relative paths "
                    "are relative to the queue root.")
    val_path: str = Field(min_length=1, description="Same class folders as train_path.")
    archive: str | None = Field(None, min_length=1, description="A .zip/.tar(.gz) holding the "
                                "dataset; then train_path and val_path are folders inside it.")
    cache: bool = Field(True, description="Copy the data to the worker's local disk first "
                        "(verified, reused while unchanged); needed for archives.")
    pack: Literal["auto", "on", "off"] = Field(
        "auto", description="Copy each data folder to the worker through its data pack (a few "
        "large tar shards beside the folder, `<folder>.cherry-pack/`) instead of file by file: "
        "through the Drive mount, minutes faster for thousands of files. The first worker to "
        "copy a folder builds it (auto: for 2,000 files or more; it takes as much Drive space "
        "as the folder), or build it ahead with `cherry data pack PATH`. off: neither.")
    image_size: int | Literal["auto"] = Field(
        224, description="Square input size in pixels (16 to 2048), or auto: the model's own "
        "(timm models' pretrained input size; 224 for torchvision's).")
    num_workers: int | None = Field(None, ge=0, le=64,
                                    description="DataLoader processes; null: chosen by the worker.")

    @field_validator("image_size")
    @classmethod
    def _pixels(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 16:
            raise ValueError("Input should be greater than or equal to 16 (pixels), or auto")
        if isinstance(v, int) and v > 2048:
            raise ValueError("Input should be less than or equal to 2048 (pixels), or auto")
        return v

    @field_validator("cache")
    @classmethod
    def _archive_needs_cache(cls, v: bool, info: ValidationInfo) -> bool:
        if info.data.get("archive") and not v:
            raise ValueError("must stay true with data.archive: the archive is extracted into "
                             "the local cache")
        return v


class AugmentationSection(_Section):
    enabled: bool = Field(True, description="Random resized crop + horizontal flip on train.")
    normalize: bool = Field(True, description="Normalise with ImageNet mean/std.")
    min_crop_scale: float = Field(0.5, gt=0, le=1,
                                  description="Smallest crop area, as a fraction of the image.")


class CheckpointSection(_Section):
    every_minutes: float = Field(10.0, gt=0, le=24 * 60,
                                 description="Wall time between checkpoints (plus one per epoch).")
    every_steps: int | None = Field(None, ge=1, description="Also checkpoint every N steps.")
    keep_last: int = Field(2, ge=1, le=100, description="Checkpoints kept (the best is kept too).")
    keep_after_finish: int = Field(
        0, ge=0, le=100, description="Checkpoints kept once the job has succeeded (they only "
        "serve resume; best.pt and final.pt hold the weights). A failed or cancelled job keeps "
        "at least its newest, for `cherry retry`.")


class PerformanceSection(_Section):
    input_pipeline: Literal["auto", "gpu", "split", "stream", "workers"] = Field(
        "auto", description="gpu: decode every image once into a uint8 cache in GPU memory and "
        "crop, resize and flip whole batches on the GPU (same random draws as the workers). "
        "stream: decode each batch's JPEGs on the GPU (nvJPEG) from the files' bytes, then "
        "the same crops and flips: for sets too large to keep decoded. split: the share of the "
        "images that fits in a third of the free GPU memory decoded once as by gpu, only the "
        "rest streamed. workers: decode and augment every step in DataLoader processes. auto: "
        "gpu on a CUDA device when the decoded set fits in a third of the free GPU memory; "
        "else, when most files are JPEGs, split when at least 5% of it fits, stream when less "
        "does; else workers.")
    resident_share: float | None = Field(
        None, gt=0, lt=1, description="With input_pipeline: split, the share of the images "
        "(train and val alike) kept decoded in GPU memory, instead of what fits: the same split "
        "on every attempt (what deterministic: true needs for identical weights after a "
        "resume when the free GPU memory may differ).")
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="torch.compile the model. auto: on a CUDA device, when the training "
        "time left (measured on the first steps) is long enough to pay back compiling.")
    fused_optimizer: bool = Field(True, description="Fused Adam/AdamW/SGD kernels on CUDA.")

    @model_validator(mode="after")
    def _share_with_split(self) -> PerformanceSection:
        if self.resident_share is not None and self.input_pipeline != "split":
            raise ValueError(f"resident_share: only with input_pipeline: split (it is "
                             f"{self.input_pipeline}); remove it, or set input_pipeline: split")
        return self

    @model_serializer(mode="wrap")
    def _without_unset_share(self, handler):
        # Written as before resident_share existed when it is not set: a worker of an earlier
        # version (extra="forbid") would otherwise reject every new manifest.
        data = handler(self)
        if isinstance(data, dict) and self.resident_share is None:
            data.pop("resident_share", None)
        return data


class EvaluateSection(_Section):
    job: str | None = Field(None, pattern=ID_PATTERN, description="A finished job: its best "
                            "weights and its model are evaluated.")
    weights: str | None = Field(None, min_length=1, description="Or a weights file (a state "
                                "dict) for the model of this config.")
    data_path: str | None = Field(None, min_length=1, description="The ImageFolder to evaluate "
                                  "on (default: data.val_path), e.g. a held-out test set.")
    latency: bool = Field(True, description="Also time inference: latency at batch 1 and "
                          "throughput at batch 64 on the worker's device.")

    @model_validator(mode="after")
    def _one_source(self) -> EvaluateSection:
        if (self.job is None) == (self.weights is None):
            raise ValueError("give exactly one of job (a finished job's id) or weights (a "
                             "weights file)")
        return self


class ExportSection(_Section):
    onnx: bool = Field(True, description="Export the best weights to model.onnx at the end of a "
                       "successful job (and in mode: evaluation), checked with onnxruntime; a "
                       "failed export or check is recorded in the result, never fails the job.")
    opset: int = Field(18, ge=13, le=23, description="The ONNX opset.")
    tolerance: float = Field(1e-3, gt=0, description="The largest logit difference onnxruntime "
                             "may show against PyTorch (same top-1 class required as well).")
    check_images: int = Field(256, ge=1, description="Validation images the check runs.")


def check_webhook(url: str) -> str:
    """A webhook URL a worker may POST to: http(s) with a host. The error never repeats the URL:
    a Slack or Discord webhook carries its secret in the path."""
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018 (a port that is not a number raises here)
    except (ValueError, AttributeError):
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or \
            any(c.isspace() for c in url.strip()):
        raise ValueError("must be an http:// or https:// URL with a host (a Slack, Discord or "
                         "ntfy webhook)")
    if parts.hostname in METADATA_HOSTS or parts.hostname.startswith("169.254."):
        # A job config comes from the shared folder: it must not aim the worker at the VM's
        # metadata server (which hands out credentials).
        raise ValueError(f"{parts.hostname} is the cloud VM's metadata server, not a webhook")
    return url.strip()


#: Hosts a config's webhook may not name (see check_webhook).
METADATA_HOSTS = ("metadata.google.internal", "metadata", "169.254.169.254")


class NotifySection(_Section):
    webhook: str | None = Field(
        None, description="POST one message here when the job ends (succeeded, failed, pruned, "
        "cancelled, or handed back after an error): a Slack or Discord incoming webhook, or an "
        "ntfy topic URL. Anyone who can read the queue folder can read it.")

    @field_validator("webhook")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        return None if v is None else check_webhook(v)


class TrainingConfig(_Section):
    """A whole training job, as written in the user's YAML."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True,
                              title="cherry-train training config")

    name: str | None = Field(
        None, pattern=NAME_PATTERN,
        description="Experiment name (letters, digits, '.', '_', '-'); defaults to the config "
                    "file's name.")
    mode: Mode = Field(Mode.training, description="development: 8 batches per epoch and 4 val "
                       "batches, to check that a job runs at all.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seeds initial weights, data order and "
                      "augmentation.")
    deterministic: bool = Field(False, description="Deterministic kernels; on CPU with the same "
                                "thread count, a resumed run ends with the same weights.")
    amp: Amp = Field(Amp.auto, description="Mixed precision. auto: bf16 on GPUs that support it, "
                     "fp16 with a GradScaler on others (T4), off on CPU.")
    priority: int = Field(0, ge=-1000, le=1000, description="Higher runs first.")
    max_attempts: int = Field(3, ge=1, le=1000, description="Consecutive attempts that may end "
                              "without a new checkpoint before the job fails (crash loop).")
    heartbeat_seconds: float = Field(30.0, gt=0, le=3600, description="How often the running "
                                     "worker rewrites heartbeat.json.")
    lease_seconds: float = Field(300.0, gt=0, le=7 * 86400, description="A running job whose "
                                 "heartbeat is older than this may be taken over.")
    log_every_steps: int = Field(10, ge=1, description="Steps between train metrics lines.")
    export: ExportSection = ExportSection()
    tensorboard: bool = Field(True, description="Also write TensorBoard event files into "
                              "done/<job_id>/tensorboard/ (`cherry tensorboard` shows them).")

    model: ModelConfig | None = Field(None, description="Required, except in mode: evaluation "
                                      "with evaluate.job (the job's own model is used).")
    training: TrainingSection | None = Field(None, description="Required unless mode is "
                                             "evaluation.")
    data: DataSection
    augmentation: AugmentationSection = AugmentationSection()
    checkpoint: CheckpointSection = CheckpointSection()
    performance: PerformanceSection = PerformanceSection()
    evaluate: EvaluateSection | None = Field(None, description="With mode: evaluation only.")
    sweep: SweepSection | None = Field(None, description="Vary hyperparameters: each trial is a "
                                       "job of its own (see Sweeps in the README).")
    requires: RequiresSection = Field(RequiresSection(), description="What the worker must "
                                      "have; a worker without it never claims the job.")
    notify: NotifySection = NotifySection()

    @model_validator(mode="after")
    def _sections_for_the_mode(self) -> TrainingConfig:
        evaluating = self.mode == Mode.evaluation
        if self.model is None and not (evaluating and self.evaluate and self.evaluate.job):
            raise ValueError("model: required, but missing (only mode: evaluation with "
                             "evaluate.job goes without it: the job's own model is used)")
        if evaluating and self.evaluate is None:
            raise ValueError("evaluate: required with mode: evaluation (job: JOB_ID, or "
                             "weights: PATH)")
        if evaluating and self.sweep is not None:
            raise ValueError("sweep: only for training (mode: training or development)")
        if not evaluating:
            if self.evaluate is not None:
                raise ValueError("evaluate: only with mode: evaluation")
            if self.training is None:
                raise ValueError("training: required, but missing (only mode: evaluation "
                                 "goes without it)")
            if self.data.train_path is None:
                raise ValueError("data.train_path: required, but missing (only mode: "
                                 "evaluation goes without it)")
        return self

    @model_validator(mode="after")
    def _compile_or_deterministic(self) -> TrainingConfig:
        if self.deterministic and self.performance.compile == "on":
            raise ValueError("performance.compile: 'on' contradicts deterministic: true "
                             "(compiled kernels may differ from run to run); use 'auto' or "
                             "'off', which never compile a deterministic job")
        return self

    @model_serializer(mode="wrap")
    def _without_empty_requires(self, handler):
        # A job that requires nothing is written as before `requires:` existed: a worker of an
        # earlier version (extra="forbid") would otherwise reject every new manifest.
        data = handler(self)
        if isinstance(data, dict) and self.requires == RequiresSection():
            data.pop("requires", None)
        return data

    @property
    def epochs(self) -> int | None:
        return self.training.epochs if self.training else None

    @field_validator("lease_seconds")
    @classmethod
    def _lease_outlives_heartbeat(cls, v: float, info: ValidationInfo) -> float:
        heartbeat = info.data.get("heartbeat_seconds")  # absent if it failed validation itself
        if heartbeat is not None and v <= 2 * heartbeat:
            raise ValueError(f"must be more than twice heartbeat_seconds ({heartbeat:g}), "
                             "or a slow heartbeat would look like a dead worker")
        return v
