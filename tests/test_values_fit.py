"""CD-FUDGE and CD-Q against exact values on the tabular model (spec section 2, check 2)."""

from __future__ import annotations

from collections import Counter, defaultdict

import pytest
import torch

from qsteer.training.value import cdq_targets, fit_value, fudge_loss, make_batch
from qsteer.values.tabular import BOS, EOS, TabularLM, TabularValue, exact_values, finished, states


def reach_probability(lm: TabularLM, state: tuple[int, ...]) -> float:
    return float(torch.prod(torch.stack([lm.next_probs(state[:t])[state[t]] for t in range(len(state))])))


def merged_batch(lm: TabularLM, samples: list[tuple[int, ...]]):
    """Identical samples as one weighted row: the same loss at a fraction of the rows."""
    counts = Counter(samples)
    unique = list(counts)
    return make_batch([[BOS]] * len(unique), [list(s) for s in unique], [lm.reward(s) for s in unique],
                      end_ids=[EOS], weights=[counts[s] for s in unique])


def rprop(model):
    # full-batch, deterministic gradients: Rprop reaches the exact minimiser in a few hundred steps
    return torch.optim.Rprop(model.parameters(), lr=0.01)


@pytest.fixture(scope="module")
def lm():
    return TabularLM(seed=0)


@pytest.fixture(scope="module")
def exact(lm):
    return exact_values(lm)


def weighted_error(lm, value: TabularValue, exact: dict) -> float:
    """Mean squared error over the completion prefixes, weighted by how often the policy reaches them."""
    prefixes = [s for s in states() if s]
    return sum(reach_probability(lm, s) * (value.value_of(s) - exact[s]) ** 2 for s in prefixes) / sum(
        reach_probability(lm, s) for s in prefixes)


@pytest.mark.parametrize("kind", ["scalar", "q"])
def test_fudge_converges_to_the_exact_value_with_enough_on_policy_samples(lm, exact, kind):
    gen = torch.Generator().manual_seed(1)
    errors = {}
    for num in (300, 60_000):
        samples = lm.sample(num, gen)
        value = TabularValue(kind)
        losses = fit_value(value, [merged_batch(lm, samples)], "fudge", epochs=200, optimizer=rprop(value),
                           max_grad_norm=None)
        assert losses[-1] < losses[0]
        # the fit reaches its minimiser: the mean reward of the samples through each prefix
        totals: dict[tuple[int, ...], list[float]] = defaultdict(lambda: [0.0, 0.0])
        for sample, count in Counter(samples).items():
            for t in range(1, len(sample) + 1):
                totals[sample[:t]][0] += count * lm.reward(sample)
                totals[sample[:t]][1] += count
        for prefix, (total, count) in totals.items():
            assert value.value_of(prefix) == pytest.approx(total / count, abs=1e-5)
        errors[num] = weighted_error(lm, value, exact)
    assert errors[60_000] < 1e-3  # spec: MSE < 1e-3
    assert errors[60_000] < errors[300] / 10


def test_cdq_reaches_the_exact_value_from_uniform_off_policy_data(lm, exact):
    """CD-Q's fixed point is V^p even when the data come from another (uniform) policy; FUDGE's is not."""
    samples = lm.sample(5000, torch.Generator().manual_seed(2), uniform_policy=True)
    batch = merged_batch(lm, samples)
    value = TabularValue("q")
    losses = fit_value(value, [batch], "cdq", base=lm, epochs=200, optimizer=rprop(value), max_grad_norm=None,
                       target_sync_every=40)
    prefixes = [s for s in states() if s]
    assert max(abs(value.value_of(s) - exact[s]) for s in prefixes) < 1e-4
    residual = float(0.5 * (((value.state_values(batch.input_ids).detach() - cdq_targets(value, lm, batch))
                             * batch.completion_mask()) ** 2).sum(-1).mul(batch.weights).sum() / batch.weights.sum())
    assert residual < 1e-8 and losses[-1] < 1e-8  # the Bellman residual at the fixed point

    fudge = TabularValue("q")
    fit_value(fudge, [batch], "fudge", epochs=120, optimizer=rprop(fudge), max_grad_norm=None)
    assert max(abs(fudge.value_of(s) - exact[s]) for s in prefixes) > 0.05  # Monte Carlo is on-policy only


def test_cdq_targets_are_the_bellman_backup(lm, exact):
    """With the exact Q in the table, every target equals the value it backs up."""
    value = TabularValue("q")
    with torch.no_grad():
        for state in states():
            if not finished(state):
                row = _row_index(torch.tensor([[BOS, *state]]))
                for z in range(6):
                    value.table[row, z] = exact[(*state, z)]
    samples = [s for s in states() if finished(s)]
    batch = make_batch([[BOS]] * len(samples), [list(s) for s in samples], [lm.reward(s) for s in samples],
                       end_ids=[EOS])
    targets = cdq_targets(value, lm, batch)
    preds = value.state_values(batch.input_ids).detach()
    mask = batch.completion_mask()
    assert (targets - preds)[mask].abs().max() < 1e-12


def _row_index(ids: torch.Tensor) -> int:
    """The table row of the state ids[0] (the model's own indexing)."""
    from qsteer.values.tabular import _prefix_index

    return int(_prefix_index(ids)[0][0, -1])


def test_cdq_needs_a_q_head_and_the_base(lm):
    batch = make_batch([[BOS]], [[1, EOS]], [0.5], end_ids=[EOS])
    with pytest.raises(ValueError, match="Q-head"):
        cdq_targets(TabularValue("scalar"), lm, batch)
    with pytest.raises(ValueError, match="base policy"):
        fit_value(TabularValue("q"), [batch], "cdq")
    with pytest.raises(ValueError, match="fudge, cdq"):
        fit_value(TabularValue("q"), [batch], "td")


def test_batches_are_checked_and_fudge_loss_counts_every_prefix():
    with pytest.raises(ValueError, match="empty completion"):
        make_batch([[BOS]], [[]], [1.0], end_ids=[EOS])
    with pytest.raises(ValueError, match="2 prompts"):
        make_batch([[BOS], [BOS]], [[1]], [1.0], end_ids=[EOS])
    batch = make_batch([[BOS], [BOS]], [[1, 2, EOS], [3, EOS]], [1.0, 0.0], end_ids=[EOS])
    assert batch.completion_mask().sum().item() == 5
    # zero values: loss = 1/2 * (3 prefixes * 1^2 + 2 prefixes * 0^2) / 2 sequences
    assert float(fudge_loss(TabularValue("scalar"), batch).detach()) == pytest.approx(0.75)
