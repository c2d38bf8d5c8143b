"""The token-wise guided loop (decoding/guided.py) on the tiny model: limiting cases, its law, its KL, its cost."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qsteer.decoding import guided
from qsteer.decoding.guided import GuidedStep, PolicyHeadScorer, ValueFunctionScorer, WeightedScorers
from qsteer.engines import SamplingParams
from qsteer.values.guided import step_kl
from qsteer.values.model import ValueModel, ValueScorer


class PairScorer:
    """A fixed score of (last context token, candidate): a known function, so the law is known."""

    uses_hidden = False

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale
        self.calls = 0

    def value(self, last: int, z: int) -> float:
        return self.scale * (((last * 31 + z * 17) % 101) / 101.0)

    def score(self, step: GuidedStep) -> torch.Tensor:
        self.calls += 1
        return torch.tensor([[self.value(ctx[-1], z) for z in cands]
                             for ctx, cands in zip(step.contexts, step.candidates.tolist(), strict=True)],
                            dtype=torch.float64)


@pytest.fixture(scope="module")
def engine64(tiny_engine64):
    return tiny_engine64


PROMPTS = ["Hello there", "Once upon a time", "The weather today is"]


@pytest.mark.parametrize("top_k", [5, 0])
def test_alpha_zero_is_the_plain_loops_top_k_sampling(engine64, top_k):
    """alpha = 0: the same tokens as plain top-k sampling with the same seed (top_k = 0: plain sampling)."""
    ids = engine64.encode(PROMPTS)
    params = SamplingParams(n=3, max_new_tokens=10 if top_k else 5, top_k=top_k, seed=7)
    plain = engine64.generate(ids, params, ["a", "b", "c"])
    ours = engine64.generate_guided(ids, params, ["a", "b", "c"], PairScorer(scale=5.0), alpha=0.0)
    for theirs, mine in zip(plain, ours, strict=True):
        assert [c.token_ids for c in mine] == [c.token_ids for c in theirs]
        assert [c.finish_reason for c in mine] == [c.finish_reason for c in theirs]
        for c_plain, c_ours in zip(theirs, mine, strict=True):
            assert c_ours.logprobs == pytest.approx(c_plain.logprobs, abs=1e-12)
            assert c_ours.guided["kl"] == pytest.approx(0.0, abs=1e-12)
    assert len({tuple(c.token_ids) for comps in ours for c in comps}) == 9  # the streams do differ


def test_greedy_alpha_zero_is_greedy_decoding(engine64):
    ids = engine64.encode(PROMPTS)
    params = SamplingParams(max_new_tokens=10, temperature=0.0, top_k=4)
    greedy = engine64.generate(ids, params)
    ours = engine64.generate_guided(ids, params, None, PairScorer(scale=5.0), alpha=0.0)
    assert [c[0].token_ids for c in ours] == [c[0].token_ids for c in greedy]
    steered = engine64.generate_guided(ids, params, None, PairScorer(scale=5.0), alpha=20.0)
    assert [c[0].token_ids for c in steered] != [c[0].token_ids for c in greedy]


def test_next_token_law_is_p_exp_alpha_v_over_z_and_kl_rises_with_alpha(tiny_engine):
    """Every draw is the inverse CDF, at its row's own uniform, of p e^{alpha V}/Z over the top-8 (computed
    here in numpy from the model's own logits), so the sampler's law is that law; the empirical law of
    the draws is within TV 0.05 of it (600 draws); the recorded KL is the law's exact KL and grows with
    alpha. (40k draws within TV 0.02 on the exact tabular model: tests/test_values_guided.py.)"""
    from qsteer.lm.sampling import step_uniforms

    lm = tiny_engine.lm
    prompt = tiny_engine.encode(["Tell me a story"])[0]
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(torch.tensor([prompt])).logits[0, -1].double(), -1)
    top_lp, top_ids = logp.topk(8)
    order = top_ids.argsort()  # the CDF runs over the candidates in token-id order
    ids = top_ids[order].numpy()
    scorer = PairScorer(scale=1.0)
    v = np.array([scorer.value(prompt[-1], z) for z in ids])
    p = top_lp[order].exp().numpy()
    p = p / p.sum()
    draws = 600
    rows = [(0, j) for j in range(draws)]
    uniforms = np.array([float(step_uniforms(11, "story", j, 1)[0]) for j in range(draws)])
    previous_kl = -1.0
    for alpha in (0.0, 2.0, 6.0):
        params = SamplingParams(max_new_tokens=1, top_k=8, seed=11)
        out = guided.generate_rows(lm, [prompt], ["story"], rows, params, scorer, alpha, max_batch_rows=draws)
        first = np.array([c.token_ids[0] for c in out])
        target = p * np.exp(alpha * v)
        target /= target.sum()
        expected = ids[np.minimum(np.searchsorted(np.cumsum(target), uniforms, side="right"), len(ids) - 1)]
        assert (first == expected).mean() > 0.995, alpha  # a uniform within float32 rounding of a CDF step may flip
        empirical = np.array([(first == z).mean() for z in ids])
        assert 0.5 * np.abs(empirical - target).sum() < 0.05, alpha
        kl = out[0].guided["kl"]
        assert kl == pytest.approx(float(np.sum(target * np.log(target / p))), abs=1e-5)
        assert kl > previous_kl
        previous_kl = kl
        # KL from the whole-vocabulary base adds -log of the top-8 mass
        assert out[0].guided["kl_full"] == pytest.approx(kl - float(torch.logsumexp(top_lp, 0)), abs=1e-5)


def test_recorded_kl_is_the_exact_per_step_sum_along_the_path(engine64):
    """Recompute each step's law from teacher-forced top-k log-probs and the scorer: the sums agree."""
    ids = engine64.encode(PROMPTS[:2])
    params = SamplingParams(n=2, max_new_tokens=8, top_k=6, seed=3)
    scorer = PairScorer(scale=2.0)
    out = engine64.generate_guided(ids, params, ["x", "y"], scorer, alpha=1.5)
    for prompt, comps in zip(ids, out, strict=True):
        for c in comps:
            prefixes = [prompt + c.token_ids[:t] for t in range(len(c.token_ids))]
            top = engine64.topk_next(prefixes, 6)
            lp = torch.tensor([[v for _, v in row] for row in top], dtype=torch.float64)
            values = torch.tensor([[scorer.value(pre[-1], z) for z, _ in row] for pre, row in zip(prefixes, top,
                                                                                                    strict=True)],
                                  dtype=torch.float64)
            assert c.guided["kl"] == pytest.approx(float(step_kl(lp, values, 1.5).sum()), abs=1e-5)
            assert all(t in [z for z, _ in row] for t, row in zip(c.token_ids, top, strict=True))
            assert c.guided["scored_candidates"] == 6 * len(c.token_ids)
    # one scorer call per step for all rows of the chunk; the shares add up to it
    total_calls = sum(c.guided["scorer_calls"] for comps in out for c in comps)
    assert total_calls == pytest.approx(scorer.calls)
    assert scorer.calls == max(len(c.token_ids) for comps in out for c in comps)


