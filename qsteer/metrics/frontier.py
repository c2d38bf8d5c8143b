"""The reward-vs-KL frontier: one point per run (mean reward, mean KL from the base policy, generated tokens).

Pure functions over a run's flattened config and its result records; `qsteer-report --frontier`
(qsteer/report.py) reads the folders, writes the table and draws the plot. Each method's KL is
the one its records can support:

- `best_of_n` (aggregate `max`): log N - (N-1)/N, the Best-of-N bound (labelled `bound`); it is
  the KL exactly when rewards never tie. Weighted or majority votes have no such bound: no KL.
- `controlled_decoding` blockwise: the records' `kl`, blocks x the Best-of-K bound (`bound`).
- `controlled_decoding` tokenwise, `transfer_qstar`, `args`: the records' exact summed per-step
  KL from the top-k base (`exact`); in greedy mode the output is the argmax of the guided law, and
  the KL is that soft law's (`guided law (greedy)`).
- `sample`: 0, exactly (it is the base policy).
- `beam_search`, `dvts`: their records carry no KL (a beam's selection has no closed-form bound):
  `no KL`, so they sit on the reward-vs-tokens panel only. Ranked by a value
  (`workflow.scorer=value`) they are their own lines, `beam_search/value` and `dvts/value`.

Generated tokens count every role's sampling for the record: all of Best-of-N's candidates, all
of blockwise CD's sampled blocks (kept or not: `stats.sampled_tokens`), the baseline's rollout
tokens of Transfer Q* (`stats.baseline_tokens`), every beam's steps.
"""

from __future__ import annotations

import math
from typing import Any

# the config keys (under `workflow.`) that move each method along its line, first the usual one
KNOBS: dict[str, tuple[str, ...]] = {
    "sample": ("n",),
    "best_of_n": ("n",),
    "controlled_decoding/blockwise": ("n", "block_size"),
    "controlled_decoding/tokenwise": ("alpha", "top_k"),
    "transfer_qstar": ("alpha", "top_k", "rollouts"),
    "args": ("alpha", "top_k"),
    "beam_search": ("beam_width", "n"),
    "beam_search/value": ("beam_width", "n"),
    "dvts": ("n", "beam_width"),
    "dvts/value": ("n", "beam_width"),
}


class FrontierError(ValueError):
    """A run that cannot be put on the frontier; the message names its folder."""


def method_of(config: dict[str, Any]) -> str:
    """The frontier's name for a run's method: the workflow, with controlled decoding's mode and a step
    search's value scorer."""
    name = config.get("workflow.name")
    if name == "controlled_decoding":
        return f"{name}/{config.get('workflow.mode', 'tokenwise')}"
    if name in ("beam_search", "dvts") and config.get("workflow.scorer") == "value":
        return f"{name}/value"
    return str(name)


def record_tokens(row: dict[str, Any]) -> int:
    """Tokens every role generated for one record (see the module docstring)."""
    stats = row.get("stats") or {}
    own = stats.get("sampled_tokens", stats.get("generated_tokens", 0))
    return int(own) + int(round(stats.get("baseline_tokens", 0)))


def best_of_n_kl_bound(n: int) -> float:
    """log N - (N - 1)/N: Best-of-N's KL from its base is at most this (Beirami et al., 2024)."""
    if n < 1:
        raise ValueError(f"Best-of-N needs N >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def run_point(where: str, config: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One run's point: method, knob values, mean reward (scored records), mean KL and its kind, mean tokens."""
    method = method_of(config)
    if method not in KNOBS:
        raise FrontierError(f"{where}: workflow={config.get('workflow.name')} has no place on the reward-vs-KL "
                            f"frontier (it takes {', '.join(sorted({m.split('/')[0] for m in KNOBS}))})")
    if not rows:
        raise FrontierError(f"{where}: results.jsonl holds no records")
    rewards = [r["reward"] for r in rows if r.get("reward") is not None]
    kl: float | None
    if method == "sample":
        kl, kind = 0.0, "exact"
    elif method == "best_of_n":
        aggregate = config.get("workflow.aggregate", "max")
        kl, kind = (best_of_n_kl_bound(int(config["workflow.n"])), "bound") if aggregate == "max" else (None, "no KL")
    else:
        kls = [float(r["kl"]) for r in rows if r.get("kl") is not None]
        kl = _mean(kls)
        if kl is None:
            kind = "no KL"
        elif any(r.get("kl_is_bound") for r in rows):
            kind = "bound"
        elif method in ("transfer_qstar", "args") and config.get("workflow.greedy"):
            kind = "guided law (greedy)"
        else:
            kind = "exact"
    return {
        "run": where,
        "method": method,
        "knobs": {key: config.get(f"workflow.{key}") for key in KNOBS[method]},
        "num_prompts": len(rows),
        "num_errors": sum(r.get("error") is not None for r in rows),
        "mean_reward": _mean(rewards),
        "mean_kl": kl,
        "kl_kind": kind,
        "tokens_per_prompt": _mean([record_tokens(r) for r in rows]),
    }


def knob_of(method: str, points: list[dict[str, Any]]) -> str:
    """The key that moves `method` along its line: its first knob whose value differs between its runs."""
    mine = [p for p in points if p["method"] == method]
    for key in KNOBS[method]:
        if len({repr(p["knobs"][key]) for p in mine}) > 1:
            return key
    return KNOBS[method][0]


def frontier_table(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of the frontier table: by method (in KNOBS order), then by the method's knob."""
    order = list(KNOBS)
    rows = []
    for method in sorted({p["method"] for p in points}, key=order.index):
        key = knob_of(method, points)
        mine = sorted((p for p in points if p["method"] == method), key=lambda p: (p["knobs"][key] is None,
                                                                                   p["knobs"][key] or 0, p["run"]))
        for p in mine:
            rows.append({"method": method, "knob": key, "value": p["knobs"][key],
                         **{k: p[k] for k in ("mean_reward", "mean_kl", "kl_kind", "tokens_per_prompt",
                                               "num_prompts", "num_errors", "run")}})
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table as markdown; numbers to 4 significant digits, a missing KL as `-`."""
    columns = ["method", "knob", "value", "mean_reward", "mean_kl", "kl_kind", "tokens_per_prompt", "num_prompts",
               "num_errors", "run"]

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"
