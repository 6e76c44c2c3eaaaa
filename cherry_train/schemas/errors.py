"""Turning pydantic's errors and YAML problems into one `dotted.field: problem` line each."""

from __future__ import annotations

import difflib
import re
import typing
from collections.abc import Iterable

from pydantic import BaseModel, ValidationError


class ConfigError(Exception):
    """A config the user must fix; `problems` are ready-to-print `field: problem` lines."""

    def __init__(self, problems: Iterable[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        super().__init__("\n".join(self.problems))


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the field at `loc` (for 'did you mean' hints)."""
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        candidates = typing.get_args(field.annotation) or (field.annotation,) if field else ()
        sections = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not sections:  # `X | None` sections count too
            return None
        model = sections[0]
    return model


#: Patterns in words: a regular expression is no answer to someone who mistyped a name.
PATTERN_WORDS = {
    r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$": "use 1 to 64 letters, digits, '.', '_' or '-', "
    "starting with a letter or digit (e.g. resnet50-lr3e-4)",
    r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$": "a job id is 1 to 128 letters, digits, '.', '_' or "
    "'-', starting with a letter or digit (e.g. 20261126-101500-resnet50-baseline-7f3a)",
}


#: Fields whose value is never repeated in an error: a webhook URL carries its secret.
SECRET_FIELDS = ("notify.webhook",)


def format_validation_error(error: ValidationError, model: type[BaseModel]) -> list[str]:
    errors = [(tuple(p for p in err["loc"] if not _is_union_branch(p)), err)
              for err in error.errors(include_url=False)]
    # A mistyped key is two errors to pydantic (the key unknown, the one meant missing) and one
    # mistake to the user: said once, as the unknown key with its suggestion.
    meant = {loc[:-1] + (close,) for loc, err in errors if err["type"] == "extra_forbidden"
             for close in _known_keys(model, loc)[0]}
    lines = [_line(loc, err, model) for loc, err in errors
             if not (err["type"] == "missing" and loc in meant)]
    # A union (e.g. bool | str) reports once per branch; one line per field is enough.
    return list(dict.fromkeys(_first_per_field(lines)))


def _known_keys(model: type[BaseModel], loc: tuple) -> tuple[list[str], list[str]]:
    """For an unknown key at `loc`: the known key it is closest to (if any), and all of them."""
    owner = _model_at(model, loc[:-1])
    known = sorted(owner.model_fields) if owner else []
    return difflib.get_close_matches(str(loc[-1]), known, n=1), known


def _line(loc: tuple, err: dict, model: type[BaseModel]) -> str:
    field = ".".join(str(p) for p in loc) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        close, known = _known_keys(model, loc)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        message = f"unknown key{hint} (allowed: {', '.join(known)})"
    elif kind in ("model_type", "dict_type", "model_attributes_type"):
        message = f"expected a mapping of keys, got {err['input']!r}"
    elif kind == "missing":
        message = "required, but missing"
    elif kind == "string_pattern_mismatch":
        pattern = err.get("ctx", {}).get("pattern", "")
        message = f"{err['input']!r} is not allowed; {PATTERN_WORDS.get(pattern, pattern)}"
    elif kind in ("literal_error", "enum"):
        allowed = err.get("ctx", {}).get("expected", "")
        message = f"{err['input']!r} is not allowed; expected {allowed}"
    else:
        message = err["msg"]
        if message.startswith("Value error, "):
            message = message[len("Value error, "):]
        named = re.match(r"^([a-z_][a-z0-9_.]*): (.*)$", message, re.S)
        if named and kind == "value_error" and isinstance(err.get("input"), dict):
            # A check across fields names the field itself ("evaluate: required ...").
            inner = named.group(1)
            field = inner if field == "(top level)" else f"{field}.{inner}"
            message = named.group(2)
        elif "input" in err and not isinstance(err["input"], dict | list) and \
                kind != "json_invalid" and \
                field not in SECRET_FIELDS:  # json_invalid: the input is then the whole file
            message += f" (got {err['input']!r})"
    return f"{field}: {message}"


def one_line(error: ValidationError, model: type[BaseModel], what: str, limit: int = 3) -> str:
    """A record's problems on one line (a log line, a status row): the first `limit` of them."""
    lines = format_validation_error(error, model)
    more = f"; and {len(lines) - limit} more" if len(lines) > limit else ""
    return f"{what}: " + "; ".join(x.removeprefix("(top level): ") for x in lines[:limit]) + more


def _is_union_branch(part: object) -> bool:
    # pydantic puts the branch type name ("bool", "str", "function-after[...]") in the location.
    return isinstance(part, str) and (part in ("bool", "str", "int", "float", "none")
                                      or "[" in part)


def _first_per_field(lines: list[str]) -> list[str]:
    seen: set[str] = set()
    for line in lines:
        field = line.split(":", 1)[0]
        if field not in seen:
            seen.add(field)
            yield line
