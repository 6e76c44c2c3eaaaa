"""Sizes: for people (3.5 GB, 129.1 MB), and the side a training image size stores its images
at (the decoded GPU cache and the prepared data pack share it)."""

import math


def human_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def stored_side(image_size: int, min_scale: float) -> int:
    """The side of the stored copy: large enough that the smallest crop (area min_scale of the
    image) still has image_size pixels across, capped at twice image_size."""
    need = max(image_size / math.sqrt(min_scale), image_size * 4 / 3)
    return int(min(2 * image_size, math.ceil(need)))
