"""Reports: one run's page; one table and one plot across a multirun's run folders; the reward-vs-KL frontier.

`qsteer-report RUN_DIR` writes `report.html` into a run folder: its summary, live counts as the
run left them (`progress.json`), a plot of its rewards, its records and its config.

The sweep report runs by itself at the end of `qsteer -m ...` (a Hydra callback) and as
`qsteer-report SWEEP_DIR`: sweep.md, sweep.json, the plot, and report.html holding both.
The x-axis is the swept key (by default the first numeric key whose value differs between
runs, e.g. `workflow.n`); other differing keys become separate lines.

`qsteer-report --frontier DIR...` takes run folders and/or multirun folders (any mix of methods)
and writes frontier.md, frontier.json and frontier.png (reward vs KL from the base policy, and
reward vs generated tokens per prompt; one line per method) into `--out`, by default the folders'
common parent. The frontier is asked for explicitly, never guessed from the number of folders:
a plain `qsteer-report DIR` keeps its sweep table. What each method's KL is: qsteer/metrics/frontier.py.
Beside them goes frontier.html (not report.html: `--out` is often a sweep folder, which has its own).

Every .html page is self-contained (`report_page.py`): plots as base64 PNG, no network resource.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from qsteer import report_page as html
from qsteer.metrics.frontier import FrontierError, frontier_table, markdown, run_point
from qsteer.results import flatten, read_results, write_atomic

RECORDS_SHOWN = 1000  # records listed on a run's page; results.jsonl holds them all
OUTPUT_CHARS = 300  # of each record's output on the page


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
        _sweep_page(sweep_dir, table, varying, None)
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
    _sweep_page(sweep_dir, table, varying, plot_path)
    return table_path, plot_path


def _sweep_page(sweep_dir: Path, table: list[dict[str, Any]], varying: list[str], plot_path: Path | None) -> Path:
    parts = [html.table(table, "sweep", caption=f"{len(table)} runs; differing keys: {', '.join(varying) or 'none'}")]
    if plot_path is not None:
        parts.append(html.png(plot_path.read_bytes(), f"mean reward vs {plot_path.stem}", "plot-sweep"))
    path = sweep_dir / "report.html"
    write_atomic(path, html.page(f"qsteer sweep: {sweep_dir.name}", html.section("Runs", *parts)))
    print(f"page: {path}")
    return path


def run_report(run_dir: str | Path) -> Path:
    """Write report.html into a run folder: summary, per-role counts, reward plots, records, config."""
    run_dir = Path(run_dir)
    rows = read_results(run_dir / "results.jsonl")
    summary = _read_json(run_dir / "summary.json")
    progress = _read_json(run_dir / "progress.json")
    config_path = run_dir / "config.yaml"
    config = flatten(yaml.safe_load(config_path.read_text())) if config_path.exists() else {}
    workflow = (summary or {}).get("workflow") or config.get("workflow.name") or "run"
    sections = []
    if summary is not None:
        top = {k: v for k, v in summary.items() if k != "metrics"}
        numbers = {k: v for k, v in summary["metrics"].items() if isinstance(v, (int, float, str)) or v is None}
        sections.append(html.section("Summary", html.key_values(top, "summary"),
                                     html.key_values(numbers, "metrics", caption="metrics (summary.json)")))
    else:
        sections.append(html.section("Summary", html.note("no summary.json: the run has not finished; the records "
                                                          "below are those written so far")))
    if progress is not None:
        roles = [{"role": name, **counts} for name, counts in progress.get("roles", {}).items()]
        state = (f"state {progress.get('state')}: {progress.get('prompts_done')}/{progress.get('prompts_total')} "
                 f"prompts, updated {progress.get('updated_at')}")
        sections.append(html.section("Calls per role", html.note(state),
                                     html.table(roles, "roles", ["role", "calls", "errors", "tokens"])))
    plot = _run_plot(rows)
    sections.append(html.section("Rewards", html.png(plot, "rewards of the records and their candidates", "plot-rewards")
                                 if plot is not None else html.note("no record has a reward")))
    shown = [{"id": r["id"], "reward": r.get("reward"),
              "generated_tokens": r.get("stats", {}).get("generated_tokens"),
              "candidates": len(r.get("candidates", [])), "error": r.get("error"),
              "output": _clip(r.get("output"))} for r in rows[:RECORDS_SHOWN]]
    caption = f"{len(rows)} records" + (f", the first {RECORDS_SHOWN} shown" if len(rows) > RECORDS_SHOWN else "")
    sections.append(html.section("Records", html.table(shown, "records", caption=caption,
                                                       text_columns=("output", "error"))))
    if config:
        sections.append(html.section("Config", html.key_values(config, "config", caption="config.yaml")))
    path = run_dir / "report.html"
    write_atomic(path, html.page(f"qsteer {workflow}: {run_dir.name}", *sections))
    print(f"page: {path}")
    return path


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _clip(text: Any) -> Any:
    if isinstance(text, str) and len(text) > OUTPUT_CHARS:
        return text[:OUTPUT_CHARS] + "..."
    return text


def _run_plot(rows: list[dict[str, Any]]) -> bytes | None:
    """Two panels: the reward histogram (records, and all candidates), and reward vs generated tokens per record."""
    records = [r for r in rows if r.get("reward") is not None]
    candidates = [c["reward"] for r in rows for c in r.get("candidates", []) if c.get("reward") is not None]
    if not records and not candidates:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (hist_ax, tok_ax) = plt.subplots(1, 2, figsize=(10, 3.5))
    if candidates:
        hist_ax.hist(candidates, bins=20, alpha=0.5, label=f"candidates ({len(candidates)})")
    if records:
        hist_ax.hist([r["reward"] for r in records], bins=20, alpha=0.7, label=f"records ({len(records)})")
    hist_ax.set_xlabel("reward")
    hist_ax.set_ylabel("count")
    hist_ax.legend(fontsize=7)
    tok_ax.scatter([r.get("stats", {}).get("generated_tokens", 0) for r in records], [r["reward"] for r in records],
                   s=12)
    tok_ax.set_xlabel("generated tokens (record)")
    tok_ax.set_ylabel("reward")
    for ax in (hist_ax, tok_ax):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return html.figure_png(fig)


class SweepReport(Callback):
    """Hydra callback: after a multirun, write the sweep's table and plot into its folder."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if any(sweep_dir.glob("*/summary.json")):
            report(sweep_dir)