def test_policy_head_rides_in_the_policys_forward(tiny_engine):
    """The Q-head on the policy scores from the loop's own hidden state: the values equal a fresh
    ValueModel evaluation of each context, and the backbone runs once per generated token."""
    lm = tiny_engine.lm
    value = ValueModel.on_policy_model(lm.model, "q")
    with torch.no_grad():
        value.head.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
        value.head.bias.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    reference = ValueScorer(value, pad_id=lm.pad_id)
    head = PolicyHeadScorer(value.head)
    checked = []

    class Checking:
        uses_hidden = True

        def score(self, step: GuidedStep) -> torch.Tensor:
            ours = head.score(step)
            theirs = torch.tensor(reference.next_values(step.contexts, step.candidates.tolist()), dtype=torch.float64)
            checked.append(float((ours - theirs).abs().max()))
            return ours

    calls = []
    hook = lm.model.base_model.register_forward_hook(lambda *args: calls.append(1))
    try:
        ids = tiny_engine.encode(PROMPTS)
        params = SamplingParams(n=2, max_new_tokens=6, top_k=10, seed=5)
        out = tiny_engine.generate_guided(ids, params, None, Checking(), alpha=1.0)
    finally:
        hook.remove()
    assert checked and max(checked) < 1e-4
    longest = max(len(c.token_ids) for comps in out for c in comps)
    # the checking scorer's own evaluations ran the backbone too: one per step, beside the loop's
    loop_forwards = len(calls) - len(checked)
    assert loop_forwards == longest  # the prefill, then one forward per token but the last
    assert sum(c.guided["policy_forwards"] for comps in out for c in comps) == pytest.approx(longest)


def test_value_function_scorer_and_weights(tiny_engine):
    """A ValueFunction (here a ValueScorer over a separate-style Q model) plugs in as a scorer; weights add."""
    lm = tiny_engine.lm
    value = ValueModel.on_policy_model(lm.model, "q")
    with torch.no_grad():
        value.head.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(2))
    function = ValueFunctionScorer(ValueScorer(value, pad_id=lm.pad_id))
    head = PolicyHeadScorer(value.head)
    ids = tiny_engine.encode(PROMPTS[:1])
    top_lp, top_ids = torch.log_softmax(lm.model(torch.tensor(ids)).logits[:, -1].double(), -1).topk(5)
    hidden = value.hidden(torch.tensor(ids))[:, -1]
    step = GuidedStep(contexts=ids, candidates=top_ids, logprobs=top_lp, hidden=hidden, rows=[("0", 0)], step=0)
    assert torch.allclose(function.score(step), head.score(step), atol=1e-5)
    both = WeightedScorers([(function, 0.5), (head, 2.0)])
    assert both.uses_hidden
    assert torch.allclose(both.score(step), 2.5 * head.score(step), atol=1e-5)
    with pytest.raises(ValueError, match="scalar head on the policy"):
        PolicyHeadScorer(ValueModel.on_policy_model(lm.model, "scalar").head)


def test_bad_scores_and_settings_are_refused(tiny_engine):
    ids = tiny_engine.encode(PROMPTS[:1])

    class Wrong:
        uses_hidden = False

        def __init__(self, value):
            self.value = value

        def score(self, step):
            return torch.full((len(step.contexts), self.value[0]), self.value[1])

    with pytest.raises(ValueError, match="shape"):
        tiny_engine.generate_guided(ids, SamplingParams(top_k=4, max_new_tokens=2), None, Wrong((3, 0.0)), 1.0)
    with pytest.raises(ValueError, match="non-finite"):
        tiny_engine.generate_guided(ids, SamplingParams(top_k=4, max_new_tokens=2), None,
                                    Wrong((4, float("nan"))), 1.0)
    with pytest.raises(ValueError, match="top_p"):
        tiny_engine.generate_guided(ids, SamplingParams(top_p=0.9, max_new_tokens=2), None, PairScorer(), 1.0)
