"""What a data folder must look like, checked by `cherry submit`'s pre-flight on the laptop and by
the worker before training, with the same words in both places: one folder per class, the same
classes in train and val, as many as model.num_classes, and images in each."""

from __future__ import annotations

CLASS_LAYOUT = "expected one folder per class, e.g. good/ and defect/"


def missing_folder(field: str, where: object, under: str | None = None) -> str:
    return f"{field}: folder {where} does not exist" + (f" under {under}" if under else "")


def no_class_folders(field: str, where: object) -> str:
    return f"{field}: {where} has no class folders ({CLASS_LAYOUT})"


def empty_class(field: str, name: str) -> str:
    return f"{field}: class folder {name!r} has no images"


def class_problems(train: list[str], val: list[str] | None, num_classes: int) -> list[str]:
    """The problems of the class folders found in train (and val, when known)."""
    problems = []
    if val is not None and train != val:
        problems.append(f"data.val_path: class folders {val} differ from data.train_path's "
                        f"{train}")
    if len(train) != num_classes:
        problems.append(f"model.num_classes: is {num_classes}, but data.train_path has "
                        f"{len(train)} class folders: {', '.join(train)}")
    return problems
