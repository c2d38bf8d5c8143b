"""Exact test bed (spec section 0.4): a tabular LM, a tabular value, and V^p by enumeration.

A "language model" over tokens {0..4}, EOS = 5 and a prompt token BOS = 6, with horizon H = 3:
every next-token law is a seeded Dirichlet(1) row keyed by the completion so far, and a
sequence ends at EOS or after H tokens (a truncated sequence counts as terminal, scored by r,
the spec's [I] choice). Its 156 finished sequences can be enumerated, so the value of every
prefix under the base policy,

    V(s) = r(s) if s is finished, else sum_z p(z|s) V([s, z])        (CD, section 2.1)

is exact, and value fitting and guided sampling can be checked against it rather than against
another estimate. Both modules meet the same interfaces as the neural ones (`forward` returns
`.logits` [B, T, V]; `state_values` / `q_values`), so the same fitting and sampling code runs
on them. Inputs are [BOS, y1, y2, ...]; positions after a finished sequence are padding and
get a uniform law / value 0.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

TOKENS = 5
EOS = 5
BOS = 6
VOCAB = 7
HORIZON = 3


def _code(prefix: torch.Tensor) -> torch.Tensor:
    """Mixed-radix index of completion prefixes [B, L] (tokens 0..5) among the 6**L prefixes of length L."""
    code = torch.zeros(prefix.shape[0], dtype=torch.long, device=prefix.device)
    for col in range(prefix.shape[1]):
        code = code * (TOKENS + 1) + prefix[:, col].clamp(max=TOKENS)
    return code


def _prefix_index(input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For every position j of [B, T] inputs: the completion length L = j and the flat index of
    y_1..y_L among all prefixes of lengths 0..H (offsets sum_{l<L} 6**l), and whether the prefix is
    an unfinished state (no EOS yet)."""
    batch, width = input_ids.shape
    completion = input_ids[:, 1:]
    index = torch.zeros(batch, width, dtype=torch.long, device=input_ids.device)
    alive = torch.ones(batch, width, dtype=torch.bool, device=input_ids.device)
    offset = 0
    for length in range(width):
        if length > HORIZON:
            alive[:, length] = False
            continue
        index[:, length] = offset + _code(completion[:, :length])
        if length:
            alive[:, length] = alive[:, length - 1] & (completion[:, length - 1] < EOS)
        offset += (TOKENS + 1) ** length
    return index, alive


NUM_PREFIXES = sum((TOKENS + 1) ** length for length in range(HORIZON + 1))


