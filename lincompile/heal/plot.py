"""The loss curve PNG written after a heal (matplotlib with the headless Agg backend; optional)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def plot_metrics(records: list[dict], path: Path) -> Path | None:
    """One panel per stage: training loss per step, held-out loss (or MSE) at each evaluation.

    Returns None when no stage has records (an old file at `path` is removed: it would describe another run);
    raises ImportError when matplotlib is not installed (the caller says so).
    """
    path = Path(path)
    stages = [s for s in ("transfer", "lora") if any(r.get("stage") == s for r in records)]
    if not stages:
        path.unlink(missing_ok=True)
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    from ..emit import _umask

    fig, axes = plt.subplots(1, len(stages), figsize=(6 * len(stages), 4), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        train = [r for r in records if r.get("stage") == stage and "loss" in r]
        evals = [r for r in records if r.get("stage") == stage and "eval" in r]
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", linewidth=1)
        key = "mse" if stage == "transfer" else "loss"
        points = [(r["step"], r["eval"][key]) for r in evals if key in r["eval"]]
        if points:
            ax.plot(*zip(*points), "o-", label=f"held-out {key}")
        ax.set_title("attention transfer (sum of per-layer MSE)" if stage == "transfer" else "LoRA (next-token loss)")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return path
