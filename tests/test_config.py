"""The training config: the seed's example validates unchanged; bad configs name their field."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import SEED_YAML

from cherry_train.schemas import ConfigError, TrainingConfig, config_json_schema, parse_config


def test_seed_example_validates_unchanged():
    config = parse_config(SEED_YAML, default_name="seed")
    assert config.model.name == "resnet50"
    assert config.model.pretrained is True
    assert config.training.epochs == 100 and config.training.optimizer == "adam"
    assert config.augmentation.normalize is False
    assert config.name == "seed"
    assert config.mode.value == "training" and config.amp.value == "auto"


def _with(path: str, value):
    data = yaml.safe_load(SEED_YAML)
    node = data
    *parents, last = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return yaml.safe_dump(data)


_DELETE = object()

BAD = [
    ("training.learnig_rate", _with("training.learnig_rate", 0.1), "did you mean 'learning_rate'"),
    ("training.epochs", _with("training.epochs", 0), "greater than or equal to 1"),
    ("training.batch_size", _with("training.batch_size", 0), "greater than or equal to 1"),
    ("training.batch_size", _with("training.batch_size", "many"), "integer"),
    ("training.learning_rate", _with("training.learning_rate", 0), "greater than 0"),
    ("training.learning_rate", _with("training.learning_rate", -0.1), "greater than 0"),
    ("training.optimizer", _with("training.optimizer", "rmsprop"), "'adam', 'adamw' or 'sgd'"),
    ("model.num_classes", _with("model.num_classes", 1), "greater than or equal to 2"),
    ("model.num_classes", _with("model.num_classes", _DELETE), "required"),
    ("model.name", _with("model.name", "ResNet-50"), "torchvision model name"),
    ("model.pretrained", _with("model.pretrained", 5), "true, false or the path"),
    ("model.pretrained", _with("model.pretrained", ""), "true, false or the path"),
    ("data.val_path", _with("data.val_path", _DELETE), "required"),
    ("data.train_path", _with("data.train_path", ""), "at least 1 character"),
    ("data.image_size", _with("data.image_size", 8), "greater than or equal to 16"),
    ("augmentation.normalise", _with("augmentation.normalise", True), "did you mean 'normalize'"),
    ("mode", _with("mode", "tuning"), "'development', 'training' or 'evaluation'"),
    ("evaluate", _with("mode", "evaluation"), "required with mode: evaluation"),
    ("evaluate", _with("evaluate", {"job": "x"}), "only with mode: evaluation"),
    ("training", _with("training", _DELETE), "required, but missing"),
    ("amp", _with("amp", "fp8"), "'auto', 'bf16', 'fp16' or 'off'"),
    ("lease_seconds", _with("lease_seconds", 40), "twice heartbeat_seconds"),
    ("performance.compile", _with("deterministic", True).replace(
        "deterministic: true", "deterministic: true\nperformance: {compile: 'on'}"),
     "contradicts deterministic: true"),
    ("heartbeat_seconds", _with("heartbeat_seconds", 0), "greater than 0"),
    ("max_attempts", _with("max_attempts", 0), "greater than or equal to 1"),
    ("checkpoint.every_minutes", _with("checkpoint.every_minutes", 0), "greater than 0"),
    ("name", _with("name", "my experiment!"), "letters, digits"),
    ("epochs", _with("epochs", 10), "unknown key"),
    ("model", "model: [1, 2]\ntraining: {}\n", "expected a mapping"),
    ("(top level)", "- just\n- a list\n", "expected a mapping"),
    ("(file)", "model: {name: [\n", "not valid YAML at line"),
]


@pytest.mark.parametrize(("field", "text", "message"), BAD, ids=[f"{b[0]}-{i}" for i, b in
                                                                  enumerate(BAD)])
def test_bad_config_names_the_field(field, text, message):
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    lines = info.value.problems
    matching = [line for line in lines if line.split(": ", 1)[0] == field]
    assert matching, lines
    assert message in matching[0], matching[0]


@pytest.mark.parametrize(("typo", "right"), [("training.learnig_rate", "learning_rate"),
                                             ("model.num_clases", "num_classes")])
def test_a_mistyped_key_is_one_line_with_its_fix(typo, right):
    """Renamed by a typo, a required key is unknown and missing at once: one mistake, one line."""
    section, wrong = typo.split(".")
    with pytest.raises(ConfigError) as info:
        parse_config(SEED_YAML.replace(f" {right}:", f" {wrong}:"))
    assert info.value.problems == [info.value.problems[0]]
    assert info.value.problems[0].startswith(f"{typo}: unknown key; did you mean '{right}'?")
    # A key that resembles nothing leaves the missing one said too.
    with pytest.raises(ConfigError) as info:
        parse_config(SEED_YAML.replace(f" {right}:", " zzz:"))
    assert [p.split(":")[0] for p in info.value.problems] == [f"{section}.{right}",
                                                              f"{section}.zzz"]


def test_one_line_per_field_even_for_unions():
    with pytest.raises(ConfigError) as info:
        parse_config(_with("model.pretrained", [1]))
    assert len([p for p in info.value.problems if p.startswith("model.pretrained")]) == 1


def test_pretrained_accepts_a_weights_path():
    config = parse_config(_with("model.pretrained", "weights/cherry.pt"))
    assert config.model.pretrained == "weights/cherry.pt"


def test_defaults_are_filled_in_and_round_trip():
    config = parse_config(SEED_YAML, default_name="my config (v2)")
    assert config.name == "my-config-v2"
    dumped = config.model_dump(mode="json")
    assert dumped["checkpoint"] == {"every_minutes": 10.0, "every_steps": None, "keep_last": 2,
                                    "keep_after_finish": 0}
    assert TrainingConfig.model_validate(dumped) == config


def test_json_schema_describes_every_section():
    schema = json.loads(config_json_schema())
    assert set(schema["required"]) == {"data"}  # model and training: unless evaluating
    assert {"model", "training", "data", "augmentation", "checkpoint", "amp", "mode"} <= \
        set(schema["properties"])
    assert schema["additionalProperties"] is False


def test_an_evaluation_needs_no_training_section():
    text = """
mode: evaluation
model: {name: resnet18, num_classes: 2}
data: {val_path: data/val}
evaluate: {job: 20261126-101500-resnet18-a-7f3a}
"""
    config = parse_config(text)
    assert config.training is None and config.epochs is None
    with pytest.raises(ConfigError) as info:
        parse_config(text.replace("{job:", "{weights: w.pt, job:"))
    assert info.value.problems == ["evaluate: give exactly one of job (a finished job's id) or "
                                   "weights (a weights file)"]
