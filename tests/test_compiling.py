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
    # ResNet-50 at batch 256 on an H100: about 68 ms a step eager, 12% less compiled. Half an
    # hour of training saves more than compiling costs; 100 epochs of 20k images (9 minutes)
    # do not.
    assert compiling.pays_back(30_000, 0.068, 256)[0] is True
    assert compiling.pays_back(100 * 78, 0.068, 256)[0] is False
    # At batch 32, CUDA graphs save most of each step: six minutes of training is enough.
    assert compiling.pays_back(12_500, 0.027, 32)[0] is True
    assert compiling.pays_back(1_250, 0.027, 32)[0] is False
    assert compiling.mode_for(32) == "reduce-overhead" and compiling.mode_for(256) == "default"
