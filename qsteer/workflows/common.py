"""Steps the workflows share: generate candidates, score them, assemble result records.

Workflows reach the models only through the role groups in their `Context` (`ctx.policy`,
`ctx.reward`; see `actors/roles.py`), so each one is a plain function that runs the same on
Ray actors and on the in-process group tests use.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from qsteer.actors.roles import PolicyRole, RewardRole, SandboxRole, Scored, ValueRole
from qsteer.data import prompt_text
from qsteer.engines import Completion, SamplingParams
from qsteer.metrics.speculative import sum_spec

# Record fields that are not dataset columns for the reward: the prompt goes in as `prompts`.
_SKIP_COLUMNS = {"prompt", "messages"}


@dataclass
class Context:
    workflow: Any  # the workflow's config, read by attribute (ctx.workflow.n); its defaults live there
    params: SamplingParams
    policy: PolicyRole | None = None
    reward: RewardRole | None = None
    sandbox: SandboxRole | None = None
    candidate: PolicyRole | None = None  # win_rate's candidate model (the policy itself when it has none)
    chat: bool = True
    context_length: int = 2048
    value: ValueRole | None = None  # the value= group's value (heads on the policy and/or value actors)
    trainer: Any = None  # a value trainer (workflow=train_value): `fit(...)`, see actors/value.py
    eos_token_ids: list[int] = field(default_factory=list)
    value_config: Any = None  # the value= group (workflow=train_value reads its training keys)
    stages: Any = None  # a code_search.StageStore: per-problem stage state, so a rerun resumes mid-search
    baseline: PolicyRole | None = None  # Transfer Q*'s aligned model (`baseline=`)
    baseline_reward: RewardRole | None = None  # the reward it was aligned to (`baseline.reward`)
    baseline_trainer: Any = None  # workflow=align_baseline's DPO trainer (`actors.baseline_trainer`)
    reward_name: str | None = None  # the reward's label (`reward.name`, or its target), for cards
    out_dir: Path | None = None  # the run folder: where a training workflow saves its model and card


@dataclass
class Stats:
    prompt_tokens: dict[str, int] = field(default_factory=dict)  # per record id
    policy_calls: int = 0
    reward_calls: int = 0
    value_calls: int = 0  # reported by the workflows that call a value role, in their own stats
    started: float = field(default_factory=time.perf_counter)

    def as_dict(self, share: int = 1) -> dict[str, Any]:
        """This batch's counts spread over its `share` records (tokens stay exact per record)."""
        return {
            "policy_calls": round(self.policy_calls / share, 4),
            "reward_calls": round(self.reward_calls / share, 4),
            "wall_s": round((time.perf_counter() - self.started) / share, 4),
        }


def encode(records: list[dict], ctx: Context, model: PolicyRole | None = None
           ) -> tuple[list[list[int]], list[str | None]]:
    """Each record's prompt as the token ids of `model` (default: the policy), and an error for a prompt
    it cannot take."""
    model = model if model is not None else ctx.policy
    assert model is not None
    prompts = [r.get("messages") or r["prompt"] for r in records]
    prompt_ids = model.encode(prompts, ctx.chat)
    errors: list[str | None] = [
        "prompt is empty" if not ids
        else f"prompt has {len(ids)} tokens, at or over the model's context length {ctx.context_length}"
        if len(ids) >= ctx.context_length
        else None
        for ids in prompt_ids
    ]
    return prompt_ids, errors


def generate(
    records: list[dict], ctx: Context, n: int, stats: Stats
) -> tuple[list[list[Completion] | None], list[str | None]]:
    """n completions per record, or an error for a record that cannot be generated."""
    assert ctx.policy is not None
    prompt_ids, errors = encode(records, ctx)
    ok = [i for i, err in enumerate(errors) if err is None]
    results: list[list[Completion] | None] = [None] * len(records)
    if ok:
        outs = ctx.policy.generate(
            [prompt_ids[i] for i in ok], replace(ctx.params, n=n), [str(records[i]["id"]) for i in ok]
        )
        stats.policy_calls += 2
        for i, completions in zip(ok, outs, strict=True):
            results[i] = completions
            stats.prompt_tokens[str(records[i]["id"])] = len(prompt_ids[i])
    return results, errors


def columns_of(record: dict) -> dict[str, Any]:
    """The record's fields a reward gets as dataset columns (all but the prompt)."""
    return {k: v for k, v in record.items() if k not in _SKIP_COLUMNS}


