"""The pictures: a job's curves.png, the overlay of `cherry compare`, the confusion matrix of an
evaluation. matplotlib is imported when a picture is drawn (the client may not have it)."""

from __future__ import annotations

import io


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on Colab's kernel thread, on CI or over ssh
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _pyplot().close(fig)
    return buf.getvalue()


def render_curves(epochs: list[dict], title: str) -> bytes:
    """curves.png: loss and accuracy per epoch, train and val (the `kind: epoch` records)."""
    plt = _pyplot()
    xs = [e["epoch"] for e in epochs]  # 1-based, as every epoch a person reads
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
    return _png(fig)


def render_overlay(series: dict[str, list[dict]], title: str = "") -> bytes:
    """Several jobs' curves on shared axes: val accuracy, and val (solid) / train (dashed) loss."""
    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    for i, (label, epochs) in enumerate(series.items()):
        colour = f"C{i % 10}"
        xs = [e["epoch"] for e in epochs]
        ax_loss.plot(xs, [e["val_loss"] for e in epochs], "-", color=colour, label=label)
        ax_loss.plot(xs, [e["train_loss"] for e in epochs], "--", color=colour, alpha=0.6)
        ax_acc.plot(xs, [e["val_accuracy"] for e in epochs], "-", color=colour, label=label)
    ax_loss.set_title("loss (val solid, train dashed)")
    ax_acc.set_title("val accuracy")
    ax_acc.set_ylim(0, 1.02)
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epoch 1, 2: never 1.5
        ax.grid(alpha=0.3)
    if series:
        ax_acc.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _png(fig)


def render_sweep(points: list[tuple[dict, float, bool]], metric: str, title: str) -> bytes:
    """Each swept hyperparameter against the metric: one panel per parameter, a dot per trial
    (a cross for a pruned one, at its best value before it stopped)."""
    plt = _pyplot()
    names = sorted({k for params, _, _ in points for k in params})
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(4.2 * max(1, len(names)), 3.8),
                             dpi=100, squeeze=False)
    for ax, name in zip(axes[0], names, strict=False):
        for marker, pruned in (("o", False), ("x", True)):
            xs = [p[name] for p, _, pr in points if pr is pruned and name in p]
            ys = [v for p, v, pr in points if pr is pruned and name in p]
            if xs:
                ax.scatter([str(x) if isinstance(x, str) else x for x in xs], ys, marker=marker,
                           color="C3" if pruned else "C0", label="pruned" if pruned else "ran")
        numbers = [p[name] for p, _, _ in points if isinstance(p.get(name), int | float)
                   and not isinstance(p.get(name), bool)]
        if numbers and min(numbers) > 0 and max(numbers) / min(numbers) >= 20:
            ax.set_xscale("log")  # learning rates and weight decays span decades
        ax.set_xlabel(name)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    return _png(fig)


CONFUSION_CMAP = "Blues"


def _luminance(rgb) -> float:
    """Relative luminance (WCAG 2) of an sRGB colour with channels in 0..1."""
    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4
    r, g, b = (linear(c) for c in rgb[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a, b) -> float:
    la, lb = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def text_color(share: float) -> str:
    """Black or white, whichever reads better on the cell colour of `share` (0..1 of the
    largest count): decided from the colour itself, not from a fixed threshold."""
    import matplotlib

    cell = matplotlib.colormaps[CONFUSION_CMAP](share)
    return "black" if contrast(cell, (0, 0, 0)) >= contrast(cell, (1, 1, 1)) else "white"


def render_confusion(matrix: list[list[int]], classes: list[str], title: str) -> bytes:
    """A confusion matrix: rows the true class, columns the predicted one, counts in cells."""
    plt = _pyplot()
    n = len(classes)
    side = min(12, 2.5 + 0.6 * n)
    fig, ax = plt.subplots(figsize=(side, side * 0.85), dpi=100)
    peak = max((max(row) for row in matrix), default=0) or 1
    # From 0, not from the smallest count: with every cell busy, the smallest would be drawn
    # white, whatever its count.
    ax.imshow(matrix, cmap=CONFUSION_CMAP, vmin=0, vmax=peak)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(matrix[i][j]), ha="center", va="center",
                        color=text_color(matrix[i][j] / peak))
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    return _png(fig)
