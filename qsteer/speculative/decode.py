"""The speculative decode loop: draft, verify in one target forward, keep what the rule accepts.

Read top to bottom, one round is: the drafter proposes a tree per row; the target runs once over
[last token, tree nodes] with a tree mask; `verify_tree` walks each row's tree with its own
uniforms; accepted nodes' cache columns stay valid, the rest become holes. The first token of a
row comes from the prefill, as in gpt-fast. Rows keep their own random streams, so a row's
output does not depend on which other rows share its batch (up to floating-point reduction order).
"""

from __future__ import annotations

import torch

from qsteer.engines.base import Completion, SamplingParams, sample_seed
from qsteer.engines.hf import many_small_rows, prefill_shared
from qsteer.speculative.config import SpeculativeConfig
from qsteer.speculative.state import Batch, ancestors, compact, forward_chunk, processed, uniform_from
from qsteer.speculative.verify import children_of, draw, verify_tree


def _spec_stats() -> dict:
    return {"rounds": 0, "drafted": 0, "accepted": 0, "tested": 0, "alpha_sum": 0.0, "draft_calls": 0,
            "target_calls": 1, "emitted": 0}


@torch.inference_mode()
def generate_rows(engine, drafter, cfg: SpeculativeConfig, prompt_ids: list[list[int]], keys: list[str],
                  rows: list[tuple[int, int]], params: SamplingParams) -> list[Completion]:
    with many_small_rows(engine.model):
        return _generate_rows(engine, drafter, cfg, prompt_ids, keys, rows, params)


