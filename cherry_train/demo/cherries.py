"""Synthetic cherry photos, so the demo and the tests train on something like the real task.

Each image is a round red fruit on a conveyor-like background, with a stem and a specular
highlight, under varied size, position, lighting and colour temperature. Half the images are
`defect`: a crack, dark rot spots or a bruise. The generator is a pure function of the seed,
so a dataset can be regenerated bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("defect", "good")  # ImageFolder sorts class folders; keep this order
DEFECTS = ("crack", "rot", "bruise")


@dataclass(frozen=True)
class DatasetSummary:
    root: Path
    train: int
    val: int
    image_size: int


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A belt-like background: a flat colour, a soft gradient and fine grain."""
    base = rng.uniform([40, 40, 40], [200, 200, 190])
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle = rng.uniform(0, 2 * math.pi)
    gradient = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None] * rng.uniform(-40, 40)
    grain = rng.normal(0, rng.uniform(2, 10), (size, size, 1))
    pixels = np.clip(base + gradient + grain, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def _fruit_layer(rng: np.random.Generator, size: int, cx: float, cy: float, r: float):
    """The cherry's colour with radial shading, and its (slightly elliptic) mask."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    squash = rng.uniform(0.88, 1.0)
    dist = np.sqrt(((xx - cx) / r) ** 2 + ((yy - cy) / (r * squash)) ** 2)
    mask = np.clip((1.0 - dist) * r / 1.5, 0, 1)  # ~1.5 px anti-aliased rim
    red = rng.uniform([120, 0, 10], [230, 40, 60])
    # Light comes from the upper left: darker towards the lower-right rim.
    lx, ly = (xx - cx) / r, (yy - cy) / r
    shade = np.clip(1.05 - 0.35 * dist**2 - 0.15 * (lx + ly), 0.35, 1.1)[..., None]
    colour = np.clip(red * shade, 0, 255)
    return colour, mask[..., None]


def _add_defect(kind: str, rng: np.random.Generator, img: np.ndarray, fruit: np.ndarray,
                cx: float, cy: float, r: float) -> None:
    size = img.shape[0]
    overlay = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(overlay)
    if kind == "crack":
        # A jagged dark line (sometimes two) across part of the fruit.
        for _ in range(rng.integers(1, 3)):
            a = rng.uniform(0, 2 * math.pi)
            x = cx + math.cos(a) * r * rng.uniform(0, 0.6)
            y = cy + math.sin(a) * r * rng.uniform(0, 0.6)
            heading = rng.uniform(0, 2 * math.pi)
            points = [(x, y)]
            for _ in range(rng.integers(4, 8)):
                heading += rng.uniform(-0.8, 0.8)
                step = r * rng.uniform(0.12, 0.25)
                x, y = x + math.cos(heading) * step, y + math.sin(heading) * step
                points.append((x, y))
            draw.line(points, fill=255, width=max(1, int(r * rng.uniform(0.06, 0.12))))
        colour, strength = np.array([35, 10, 8]), 0.9
    elif kind == "rot":
        for _ in range(rng.integers(1, 4)):
            a, d = rng.uniform(0, 2 * math.pi), r * rng.uniform(0, 0.65)
            x, y = cx + math.cos(a) * d, cy + math.sin(a) * d
            s = r * rng.uniform(0.15, 0.32)
            draw.ellipse((x - s, y - s * rng.uniform(0.7, 1.0), x + s, y + s), fill=255)
        overlay = overlay.filter(ImageFilter.GaussianBlur(max(0.6, r * 0.05)))
        colour, strength = rng.uniform([40, 25, 5], [80, 45, 20]), 0.85
    else:  # bruise: a large, soft, darker and duller patch
        a, d = rng.uniform(0, 2 * math.pi), r * rng.uniform(0, 0.45)
        x, y = cx + math.cos(a) * d, cy + math.sin(a) * d
        s = r * rng.uniform(0.35, 0.55)
        draw.ellipse((x - s, y - s, x + s, y + s), fill=255)
        overlay = overlay.filter(ImageFilter.GaussianBlur(r * 0.15))
        colour, strength = rng.uniform([60, 15, 25], [95, 35, 45]), 0.75
    alpha = (np.asarray(overlay, np.float32) / 255.0)[..., None] * fruit * strength
    img[:] = img * (1 - alpha) + colour * alpha


def render_cherry(seed: int, defect: str | None, size: int = 96) -> Image.Image:
    """One photo of a cherry; `defect` is None for a good one, else one of DEFECTS."""
    rng = np.random.default_rng(seed)
    background = _background(rng, size)
    r = size * rng.uniform(0.24, 0.36)
    cx = size / 2 + rng.uniform(-0.12, 0.12) * size
    cy = size / 2 + rng.uniform(-0.08, 0.12) * size
    colour, fruit = _fruit_layer(rng, size, cx, cy, r)
    img = np.asarray(background, np.float32) * (1 - fruit) + colour * fruit
    if defect is not None:
        _add_defect(defect, rng, img, fruit, cx, cy, r)

    # Specular highlight, upper left, drawn after defects (it sits on the skin's surface).
    hl = Image.new("L", (size, size), 0)
    hx, hy, hs = cx - r * 0.38, cy - r * 0.4, r * rng.uniform(0.12, 0.22)
    ImageDraw.Draw(hl).ellipse((hx - hs, hy - hs * 0.7, hx + hs, hy + hs * 0.7), fill=255)
    hl = hl.filter(ImageFilter.GaussianBlur(hs * 0.5))
    alpha = (np.asarray(hl, np.float32) / 255.0)[..., None] * fruit * rng.uniform(0.4, 0.8)
    img = img * (1 - alpha) + 255 * alpha

    # Lighting and colour temperature of the whole shot.
    img = img * rng.uniform(0.7, 1.2) * rng.uniform([0.9, 0.95, 0.85], [1.1, 1.05, 1.15])
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")

    # Stem: a brown-green curve from the top of the fruit.
    draw = ImageDraw.Draw(out)
    top = (cx + rng.uniform(-0.15, 0.15) * r, cy - r * 0.92)
    bend = rng.uniform(-0.5, 0.5) * r
    stem = [(top[0] + bend * (t**2), top[1] - r * 0.9 * t) for t in np.linspace(0, 1, 6)]
    stem_colour = tuple(int(c) for c in rng.uniform([60, 50, 10], [110, 110, 40]))
    draw.line(stem, fill=stem_colour, width=max(1, int(r * 0.08)))
    return out.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.6)))


def generate_dataset(root: Path, train: int = 1200, val: int = 300, size: int = 96,
                     seed: int = 0, quality: int = 90, progress: bool = False) -> DatasetSummary:
    """Write `root/{train,val}/{defect,good}/*.jpg`; balanced classes, defect kinds mixed."""
    root = Path(root)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=train + val, desc="cherries", unit="img", leave=False)
    for split, count, offset in (("train", train, 0), ("val", val, 10_000_000)):
        for cls in CLASSES:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image_seed = seed * 100_000_000 + offset + i
            cls = CLASSES[i % 2]
            defect = DEFECTS[(i // 2) % len(DEFECTS)] if cls == "defect" else None
            path = root / split / cls / f"{split}-{i:06d}.jpg"
            render_cherry(image_seed, defect, size).save(path, quality=quality)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return DatasetSummary(root=root, train=train, val=val, image_size=size)
