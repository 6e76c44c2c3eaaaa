"""What the ranks of a job agree on, and where: the one loop over epochs and steps that rank 0
(train.py) and every follower (followers.py) run, each with its own part (a `Side`). The
questions are asked here and nowhere else, so neither side can ask one the other does not: a
collective that one rank never reaches leaves the others blocked in it until the group's
timeout, and the attempt is lost. On one GPU the same loop runs; each answer is rank 0's alone.

What the ranks agree on: whether to end at the resume (a sweep trial paused at a rung), whether
to stop before an epoch and after each step (a stop asked of rank 0: a signal, a fence), and
whether to end after an epoch (a sweep trial pruned or paused). Rank 0 decides, the followers
say no, and the word is yes if any rank says yes. Checkpoints are not agreed: rank 0 alone
writes them, between two steps, and the followers need not know. Validation's collectives (the
BatchNorm statistics, the sums) are inside `end_epoch`, which every side runs at one point.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

import torch

from cherry_train.worker.checkpoints.state import TrainState
from cherry_train.worker.multigpu.distributed import Group

#: The questions, in the order of the loop; a question's number travels with every rank's word.
QUESTIONS = ("end at resume?", "stop before this epoch?", "stop after this step?",
             "end after this epoch?")
AT_RESUME, BEFORE_EPOCH, AFTER_STEP, AFTER_EPOCH = QUESTIONS
#: How train_epochs ends: every epoch trained, a stop agreed on, or ended early (a sweep's trial).
DONE, STOPPED, ENDED = "done", "stopped", "ended"


class Agreement:
    """Each rank's word at one point, and whether any rank said yes (Group.agree: ranks that
    ask different questions fail at once, naming both). `heard(question, word)`: a record of
    every question asked, for a test."""

    def __init__(self, group: Group | None,
                 heard: Callable[[str, bool], None] | None = None):
        self.group, self.heard = group, heard

    def __call__(self, question: str, flag: bool) -> bool:
        word = flag if self.group is None else \
            self.group.agree(flag, QUESTIONS.index(question), QUESTIONS)
        if self.heard is not None:
            self.heard(question, word)
        return word


class Side(Protocol):
    """One rank's part at each point of train_epochs: train.Leader on rank 0, which answers
    the questions, reports and checkpoints; followers.Follower on the others, which says no."""

    state: TrainState
    epochs: int

    def ends_at_resume(self) -> bool: ...

    def stop_asked(self) -> bool: ...

    def batches(self) -> Iterable[tuple[torch.Tensor, torch.Tensor]]: ...

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None: ...

    def between_steps(self) -> None: ...

    def stop(self) -> None: ...

    def steps_failed(self, error: Exception) -> bool: ...

    def end_epoch(self) -> bool: ...


def train_epochs(side: Side, agree: Agreement) -> str:
    """Every rank's epochs from where it resumed, question for question: DONE, STOPPED (the
    ranks agreed to stop; `side.stop()` ran) or ENDED (a sweep trial, at its rung)."""
    if agree(AT_RESUME, side.ends_at_resume()):
        return ENDED
    while side.state.epoch < side.epochs:
        if agree(BEFORE_EPOCH, side.stop_asked()):
            side.stop()
            return STOPPED
        try:
            for x, y in side.batches():
                side.step(x, y)
                if agree(AFTER_STEP, side.stop_asked()):  # every rank stops after this step
                    side.stop()
                    return STOPPED
                side.between_steps()
        except Exception as e:
            if side.steps_failed(e):  # the stop asked for (its signal may have caused this)
                return STOPPED
            raise
        if agree(AFTER_EPOCH, side.end_epoch()):
            return ENDED
    return DONE
