"""Step-level search shared by `beam_search` and `dvts`: beams grow one step per policy call and are
ranked by a scorer of the partial text.

After search-and-learn (`src/sal/search/beam_search.py`, `diverse_verifier_tree_search.py`):

- A step ends at the delimiter (default a blank line, search-and-learn's "\\n\\n"), at EOS, or after
  `block_size` tokens: one `generate` call with the delimiter as a stop string and
  `max_new_tokens=block_size`. The delimiter stays in the beam's tokens; the search carries token
  ids from step to step, never re-encoded text.
- Each prompt's search is its own (search-and-learn ranks one pool of beams for a whole batch,
  search-and-learn#26): a `Tree` holds one prompt's beams, and a prompt may have several trees
  (DVTS's subtrees). Every step sends the active beams of every tree of every prompt in one
  `generate` call and their candidates to the scorer in one call.
- A tree keeps `keep` beams. Each step it samples `keep * beam_width` candidates from its active
  beams (spread evenly, as search-and-learn fills its `n` slots by repeating the active beams),
  ranks them by score, and keeps the best `keep`; a kept candidate that finished (EOS, the token
  budget `generation.max_new_tokens`, or a `generation.stop` string) leaves the active set for the
  tree's finished beams, so finished beams hold slots, as in DVTS, where a subtree ends when its
  best candidate ends. The tree stops when nothing is active. Unkept candidates are dropped.
- Random streams: candidate 0 of a beam continues the beam's own stream where its last step left
  it (`SamplingParams.offsets`); candidate j > 0 starts a fresh stream named after the beam, the
  step and j. A search of one beam with one candidate therefore draws exactly the tokens plain
  sampling draws for the same seed and prompt id, and no two candidates share a stream.

The scorer is a seam (`StepScorer`, chosen by `workflow.scorer`): `RewardScorer` scores the text
so far with the reward group (`reward=model`, or any reward that accepts a partial text);
`ValueStepScorer` scores the prefix's token ids (prompt and beam) with the `value=` group, as
blockwise controlled decoding does. The scorer alone ranks beams and picks the output; with a
value, the finished beams are then scored once by the reward for the records (search-and-learn
likewise picks its answer by the verifier, and reports the task's score beside it), so the reward
never steers a value-scored search.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol

from qsteer.workflows.common import Context, Stats, result, score


@dataclass
class Beam:
    ids: list[int]  # completion tokens so far
    key: str  # its random stream
    offset: int  # draws its stream has made
    steps: int = 0
    text: str = ""
    score: float | None = None  # the scorer's: it ranks the beam
    reward: float | None = None  # the reward's, for the record (the score itself when the scorer is the reward)
    value: float | None = None  # the value's, when the value scored it
    info: dict = field(default_factory=dict)
    finished: bool = False
    finish_reason: str = "length"


@dataclass
class Tree:
    record: int  # position of the prompt in the batch
    index: int  # which of the prompt's trees
    keep: int  # beams kept after each step
    beam_width: int  # candidates sampled per kept beam
    active: list[Beam]
    finished: list[Beam] = field(default_factory=list)


class StepScorer(Protocol):
    """Scores candidates: per item (record position, text so far, completion token ids), a number or None."""

    is_reward: bool  # True: its scores of finished texts are the records' rewards

    def __call__(self, items: list[tuple[int, str, list[int]]]) -> list[tuple[float | None, dict]]: ...


class RewardScorer:
    """The reward group on the text so far: one reward call per step for the whole batch."""

    is_reward = True

    def __init__(self, records: list[dict], ctx: Context, stats: Stats, usage: list[dict]) -> None:
        self.records, self.ctx, self.stats, self.usage = records, ctx, stats, usage

    def __call__(self, items: list[tuple[int, str, list[int]]]) -> list[tuple[float | None, dict]]:
        texts: list[list[str]] = [[] for _ in self.records]
        ids: list[list[list[int]]] = [[] for _ in self.records]
        for record, text, token_ids in items:
            texts[record].append(text)
            ids[record].append(token_ids)
        scored = score(self.records, texts, self.ctx, self.stats, ids)
        for record, group in enumerate(texts):
            if group:
                self.usage[record]["reward"]["calls"] += 1
                self.usage[record]["reward"]["texts"] += len(group)
        taken = [0] * len(self.records)
        out = []
        for record, _, _ in items:
            out.append(scored[record][taken[record]])
            taken[record] += 1
        return out


class ValueStepScorer:
    """The value role on the token ids of the prompt and the beam so far: one value call per step for the
    whole batch (a finished beam's prefix ends with its EOS, as blockwise CD values a finished block)."""

    is_reward = False

    def __init__(self, prompt_ids: list[list[int]], ctx: Context, stats: Stats, usage: list[dict]) -> None:
        if ctx.value is None:
            raise ValueError("workflow.scorer=value ranks the steps with the value= group: set value.path")
        self.prompt_ids, self.value, self.stats, self.usage = prompt_ids, ctx.value, stats, usage

    def __call__(self, items: list[tuple[int, str, list[int]]]) -> list[tuple[float | None, dict]]:
        values = self.value.values([self.prompt_ids[record] + ids for record, _, ids in items])
        self.stats.value_calls += 1
        for record in {record for record, _, _ in items}:
            self.usage[record]["value"]["calls"] += 1
        for record, _, _ in items:
            self.usage[record]["value"]["prefixes"] += 1
        return [(value, {}) for value in values]


def build_scorer(records: list[dict], prompt_ids: list[list[int]], ctx: Context, stats: Stats,
                 usage: list[dict]) -> StepScorer:
    """The scorer `workflow.scorer` names."""
    if ctx.workflow.scorer == "reward":
        return RewardScorer(records, ctx, stats, usage)
    if ctx.workflow.scorer == "value":
        return ValueStepScorer(prompt_ids, ctx, stats, usage)
    raise ValueError(f"workflow.scorer={ctx.workflow.scorer!r} is not one of: reward, value")


def search(records: list[dict], ctx: Context, trees: int, keep: int, beam_width: int) -> tuple[
        list[list[Tree] | None], list[str | None], Stats, list[dict]]:
    """Run every prompt's `trees` trees to the end; returns them per record (None where the prompt
    could not be encoded, with its error), the batch's stats and each record's usage per role."""
    assert ctx.policy is not None
    stats = Stats()
    by_value = ctx.workflow.scorer == "value"
    usage = [{"policy": {"calls": 0, "generated_tokens": 0, "prompt_tokens": 0, "candidates": 0},
              "reward": {"calls": 0, "texts": 0}, **({"value": {"calls": 0, "prefixes": 0}} if by_value else {}),
              "steps": 0} for _ in records]
    prompt_ids = ctx.policy.encode([r.get("messages") or r["prompt"] for r in records], ctx.chat)
    stats.policy_calls += 1
    errors = ["prompt is empty" if not ids
              else f"prompt has {len(ids)} tokens, at or over the model's context length {ctx.context_length}"
              if len(ids) >= ctx.context_length else None for ids in prompt_ids]
    eos = set(ctx.policy.info()[0]["eos_token_ids"])
    forest: list[list[Tree] | None] = [
        None if error else [Tree(position, t, keep, beam_width, [Beam([], _root_key(record, t), 0)])
                            for t in range(trees)]
        for position, (record, error) in enumerate(zip(records, errors, strict=True))
    ]
    scorer = build_scorer(records, prompt_ids, ctx, stats, usage)
    step = 0
    while True:
        live = [tree for group in forest if group for tree in group if tree.active]
        if not live:
            break
        _step(live, prompt_ids, ctx, stats, usage, scorer, eos, step)
        step += 1
    finals = [(tree, beam) for group in forest if group for tree in group for beam in tree.finished]
    if scorer.is_reward:
        for _, beam in finals:
            beam.reward = beam.score
    elif finals:  # the records' rewards are the reward's; the value ranked the beams and picks the output
        rescored = RewardScorer(records, ctx, stats, usage)([(t.record, b.text, b.ids) for t, b in finals])
        for (_, beam), (reward, info) in zip(finals, rescored, strict=True):
            beam.value, beam.reward, beam.info = beam.score, reward, info
    return forest, errors, stats, usage


def _root_key(record: dict, tree: int) -> str:
    # tree 0 uses the prompt's own stream, so one tree of one beam and one candidate is plain sampling
    return str(record["id"]) if tree == 0 else f"{record['id']}#tree{tree}"


def _spread(total: int, beams: int) -> list[int]:
    """`total` candidates over `beams` beams, as evenly as possible, the first beams taking the rest."""
    return [total // beams + (i < total % beams) for i in range(beams)]


def _step(live: list[Tree], prompt_ids: list[list[int]], ctx: Context, stats: Stats, usage: list[dict],
          scorer: StepScorer, eos: set[int], step: int) -> None:
    """One step of every live tree: sample, decode, score, keep the best."""
    cfg, limit = ctx.workflow, ctx.params.max_new_tokens
    entries: list[tuple[Tree, Beam, str, int]] = []  # (tree, parent, stream key, stream offset)
    for tree in live:
        for beam, count in zip(tree.active, _spread(tree.keep * tree.beam_width, len(tree.active)), strict=True):
            for j in range(count):
                entries.append((tree, beam, beam.key, beam.offset) if j == 0
                               else (tree, beam, f"{beam.key}/{step}.{j}", 0))
    prompts = [prompt_ids[tree.record] + beam.ids for tree, beam, _, _ in entries]
    params = replace(
        ctx.params, n=1, max_new_tokens=cfg.block_size,
        stop=[*([cfg.delimiter] if cfg.delimiter else []), *ctx.params.stop],
        offsets=[offset for *_, offset in entries],
        budgets=[min(cfg.block_size, limit - len(beam.ids)) for _, beam, _, _ in entries],
    )
    outs = ctx.policy.generate(prompts, params, [key for _, _, key, _ in entries])
    stats.policy_calls += 1
    candidates: list[tuple[Tree, Beam]] = []
    for (tree, parent, key, offset), prompt, (completion,) in zip(entries, prompts, outs, strict=True):
        new = completion.token_ids
        ids = parent.ids + new
        candidates.append((tree, Beam(ids, key, offset + len(new), parent.steps + 1)))
        use = usage[tree.record]["policy"]
        use["generated_tokens"] += len(new)
        use["prompt_tokens"] += len(prompt)
        use["candidates"] += 1
    texts = ctx.policy.decode([beam.ids for _, beam in candidates])
    for (tree, beam), text in zip(candidates, texts, strict=True):
        beam.text, beam.finished, beam.finish_reason = _finish(beam.ids, text, eos, ctx,
                                                               len(prompt_ids[tree.record]))
    for record in {tree.record for tree in live}:
        usage[record]["policy"]["calls"] += 1
        usage[record]["steps"] += 1
    scored = scorer([(tree.record, beam.text, beam.ids) for tree, beam in candidates])
    for (_, beam), (value, info) in zip(candidates, scored, strict=True):
        beam.score, beam.info = value, info
    for tree in live:
        mine = [beam for owner, beam in candidates if owner is tree]
        kept = [mine[i] for i in sorted(range(len(mine)), key=lambda i: (-_rank(mine[i].score), i))[: tree.keep]]
        tree.finished += [beam for beam in kept if beam.finished]
        tree.active = [beam for beam in kept if not beam.finished]


def _rank(value: float | None) -> float:
    return float("-inf") if value is None else value


def _finish(ids: list[int], text: str, eos: set[int], ctx: Context, prompt_length: int) -> tuple[str, bool, str]:
    """(text, finished, finish reason) of a beam after a step: EOS or a `generation.stop` string end it
    ("stop", the text cut before that string), as does its token budget or the context ("length")."""
    if ids and ids[-1] in eos:
        return text, True, "stop"
    cuts = [text.find(s) for s in ctx.params.stop if s in text]
    if cuts:
        return text[: min(cuts)], True, "stop"
    if len(ids) >= ctx.params.max_new_tokens or prompt_length + len(ids) >= ctx.context_length:
        return text, True, "length"
    return text, False, "length"


def beam_candidate(beam: Beam, tree: int) -> dict:
    item = {"text": beam.text, "reward": beam.reward, "num_tokens": len(beam.ids), "finish_reason": beam.finish_reason,
            "steps": beam.steps, "tree": tree}
    if beam.value is not None:
        item["value"] = beam.value
    if beam.info:
        item["info"] = beam.info
    return item


def records_of(records: list[dict], forest: list[list[Tree] | None], errors: list[str | None], stats: Stats,
               usage: list[dict], finals: list[list[tuple[int, Beam]]]) -> list[dict]:
    """Result records: `finals[i]` are record i's candidates ((tree, beam) pairs), the one the scorer ranks
    best (its `value` when a value scored them, else its `reward`; the earliest among equals) is the output."""
    out = []
    for record, trees, error, use, beams in zip(records, forest, errors, usage, finals, strict=True):
        row_stats = stats.as_dict(len(records)) | {
            "generated_tokens": use["policy"]["generated_tokens"], "prompt_tokens": use["policy"]["prompt_tokens"],
            "roles": {role: use[role] for role in ("policy", "reward", "value") if role in use}, "steps": use["steps"]}
        if trees is None:
            out.append(result(record, None, None, [], row_stats, error))
            continue
        candidates = [beam_candidate(beam, tree) for tree, beam in beams]
        ranks = [_rank(c.get("value", c["reward"])) for c in candidates]
        chosen = max(range(len(candidates)), key=lambda i: (ranks[i], -i))
        best = candidates[chosen]
        failed = None if best["reward"] is not None else best.get("info", {}).get("error", "reward returned None")
        out.append(result(record, best["text"], best["reward"], candidates, row_stats, failed, selected=chosen))
    return out
