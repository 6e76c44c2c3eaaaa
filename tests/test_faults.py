"""The fault hooks the crash tests and benchmarks steer through the environment (faults.py)."""

from __future__ import annotations

from cherry_train import faults


def test_slow_sleeps_as_long_as_asked_and_not_at_all_for_zero(monkeypatch):
    slept = []
    monkeypatch.setattr(faults.time, "sleep", slept.append)
    monkeypatch.setenv("CHERRY_SLOW", "open:0.02,stat:0")
    faults.slow("open")
    faults.slow("stat")  # 0 s: no sleep(0), which costs a syscall each of 60,000 stats
    faults.slow("decode")  # not named
    assert slept == [0.02]
    monkeypatch.delenv("CHERRY_SLOW")
    faults.slow("open")
    assert slept == [0.02]
