"""The benchmark's PNG: TTFT CDF per target, and each adapter's p99 TTFT against its popularity rank.

Needs matplotlib, the `bench` extra: pip install 'loragate[bench]' (or: pip install 'matplotlib>=3.8,<4').
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

INSTALL_HINT = "the plot needs matplotlib: pip install 'loragate[bench]' (or 'matplotlib>=3.8,<4')"


def matplotlib_missing() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return True
    return False


def save_plot(document: Mapping[str, Any], path: Path) -> None:
    """Draw a `report.to_json` document into `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (cdf, ranks) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, target in document["targets"].items():
        ttfts = sorted(
            t
            for run in target["rounds"]
            for t, status in zip(run["records"]["ttft_s"], run["records"]["status"], strict=True)
            if status == "ok" and t is not None
        )
        if ttfts:
            cdf.step(ttfts, [(i + 1) / len(ttfts) for i in range(len(ttfts))], where="post", label=name)
        points = sorted(
            (s["rank"], s["ttft_s"]["p99"])
            for s in target["per_adapter"].values()
            if s["rank"] > 0 and s["ttft_s"]["p99"] is not None
        )
        if points:
            (line,) = ranks.plot([r for r, _ in points], [p for _, p in points], marker="o", markersize=3, label=name)
            base = next((s["ttft_s"]["p99"] for s in target["per_adapter"].values() if s["rank"] == 0), None)
            if base is not None:
                ranks.axhline(base, color=line.get_color(), linestyle="--", linewidth=1, label=f"{name}: base model")
    cdf.set(xlabel="TTFT (s)", ylabel="fraction of requests", title="TTFT CDF per target", xscale="log")
    ranks.set(xlabel="adapter popularity rank (1 = most requested)", ylabel="p99 TTFT (s)", yscale="log")
    ranks.set_title("per-adapter p99 TTFT")
    if (config_adapters := document["config"]["adapters"]) and config_adapters > 20:
        ranks.set_xscale("log")
    config = document["config"]
    workload = f"Zipf({config['zipf']}) over {config['adapters']} adapters" if not config["trace"] else "trace"
    figure.suptitle(f"loragate bench: {config['requests']} requests x {config['rounds']} rounds, {workload}")
    for axes in (cdf, ranks):
        axes.grid(True, alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
