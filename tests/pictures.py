"""Pictures the data tests share: a random JPEG of a size, and a folder holding every kind of
file a data folder may (what decodes, what only Pillow takes, what nothing decodes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def jpeg(path: Path, size: tuple[int, int], progressive: bool = False, seed: int = 0,
         mode: str = "RGB") -> None:
    """Noise of `size` (width, height) saved as a JPEG, quality 85."""
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), np.uint8)
    Image.fromarray(pixels).convert(mode).save(path, "JPEG", quality=85,
                                               progressive=progressive)


def mixed_folder(folder: Path, every_kind: bool = False) -> Path:
    """folder/a/: a PNG, a tall JPEG, a small baseline and a small progressive one (smaller
    than a 16 px job stores: kept as they are), and a file named .jpg that is not one.
    `every_kind` adds what a device encoder must hand to Pillow or refuse: a large progressive
    JPEG, a grey one, a CMYK one, and a JPEG cut short whose header still reads."""
    (folder / "a").mkdir(parents=True)
    Image.new("RGB", (64, 48), (200, 30, 40)).save(folder / "a" / "wide.png")
    jpeg(folder / "a" / "tall.jpg", (40, 60))
    jpeg(folder / "a" / "small.jpg", (20, 16))
    jpeg(folder / "a" / "small_progressive.jpg", (20, 16), progressive=True)
    (folder / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    if every_kind:
        jpeg(folder / "a" / "big_progressive.jpg", (80, 60), progressive=True, seed=1)
        jpeg(folder / "a" / "grey.jpg", (50, 70), mode="L", seed=2)
        jpeg(folder / "a" / "cmyk.jpg", (50, 50), mode="CMYK", seed=3)
        jpeg(folder / "a" / "cut.jpg", (64, 64), seed=4)
        cut = (folder / "a" / "cut.jpg").read_bytes()
        (folder / "a" / "cut.jpg").write_bytes(cut[:len(cut) // 2])
    return folder
