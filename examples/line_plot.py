"""One line plot of the sweeps' results (examples/sweep_*.py), saved as a PNG for the docs."""

from __future__ import annotations

from pathlib import Path


def save_line_plot(lines: list[tuple[str, list, list, bool]], path: Path, xlabel: str, ylabel: str, title: str,
                   log_x: bool = False, marker: str | None = None) -> None:
    """``lines``: (label, x, y, emphasised) each; the emphasised one (the LoRA control) drawn thicker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, x, y, emphasised in lines:
        ax.plot(x, y, marker=marker, label=label, linewidth=2.5 if emphasised else 1.5)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
