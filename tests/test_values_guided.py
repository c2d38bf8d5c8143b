"""The tokenwise guided law p exp(alpha V) / Z over the top-k: limiting cases, exact law, KL accounting."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qsteer.values.guided import best_of_k_kl_bound, guided_logprobs, sample_guided, step_kl
from qsteer.values.tabular import BOS, EOS, TOKENS, TabularLM, exact_values, sequence_law

try:  # the base policy's own top-k sampler, wherever the decoding-core refactor puts it
    from qsteer.lm.params import SamplingParams
    from qsteer.lm.sampling import filter_logits, sample_tokens
except ImportError:
    from qsteer.engines.base import SamplingParams
    from qsteer.engines.hf import filter_logits, sample_tokens


def tiny_next_logprobs(tiny_path: str, prompts: list[str]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_path).eval()
    rows = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tok(prompt, return_tensors="pt").input_ids
            rows.append(torch.log_softmax(model(ids).logits[0, -1].float(), -1))
    return torch.stack(rows)


@pytest.fixture(scope="module")
def tiny_logprobs(tiny_path):
    prompts = ["Hello there", "The weather today", "Once upon a time", "def f(x):", "1 2 3"]
    return tiny_next_logprobs(tiny_path, prompts)


@pytest.mark.parametrize("k", [1, 5, 40])
def test_alpha_zero_is_the_base_top_k_law_and_draws_the_same_tokens(tiny_logprobs, k):
    logprobs = tiny_logprobs
    top_lp, top_ids = logprobs.topk(k, dim=-1)
    values = torch.randn(top_lp.shape, generator=torch.Generator().manual_seed(0)) * 5
    # the law: max-abs difference from the base's own top-k filter, on the same candidates
    base = filter_logits(logprobs, SamplingParams(top_k=k)).softmax(-1)
    law = guided_logprobs(top_lp, values, alpha=0.0).exp()
    assert (law - base.gather(-1, top_ids)).abs().max() < 1e-7
    # the draws: the same uniform gives the token the base policy's top-k sampler gives
    draws = 100
    uniforms = torch.rand(draws * logprobs.shape[0], generator=torch.Generator().manual_seed(1))
    ours = sample_guided(top_ids.repeat(draws, 1), top_lp.repeat(draws, 1), values.repeat(draws, 1), 0.0, uniforms)
    theirs = sample_tokens(logprobs.repeat(draws, 1), SamplingParams(top_k=k), uniforms)
    assert torch.equal(ours, theirs)
    if k > 1:
        assert len(set(ours.tolist())) > logprobs.shape[0]  # the draws do vary within a row


def test_alpha_zero_with_top_k_the_vocabulary_is_plain_sampling(tiny_logprobs):
    vocab = tiny_logprobs.shape[-1]
    top_lp, top_ids = tiny_logprobs.topk(vocab, dim=-1)
    values = torch.rand(top_lp.shape, generator=torch.Generator().manual_seed(2))
    draws = 20
    uniforms = torch.rand(draws * tiny_logprobs.shape[0], generator=torch.Generator().manual_seed(3))
    plain = sample_tokens(tiny_logprobs.repeat(draws, 1), SamplingParams(), uniforms)
    ours = sample_guided(top_ids.repeat(draws, 1), top_lp.repeat(draws, 1), values.repeat(draws, 1), 0.0, uniforms)
    assert torch.equal(ours, plain)


def test_the_law_is_invariant_to_a_per_row_shift_of_the_logprobs():
    """Spec 0.3: adding a constant per row (raw logits instead of log-probs) leaves the law unchanged."""
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(6, 10, generator=gen, dtype=torch.float64) * 3
    values = torch.randn(6, 10, generator=gen, dtype=torch.float64)
    a = guided_logprobs(torch.log_softmax(logits, -1), values, 1.7).exp()
    b = guided_logprobs(logits + 11.0, values, 1.7).exp()
    assert (a - b).abs().max() < 1e-12


def test_sampler_law_matches_p_exp_alpha_v_on_the_tabular_model():
    """With the exact V of the tabular model, 40k draws at one state are within TV 0.02 of the law,
    computed here independently in numpy from the model's table and the enumerated values."""
    lm = TabularLM(seed=3)
    values = exact_values(lm)
    state = (2,)
    p = lm.next_probs(state).numpy()[: TOKENS + 1]
    v = np.array([values[(*state, z)] for z in range(TOKENS + 1)])
    ids = torch.arange(TOKENS + 1)[None]
    logp = torch.tensor(np.log(p))[None]
    vals = torch.tensor(v)[None]
    draws = 40_000
    uniforms = torch.rand(draws, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    previous_kl = -1.0
    for alpha in (0.0, 1.0, 4.0, 12.0):
        target = p * np.exp(alpha * v)
        target /= target.sum()
        tokens = sample_guided(ids.expand(draws, -1), logp.expand(draws, -1), vals.expand(draws, -1),
                               alpha, uniforms)
        empirical = np.bincount(tokens.numpy(), minlength=TOKENS + 1) / draws
        assert 0.5 * np.abs(empirical - target).sum() < 0.02, alpha
        kl = float(step_kl(logp, vals, alpha)[0])
        assert kl == pytest.approx(float(np.sum(target * np.log(target / p))), abs=1e-10)
        assert kl > previous_kl  # d KL / d alpha = alpha Var_pi(V) > 0
        previous_kl = kl
    assert float(step_kl(logp, vals, 0.0)[0]) == 0.0


def test_kl_from_full_base_adds_the_mass_outside_the_top_k():
    gen = torch.Generator().manual_seed(6)
    logp = torch.log_softmax(torch.randn(3, 50, generator=gen, dtype=torch.float64), -1)
    top_lp, _ = logp.topk(8, dim=-1)
    values = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    pi = guided_logprobs(top_lp, values, 2.0).exp()
    direct = (pi * (pi.log() - top_lp)).sum(-1)  # KL(pi || p), p the full-vocabulary base
    assert torch.allclose(step_kl(top_lp, values, 2.0, full_base=True), direct, atol=1e-12)


def test_one_token_horizon_expected_reward_rises_with_alpha():
    """With exact V, the guided law's expected next-step value is monotone in alpha (spec 2, check 3)."""
    lm = TabularLM(seed=1)
    values = exact_values(lm)
    logp = torch.log(lm.next_probs(())[: TOKENS + 1])[None]
    v = torch.tensor([values[(z,)] for z in range(TOKENS + 1)], dtype=torch.float64)[None]
    expected = [float((guided_logprobs(logp, v, a).exp() * v).sum()) for a in (0, 0.5, 1, 2, 4, 8)]
    assert expected[0] == pytest.approx(values[()], abs=1e-12)  # alpha = 0: the base's own value
    assert all(b > a for a, b in zip(expected, expected[1:], strict=False))


def test_best_of_k_kl_bound_holds_for_the_exact_best_of_k_law():
    """Blockwise CD with one block as long as the answer is Best-of-K: its exact KL stays under the bound."""
    lm = TabularLM(seed=2)
    law = sequence_law(lm)
    seqs = sorted(law, key=lm.reward)  # rewards are distinct
    probs = np.array([law[s] for s in seqs])
    cdf = np.cumsum(probs)
    assert best_of_k_kl_bound(1) == 0.0
    for k in (1, 2, 4, 8, 16):
        bon = cdf ** k - np.concatenate([[0.0], cdf[:-1]]) ** k  # P_BoN(y) = F(r(y))^K - F(r(y)-)^K
        kl = float(np.sum(bon * np.log(np.where(bon > 0, bon, 1) / probs)))
        assert kl <= best_of_k_kl_bound(k) + 1e-12
        assert best_of_k_kl_bound(k) == pytest.approx(math.log(k) - (k - 1) / k)
    with pytest.raises(ValueError, match="K >= 1"):
        best_of_k_kl_bound(0)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="differ in shape"):
        guided_logprobs(torch.zeros(2, 3), torch.zeros(2, 4), 1.0)


def test_tabular_model_is_a_language_model():
    """The test bed itself: rows are laws, the enumeration sums to 1, and V at the root is E[r]."""
    lm = TabularLM(seed=0)
    ids = torch.tensor([[BOS, 1, 2, EOS], [BOS, EOS, 0, 0]])
    assert torch.allclose(lm(ids).logits.exp().sum(-1), torch.ones(2, 4, dtype=torch.float64))
    law = sequence_law(lm)
    assert sum(law.values()) == pytest.approx(1.0, abs=1e-12)
    assert exact_values(lm)[()] == pytest.approx(sum(p * lm.reward(s) for s, p in law.items()), abs=1e-12)
