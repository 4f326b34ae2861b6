"""Plot helpers shared by the report and the mechanism analyses (no imports of either: no cycle)."""

from __future__ import annotations

from pathlib import Path


def colors_for(models: list[str]) -> dict[str, tuple]:
    """One viridis colour per model, in the given order (smallest first)."""
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("viridis")
    return {m: cmap(i / max(1, len(models) - 1) * 0.9) for i, m in enumerate(models)}


def save_figure(fig, target: Path) -> Path:
    """Write the figure to `target` through a temporary file, and close it."""
    import matplotlib.pyplot as plt

    tmp = target.with_name(target.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(target)
    return target
