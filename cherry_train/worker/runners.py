"""Which Runner runs a job's attempt: the evaluator in mode: evaluation, else the trainer. Both
import torch, so they are imported here only once there is work."""

from __future__ import annotations

from cherry_train.jobqueue.claims import Claim
from cherry_train.schemas import Mode
from cherry_train.worker.outcome import Runner


def runner_for(claim: Claim, trainer: Runner | None, evaluator: Runner | None) -> Runner:
    """`evaluator` in mode: evaluation, else `trainer` (a test's fake, its seams), by default
    evaluate.Evaluation() and train.Training()."""
    if claim.manifest.config.mode == Mode.evaluation:
        if evaluator is None:
            from cherry_train.worker.evaluate import Evaluation

            return Evaluation()
        return evaluator
    if trainer is None:
        from cherry_train.worker.training.train import Training

        return Training()
    return trainer
