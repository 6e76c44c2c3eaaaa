"""The `sweep:` section of a config: which hyperparameters to vary, how to choose the trials, and
when the workers stop a hopeless one early. Each trial is an ordinary job whose config is the
base config with the trial's values put in (jobqueue/sweeps.py makes them)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Parameter(_Section):
    """One hyperparameter, as a dotted config path: a list of `values` (grid, random, tpe), a
    range `{min, max, log}` (random, tpe), or `{choices}` (random, tpe)."""

    values: list[Any] | None = Field(None, min_length=1, description="The values to try.")
    min: float | None = Field(None, description="Lower end of a range.")
    max: float | None = Field(None, description="Upper end of a range.")
    log: bool = Field(False, description="Draw the range on a log scale (learning rates).")
    integer: bool = Field(False, description="Draw whole numbers from the range.")
    choices: list[Any] | None = Field(None, min_length=1, description="Values to draw from.")

    @model_validator(mode="after")
    def _one_kind(self) -> Parameter:
        kinds = [self.values is not None, self.min is not None or self.max is not None,
                 self.choices is not None]
        if sum(kinds) != 1:
            raise ValueError("give exactly one of: values: [...], min and max, choices: [...]")
        if kinds[1]:
            if self.min is None or self.max is None:
                raise ValueError("a range needs both min and max")
            if not self.min < self.max:
                raise ValueError(f"min ({self.min:g}) must be below max ({self.max:g})")
            if self.log and self.min <= 0:
                raise ValueError("a log range needs min > 0")
        return self

    @property
    def is_range(self) -> bool:
        return self.min is not None

    @property
    def options(self) -> list[Any] | None:
        """The discrete values, for values and choices; None for a range."""
        return self.values if self.values is not None else self.choices


class EarlyStop(_Section):
    method: Literal["asha", "median"] = Field(
        "asha", description="asha: at epochs grace_epochs x reduction^k a trial goes on only if "
        "it is in the top 1/reduction of the trials that reached that epoch, else it pauses "
        "(its worker takes other work) until promoted or, the rung complete, pruned; median: after "
        "grace_epochs, a trial worse than the median of the others at the same epoch stops.")
    grace_epochs: int = Field(1, ge=1, description="Epochs every trial trains before any stop.")
    reduction: int = Field(3, ge=2, le=100, description="asha: 1/reduction of the trials at a "
                           "rung go on to the next.")
    min_trials: int = Field(2, ge=1, description="median: how many other trials must have "
                            "reached an epoch before a trial is compared at it.")


class SweepSection(_Section):
    method: Literal["grid", "random", "tpe"] = Field(
        "grid", description="grid: every combination of the values; random: `trials` draws; "
        "tpe: Bayesian search (Optuna's TPE, needs `pip install 'cherry-train[sweep]'`), each "
        "trial chosen from the results so far.")
    trials: int | None = Field(None, ge=1, le=10_000, description="How many trials (random and "
                               "tpe; grid: at most the number of combinations, all by default).")
    parallel: int = Field(4, ge=1, le=1000, description="Trials queued or running at once; the "
                          "workers create the next ones as trials end.")
    metric: Literal["val_accuracy", "val_loss"] = Field(
        "val_accuracy", description="What the sweep optimises: val_accuracy is maximised, "
        "val_loss minimised (the best epoch of each trial counts).")
    parameters: dict[str, Parameter] = Field(
        min_length=1, description="Dotted config paths to vary, e.g. training.learning_rate.")
    early_stop: EarlyStop | None = Field(None, description="Stop hopeless trials early; their "
                                         "state is `pruned`.")

    @model_validator(mode="after")
    def _trials_for_the_method(self) -> SweepSection:
        if self.method == "grid":
            ranged = [k for k, p in self.parameters.items() if p.is_range]
            if ranged:
                raise ValueError(f"parameters: grid needs values (or choices) for each parameter; "
                                 f"{', '.join(ranged)} is a range (use method: random or tpe)")
        elif self.trials is None:
            raise ValueError(f"trials: required for method: {self.method} (how many to run)")
        for path in self.parameters:
            if path.split(".")[0] in ("sweep", "name", "mode") or not all(path.split(".")):
                raise ValueError(f"parameters: {path!r} cannot be swept")
        return self

    @property
    def maximize(self) -> bool:
        return self.metric == "val_accuracy"


class SweepRef(BaseModel):
    """In a trial's manifest: which sweep it belongs to, its number and its values."""

    model_config = ConfigDict(extra="ignore")

    id: str
    trial: int = Field(ge=1)
    params: dict[str, Any] = Field(default_factory=dict)
    metric: Literal["val_accuracy", "val_loss"] = "val_accuracy"
    early_stop: EarlyStop | None = None  # what the worker applies at each epoch's end
