"""Token Recycling (Luo et al. 2025): the top-k tokens the target predicted after each token are kept
in a vocab x topk table M and read breadth first, from the row's last token, into a static tree.

Every verify forward refreshes M for every token in its chunk, accepted or not ("recycling"),
and M persists across requests (hot start). Deterministic drafts, verified by the `match` rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from qsteer.decoding.drafters.base import Batch, Draft, DraftConfig, Drafter, config_error

# Token Recycling's static tree "2.2.2" (80 nodes, depth 6), from Spec-Bench's tree_template_.py:
# each node is the path of child ranks from the root.
_TREE_222 = (
    [[i] for i in range(8)]
    + [[0, i] for i in range(8)] + [[1, i] for i in range(4)] + [[2, i] for i in range(3)] + [[3, 0], [3, 1]]
    + [[i, 0] for i in range(4, 8)]
    + [[0, 0, i] for i in range(8)] + [[0, 1, 0], [0, 1, 1], [0, 1, 2], [0, 2, 0], [0, 2, 1]]
    + [[0, i, 0] for i in range(3, 8)] + [[1, 0, 0], [1, 0, 1], [1, 1, 0]] + [[i, 0, 0] for i in range(2, 6)]
    + [[0, 0, 0, i] for i in range(5)] + [[0, 0, 1, 0], [0, 0, 1, 1], [0, 0, 2, 0], [0, 0, 3, 0], [0, 0, 4, 0],
                                          [0, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [2, 0, 0, 0], [3, 0, 0, 0]]
    + [[0, 0, 0, 0, 0], [0, 0, 0, 0, 1], [0, 0, 0, 0, 2], [0, 0, 0, 1, 0], [0, 0, 0, 2, 0], [0, 0, 1, 0, 0],
       [0, 1, 0, 0, 0], [1, 0, 0, 0, 0]]
    + [[0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1], [0, 0, 0, 1, 0, 0]]
)
TREES = {"2.2.2": _TREE_222}


def tree_shape(tree: str | tuple | list, topk: int) -> tuple[list[int], list[int]]:
    """(parent index, rank) per node of a named tree or a list of rank paths, checked."""
    if isinstance(tree, str):
        if tree not in TREES:
            raise config_error("tree", f"{tree!r} is not one of {sorted(TREES)} or a list of rank paths")
        tree = TREES[tree]
    paths = [tuple(p) for p in tree]
    index: dict[tuple, int] = {}
    for i, path in enumerate(paths):
        if not path:
            raise config_error("tree", "an empty path (the root is implicit)")
        if len(path) > 1 and path[:-1] not in index:
            raise config_error("tree", f"node {list(path)} has no parent {list(path[:-1])} listed before it")
        if not 0 <= path[-1] < topk:
            raise config_error("tree", f"rank {path[-1]} in {list(path)} is outside draft.topk={topk}")
        index[path] = i
    return [index[p[:-1]] if len(p) > 1 else -1 for p in paths], [p[-1] for p in paths]


@dataclass(frozen=True)
class RecycleConfig(DraftConfig):
    kind: Literal["recycle"] = "recycle"
    """Token Recycling: the target's own past top-k predictions, read into a static tree."""
    topk: int = 8
    """Candidates kept per token (the paper's k)."""
    tree: str | tuple[tuple[int, ...], ...] = "2.2.2"
    """The paper's 80-node tree "2.2.2", or a list of rank paths such as [[0], [1], [0, 0]]."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.topk < 1:
            raise config_error("topk", f"must be at least 1, got {self.topk}")
        if not isinstance(self.tree, str):
            object.__setattr__(self, "tree", tuple(tuple(int(i) for i in path) for path in self.tree))
        tree_shape(self.tree, self.topk)


class RecycleDrafter(Drafter):
    rule = "match"

    def __init__(self, cfg: RecycleConfig, vocab_size: int) -> None:
        self.parents, ranks = tree_shape(cfg.tree, cfg.topk)
        self.ranks = torch.tensor(ranks)
        self.topk = cfg.topk
        self.matrix = torch.zeros((vocab_size, cfg.topk), dtype=torch.long)
        self.max_nodes = len(self.parents)

    def propose(self, batch: Batch) -> Draft:
        root = batch.last.cpu()
        tokens = torch.zeros((len(root), len(self.parents)), dtype=torch.long)
        for node, parent in enumerate(self.parents):
            above = root if parent < 0 else tokens[:, parent]
            tokens[:, node] = self.matrix[above, self.ranks[node]]
        return Draft(tokens, self.parents, torch.ones_like(tokens, dtype=torch.bool))

    def observe(self, batch: Batch, draft: Draft, logits: torch.Tensor) -> None:
        # every node's prediction is recycled, accepted or not
        chunk = torch.cat([draft.root.cpu()[:, None], draft.tokens], dim=-1)
        self.matrix[chunk.reshape(-1)] = logits.topk(self.topk, dim=-1).indices.reshape(-1, self.topk).cpu()
