"""The config reference table in the README, generated from the schema so they cannot drift."""

from __future__ import annotations

import typing
from enum import Enum

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from cherry_train.schemas.config import TrainingConfig


def _type_name(annotation) -> str:
    if typing.get_origin(annotation) is list:
        return "list"
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return " \\| ".join(f"`{m.value}`" for m in annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(annotation))
    args = typing.get_args(annotation)
    if args:
        names = [_type_name(a) for a in args if a is not type(None)]
        if type(None) in args:
            names.append("null")
        return " \\| ".join(dict.fromkeys(names))
    if typing.get_origin(annotation) is typing.Annotated:
        return _type_name(args[0])
    return {bool: "bool", int: "int", float: "float", str: "str"}.get(annotation,
                                                                      str(annotation))


def _bounds(field) -> str:
    parts = []
    for m in field.metadata:
        for attr, sym in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            if getattr(m, attr, None) is not None:
                parts.append(f"{sym} {getattr(m, attr)}")
    return ", ".join(parts)


def _default(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "**required**"
    value = field.default
    if isinstance(value, BaseModel):
        return ""
    if isinstance(value, Enum):
        value = value.value
    if value is None:
        return "null"
    return f"`{str(value).lower() if isinstance(value, bool) else value}`"


def _rows(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        annotation = field.annotation
        sections = [a for a in (typing.get_args(annotation) or (annotation,))
                    if isinstance(a, type) and issubclass(a, BaseModel)]
        if sections:  # a section (`X` or `X | None`): its fields, dotted
            keyed = typing.get_origin(annotation) is dict  # {any key: section}
            if field.description:
                yield (f"`{prefix}{name}`", "mapping" if keyed else "section", "",
                       field.description)
            yield from _rows(sections[0], f"{prefix}{name}.<key>." if keyed
                             else f"{prefix}{name}.")
            continue
        kind = _type_name(annotation)
        bounds = _bounds(field)
        yield (f"`{prefix}{name}`", kind + (f" ({bounds})" if bounds else ""), _default(field),
               (field.description or "").replace("|", "\\|"))


def config_reference() -> str:
    lines = ["| field | type | default | meaning |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in _rows(TrainingConfig)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(config_reference(), end="")
