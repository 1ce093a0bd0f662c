"""PNG plots of the pipeline's reports (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> Path:
    """Write the figure atomically as PNG and close it (also when writing fails)."""
    plt = pyplot()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp.png")
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
        tmp.replace(path)
        return path
    finally:
        plt.close(fig)


def training_curve(history: list[dict], path: Path, title: str = "generator training") -> Path:
    """Loss and sampled relative error against the training step."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["loss"] for h in history], marker="o", label="loss")
    ax.plot(steps, [h["error"] for h in history], marker="s", label="relative L2 error of samples")
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    return save(fig, path)


def comparison(methods: dict[str, dict], columns: list[str], path: Path, title: str) -> Path:
    """Grouped bars: one group per metric, one bar per method (percentages)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.8))
    names = list(methods)
    width = 0.8 / max(1, len(names))
    for j, name in enumerate(names):
        values = [methods[name].get(c) or 0.0 for c in columns]
        ax.bar([i + j * width for i in range(len(columns))], values, width, label=name)
    ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(columns))], columns)
    ax.set_ylim(0, 100)
    ax.set_ylabel("%")
    ax.set_title(title)
    ax.legend()
    return save(fig, path)
