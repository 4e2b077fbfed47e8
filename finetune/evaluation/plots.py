"""PNG figures for the reports: router load heatmaps side by side, and loss curves from a training log."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed (servers, CI)
import matplotlib.pyplot as plt  # noqa: E402


def router_heatmaps(panels: list[tuple[str, list[list[float]]]], path: str | Path, per_row: int | None = None) -> Path:
    """One heatmap per panel (a model, or a language of a model): share of routed tokens per layer (rows) x
    expert (columns), on one colour scale, with the uniform share marked in the colour bar, so panels compare
    at a glance. `per_row` panels a row (default: all in one row)."""
    path = Path(path)
    experts = len(panels[0][1][0])
    layers = len(panels[0][1])
    vmax = max(max(max(row) for row in share) for _, share in panels)
    across = per_row or len(panels)
    down = -(-len(panels) // across)
    fig, axes = plt.subplots(down, across, figsize=(2.4 + 0.55 * experts * across, (1.2 + 0.45 * layers) * down),
                             squeeze=False, constrained_layout=True)
    image = None
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (title, share) in zip(axes.flat, panels):
        image = ax.imshow(share, cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_xticks(range(experts))
        ax.set_yticks(range(layers))
        if experts * layers <= 128:
            for layer, row in enumerate(share):
                for expert, value in enumerate(row):
                    ax.text(expert, layer, f"{value:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if value < 0.6 * vmax else "black")
    bar = fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.9)
    bar.set_label("share of routed tokens")
    bar.ax.axhline(1 / experts, color="red", linewidth=1)  # the balanced share
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def loss_curves(curves: list[tuple[str, list[tuple[int, float]]]], path: str | Path, title: str,
                ylabel: str = "loss") -> Path:
    """Line plot of (step, value) series, e.g. train and eval loss of one run."""
    path = Path(path)
    fig, ax = plt.subplots(figsize=(5.5, 3.4), constrained_layout=True)
    for label, points in curves:
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if len(points) < 12 else None, markersize=3, label=label)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def log_series(log_history: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one key in a Trainer log history (trainer_state.json)."""
    return [(entry["step"], entry[key]) for entry in log_history if key in entry]
