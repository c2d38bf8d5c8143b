"""PG-TD (Zhang et al., 2023, "Planning with Large Language Models for Code Generation").

Monte Carlo tree search over the tokens of the program, with the policy as the prior:

- select: from the root, the child with the highest P-UCB,
  Q(s, a) + beta(s) * p(a | s) * sqrt(log N(s)) / (1 + N(s, a)),
  beta(s) = log((N(s) + c_base + 1) / c_base) + c, until a node that is not yet expanded
  (ties go to the larger prior, so an unvisited level follows the policy's argmax);
- evaluate: a greedy rollout from the node's prefix to a full program, scored by the share of
  the public tests (the statement's examples) it passes, in the sandbox group;
- expand: the policy's `top_k` next tokens become the node's children, with their
  probabilities renormalised over the k as priors (an end-of-sequence token makes a leaf);
- back up: Q is the largest reward found below a node (the paper's max backup: a program is
  either right or not, so a mean would punish a branch for its bad siblings).

Rollout caching (the paper's sequence cache): a greedy rollout from prefix p that produced
the sequence s is also the greedy rollout of every prefix q with p <= q <= s, so a node on a
cached greedy path costs no model call. Verdicts are cached by the sandbox group by (code,
test). Hence one rollout with no expansion below the root is greedy decoding, and top_k = 1
(a chain along the greedy path) never calls the model again after its first rollout.

Each MCTS iteration runs over all problems of the batch at once: one generate call for the
rollouts that miss the cache, one `topk_next` call for the expansions, one sandbox call. The
output is the program with the highest public share (the earliest on a tie); every distinct
program evaluated is a candidate, judged on the hidden tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from qsteer.workflows.code_search import CodeRun, public_tests
from qsteer.workflows.common import Context


@dataclass
class Node:
    tokens: tuple[int, ...]  # the program's tokens so far (after the prompt)
    prior: float = 1.0
    terminal: bool = False
    children: list[Node] = field(default_factory=list)
    expanded: bool = False
    visits: int = 0
    value: float = 0.0  # the largest reward found below


@dataclass
class Search:
    """One problem's tree and its caches."""

    prompt: list[int]
    root: Node
    rollouts: list[tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)  # (from prefix, sequence)
    programs: dict[tuple[int, ...], float] = field(default_factory=dict)  # sequence -> public share, in order
    texts: dict[tuple[int, ...], str] = field(default_factory=dict)
    generated_tokens: int = 0
    model_rollouts: int = 0

    def cached_rollout(self, tokens: tuple[int, ...]) -> tuple[int, ...] | None:
        for start, sequence in self.rollouts:
            if tokens[: len(start)] == start and sequence[: len(tokens)] == tokens:
                return sequence
        return None


def p_ucb(parent: Node, child: Node, c_base: float, c: float) -> tuple[float, float]:
    beta = math.log((parent.visits + c_base + 1) / c_base) + c
    explore = beta * child.prior * math.sqrt(math.log(parent.visits)) / (1 + child.visits) if parent.visits else 0.0
    return child.value + explore, child.prior


def run(records: list[dict], ctx: Context) -> list[dict]:
    cfg = ctx.workflow
    job = CodeRun(records, ctx)
    policy = ctx.policy
    eos = set(policy.info()[0]["eos_token_ids"])
    budget = ctx.params.max_new_tokens
    prompts = policy.encode([r.get("messages") or r["prompt"] for r in records], ctx.chat)
    searches = [Search(prompt=p, root=Node(tokens=())) for p in prompts]
    publics = [public_tests(r) for r in records]

    for _ in range(cfg.rollouts):
        paths = []
        for search in searches:
            node, path = search.root, [search.root]
            while node.expanded and node.children:
                parent = node
                node = max(node.children, key=lambda child: p_ucb(parent, child, cfg.ucb_base, cfg.ucb_constant))
                path.append(node)
            paths.append(path)

        # evaluate: greedy rollouts, from the cache where the leaf lies on a greedy path already taken
        sequences: list[tuple[int, ...] | None] = []
        misses = []
        for index, (search, path) in enumerate(zip(searches, paths, strict=True)):
            leaf = path[-1]
            hit = leaf.tokens if leaf.terminal or len(leaf.tokens) >= budget else search.cached_rollout(leaf.tokens)
            sequences.append(hit)
            if hit is None:
                misses.append(index)
        if misses:
            params = replace(ctx.params, n=1, temperature=0.0)
            groups = {}
            for index in misses:  # the token budget is the program's, so each prefix gets what it has left
                groups.setdefault(budget - len(paths[index][-1].tokens), []).append(index)
            for left, members in groups.items():
                outs = policy.generate([searches[i].prompt + list(paths[i][-1].tokens) for i in members],
                                       replace(params, max_new_tokens=left),
                                       [f"{records[i]['id']}/pgtd" for i in members])
                job.stats.policy_calls += 1
                for i, (completion,) in zip(members, outs, strict=True):
                    new = tuple(t for t in completion.token_ids if t not in eos)
                    start = paths[i][-1].tokens
                    sequences[i] = start + new
                    searches[i].rollouts.append((start, start + new))
                    searches[i].generated_tokens += len(completion.token_ids)
                    searches[i].model_rollouts += 1

        # score the programs not met before (the sandbox group caches verdicts as well)
        fresh = [(i, seq) for i, seq in enumerate(sequences) if seq not in searches[i].programs]
        if fresh:
            texts = policy.decode([list(seq) for _, seq in fresh])
            for (i, seq), text in zip(fresh, texts, strict=True):
                searches[i].texts[seq] = text
            verdicts = job.judge_public([(records[i], text, publics[i]) for (i, _), text in zip(fresh, texts,
                                                                                               strict=True)])
            for (i, seq), share in zip(fresh, verdicts, strict=True):
                searches[i].programs[seq] = share
        rewards = [search.programs[seq] for search, seq in zip(searches, sequences, strict=True)]

        # expand the leaves, one top-k call for the batch
        grow = [i for i, path in enumerate(paths)
                if not path[-1].expanded and not path[-1].terminal and len(path[-1].tokens) < budget]
        if grow:
            tops = policy.topk_next([searches[i].prompt + list(paths[i][-1].tokens) for i in grow], cfg.top_k)
            job.stats.policy_calls += 1
            for i, top in zip(grow, tops, strict=True):
                leaf = paths[i][-1]
                weights = [math.exp(logprob) for _, logprob in top]
                total = sum(weights)
                leaf.children = [Node(tokens=leaf.tokens + (token,), prior=w / total, terminal=token in eos)
                                 for (token, _), w in zip(top, weights, strict=True)]
                for child in leaf.children:
                    if child.terminal:
                        child.tokens = leaf.tokens  # the end token is not part of the program
                leaf.expanded = True

        for path, reward in zip(paths, rewards, strict=True):
            for node in path:
                node.visits += 1
                node.value = max(node.value, reward)

    for search, state in zip(searches, job.states, strict=True):
        state["code"] = [search.texts[seq] for seq in search.programs]
        state["tokens"]["rollouts"] = [search.generated_tokens]
    extra = [{"pgtd": {"model_rollouts": s.model_rollouts, "programs": len(s.programs),
                       "tree_nodes": _count(s.root)}} for s in searches]
    return job.records_out("code", extra, num_tokens=[[len(seq) for seq in s.programs] for s in searches])


def _count(node: Node) -> int:
    return 1 + sum(_count(child) for child in node.children)
