"""Sweep report: one table and one plot across a multirun's run folders.

Runs by itself at the end of `qsteer -m ...` (a Hydra callback) and as `qsteer-report DIR`.
The x-axis is the swept key (by default the first numeric key whose value differs between
runs, e.g. `workflow.n`); other differing keys become separate lines.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from qsteer.results import flatten


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    runs = []
    for summary_path in sorted(sweep_dir.glob("*/summary.json")):
        config_path = summary_path.parent / "config.yaml"
        config = flatten(yaml.safe_load(config_path.read_text())) if config_path.exists() else {}
        runs.append({"dir": summary_path.parent.name, "config": config, "summary": json.loads(summary_path.read_text())})
    return runs


def varying_keys(runs: list[dict[str, Any]]) -> list[str]:
    keys = sorted({k for r in runs for k in r["config"]})
    return [k for k in keys if len({json.dumps(r["config"].get(k)) for r in runs}) > 1]


def report(sweep_dir: str | Path, x_key: str | None = None) -> tuple[Path, Path | None]:
    """Write sweep.md, sweep.json and (with a numeric swept key) reward_vs_<key>.png."""
    sweep_dir = Path(sweep_dir)
    runs = collect(sweep_dir)
    if not runs:
        raise FileNotFoundError(f"no */summary.json under {sweep_dir}")
    varying = varying_keys(runs)
    numeric = [k for k in varying if all(isinstance(r["config"].get(k), (int, float)) for r in runs)]
    x_key = x_key or (numeric[0] if numeric else None)
    others = [k for k in varying if k != x_key]
    runs.sort(key=lambda r: tuple(str(r["config"].get(k)) for k in others) + (r["config"].get(x_key) or 0,))

    columns = [*varying, "num_prompts", "num_errors", "mean_reward", "generated_tokens", "tokens_per_s"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    table = []
    for run in runs:
        row = {k: run["config"].get(k) for k in varying} | {k: run["summary"].get(k) for k in columns[len(varying):]}
        table.append(row)
        lines.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    table_path = sweep_dir / "sweep.md"
    table_path.write_text("\n".join(lines) + "\n")
    (sweep_dir / "sweep.json").write_text(json.dumps(table, indent=2) + "\n")
    print("\n".join(lines))

    if x_key is None:
        return table_path, None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    series: dict[str, list[tuple[float, float]]] = {}
    for run in runs:
        label = ", ".join(f"{k}={run['config'].get(k)}" for k in others) or "mean reward"
        if run["summary"].get("mean_reward") is not None:
            series.setdefault(label, []).append((run["config"][x_key], run["summary"]["mean_reward"]))
    for label, points in series.items():
        xs, ys = zip(*sorted(points), strict=True)
        ax.plot(xs, ys, marker="o", label=label)
    if x_key.endswith(".n") and all(p[0] > 0 for pts in series.values() for p in pts):
        ax.set_xscale("log", base=2)
    ax.set_xlabel(x_key)
    ax.set_ylabel("mean reward")
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    plot_path = sweep_dir / f"reward_vs_{x_key.split('.')[-1]}.png"
    fig.savefig(plot_path, dpi=120)
    plt.close(fig)
    print(f"plot: {plot_path}")
    return table_path, plot_path


class SweepReport(Callback):
    """Hydra callback: after a multirun, write the sweep's table and plot into its folder."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if any(sweep_dir.glob("*/summary.json")):
            report(sweep_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description="Table and plot across a qsteer sweep's run folders")
    parser.add_argument("sweep_dir", help="a multirun folder holding one run folder per job")
    parser.add_argument("--x", dest="x_key", default=None, help="the swept config key for the x-axis")
    args = parser.parse_args()
    report(args.sweep_dir, args.x_key)


if __name__ == "__main__":
    main()
