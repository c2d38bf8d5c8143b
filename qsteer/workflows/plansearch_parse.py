"""PlanSearch's bookkeeping: parsing observation lists, the observation tree, and which codes to draw.

Follows the reference implementation (scaleapi/plansearch, `search/combo_observation_model.py`):

- Observation lists. After an observation prompt, three follow-up turns in the same
  conversation ask to list, filter and format the observations as a Python list of strings
  (`plansearch_prompts.LIST_FOLLOW_UPS`). The last reply's first fenced code block must hold a
  list of strings. The reference `eval`s it; here it is read with `ast.literal_eval`, which
  accepts only literals, so model output stays data. A reply that does not parse is asked
  again, only for the conversations that failed, at temperatures 0, 0.2 and 0.4 (three tries
  in all); a list that never parses becomes the empty list, and the search goes on with the
  empty observation tuple.
- The tree. The root (layer 0) gets first-order observations; its children are all subsets
  of them of size 0..S (S = `max_k`, 2), shuffled. Each child (layer 1) is asked for
  second-order observations from its subset (the empty subset included), and its own children
  are the subsets, size 0..S, of its new observations only. With the default two layers the
  layer-2 nodes are leaves. The plans' inputs are the unique observation tuples over all
  nodes, collected children before parent and deduplicated: with n1 first-order and n2_j
  second-order observations (all distinct) that is 1 + (n1 + C(n1, 2)) + sum_j (n2_j + C(n2_j, 2)).
- The codes. Each tuple yields one sketch, and with the critique-and-fix step also a fixed
  sketch: two code slots per tuple (one without the fix step). The reference generates a code
  for every slot of the tree, shuffles them and hands out the first n (cycling through them
  again when n is larger). `draw_code_slots` draws the same shuffled slots but only the n that
  are used, so a run generates n codes, not thousands: the observation tree is grown in full
  (4 calls per expanded node) and is drawn until it has n codes. When n exceeds the tree's
  slots the draw goes round again, and a slot drawn a second time is generated afresh (a new
  sample) rather than copied.

Random draws (subset order, slot order) come from a `random.Random` per problem, so a
problem's search does not depend on which other problems share its batch.
"""

from __future__ import annotations

import ast
import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from qsteer.workflows.plansearch_prompts import (
    AS_PYTHON_LIST,
    KEEP_USEFUL,
    LIST_ALL,
    Conversation,
    Problem,
    first_observations,
    follow_up,
    second_observations,
)

__all__ = [
    "PARSE_TEMPERATURES",
    "Ask",
    "CodeSlot",
    "ObservationNode",
    "ObservationReply",
    "ObservationTree",
    "SketchJob",
    "ask_for_observations",
    "draw_code_slots",
    "first_code_block",
    "grow_observation_trees",
    "observation_subsets",
    "parse_string_list",
    "sketch_jobs",
]

PARSE_TEMPERATURES: tuple[float, ...] = (0.0, 0.2, 0.4)
"""Temperatures of the tries at the Python-list turn (the reference's 0.2 x attempt, three attempts)."""

Ask = Callable[[list[Conversation], float | None], list[str]]
"""A batched chat call: one reply per conversation; the temperature overrides the sampling one when set."""


def first_code_block(text: str) -> str:
    """The lines inside the first Markdown fence of `text` ("" when there is none).

    The reference's rule: a fence is any line starting with three backticks (the language tag
    is ignored); an unclosed fence runs to the end of the text.
    """
    lines: list[str] = []
    inside = False
    for line in text.split("\n"):
        if line.strip().startswith("```"):
            if inside:
                break
            inside = True
        elif inside:
            lines.append(line)
    return "".join(f"{line}\n" for line in lines)


def parse_string_list(text: str) -> list[str] | None:
    """The list of strings in the first code block of a reply, or None when there is none.

    Read with `ast.literal_eval` (literals only, never `eval`): a call, a name or an
    arithmetic expression fails to parse, as does anything but a list of strings.
    """
    block = first_code_block(text)
    try:
        value = ast.literal_eval(block.strip())
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    return None


@dataclass
class ObservationReply:
    """One conversation's observations and every reply that led to them."""

    observations: tuple[str, ...]
    """The parsed list; empty when no try parsed."""
    log: dict[str, Any]
    """The replies, stage by stage, kept in the record so a run can be inspected."""


def ask_for_observations(conversations: Sequence[Conversation], ask: Ask) -> list[ObservationReply]:
    """Run observation prompts and their three follow-ups, then parse the lists with retries.

    Four batched calls over all conversations, plus up to two more over those whose list did
    not parse.
    """
    conversations = list(conversations)
    first = ask(conversations, None)
    listing = [follow_up(c, reply, LIST_ALL) for c, reply in zip(conversations, first, strict=True)]
    listed = ask(listing, None)
    filtering = [follow_up(c, reply, KEEP_USEFUL) for c, reply in zip(listing, listed, strict=True)]
    filtered = ask(filtering, None)
    formatting = [follow_up(c, reply, AS_PYTHON_LIST) for c, reply in zip(filtering, filtered, strict=True)]

    parsed: list[list[str] | None] = [None] * len(conversations)
    attempts: list[list[str]] = [[] for _ in conversations]
    for temperature in PARSE_TEMPERATURES:
        todo = [i for i, value in enumerate(parsed) if value is None]
        if not todo:
            break
        replies = ask([formatting[i] for i in todo], temperature)
        for i, reply in zip(todo, replies, strict=True):
            attempts[i].append(reply)
            parsed[i] = parse_string_list(reply)
    return [
        ObservationReply(
            observations=tuple(parsed[i] or ()),
            log={
                "observations_text": first[i],
                "listed": listed[i],
                "filtered": filtered[i],
                "list_attempts": attempts[i],
                "parsed": parsed[i] is not None,
            },
        )
        for i in range(len(conversations))
    ]


