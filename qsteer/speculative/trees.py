"""Static draft trees, as paths of child ranks from the root (Token Recycling, Medusa-style)."""

from __future__ import annotations

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
            raise ValueError(f"draft.tree: {tree!r} is not one of {sorted(TREES)} or a list of rank paths")
        tree = TREES[tree]
    paths = [tuple(p) for p in tree]
    index: dict[tuple, int] = {}
    for i, path in enumerate(paths):
        if not path:
            raise ValueError("draft.tree: an empty path (the root is implicit)")
        if len(path) > 1 and path[:-1] not in index:
            raise ValueError(f"draft.tree: node {list(path)} has no parent {list(path[:-1])} listed before it")
        if not 0 <= path[-1] < topk:
            raise ValueError(f"draft.tree: rank {path[-1]} in {list(path)} is outside draft.topk={topk}")
        index[path] = i
    return [index[p[:-1]] if len(p) > 1 else -1 for p in paths], [p[-1] for p in paths]
