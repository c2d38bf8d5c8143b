"""Win rate of a candidate model against the reference under an inference-time procedure, and their KL.

Per prompt, `samples` completions from each side (the candidate group, and the policy group as
the reference), all scored in one reward call; the prompt's win rate under sample / Best-of-N /
worst-of-N is the exact closed form over those pools (`metrics.inference_win_rate.prompt_win_rate`,
N-subsets of the pools, ties as half), never a resampling. The summary's `metrics.win_rate` is the
mean over prompts with a normal interval over prompts (`results.summarize`).

The KL of the candidate to the reference is estimated on the candidate's own samples: their
per-token log-probabilities as sampled (the engines' raw, temperature-1 `logprobs`) against the
reference's teacher-forced `score` of the same tokens; k1 (the objective's and RLOO's term) and
k3 (never negative, smaller variance near the reference) are both kept. They estimate the
sequence KL only when the samples come from the untempered model: generation.temperature=1,
top_p=1, top_k=0 (the record says when not).

With `reward=calibrated`, the win rate is judged by the base reward (`raw_reward`), whose order C
keeps up to its 1/M steps; the mean calibrated reward of each side is kept beside it.

Each side samples on its own random streams (`win_rate/candidate/<id>`, `win_rate/reference/<id>`),
so the reference against itself compares independent samples, and neither side reuses the
samples `reward=calibrated` calibrates against (`reference/<id>`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from qsteer.actors.roles import PolicyRole
from qsteer.engines import Completion
from qsteer.metrics.inference_win_rate import kl_estimate, prompt_win_rate
from qsteer.workflows.common import Context, Stats, candidate, record_stats, result, score

CANDIDATE_KEY, REFERENCE_KEY = "win_rate/candidate/", "win_rate/reference/"


def run(records: list[dict], ctx: Context) -> list[dict]:
    w = ctx.workflow
    label = w.procedure if w.procedure == "sample" else f"{w.procedure}{w.n}"
    assert ctx.candidate is not None
    return evaluate(records, ctx, ctx.candidate, w.samples or w.n, [(label, w.procedure, w.n)], w.opponent, main=label)


def evaluate(
    records: list[dict],
    ctx: Context,
    candidate_group: PolicyRole,
    pool: int,
    procedures: list[tuple[str, str, int]],
    opponent: str = "procedure",
    main: str | None = None,
) -> list[dict]:
    """One record per prompt: the candidate's samples, the reference's rewards, the win rate under each
    (label, procedure, N) in `procedures` (`win_rates`; `win_rate` is the one labelled `main`), and the KL."""
    assert ctx.policy is not None
    stats = Stats()
    prompts = [r.get("messages") or r["prompt"] for r in records]
    prompt_ids = ctx.policy.encode(prompts, ctx.chat)
    errors = [
        "prompt is empty" if not ids
        else f"prompt has {len(ids)} tokens, at or over the model's context length {ctx.context_length}"
        if len(ids) >= ctx.context_length else None
        for ids in prompt_ids
    ]
    ok = [i for i, err in enumerate(errors) if err is None]
    out: list[dict] = []
    if not ok:
        return [result(r, None, None, [], record_stats(stats, len(records), [], r["id"]), e)
                for r, e in zip(records, errors, strict=True)]
    params = replace(ctx.params, n=pool)
    same_tokens = True
    if candidate_group is not ctx.policy:
        same_tokens = candidate_group.encode(prompts, ctx.chat) == prompt_ids
    ids = [prompt_ids[i] for i in ok]
    keys = [str(records[i]["id"]) for i in ok]
    cand = candidate_group.generate(ids, params, [CANDIDATE_KEY + k for k in keys])
    ref = ctx.policy.generate(ids, params, [REFERENCE_KEY + k for k in keys])
    stats.policy_calls += 2
    for i in ok:
        stats.prompt_tokens[str(records[i]["id"])] = len(prompt_ids[i])
    texts = [[c.text for c in a] + [c.text for c in b] for a, b in zip(cand, ref, strict=True)]
    token_ids = [[c.token_ids for c in a] + [c.token_ids for c in b] for a, b in zip(cand, ref, strict=True)]
    scored = score([records[i] for i in ok], texts, ctx, stats, token_ids)
    reference_logprobs = kl_reference_logprobs(ctx, ids, cand) if same_tokens else None
    exact_kl = ctx.params.temperature == 1 and ctx.params.top_p == 1 and ctx.params.top_k == 0
    by_index = {i: j for j, i in enumerate(ok)}
    for i, record in enumerate(records):
        if i not in by_index:
            out.append(result(record, None, None, [], record_stats(stats, len(records), [], record["id"]), errors[i]))
            continue
        j = by_index[i]
        samples, rewards = cand[j], scored[j]
        # judged by the base reward: a calibrated reward's 1/M steps would turn close calls into ties
        judged = [info.get("raw_reward", v) if v is not None else None for v, info in rewards]
        cand_rewards = [v for v in judged[:pool] if v is not None]
        ref_rewards = [v for v in judged[pool:] if v is not None]
        cands = [candidate(c, v, info) for c, (v, info) in zip(samples, rewards[:pool], strict=True)]
        row_stats = record_stats(stats, len(records), samples + ref[j], record["id"])
        fewest = min(len(cand_rewards), len(ref_rewards))
        needed = max(n for _, _, n in procedures)
        error = None
        win_rates: dict[str, float] = {}
        if fewest < needed:
            error = f"only {fewest} samples of a side were scored; the procedures need {needed}"
        else:
            for label, procedure, n in procedures:
                win_rates[label] = prompt_win_rate(cand_rewards, ref_rewards, procedure, n, opponent)
        fields: dict[str, Any] = {
            "win_rates": win_rates,
            "reference_rewards": judged[pool:],
            "opponent": opponent,
        }
        calibrated = [info.get("calibrated") for _, info in rewards]
        if any(u is not None for u in calibrated):  # reward=calibrated: C of each side's samples
            fields["calibrated"] = _mean(calibrated[:pool])
            fields["reference_calibrated"] = _mean(calibrated[pool:])
        if main is not None and main in win_rates:
            fields["win_rate"] = win_rates[main]
        if reference_logprobs is not None:
            fields["kl"] = sequence_kl(samples, reference_logprobs[j]) | {"exact": exact_kl}
        out.append(result(record, cands[0]["text"], cands[0]["reward"], cands, row_stats, error, **fields))
    return out


def kl_reference_logprobs(ctx: Context, prompt_ids: list[list[int]], samples: list[list[Completion]]):
    """The reference's per-token log-probabilities of every candidate sample (one score call)."""
    assert ctx.policy is not None
    flat_prompts = [p for p, group in zip(prompt_ids, samples, strict=True) for _ in group]
    flat = ctx.policy.score(flat_prompts, [c.token_ids for group in samples for c in group])
    out, start = [], 0
    for group in samples:
        out.append(flat[start : start + len(group)])
        start += len(group)
    return out


def sequence_kl(samples: list[Completion], reference_logprobs: list[list[float]]) -> dict[str, float]:
    """k1 and k3 per sequence, averaged over this prompt's samples, and the tokens they cover."""
    candidate_logprobs = [[sample.logprobs for sample in samples]]
    k1, k3 = (kl_estimate(candidate_logprobs, [reference_logprobs], name) for name in ("k1", "k3"))
    return {"k1": k1.per_sequence, "k3": k3.per_sequence, "tokens": sum(len(s.logprobs) for s in samples),
            "samples": len(samples)}


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None
