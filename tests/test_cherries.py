"""The synthetic cherry dataset: deterministic, balanced, in ImageFolder layout."""

from __future__ import annotations

import numpy as np
from PIL import Image

from cherry_train.demo.cherries import CLASSES, generate_dataset, render_cherry


def test_rendering_is_a_pure_function_of_the_seed():
    a = np.asarray(render_cherry(7, "rot", 64))
    b = np.asarray(render_cherry(7, "rot", 64))
    c = np.asarray(render_cherry(8, "rot", 64))
    assert a.shape == (64, 64, 3)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_defects_change_the_fruit():
    for kind in ("crack", "rot", "bruise"):
        good, bad = (np.asarray(render_cherry(3, d, 64), np.float32) for d in (None, kind))
        assert np.abs(good - bad).mean() > 0.5, kind


def test_dataset_layout_is_balanced(tmp_path):
    summary = generate_dataset(tmp_path, train=10, val=4, size=32, seed=2)
    assert summary.train == 10
    for split, n in (("train", 10), ("val", 4)):
        counts = [len(list((tmp_path / split / cls).glob("*.jpg"))) for cls in CLASSES]
        assert counts == [n // 2, n // 2]
    with Image.open(next((tmp_path / "train" / "good").glob("*.jpg"))) as img:
        assert img.size == (32, 32) and img.mode == "RGB"