class TabularLM(nn.Module):
    """The base policy: one Dirichlet(1) row over {0..4, EOS} per unfinished completion prefix."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        # Dirichlet(1) rows as normalised exponentials: torch's Dirichlet takes no generator
        rows = -torch.log(torch.rand((NUM_PREFIXES, TOKENS + 1), generator=gen, dtype=torch.float64))
        rows = rows / rows.sum(-1, keepdim=True)
        probs = torch.zeros(NUM_PREFIXES, VOCAB, dtype=torch.float64)
        probs[:, : TOKENS + 1] = rows
        self.register_buffer("table", probs)
        # distinct rewards of finished sequences, in [0, 1)
        self.register_buffer("reward_table", torch.rand(NUM_PREFIXES, generator=gen, dtype=torch.float64))

    def next_probs(self, completion: tuple[int, ...]) -> torch.Tensor:
        return self.table[_prefix_index(torch.tensor([[BOS, *completion]]))[0][0, -1]]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> CausalLMOutput:
        index, alive = _prefix_index(input_ids)
        probs = self.table[index.clamp(max=NUM_PREFIXES - 1)]
        # past a finished sequence (or at the horizon) the row is padding: any law will do
        at_horizon = torch.arange(input_ids.shape[1], device=input_ids.device) >= HORIZON
        dead = ~alive | at_horizon
        probs = torch.where(dead[..., None], torch.full_like(probs, 1.0 / VOCAB), probs)
        # float64 logits: the exactness checks compare against enumeration to 1e-8
        return CausalLMOutput(logits=probs.clamp_min(1e-300).log())

    def reward(self, completion: tuple[int, ...]) -> float:
        return float(self.reward_table[_prefix_index(torch.tensor([[BOS, *completion]]))[0][0, -1]])

    def sample(self, num: int, generator: torch.Generator, uniform_policy: bool = False) -> list[tuple[int, ...]]:
        """`num` finished completions from the policy (or from the uniform law over {0..4, EOS})."""
        ids = torch.full((num, 1), BOS, dtype=torch.long)
        for _ in range(HORIZON):
            probs = self(ids).logits[:, -1].exp()[:, : TOKENS + 1]
            if uniform_policy:
                probs = torch.ones_like(probs)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], dim=1)
        out = []
        for row in ids[:, 1:].tolist():
            cut = row.index(EOS) + 1 if EOS in row else HORIZON
            out.append(tuple(row[:cut]))
        return out


def finished(completion: tuple[int, ...]) -> bool:
    return len(completion) >= HORIZON or (len(completion) > 0 and completion[-1] == EOS)


def states() -> list[tuple[int, ...]]:
    """Every completion prefix the policy can reach (unfinished and finished), shortest first."""
    out: list[tuple[int, ...]] = [()]
    frontier: list[tuple[int, ...]] = [()]
    while frontier:
        frontier = [(*s, z) for s in frontier if not finished(s) for z in range(TOKENS + 1)]
        out.extend(frontier)
    return out


def exact_values(lm: TabularLM) -> dict[tuple[int, ...], float]:
    """V^p of every reachable completion prefix, by backward induction over the enumeration."""
    values: dict[tuple[int, ...], float] = {}
    for state in sorted(states(), key=len, reverse=True):
        if finished(state):
            values[state] = lm.reward(state)
        else:
            probs = lm.next_probs(state)
            values[state] = float(sum(probs[z] * values[(*state, z)] for z in range(TOKENS + 1)))
    return values


def sequence_law(lm: TabularLM) -> dict[tuple[int, ...], float]:
    """The probability of every finished completion under the policy."""
    law = {}
    for state in states():
        if finished(state):
            law[state] = float(torch.prod(torch.stack(
                [lm.next_probs(state[:t])[state[t]] for t in range(len(state))])))
    return law


class TabularValue(nn.Module):
    """One parameter per prefix (scalar) or per (state, next token) (Q): the spec's tabular scorer."""

    def __init__(self, kind: str = "scalar") -> None:
        super().__init__()
        if kind not in ("scalar", "q"):
            raise ValueError(f"value kind {kind!r} is not one of: scalar, q")
        self.kind = kind
        shape = (NUM_PREFIXES,) if kind == "scalar" else (NUM_PREFIXES, VOCAB)
        self.table = nn.Parameter(torch.zeros(shape, dtype=torch.float64))

    def state_values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        index, _ = _prefix_index(input_ids)
        index = index.clamp(max=NUM_PREFIXES - 1)
        if self.kind == "scalar":
            return self.table[index]
        out = self.table[index[:, :-1], input_ids[:, 1:].clamp(max=VOCAB - 1)]
        return torch.nn.functional.pad(out, (1, 0))

    def q_values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind != "q":
            raise ValueError("q_values needs a Q-table; this value is scalar")
        index, _ = _prefix_index(input_ids)
        return self.table[index.clamp(max=NUM_PREFIXES - 1)]

    @torch.no_grad()
    def value_of(self, completion: tuple[int, ...]) -> float:
        ids = torch.tensor([[BOS, *completion]])
        return float(self.state_values(ids)[0, -1])


def all_completions() -> list[tuple[int, ...]]:
    """Every finished completion, in a fixed order."""
    return [s for s in states() if finished(s)]


def _row(state: tuple[int, ...]) -> int:
    return int(_prefix_index(torch.tensor([[BOS, *state]]))[0][0, -1])


def completion_law(lm: TabularLM, prefix: tuple[int, ...] = ()) -> dict[tuple[int, ...], float]:
    """The law of the finished completions that extend `prefix`, given it, by enumeration."""
    table = lm.table.tolist()
    law: dict[tuple[int, ...], float] = {}

    def walk(state: tuple[int, ...], prob: float) -> None:
        if finished(state):
            law[state] = prob
            return
        row = table[_row(state)]
        for z in range(TOKENS + 1):
            walk((*state, z), prob * row[z])

    walk(tuple(prefix), 1.0)
    return law


def tilted_lm(lm: TabularLM, reward: TabularLM, beta: float) -> TabularLM:
    """rho(y | s) ∝ p(y | s) exp(r(y) / beta) as a TabularLM: the policy aligned to `reward.reward`.

    Its next-token law is p(z | s) Z([s, z]) / Z(s) with Z(s) = E_p[exp(r / beta) | s] by backward
    induction, so rho is the trajectory-level optimum from every state at once (Transfer Q*'s rho*,
    or an exactly aligned baseline rho_BL). The tilted model keeps `lm`'s reward table.
    """
    partition: dict[tuple[int, ...], float] = {}
    tilted = TabularLM()
    table = lm.table.clone()
    for state in sorted(states(), key=len, reverse=True):
        if finished(state):
            partition[state] = float(torch.exp(torch.tensor(reward.reward(state) / beta, dtype=torch.float64)))
            continue
        probs = lm.next_probs(state)
        children = torch.tensor([partition[(*state, z)] for z in range(TOKENS + 1)], dtype=torch.float64)
        mass = probs[: TOKENS + 1] * children
        partition[state] = float(mass.sum())
        table[_row(state), : TOKENS + 1] = mass / mass.sum()
    tilted.table.copy_(table)
    tilted.reward_table.copy_(lm.reward_table)
    return tilted
