"""Step-level search (`workflow=beam_search`, `workflow=dvts`) on the in-process groups and the tiny model.

The defining checks: one beam with one candidate is plain sampling, token for token; DVTS with one
subtree is beam search; every step keeps the best-scoring candidates of each prompt's own beams
(never a pool shared across prompts, search-and-learn#26); the records count calls and tokens per
role. Scored by a value (`workflow.scorer=value`): a value equal to the reward on every prefix
searches exactly as the reward does, and a tabular value over token ids keeps the steps, and picks
the output, that its table predicts. The tiny model runs in float64, where a step's prefill and the
plain loop's decode give the same numbers, so equalities are exact.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from reward_fns import word_count

from qsteer.actors.local import local_policy, local_reward, local_value
from qsteer.config import ConfigError, check_config, speculative_config
from qsteer.data import load_dataset
from qsteer.run import context, run_job
from qsteer.workflows import WORKFLOWS

# short steps (a space ends one, or 3 tokens) so that an 8-token completion takes several
STEPS = ["generation.max_new_tokens=8", "workflow.block_size=3", "workflow.delimiter=' '"]


@pytest.fixture(scope="module")
def prompts():
    return load_dataset("sentiment", limit=2)


@pytest.fixture(scope="module")
def engines64(tiny_path):
    from qsteer.engines.hf import HFEngine

    plain = HFEngine(path=tiny_path, dtype="float64", max_batch_rows=64)
    cached = HFEngine(path=tiny_path, dtype="float64", max_batch_rows=64, prefix_cache_tokens=8192)
    cached.lm, cached.model = plain.lm, plain.model  # one set of weights
    return {"plain": plain, "cached": cached}


@pytest.fixture
def run(compose, engines64):
    def _run(records, *overrides, reward=word_count, engine="plain", value=None):
        cfg = compose(*overrides)
        check_config(cfg)
        roles = {"policy": local_policy(engines64[engine]), "reward": local_reward(reward)}
        if value is not None:
            roles["value"] = local_value(value)
        ctx = context(cfg, roles, speculative_config(cfg))
        return WORKFLOWS[cfg.workflow.name].run(records, ctx), roles

    return _run


@pytest.mark.parametrize("engine", ["plain", "cached"])
def test_one_beam_one_candidate_is_plain_sampling(run, prompts, engine):
    searched, roles = run(prompts, "workflow=beam_search", "workflow.n=1", "workflow.beam_width=1", *STEPS,
                          engine=engine)
    sampled, _ = run(prompts, "workflow=sample", *STEPS[:1])
    for beam, plain in zip(searched, sampled, strict=True):
        assert beam["error"] is None and beam["stats"]["steps"] > 1  # it did step
        assert (beam["output"], beam["reward"]) == (plain["output"], plain["reward"])
        assert beam["candidates"][0]["num_tokens"] == plain["candidates"][0]["num_tokens"]
        assert beam["stats"]["generated_tokens"] == plain["stats"]["generated_tokens"]
    if engine == "cached":  # every step after the first extends the previous step's prompt
        cache = roles["policy"].info()[0]["prefix_cache"]
        assert cache["hits"] >= sum(r["stats"]["steps"] - 1 for r in searched) > 0


def test_dvts_with_one_subtree_is_beam_search(run, prompts):
    dvts, _ = run(prompts, "workflow=dvts", "workflow.n=2", "workflow.beam_width=2", *STEPS)
    beams, _ = run(prompts, "workflow=beam_search", "workflow.n=2", "workflow.beam_width=2", *STEPS)
    for a, b in zip(dvts, beams, strict=True):
        assert {k: a[k] for k in ("output", "reward", "candidates", "selected")} == \
            {k: b[k] for k in ("output", "reward", "candidates", "selected")}
        assert a["stats"]["roles"] == b["stats"]["roles"]


def _logging_reward(log: list):
    def reward(prompts, completions, **columns):
        log.append(list(zip(columns["id"], completions, strict=True)))
        return word_count(prompts, completions)

    return reward


@pytest.mark.parametrize("workflow", ["beam_search", "dvts"])
def test_each_step_keeps_the_best_of_each_prompts_own_candidates(run, prompts, workflow):
    """Replay the reward's calls (one per step): every candidate of step t+1 extends one of the best
    n / beam_width (beam search) or the best of its subtree (DVTS) unfinished texts of step t."""
    log: list = []
    rows, roles = run(prompts, f"workflow={workflow}", "workflow.n=4", "workflow.beam_width=2", *STEPS,
                      reward=_logging_reward(log))
    assert len(log) == max(r["stats"]["steps"] for r in rows) == roles["reward"].info()[0]["calls"]
    for row in rows:
        steps = [[text for rid, text in call if rid == row["id"]] for call in log]
        steps = [s for s in steps if s]
        assert len(steps) == row["stats"]["steps"]
        use = row["stats"]["roles"]
        assert use["policy"]["calls"] == use["reward"]["calls"] == len(steps)
        assert use["policy"]["candidates"] == use["reward"]["texts"] == sum(len(s) for s in steps)
        for before, after in zip(steps, steps[1:], strict=False):
            if workflow == "beam_search":  # n candidates per step; the best n / beam_width go on
                assert len(before) == 4
                groups = [range(4)]
            else:  # beam_width candidates per live subtree, subtree by subtree; each one's best goes on
                assert len(before) in (2, 4)
                groups = [range(i, i + 2) for i in range(0, len(before), 2)]
            keep = 2 if workflow == "beam_search" else 1
            parents = {before[i] for group in groups
                       for i in sorted(group, key=lambda i: (-word_count([], [before[i]])[0], i))[:keep]}
            assert all(any(text.startswith(parent) for parent in parents) for text in after)
        assert row["reward"] == max(c["reward"] for c in row["candidates"])
        assert row["output"] == row["candidates"][row["selected"]]["text"]
        if workflow == "dvts":
            assert sorted({c["tree"] for c in row["candidates"]}) == [0, 1]


def test_each_prompt_searches_alone(run, prompts):
    """A prompt's records are the same whether it is searched in a batch or on its own."""
    together, _ = run(prompts, "workflow=beam_search", "workflow.n=4", "workflow.beam_width=2", *STEPS)
    for record, row in zip(prompts, together, strict=True):
        (alone,), _ = run([record], "workflow=beam_search", "workflow.n=4", "workflow.beam_width=2", *STEPS)
        assert (alone["output"], alone["reward"], alone["candidates"]) == (row["output"], row["reward"],
                                                                          row["candidates"])
        assert alone["stats"]["roles"] == row["stats"]["roles"]


