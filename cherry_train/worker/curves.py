"""curves.png: loss and accuracy per epoch, train and val, redrawn after every epoch."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # no display on Colab's kernel thread or on CI
import matplotlib.pyplot as plt  # noqa: E402


def render_curves(epochs: list[dict], title: str) -> bytes:
    """PNG bytes of the two panels, from the `kind: epoch` metrics records."""
    xs = [e["epoch"] + 1 for e in epochs]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for ax, key, label in ((ax_loss, "loss", "loss"), (ax_acc, "accuracy", "accuracy")):
        ax.plot(xs, [e[f"train_{key}"] for e in epochs], "o-", label="train", ms=3)
        ax.plot(xs, [e[f"val_{key}"] for e in epochs], "s-", label="val", ms=3)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    ax_acc.set_ylim(0, 1.02)
    if len(xs) == 1:
        for ax in (ax_loss, ax_acc):
            ax.set_xticks(xs)
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
