"""One model of every torchvision family through pre-flight and a real one-step worker job:
the same forward pass and loss serve pre-flight, training, validation and evaluation, so a
model that passes pre-flight trains (googlenet and inception_v3 return several heads' scores
while training; pre-flight once handled that and training did not)."""

from __future__ import annotations

import warnings

import pytest

from cherry_train.client.submit import preflight
from cherry_train.jobqueue.claims import WorkerIdentity
from cherry_train.jobqueue.lifecycle import JobQueue
from cherry_train.jobqueue.views import job_view
from cherry_train.schemas import JobState, validate_config
from cherry_train.storage import LocalStorage
from cherry_train.worker.loop import Worker, WorkerOptions

pytestmark = pytest.mark.slow

#: The smallest model of each family (torchvision module), at the smallest size it trains at.
FAMILIES = {
    "alexnet": 63, "convnext_tiny": 32, "densenet121": 32, "efficientnet_b0": 32,
    "googlenet": 32, "inception_v3": 75, "maxvit_t": 224, "mnasnet0_5": 32, "mobilenet_v2": 32,
    "mobilenet_v3_small": 32, "regnet_x_400mf": 32, "resnet18": 32, "shufflenet_v2_x0_5": 32,
    "squeezenet1_0": 32, "swin_t": 32, "vgg11": 32, "vit_b_16": 224,
}
#: Worker jobs write a checkpoint, best.pt and final.pt: these families' smallest models are
#: 30-129 M parameters (0.1-0.5 GB each file), too much disk and time for the 2-core default
#: run; they go through pre-flight (the same forward and loss) only, and that with -m long.
HEAVY = {"alexnet", "vgg11", "vit_b_16", "maxvit_t"}


@pytest.fixture(scope="module")
def few_cherries(tmp_path_factory):
    """8 train + 4 val images: one step of batch 8, validation on 4."""
    from cherry_train.demo.cherries import generate_dataset

    data = tmp_path_factory.mktemp("few")
    generate_dataset(data, train=8, val=4, size=40, seed=2)
    return data


def job_config(name: str, size: int) -> dict:
    return {
        "name": name.replace("_", "-"), "seed": 1, "mode": "development",
        "model": {"name": name, "num_classes": 2, "pretrained": False},
        # SGD without momentum: no optimizer state, so checkpoints are the weights alone.
        "training": {"epochs": 1, "batch_size": 8, "learning_rate": 0.001, "optimizer": "sgd",
                     "momentum": 0.0},
        "data": {"train_path": "data/train", "val_path": "data/val", "image_size": size,
                 "num_workers": 0, "cache": False},
        "checkpoint": {"keep_last": 1}, "heartbeat_seconds": 1, "max_attempts": 1,
        "export": {"onnx": False},
    }


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.long) if n in HEAVY else n
                                  for n in sorted(FAMILIES)])
def test_preflight_trains_one_model_of_every_family(name, few_cherries):
    warnings.filterwarnings("ignore", category=FutureWarning)  # googlenet's init notice
    cfg = validate_config({**job_config(name, FAMILIES[name]),
                           "data": {**job_config(name, FAMILIES[name])["data"],
                                    "train_path": str(few_cherries / "train"),
                                    "val_path": str(few_cherries / "val")}})
    report = preflight(cfg, None)
    assert "training steps of" in report.render()


def test_a_real_one_step_worker_job_for_each_family(tmp_path, few_cherries):
    root = tmp_path / "root"
    root.mkdir()
    (root / "data").symlink_to(few_cherries, target_is_directory=True)
    queue = JobQueue(LocalStorage(root))
    jobs = {name: queue.submit(validate_config(job_config(name, size))).job_id
            for name, size in FAMILIES.items() if name not in HEAVY}
    assert {"googlenet", "inception_v3"} <= jobs.keys()
    worker = Worker(queue, WorkerIdentity("families"),
                    WorkerOptions(exit_when_idle=True, poll_min_seconds=0.01))
    assert worker.run() == 0
    for name, job_id in jobs.items():
        view = job_view(queue, job_id)
        assert view.state == JobState.succeeded, (name, view.error)
        assert view.result.steps_completed == 1, name