def test_bad_search_configs_are_refused_by_key(compose):
    with pytest.raises(ConfigError, match=r"workflow\.n must be a multiple of workflow\.beam_width"):
        check_config(compose("workflow=dvts", "workflow.n=5", "workflow.beam_width=2"))
    with pytest.raises(ConfigError, match=r"generation\.speculative='lookup': workflow=beam_search"):
        check_config(compose("workflow=beam_search", "generation.speculative=lookup"))


@pytest.mark.ray
def test_beam_search_through_run_job_on_ray_with_the_prefix_cache(ray_session, compose, tmp_path, tiny_path, run,
                                                                   prompts):
    """The config reaches the Ray policy actor (prefix cache on, its counters in `info`), and the records
    are the in-process run's without the cache."""
    import json

    from qsteer.run import run_job

    search = ["workflow=beam_search", "workflow.n=4", "workflow.beam_width=2", *STEPS]
    cfg = compose(*search, f"model.path={tiny_path}", "model.dtype=float64", "model.prefix_cache_tokens=4096",
                  "dataset.limit=2", "reward=callable", "reward.target=reward_fns:word_count")
    summary = run_job(cfg, tmp_path)
    assert summary["num_errors"] == 0 and summary["num_prompts"] == 2
    on_ray = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    in_process, _ = run(prompts, *search)
    assert [(r["output"], r["reward"], r["candidates"]) for r in on_ray] == \
        [(r["output"], r["reward"], r["candidates"]) for r in in_process]


class KnownValue:
    """A value known in closed form: `of_completion` of the completion's token ids (the prompt's ids, which
    every prefix the search sends starts with, stripped). Logs each call as (record, completion ids) pairs."""

    def __init__(self, prompt_ids: list[list[int]], of_completion: Callable[[list[int]], float]) -> None:
        self.prompt_ids, self.of_completion = prompt_ids, of_completion
        self.calls: list[list[tuple[int, list[int]]]] = []

    def values(self, prefixes: list[list[int]]) -> list[float]:
        call = []
        for prefix in prefixes:
            record = max((i for i, p in enumerate(self.prompt_ids) if prefix[: len(p)] == p),
                         key=lambda i: len(self.prompt_ids[i]))
            call.append((record, prefix[len(self.prompt_ids[record]):]))
        self.calls.append(call)
        return [self.of_completion(ids) for _, ids in call]

    def next_values(self, prefixes: list[list[int]], candidates: list[list[int]]) -> list[list[float]]:
        return [self.values([prefix + [z] for z in cands]) for prefix, cands in zip(prefixes, candidates, strict=True)]