def _generate_rows(engine, drafter, cfg: SpeculativeConfig, prompt_ids: list[list[int]], keys: list[str],
                   rows: list[tuple[int, int]], params: SamplingParams) -> list[Completion]:
    model, device = engine.model, engine.device
    unique = sorted({p for p, _ in rows})
    slot = {p: i for i, p in enumerate(unique)}
    headroom = params.max_new_tokens + 2 * (drafter.max_nodes + 1) + 64
    cache, first_logits, mask, _ = prefill_shared(
        model, [prompt_ids[p] for p in unique], [slot[p] for p, _ in rows], engine.pad_id, device, headroom
    )
    capacity = mask.shape[1] + headroom

    verify_rngs = [torch.Generator().manual_seed(sample_seed(params.seed, keys[p], j)) for p, j in rows]
    uniforms = [uniform_from(g) for g in verify_rngs]
    greedy = params.temperature == 0
    rule = "greedy" if greedy else cfg.rule
    eos = set(engine.eos_token_ids)
    budget = [min(params.max_new_tokens, engine.context_length - len(prompt_ids[p])) for p, _ in rows]
    stop_window = max((len(s) for s in params.stop), default=0) + 2

    outputs: list[list[int]] = [[] for _ in rows]
    logprobs: list[list[float]] = [[] for _ in rows]
    finish = ["length"] * len(rows)
    stats = [_spec_stats() for _ in rows]

    def emit(row: int, token: int, logprob: float) -> bool:
        """Append one token; False once the row is done (EOS, stop string, budget)."""
        outputs[row].append(token)
        logprobs[row].append(logprob)
        if token in eos:
            finish[row] = "stop"
            return False
        if params.stop:
            tail = engine.tokenizer.decode(outputs[row][-stop_window:])
            if any(s in tail for s in params.stop):
                finish[row] = "stop"
                return False
        return len(outputs[row]) < budget[row]

    raw_first = torch.log_softmax(first_logits, dim=-1)
    p_first = first_logits if greedy else processed(first_logits, params)
    alive = []  # per batch slot: still generating
    for r in range(len(rows)):
        token = int(p_first[r].argmax()) if greedy else draw(p_first[r], uniforms[r]())
        alive.append(emit(r, token, float(raw_first[r, token])))

    batch = Batch(
        history=[list(prompt_ids[p]) + outputs[r] for r, (p, _) in enumerate(rows)],
        keys=[(keys[p], j) for p, j in rows],
        cache=cache,
        valid=mask.bool(),
        pos=torch.tensor([len(prompt_ids[p]) for p, _ in rows], device=device),
        params=params,
    )
    live = list(range(len(rows)))  # which row each batch slot holds
    drafting = any(alive)
    if drafting:
        drafter.begin(batch)
    while any(alive):
        # finished rows ride along until a quarter of the batch has finished, then the batch shrinks
        if alive.count(False) * 4 >= len(alive):
            keep = torch.tensor([i for i, a in enumerate(alive) if a])
            cache.batch_select_indices(keep.to(device))
            batch.valid, batch.pos = batch.valid[keep.to(device)], batch.pos[keep.to(device)]
            for name in ("history", "keys"):
                setattr(batch, name, [getattr(batch, name)[i] for i in keep.tolist()])
            live = [live[i] for i in keep.tolist()]
            alive = [True] * len(live)
            drafter.select(keep)
        if batch.valid.shape[1] + 2 * (drafter.max_nodes + 1) > capacity:
            batch.valid = compact(cache, batch.valid)

        draft = drafter.propose(batch)
        draft.root = batch.last
        nodes = draft.tokens.shape[1]
        depth = torch.tensor([0] + [d + 1 for d in draft.depths], device=device)
        chunk = torch.cat([draft.root[:, None], draft.tokens.to(device)], dim=-1)
        logits = forward_chunk(model, cache, batch.valid, chunk, batch.pos[:, None] + depth, ancestors(draft.parents))
        children = children_of(draft.parents)
        kept = torch.zeros((len(live), nodes + 1), dtype=torch.bool)
        kept[:, 0] = True
        advance = torch.zeros(len(live), dtype=torch.long)
        for slot_index, row in enumerate(live):
            if not alive[slot_index]:
                continue
            row_logits = logits[slot_index]
            cache_p: dict[int, torch.Tensor] = {}

            def p_at(col: int, row_logits=row_logits, cache_p=cache_p) -> torch.Tensor:
                if col not in cache_p:
                    cache_p[col] = row_logits[col] if greedy else processed(row_logits[col][None], params)[0]
                return cache_p[col]

            q = draft.q[slot_index] if draft.q is not None else None
            verdict = verify_tree(
                p_at, draft.tokens[slot_index].tolist(), children, draft.valid[slot_index].tolist(), rule,
                uniforms[row], (lambda node, q=q: q[node]) if q is not None else None, draft.without_replacement,
            )
            path_cols = [0] + [n + 1 for n in verdict.accepted]
            raw = torch.log_softmax(row_logits[path_cols], dim=-1)
            emitted = [int(draft.tokens[slot_index, n]) for n in verdict.accepted] + [verdict.token]
            s = stats[row]
            s["rounds"] += 1
            s["target_calls"] += 1
            s["draft_calls"] += draft.calls
            s["drafted"] += int(draft.valid[slot_index].sum())
            s["accepted"] += len(verdict.accepted)
            s["tested"] += verdict.tested
            s["alpha_sum"] += sum(verdict.alpha)
            for i, token in enumerate(emitted):
                s["emitted"] += 1
                if not emit(row, token, float(raw[i, token])):
                    alive[slot_index] = False
                    break
            kept[slot_index, [n + 1 for n in verdict.accepted]] = True
            advance[slot_index] = len(emitted)
            batch.history[slot_index] = batch.history[slot_index] + emitted
        batch.valid = torch.cat([batch.valid, kept.to(device)], dim=-1)
        batch.pos = batch.pos + advance.to(device)
        drafter.observe(batch, draft, logits)
    if drafting and hasattr(drafter, "finish"):
        drafter.finish()

    completions = []
    for row in range(len(rows)):
        text = engine.decode(outputs[row])
        if finish[row] == "stop" and params.stop:
            cut = min((text.find(s) for s in params.stop if s in text), default=-1)
            if cut >= 0:
                text = text[:cut]
        completions.append(Completion(outputs[row], text, logprobs[row], finish[row], spec=stats[row]))
    return completions
