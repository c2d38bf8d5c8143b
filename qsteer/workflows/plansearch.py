"""PlanSearch (Wang et al., 2024): search over natural-language observations, then plans, then code.

The stages, each one batched call to the policy group over every problem of the batch
(prompts in `plansearch_prompts`, list parsing and the tree's rules in `plansearch_parse`):

1. the observation tree, one layer at a time (`grow_observation_trees`: the observation prompt
   and its three list turns, plus the list retries, each batched over all frontier nodes);
2. the code slots: the tree's unique observation tuples, one slot per tuple and sketch kind
   (original, fixed), shuffled per problem and drawn until there are `workflow.n`;
3. a sketch per drawn tuple; 4. a critique, and 5. the fix, where a fixed sketch was drawn;
6. pseudocode per slot; 7. the code per slot.

Ablations (as in the reference): `without_fix_idea` (no critique and fix: one slot per tuple),
`without_pseudocode` (code from the sketch), `without_idea` (code from the observations).

Each stage's outputs are kept in the problem's stage state (the tree as nested nodes with every
reply, and its random generator's state), saved after the stage: a rerun resumes at the first
unfinished stage, and the record's `stages` field shows them all.
"""

from __future__ import annotations

import random
from typing import Any

from qsteer.workflows.code_search import CodeRun
from qsteer.workflows.common import Context
from qsteer.workflows.plansearch_parse import (
    CodeSlot,
    ObservationNode,
    ObservationTree,
    draw_code_slots,
    grow_observation_trees,
    sketch_jobs,
)
from qsteer.workflows.plansearch_prompts import (
    FIX_FOLLOW_UP,
    Problem,
    code_from_observations,
    code_from_pseudocode,
    code_from_sketch,
    critique,
    follow_up,
    problem_of,
    pseudocode,
    sketch,
)


def run(records: list[dict], ctx: Context) -> list[dict]:
    cfg = ctx.workflow
    use_idea = not cfg.without_idea
    use_fix = use_idea and not cfg.without_fix_idea
    use_pseudocode = use_idea and not cfg.without_pseudocode
    job = CodeRun(records, ctx)
    problems = [problem_of(r) for r in records]

    # 1. The observation trees, a layer at a time; a tree restored from the stage state keeps its rng.
    trees = [load_tree(state.get("tree"), rng_for(ctx, record), cfg.max_subset)
             for state, record in zip(job.states, records, strict=True)]
    ask = job.ask_owned(lambda conversation: owner(conversation, problems), "observations")
    for layer in range(1, cfg.layers + 1):
        todo = [i for i, state in enumerate(job.states) if state.get("tree_layers", 0) < layer]
        if not todo:
            continue
        grow_observation_trees([problems[i] for i in todo], [trees[i] for i in todo], ask, layers=layer,
                               n_obs=cfg.num_observations)
        for i in todo:
            job.states[i]["tree"] = dump_tree(trees[i])
            job.states[i]["tree_layers"] = layer
        job.save(todo)

    # 2. The code slots, drawn once and kept.
    for i, state in enumerate(job.states):
        if "slots" not in state:
            tuples = trees[i].unique_tuples()
            state["unique_tuples"] = len(tuples)
            slots = draw_code_slots(tuples, cfg.n, use_fix, trees[i].rng)
            state["slots"] = [[list(s.observations), s.round, s.sketch] for s in slots]
            state["tree"] = dump_tree(trees[i])  # the draw moved the rng
    job.save()
    slots = [[CodeSlot(tuple(o), r, k) for o, r, k in state["slots"]] for state in job.states]

    plans: list[list[str]] = [[_observation_plan(s.observations) for s in row] for row in slots]
    if use_idea:
        # 3-5. A sketch per drawn tuple; critique and fix only where a fixed sketch was drawn.
        jobs = [sketch_jobs(row) for row in slots]
        sketches = job.stage("sketch", lambda i, state: [
            (sketch(problems[i], sj.observations), str(j)) for j, sj in enumerate(jobs[i])
        ])
        fixes_of = [[j for j, sj in enumerate(row) if sj.fix] for row in jobs]
        critiques = job.stage("critique", lambda i, state: [
            (critique(problems[i], sketches[i][j]), str(j)) for j in fixes_of[i]
        ])
        fixed = job.stage("fix", lambda i, state: [
            (follow_up(critique(problems[i], sketches[i][j]), critiques[i][m], FIX_FOLLOW_UP), str(j))
            for m, j in enumerate(fixes_of[i])
        ])
        plans = []
        for i, row in enumerate(slots):
            index = {(sj.observations, sj.round): j for j, sj in enumerate(jobs[i])}
            fixed_of = {j: fixed[i][m] for m, j in enumerate(fixes_of[i])}
            plans.append([
                fixed_of[index[(s.observations, s.round)]] if s.sketch == "fixed"
                else sketches[i][index[(s.observations, s.round)]]
                for s in row
            ])
    if use_pseudocode:
        plans = job.stage("pseudocode", lambda i, state: [
            (pseudocode(problems[i], plan), str(j)) for j, plan in enumerate(plans[i])
        ])

    def code_prompt(problem: Problem, slot: CodeSlot, plan: str):
        if not use_idea:
            return code_from_observations(problem, slot.observations)
        return code_from_pseudocode(problem, plan) if use_pseudocode else code_from_sketch(problem, plan)

    job.stage("code", lambda i, state: [
        (code_prompt(problems[i], slot, plans[i][j]), str(j)) for j, slot in enumerate(slots[i])
    ])
    extra = [{"observation_tree": {"unique_tuples": state["unique_tuples"], "nodes": count_nodes(trees[i].root)}}
             for i, state in enumerate(job.states)]
    return job.records_out("code", extra)


def rng_for(ctx: Context, record: dict) -> random.Random:
    """The problem's own generator: subsets and slots do not depend on the batch."""
    return random.Random(f"plansearch/{ctx.params.seed}/{record['id']}")


def _observation_plan(observations: tuple[str, ...]) -> str:
    return "\n".join(f"- {o}" for o in observations)


def owner(conversation: list[dict], problems: list[Problem]) -> int:
    """Which problem an observation conversation belongs to (its prompt quotes the statement)."""
    text = conversation[1]["content"]
    return next((k for k, p in enumerate(problems) if p.statement in text), 0)


def count_nodes(node: ObservationNode) -> int:
    return 1 + sum(count_nodes(child) for child in node.children)


def dump_tree(tree: ObservationTree) -> dict[str, Any]:
    def node(n: ObservationNode) -> dict[str, Any]:
        return {"given": list(n.given), "layer": n.layer,
                "derived": None if n.derived is None else list(n.derived), "log": n.log,
                "children": [node(c) for c in n.children]}

    version, internal, gauss = tree.rng.getstate()
    return {"root": node(tree.root), "rng": [version, list(internal), gauss], "max_k": tree.max_k}


def load_tree(data: dict[str, Any] | None, rng: random.Random, max_k: int) -> ObservationTree:
    tree = ObservationTree(rng, max_k)
    if not data:
        return tree

    def node(d: dict[str, Any]) -> ObservationNode:
        return ObservationNode(given=tuple(d["given"]), layer=d["layer"],
                               derived=None if d["derived"] is None else tuple(d["derived"]),
                               children=[node(c) for c in d["children"]], log=d["log"])

    tree.root = node(data["root"])
    version, internal, gauss = data["rng"]
    tree.rng.setstate((version, tuple(internal), gauss))
    return tree