SEARCH = ["workflow.n=4", "workflow.beam_width=2", *STEPS]


@pytest.mark.parametrize("workflow", ["beam_search", "dvts"])
def test_a_value_equal_to_the_reward_searches_as_the_reward(run, prompts, engines64, workflow):
    """V(prefix) = the reward of the prefix's text: every step ranks as the reward does, so the records are
    the reward-scored search's, with each candidate's value beside its reward; the value is called once a
    step and the reward once, on the finished beams."""
    engine = engines64["plain"]
    value = KnownValue(engine.encode([p["prompt"] for p in prompts]),
                       lambda ids: word_count([], [engine.decode(ids)])[0])
    by_reward, _ = run(prompts, f"workflow={workflow}", *SEARCH)
    by_value, roles = run(prompts, f"workflow={workflow}", *SEARCH, "workflow.scorer=value", value=value)
    for v, r in zip(by_value, by_reward, strict=True):
        assert (v["output"], v["reward"], v["selected"]) == (r["output"], r["reward"], r["selected"])
        assert [{k: x for k, x in c.items() if k != "value"} for c in v["candidates"]] == r["candidates"]
        assert all(c["value"] == c["reward"] for c in v["candidates"])
        use, ref = v["stats"]["roles"], r["stats"]["roles"]
        assert use["policy"] == ref["policy"] and v["stats"]["steps"] == r["stats"]["steps"]
        assert use["value"] == {"calls": ref["reward"]["calls"], "prefixes": ref["reward"]["texts"]}
        assert use["reward"] == {"calls": 1, "texts": len(v["candidates"])}
    assert len(value.calls) == max(r["stats"]["steps"] for r in by_value)
    assert roles["reward"].info()[0]["calls"] == 1


@pytest.mark.parametrize("workflow", ["beam_search", "dvts"])
def test_a_tabular_value_picks_the_steps_and_the_output(run, prompts, engines64, workflow):
    """V = the sum of a fixed random weight per completion token: replayed from the value's calls, every
    step's candidates extend the best-valued of the step before (n / beam_width of them in beam search,
    each subtree's best in DVTS), and the output is the finished beam of highest value, whatever its
    reward (the reward only scores the finished beams)."""
    engine = engines64["plain"]
    weights = torch.randn(engine.model.config.vocab_size, generator=torch.Generator().manual_seed(0),
                          dtype=torch.float64).tolist()

    def table(ids: list[int]) -> float:
        return sum(weights[t] for t in ids)

    value = KnownValue(engine.encode([p["prompt"] for p in prompts]), table)
    rows, _ = run(prompts, f"workflow={workflow}", *SEARCH, "workflow.scorer=value", value=value)
    for position, row in enumerate(rows):
        steps = [[ids for record, ids in call if record == position] for call in value.calls]
        steps = [s for s in steps if s]
        assert len(steps) == row["stats"]["steps"] > 1
        for before, after in zip(steps, steps[1:], strict=False):
            groups = [range(len(before))] if workflow == "beam_search" else \
                [range(i, i + 2) for i in range(0, len(before), 2)]
            keep = 2 if workflow == "beam_search" else 1
            parents = [before[i] for group in groups
                       for i in sorted(group, key=lambda i: (-table(before[i]), i))[:keep]]
            assert all(any(ids[: len(p)] == p and len(ids) > len(p) for p in parents) for ids in after)
        seen = {(engine.decode(ids), len(ids)): table(ids) for step in steps for ids in step}
        candidates = row["candidates"]
        assert [c["value"] for c in candidates] == [seen[c["text"], c["num_tokens"]] for c in candidates]
        best = max(range(len(candidates)), key=lambda i: (candidates[i]["value"], -i))
        assert row["selected"] == best and row["output"] == candidates[best]["text"]
        assert [c["reward"] for c in candidates] == word_count([], [c["text"] for c in candidates])
        assert row["stats"]["roles"]["reward"] == {"calls": 1, "texts": len(candidates)}


def test_value_scorer_needs_a_value_named_by_key(compose, tmp_path):
    with pytest.raises(ConfigError, match=r"^value\.path is required by workflow=dvts"):
        run_job(compose("workflow=dvts", "workflow.scorer=value"), tmp_path / "dvts")
