"""The CTRL report: win rate under sample, BoN(4) and BoN(16) against KL, for each trained model of a sweep.

    benchmarks/ctrl_sweep.sh OUT          runs the sweep (raw reward, calibrated identity, calibrated bon
                                          over beta) and then this script
    python benchmarks/ctrl_report.py OUT [OUT2 ...] [--output PREFIX]

Reads every run folder under the given folders (each `workflow=ctrl_align` run's `summary.json` and
`config.yaml`) and writes PREFIX.md (one table: reward, transform, t, beta, KL k1 and k3 per
sequence with its standard error, mean calibrated reward, the win rates with their intervals) and
PREFIX.png (win rate against k1 KL, one panel per procedure, one line per reward/transform).
Win rates are the trained model against the reference, each side through the same procedure,
judged by the base reward, computed in the run's evaluation (`workflows.ctrl_align`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

PROCEDURES = ("sample", "bon4", "bon16")


def collect(folders: list[Path]) -> list[dict]:
    rows = []
    for folder in folders:
        for summary_path in sorted(folder.rglob("summary.json")):
            run = summary_path.parent
            config = yaml.safe_load((run / "config.yaml").read_text())
            if config["workflow"]["name"] != "ctrl_align":
                continue
            summary = json.loads(summary_path.read_text())
            metrics = summary["metrics"]
            reward = config["reward"]
            card_path = run / "model" / "training_card.json"
            card = json.loads(card_path.read_text()) if card_path.exists() else {}
            rows.append({
                "run": str(run),
                "reward": reward.get("base", reward["name"]) if reward["name"] == "calibrated" else reward["name"],
                "transform": reward.get("transform", "raw") if reward["name"] == "calibrated" else "raw",
                "t": reward.get("t"),
                "beta": config["workflow"]["beta"],
                "steps": card.get("steps"),
                "prompts": summary["num_prompts"],
                **{k: metrics.get(k) for k in ("kl_k1", "kl_k1_se", "kl_k3", "kl_k3_se", "mean_calibrated",
                                               "reference_mean_calibrated", "mean_reward")},
                **{f"{p}{s}": metrics.get(f"win_rate_{p}{s}") for p in PROCEDURES for s in ("", "_ci_low", "_ci_high")},
            })
    return sorted(rows, key=lambda r: (r["reward"], r["transform"], r["beta"]))


def fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def table(rows: list[dict]) -> str:
    head = ("| reward | transform | beta | KL k1 (± se) | KL k3 | mean C | "
            + " | ".join(f"WR {p} [95% CI]" for p in PROCEDURES) + " |")
    lines = [head, "|" + "---|" * (6 + len(PROCEDURES))]
    for r in rows:
        wr = [f"{fmt(r[p])} [{fmt(r[p + '_ci_low'], 2)}, {fmt(r[p + '_ci_high'], 2)}]" for p in PROCEDURES]
        lines.append(f"| {r['reward']} | {r['transform']} | {r['beta']} | {fmt(r['kl_k1'])} ± {fmt(r['kl_k1_se'])} "
                     f"| {fmt(r['kl_k3'])} | {fmt(r['mean_calibrated'])} | " + " | ".join(wr) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PROCEDURES), figsize=(4 * len(PROCEDURES), 3.4), sharey=True)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["reward"], r["transform"]), []).append(r)
    for ax, procedure in zip(axes, PROCEDURES, strict=True):
        for (reward, kind), members in groups.items():
            members = sorted((m for m in members if m["kl_k1"] is not None and m[procedure] is not None),
                             key=lambda m: m["kl_k1"])
            if not members:
                continue
            xs = [m["kl_k1"] for m in members]
            ys = [m[procedure] for m in members]
            errors = [[y - m[procedure + "_ci_low"] for y, m in zip(ys, members, strict=True)],
                      [m[procedure + "_ci_high"] - y for y, m in zip(ys, members, strict=True)]]
            ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=f"{reward} {kind}")
        ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xlabel("KL(pi || pi_ref), k1 nats per sequence")
        ax.set_title(f"win rate vs reference, {procedure}")
    axes[0].set_ylabel("win rate (ties half)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--output", type=Path, default=None, help="PREFIX of PREFIX.md and PREFIX.png")
    args = parser.parse_args(argv)
    rows = collect(args.folders)
    if not rows:
        raise SystemExit(f"no ctrl_align runs under {', '.join(map(str, args.folders))}")
    prefix = args.output or args.folders[0] / "ctrl_report"
    text = table(rows)
    prefix.with_suffix(".md").write_text(text)
    (prefix.with_suffix(".json")).write_text(json.dumps(rows, indent=1) + "\n")
    plot(rows, prefix.with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    main()