def observation_subsets(observations: Sequence[str], max_k: int, rng: random.Random) -> list[tuple[str, ...]]:
    """All subsets of size 0..min(max_k, len) in itertools order, then shuffled by `rng`."""
    subsets = [
        subset for size in range(min(max_k, len(observations)) + 1) for subset in itertools.combinations(observations, size)
    ]
    rng.shuffle(subsets)
    return subsets


@dataclass
class ObservationNode:
    """A node of the observation tree: the subset it was given and what it derived from it."""

    given: tuple[str, ...]
    """The observation subset this node's prompt shows (empty for the root)."""
    layer: int
    derived: tuple[str, ...] | None = None
    """Its own parsed observations; None until it is expanded."""
    children: list[ObservationNode] = field(default_factory=list)
    log: dict[str, Any] = field(default_factory=dict)


class ObservationTree:
    """One problem's observation tree, grown layer by layer from the replies of the policy."""

    def __init__(self, rng: random.Random, max_k: int = 2) -> None:
        if max_k < 0:
            raise ValueError(f"max_k must be >= 0, got {max_k}")
        self.rng = rng
        self.max_k = max_k
        self.root = ObservationNode(given=(), layer=0)

    def frontier(self) -> list[ObservationNode]:
        """The nodes not yet expanded, depth first: the next layer's prompts, in order."""
        return [node for node in self._nodes(self.root) if node.derived is None]

    def expand(self, node: ObservationNode, observations: Sequence[str], log: dict[str, Any] | None = None) -> None:
        """Give `node` its observations and one child per shuffled subset of them."""
        if node.derived is not None:
            raise ValueError(f"node {node.given!r} on layer {node.layer} is already expanded")
        node.derived = tuple(observations)
        node.log = dict(log or {})
        node.children = [
            ObservationNode(given=subset, layer=node.layer + 1)
            for subset in observation_subsets(node.derived, self.max_k, self.rng)
        ]

    def unique_tuples(self) -> list[tuple[str, ...]]:
        """Every node's given tuple once, children before their parent (the reference's order)."""
        seen: set[tuple[str, ...]] = set()
        ordered: list[tuple[str, ...]] = []

        def visit(node: ObservationNode) -> None:
            for child in node.children:
                visit(child)
            if node.given not in seen:
                seen.add(node.given)
                ordered.append(node.given)

        visit(self.root)
        return ordered

    def _nodes(self, node: ObservationNode) -> list[ObservationNode]:
        return [node, *(descendant for child in node.children for descendant in self._nodes(child))]


def grow_observation_trees(
    problems: Sequence[Problem], trees: Sequence[ObservationTree], ask: Ask, layers: int = 2, n_obs: int = 10
) -> None:
    """Expand every tree `layers` times: each layer is one `ask_for_observations` over all trees' frontiers.

    A tree already grown further (a resumed run) only expands the nodes it still lacks.
    """
    if len(problems) != len(trees):
        raise ValueError(f"{len(problems)} problems but {len(trees)} trees")
    for layer in range(layers):
        nodes = [(problem, tree, node) for problem, tree in zip(problems, trees, strict=True) for node in tree.frontier()]
        nodes = [(problem, tree, node) for problem, tree, node in nodes if node.layer == layer]
        if not nodes:
            continue
        conversations = [
            first_observations(problem, n_obs) if node.layer == 0 else second_observations(problem, node.given)
            for problem, _, node in nodes
        ]
        for (_, tree, node), reply in zip(nodes, ask_for_observations(conversations, ask), strict=True):
            tree.expand(node, reply.observations, reply.log)


@dataclass(frozen=True)
class CodeSlot:
    """One code to generate: from which tuple, on which pass over the tree, from which sketch."""

    observations: tuple[str, ...]
    round: int
    """0 on the first pass over the tree's slots; k on the (k+1)-th when n exceeds them."""
    sketch: Literal["original", "fixed"]


def draw_code_slots(
    tuples: Sequence[tuple[str, ...]], n: int, use_fix: bool, rng: random.Random
) -> list[CodeSlot]:
    """The n code slots to generate: the tree's slots (one or two per tuple) shuffled, drawn in turn."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not tuples:
        raise ValueError("the observation tree has no tuple (it always holds the empty one once grown)")
    sketches: tuple[Literal["original", "fixed"], ...] = ("original", "fixed") if use_fix else ("original",)
    slots = [(observations, sketch) for observations in tuples for sketch in sketches]
    rng.shuffle(slots)
    return [
        CodeSlot(observations=slots[i % len(slots)][0], round=i // len(slots), sketch=slots[i % len(slots)][1])
        for i in range(n)
    ]


@dataclass(frozen=True)
class SketchJob:
    """One sketch to write, and whether its critique-and-fix is needed."""

    observations: tuple[str, ...]
    round: int
    fix: bool


def sketch_jobs(slots: Sequence[CodeSlot]) -> list[SketchJob]:
    """The sketches the drawn slots need, in first-use order; a fix only where a fixed slot was drawn."""
    needs_fix: dict[tuple[tuple[str, ...], int], bool] = {}
    for slot in slots:
        key = (slot.observations, slot.round)
        needs_fix[key] = needs_fix.get(key, False) or slot.sketch == "fixed"
    return [SketchJob(observations, round_, fix) for (observations, round_), fix in needs_fix.items()]
