"""Speculative decoding counts, summed over completions, and the rates people compare."""

from __future__ import annotations

from typing import Any

COUNTS = ("rounds", "drafted", "accepted", "tested", "emitted", "draft_calls", "target_calls", "alpha_sum")


def sum_spec(specs: list[dict | None]) -> dict[str, Any] | None:
    specs = [s for s in specs if s]
    if not specs:
        return None
    total: dict[str, Any] = {k: sum(s.get(k, 0) for s in specs) for k in COUNTS if any(k in s for s in specs)}
    if any(s.get("lossy") for s in specs):
        total["lossy"] = True
        for key in ("large_tokens", "small_tokens", "switches", "switch_prefill_tokens"):
            if any(key in s for s in specs):
                total[key] = sum(s.get(key, 0) for s in specs)
    return total


def rates(total: dict[str, Any] | None) -> dict[str, float]:
    """acceptance_rate: kept draft tokens / proposed; position_acceptance: passed / tested positions
    (for one chain they agree); mean_accepted_length: tokens per verify round (Spec-Bench's tau)."""
    if not total:
        return {}
    out = {}
    if total.get("drafted"):
        out["acceptance_rate"] = total["accepted"] / total["drafted"]
    if total.get("tested"):
        out["position_acceptance"] = total["accepted"] / total["tested"]
        out["analytic_acceptance"] = total["alpha_sum"] / total["tested"]
    if total.get("rounds"):
        out["mean_accepted_length"] = total["emitted"] / total["rounds"]
    if total.get("large_tokens") is not None:
        out["large_fraction"] = total["large_tokens"] / max(1, total["large_tokens"] + total.get("small_tokens", 0))
    return out


def run_metrics(rows: list[dict]) -> dict:
    """Acceptance and speedup over a run's records (any workflow whose candidates were decoded speculatively)."""
    total = sum_spec([r.get("stats", {}).get("spec") for r in rows])
    out: dict = dict(rates(total))
    if total:
        out["speculative"] = total
    spec_wall = sum(r["stats"].get("spec_wall_s", 0) for r in rows if r.get("stats"))
    plain_wall = sum(r["stats"].get("plain_wall_s", 0) for r in rows if r.get("stats"))
    if spec_wall and plain_wall:
        spec_tokens = sum(r["stats"].get("generated_tokens", 0) for r in rows if r.get("stats"))
        plain_tokens = sum(r["stats"].get("plain_generated_tokens", 0) for r in rows if r.get("stats"))
        out["speedup"] = (spec_tokens / spec_wall) / (plain_tokens / plain_wall) if plain_tokens else None
        out["plain_tokens_per_s"] = plain_tokens / plain_wall
        out["spec_tokens_per_s"] = spec_tokens / spec_wall
    identical = [r["identical_to_plain"] for r in rows if "identical_to_plain" in r]
    if identical:
        out["identical_to_plain"] = sum(identical) / len(identical)
    return out