def run_folders(paths: list[str | Path]) -> list[Path]:
    """The run folders named by `paths`: a folder holding results.jsonl is one; any other, its children that do."""
    out: list[Path] = []
    for path in map(Path, paths):
        if (path / "results.jsonl").exists():
            out.append(path)
            continue
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such folder")
        found = sorted(p.parent for p in path.glob("*/results.jsonl"))
        if not found:
            raise FileNotFoundError(f"{path}: neither a run folder (results.jsonl) nor a multirun folder "
                                    "(*/results.jsonl)")
        out += found
    return out


def frontier(paths: list[str | Path], out_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Write frontier.md, frontier.json and frontier.png for the runs under `paths` (see the module docstring)."""
    folders = run_folders(paths)
    out = Path(out_dir) if out_dir is not None else Path(os.path.commonpath([p.resolve() for p in folders]))
    if out in [p.resolve() for p in folders] and len(folders) > 1:
        out = out.parent
    points = []
    for folder in folders:
        config_path = folder / "config.yaml"
        if not config_path.exists():
            raise FrontierError(f"{folder}: no config.yaml, so its method and knob are unknown")
        config = flatten(yaml.safe_load(config_path.read_text()))
        points.append(run_point(str(folder), config, read_results(folder / "results.jsonl")))
    rows = frontier_table(points)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows)
    (out / "frontier.md").write_text(table)
    (out / "frontier.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(table, end="")
    plot_path = out / "frontier.png"
    _frontier_plot(rows, plot_path)
    print(f"plot: {plot_path}")
    page = html.page("qsteer frontier", html.section(
        "Reward vs KL from the base policy, and vs generated tokens",
        html.table(rows, "frontier", caption=f"{len(rows)} runs, {len({r['method'] for r in rows})} methods"),
        html.png(plot_path.read_bytes(), "reward vs KL and vs generated tokens per method", "plot-frontier"),
    ))
    write_atomic(out / "frontier.html", page)
    print(f"page: {out / 'frontier.html'}")
    return out / "frontier.md", plot_path


def _frontier_plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (kl_ax, tok_ax) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for index, method in enumerate(methods):
        mine = [r for r in rows if r["method"] == method and r["mean_reward"] is not None]
        color = f"C{index % 10}"
        knob = mine[0]["knob"] if mine else ""
        with_kl = [r for r in mine if r["mean_kl"] is not None]
        if with_kl:
            bound = any(r["kl_kind"] == "bound" for r in with_kl)
            label = f"{method} over {knob}" + (" (KL bound)" if bound else "")
            kl_ax.plot([r["mean_kl"] for r in with_kl], [r["mean_reward"] for r in with_kl], marker="o",
                       color=color, linestyle="--" if bound else "-", label=label)
            for r in with_kl:
                kl_ax.annotate(f"{r['value']}", (r["mean_kl"], r["mean_reward"]), fontsize=7,
                               textcoords="offset points", xytext=(3, 3), color=color)
        if mine:
            tok_ax.plot([r["tokens_per_prompt"] for r in mine], [r["mean_reward"] for r in mine], marker="o",
                        color=color, label=f"{method} over {knob}" + ("" if with_kl else " (no KL)"))
            for r in mine:
                tok_ax.annotate(f"{r['value']}", (r["tokens_per_prompt"], r["mean_reward"]), fontsize=7,
                                textcoords="offset points", xytext=(3, 3), color=color)
    kl_ax.set_xlabel("mean KL from the base policy (nats)")
    kl_ax.set_ylabel("mean reward")
    tok_ax.set_xlabel("generated tokens per prompt (all roles)")
    if any(r["tokens_per_prompt"] for r in rows):
        tok_ax.set_xscale("log")
    for ax in (kl_ax, tok_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description="A run folder's page (report.html); the table, plot and page "
                                     "across a qsteer sweep's run folders; or the reward-vs-KL frontier across run "
                                     "and multirun folders (--frontier)")
    parser.add_argument("dirs", nargs="+", metavar="DIR",
                        help="a run folder, or a multirun folder holding one run folder per job; with --frontier, "
                        "any number of run and multirun folders")
    parser.add_argument("--x", dest="x_key", default=None, help="the swept config key for the x-axis")
    parser.add_argument("--frontier", action="store_true",
                        help="write frontier.md/.json/.png: reward vs KL and vs generated tokens, one line per method")
    parser.add_argument("--out", default=None, help="with --frontier: where to write (default: the folders' "
                        "common parent)")
    args = parser.parse_args()
    if args.frontier:
        frontier(args.dirs, args.out)
    elif len(args.dirs) != 1:
        parser.error("the sweep report takes one multirun folder; for several folders use --frontier")
    elif (Path(args.dirs[0]) / "results.jsonl").exists():
        run_report(args.dirs[0])
    else:
        report(args.dirs[0], args.x_key)


if __name__ == "__main__":
    main()