def score(
    records: list[dict], texts: list[list[str]], ctx: Context, stats: Stats, ids: list[list[list[int]]] | None = None
) -> list[list[Scored]]:
    """Reward each text of each record in one reward call; returns (reward, info) per text."""
    assert ctx.reward is not None
    flat_records = [r for r, group in zip(records, texts, strict=True) for _ in group]
    if not flat_records:
        return [[] for _ in records]
    columns_names = sorted({k for r in records for k in r} - _SKIP_COLUMNS)
    columns = {name: [r.get(name) for r in flat_records] for name in columns_names}
    flat_ids = None if ids is None else [x for group in ids for x in group]
    flat = ctx.reward.score([prompt_text(r) for r in flat_records], [t for g in texts for t in g], flat_ids, columns)
    stats.reward_calls += 1
    out, start = [], 0
    for group in texts:
        out.append(flat[start : start + len(group)])
        start += len(group)
    return out


def generate_and_score(
    records: list[dict], ctx: Context, n: int, stats: Stats
) -> tuple[list[list[Completion] | None], list[str | None], list[list[Scored]]]:
    """n completions per record and their (reward, info), in one policy and one reward call."""
    completions, errors = generate(records, ctx, n, stats)
    return completions, errors, score_completions(records, completions, ctx, stats)


def score_completions(
    records: list[dict], completions: list[list[Completion] | None], ctx: Context, stats: Stats
) -> list[list[Scored]]:
    """(reward, info) for each completion of each record (none for a record that has none)."""
    texts = [[c.text for c in comps] if comps else [] for comps in completions]
    ids = [[c.token_ids for c in comps] if comps else [] for comps in completions]
    return score(records, texts, ctx, stats, ids)


@dataclass
class Choice:
    """A workflow's decision for one record: which candidate is the output, and what it adds."""

    index: int = 0
    fields: dict[str, Any] = field(default_factory=dict)  # the record's own extra fields
    stats: dict[str, Any] = field(default_factory=dict)  # extra entries of the record's `stats`


def first(position: int, candidates: list[dict]) -> Choice:
    """The first sample is the output (plain sampling)."""
    return Choice()


def assemble(
    records: list[dict],
    completions: list[list[Completion | str] | None],
    errors: list[str | None],
    scored: list[list[Scored]],
    stats: Stats,
    choose: Callable[[int, list[dict]], Choice] = first,
) -> list[dict]:
    """One result record per input record, in order.

    A record without completions carries its error; otherwise its candidates (text, reward,
    tokens) are built here and `choose(position, candidates)` picks the output. The record's
    `error` is the chosen candidate's reward error, so Best-of-N errs only when every candidate
    failed and sampling when its one output did. A completion given as text (the score
    workflow) has no token counts.
    """
    out = []
    for position, (record, comps, error, rewards) in enumerate(zip(records, completions, errors, scored, strict=True)):
        tokens = [c for c in comps if isinstance(c, Completion)] if comps else []
        row_stats = record_stats(stats, len(records), tokens, record["id"])
        if comps is None:
            out.append(result(record, None, None, [], row_stats, error))
            continue
        cands = [candidate(c, reward, info) for c, (reward, info) in zip(comps, rewards, strict=True)]
        choice = choose(position, cands)
        chosen = cands[choice.index]
        error = None if chosen["reward"] is not None else chosen.get("info", {}).get("error", "reward returned None")
        out.append(result(record, chosen["text"], chosen["reward"], cands, row_stats | choice.stats, error,
                          **choice.fields))
    return out


def candidate(completion: Completion | str, reward: float | None, info: dict) -> dict:
    if isinstance(completion, str):
        item: dict[str, Any] = {"text": completion, "reward": reward}
    else:
        item = {"text": completion.text, "reward": reward, "num_tokens": len(completion.token_ids),
                "finish_reason": completion.finish_reason}
    if info:
        item["info"] = info
    return item


def result(record: dict, output: str | None, reward: float | None, candidates: list[dict], stats: dict,
           error: str | None = None, **extra: Any) -> dict:
    """A result record with the fields README's "Output files" lists; workflows add theirs beside."""
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


def record_stats(stats: Stats, share: int, completions: list[Completion], record_id: str) -> dict[str, Any]:
    out = stats.as_dict(share)
    out["generated_tokens"] = sum(len(c.token_ids) for c in completions)
    # prefilled once per prompt however many samples share it
    out["prompt_tokens"] = stats.prompt_tokens.get(str(record_id), 0)
    spec = sum_spec([c.spec for c in completions]) if completions else None
    if spec:
        out["spec"] = spec
    return out
