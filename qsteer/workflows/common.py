"""Steps the workflows share: generate candidates, score them, assemble result records."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import ray

from qsteer.actors.group import ActorGroup
from qsteer.data import prompt_text
from qsteer.engines import Completion, SamplingParams
from qsteer.metrics.speculative import sum_spec

# Fields every result record carries (DESIGN.md); a workflow adds its own beside them.
_SKIP_COLUMNS = {"prompt", "messages"}


@dataclass
class Context:
    workflow: dict[str, Any]  # the workflow's own config keys
    params: SamplingParams
    policy: ActorGroup | None = None
    reward: ActorGroup | None = None
    chat: bool = True
    context_length: int = 2048


@dataclass
class Stats:
    prompt_tokens: dict[str, int] = field(default_factory=dict)  # per record id
    policy_calls: int = 0
    reward_calls: int = 0
    started: float = field(default_factory=time.perf_counter)

    def as_dict(self, share: int = 1) -> dict[str, Any]:
        """This batch's counts spread over its `share` records (tokens stay exact per record)."""
        return {
            "policy_calls": round(self.policy_calls / share, 4),
            "reward_calls": round(self.reward_calls / share, 4),
            "wall_s": round((time.perf_counter() - self.started) / share, 4),
        }


def generate(
    records: list[dict], ctx: Context, n: int, stats: Stats
) -> tuple[list[list[Completion] | None], list[str | None]]:
    """n completions per record, or an error for a record that cannot be generated."""
    assert ctx.policy is not None
    prompts = [r.get("messages") or r["prompt"] for r in records]
    prompt_ids = ray.get(ctx.policy.call("encode", prompts, ctx.chat))
    errors: list[str | None] = [
        f"prompt has {len(ids)} tokens, at or over the model's context length {ctx.context_length}"
        if len(ids) >= ctx.context_length
        else None
        for ids in prompt_ids
    ]
    ok = [i for i, err in enumerate(errors) if err is None]
    results: list[list[Completion] | None] = [None] * len(records)
    if ok:
        outs = ray.get(
            ctx.policy.call(
                "generate",
                [prompt_ids[i] for i in ok],
                replace(ctx.params, n=n),
                [str(records[i]["id"]) for i in ok],
            )
        )
        stats.policy_calls += 2
        for i, completions in zip(ok, outs, strict=True):
            results[i] = completions
            stats.prompt_tokens[str(records[i]["id"])] = len(prompt_ids[i])
    return results, errors


def score(
    records: list[dict], texts: list[list[str]], ctx: Context, stats: Stats, ids: list[list[list[int]]] | None = None
) -> list[list[tuple[float | None, dict]]]:
    """Reward each text of each record in one reward call; returns (reward, info) per text."""
    assert ctx.reward is not None
    flat_records = [r for r, group in zip(records, texts, strict=True) for _ in group]
    if not flat_records:
        return [[] for _ in records]
    columns_names = sorted({k for r in records for k in r} - _SKIP_COLUMNS)
    columns = {name: [r.get(name) for r in flat_records] for name in columns_names}
    flat_ids = None if ids is None else [x for group in ids for x in group]
    flat = ray.get(
        ctx.reward.call(
            "score", [prompt_text(r) for r in flat_records], [t for g in texts for t in g], flat_ids, columns
        )
    )
    stats.reward_calls += 1
    out, start = [], 0
    for group in texts:
        out.append(flat[start : start + len(group)])
        start += len(group)
    return out


def generate_and_score(
    records: list[dict], ctx: Context, n: int, stats: Stats
) -> tuple[list[list[Completion] | None], list[str | None], list[list[tuple[float | None, dict]]]]:
    """n completions per record and their (reward, info), in one policy and one reward call."""
    completions, errors = generate(records, ctx, n, stats)
    return completions, errors, score_completions(records, completions, ctx, stats)


def score_completions(
    records: list[dict], completions: list[list[Completion] | None], ctx: Context, stats: Stats
) -> list[list[tuple[float | None, dict]]]:
    """(reward, info) for each completion of each record (none for a record that has none)."""
    texts = [[c.text for c in comps] if comps else [] for comps in completions]
    ids = [[c.token_ids for c in comps] if comps else [] for comps in completions]
    return score(records, texts, ctx, stats, ids)


def candidate(text: str, reward: float | None, info: dict, completion: Completion | None = None) -> dict:
    item: dict[str, Any] = {"text": text, "reward": reward}
    if completion is not None:
        item["num_tokens"] = len(completion.token_ids)
        item["finish_reason"] = completion.finish_reason
    if info:
        item["info"] = info
    return item


def result(record: dict, output: str | None, reward: float | None, candidates: list[dict], stats: dict,
           error: str | None = None, **extra: Any) -> dict:
    return {
        "id": record["id"],
        "prompt": prompt_text(record),
        "output": output,
        "reward": reward,
        "candidates": candidates,
        "stats": stats,
        "error": error,
        **extra,
    }


def record_stats(stats: Stats, share: int, completions: list[Completion] | None, record_id: str) -> dict[str, Any]:
    out = stats.as_dict(share)
    out["generated_tokens"] = sum(len(c.token_ids) for c in completions) if completions else 0
    # prefilled once per prompt however many samples share it
    out["prompt_tokens"] = stats.prompt_tokens.get(str(record_id), 0)
    spec = sum_spec([c.spec for c in completions]) if completions else None
    if spec:
        out["spec"] = spec
    return out


def reward_error(scored: list[tuple[float | None, dict]]) -> str | None:
    """The first reward error of a record's candidates, if every candidate failed."""
    if scored and all(r is None for r, _ in scored):
        return next((info.get("error") for _, info in scored if info.get("error")), "reward returned None")
    return None
