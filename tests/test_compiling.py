"""The compile decision: fixed where no timing is needed, else by measured pay-back."""

from __future__ import annotations

import torch

from cherry_train.worker import compiling

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def test_fixed_decisions():
    assert compiling.fixed_decision("off", CUDA, False)[0] is False
    assert compiling.fixed_decision("on", CPU, False)[0] is False  # no compiling on the CPU
    assert compiling.fixed_decision("auto", CUDA, True)[0] is False  # deterministic
    assert compiling.fixed_decision("on", CUDA, False)[0] is True
    assert compiling.fixed_decision("auto", CUDA, False) is None  # time it first


def test_a_long_job_compiles_and_a_short_one_does_not():
    # ResNet-50 at batch 256 on an H100: about 66 ms a step eager, 1.39x faster compiled. Ten
    # minutes of training save more than compiling costs; two minutes do not.
    assert compiling.pays_back(10_000, 0.066, 256)[0] is True
    assert compiling.pays_back(20 * 78, 0.066, 256)[0] is False
    # At batch 32, CUDA graphs save most of each step: six minutes of training is enough.
    assert compiling.pays_back(12_500, 0.020, 32)[0] is True
    assert compiling.pays_back(1_250, 0.020, 32)[0] is False
    assert compiling.mode_for(32) == "reduce-overhead" and compiling.mode_for(256) == "default"


def test_each_job_compiles_a_static_graph_in_a_long_lived_worker():
    # A worker process trains job after job. Without a reset, dynamo's caches (per code object,
    # shared by every ResNet) make the second job's graph symbolic in the batch dimension.
    graphs = []

    def record(gm, example_inputs, **kwargs):
        images = [t for t in example_inputs if isinstance(t, torch.Tensor) and t.dim() == 4
                  and t.shape[1] == 3 and t.shape[-1] == 32]
        graphs.append({"images": [tuple(t.shape) for t in images],
                       "symbolic": [t for t in example_inputs if isinstance(t, torch.SymInt)]})
        return gm.forward

    import torchvision

    for batch in (4, 8, 6):  # three jobs, three batch sizes
        model = torchvision.models.resnet18(num_classes=2)
        compiled, mode = compiling.compile_model(model, batch, backend=record)
        assert mode == "reduce-overhead"
        out = compiled(torch.randn(batch, 3, 32, 32))
        assert out.shape == (batch, 2)
    assert [g["images"] for g in graphs] == [[(4, 3, 32, 32)], [(8, 3, 32, 32)], [(6, 3, 32, 32)]]
    assert all(not g["symbolic"] for g in graphs)
