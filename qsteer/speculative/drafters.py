"""Drafters: where a round's draft comes from. Each proposes a tree (a chain is a thin tree).

- `ModelDrafter`: another causal LM with the policy's tokenizer, on its own KV cache (in the
  policy's process, or in a draft actor behind `RemoteDrafter`).
- `LayerSkipDrafter`: the policy with sub-blocks skipped, drafting on the policy's own cache.
- `LookupDrafter`: prompt lookup / input-guided copy from the row's own tokens.
- `RecycleDrafter`: Token Recycling's adjacency matrix of past candidates, expanded into a tree.

Model and layer-skip drafts sample from a distribution q (`sample_chains`), one chain or k of
them (SpecTr, RSD); lookup and recycling drafts are deterministic.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from qsteer.engines.base import SamplingParams, sample_seed
from qsteer.engines.hf import prefill_shared
from qsteer.speculative import layerskip
from qsteer.speculative.config import SpeculativeConfig
from qsteer.speculative.state import Batch, Draft, compact, crop, forward_chunk, processed
from qsteer.speculative.trees import tree_shape
from qsteer.speculative.verify import draw

# -- sampling chains from a draft distribution --------------------------------------------------


class AcceptancePredictor:
    """P(a draft token is accepted) as a function of the draft's own probability for it, learned online.

    SpecDec++ trains a head on the draft's hidden state for this; here the predictor is a
    calibration table over q(token) (10 bins), started at acceptance = q (DySpec's observation
    that acceptance tracks draft probability) and updated with the soft labels
    min(1, p/q) that every verification yields for free.
    """

    def __init__(self, bins: int = 10) -> None:
        self.bins = bins
        self.total = (torch.arange(bins, dtype=torch.float64) + 0.5) / bins  # one pseudo-observation per bin
        self.count = torch.ones(bins, dtype=torch.float64)

    def _bin(self, q_token: torch.Tensor) -> torch.Tensor:
        return (q_token.double() * self.bins).long().clamp(0, self.bins - 1)

    def predict(self, q_token: torch.Tensor) -> torch.Tensor:
        b = self._bin(q_token)
        return (self.total[b] / self.count[b]).to(q_token.dtype)

    def update(self, q_token: torch.Tensor, soft_label: torch.Tensor) -> None:
        b = self._bin(q_token)
        self.total.index_add_(0, b, soft_label.double())
        self.count.index_add_(0, b, torch.ones_like(soft_label, dtype=torch.float64))


def row_generators(batch: Batch, salt: str) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(sample_seed(batch.params.seed, f"{key}/{salt}", j)) for key, j in batch.keys]


def _first_tokens(q0: torch.Tensor, k: int, without_replacement: bool, greedy: bool, rng: torch.Generator) -> list[int]:
    if greedy:
        return q0.topk(k).indices.tolist() if without_replacement else [int(q0.argmax())] * k
    if without_replacement:  # Gumbel-top-k: the order of the perturbed scores is the sampling order
        gumbel = -torch.log(-torch.log(torch.rand(q0.shape, generator=rng, dtype=torch.float64).clamp_min(1e-300)))
        return (q0.double().log() + gumbel).topk(k).indices.tolist()
    return [draw(q0, float(torch.rand((), generator=rng, dtype=torch.float64))) for _ in range(k)]


def sample_chains(
    start_logits: torch.Tensor,  # [rows, vocab]: the draft's logits for the first draft token
    step: Callable[[int, torch.Tensor], torch.Tensor],  # (t, inputs [rows, k]) -> logits [rows, k, vocab]
    cfg: SpeculativeConfig,
    params: SamplingParams,
    rngs: list[torch.Generator],
    predictor: AcceptancePredictor | None = None,
) -> Draft:
    rows, k, gamma = start_logits.shape[0], cfg.num_drafts, cfg.gamma
    greedy = params.temperature == 0
    without_replacement = k > 1 and cfg.verify != "kseq"
    q0 = processed(start_logits, params)
    tokens = torch.zeros((rows, k, gamma), dtype=torch.long)
    qs = torch.zeros((rows, k, gamma, q0.shape[-1]))
    valid = torch.ones((rows, k, gamma), dtype=torch.bool)
    tokens[:, :, 0] = torch.tensor([_first_tokens(q0[r], k, without_replacement, greedy, rngs[r]) for r in range(rows)])
    qs[:, :, 0] = q0[:, None].cpu()
    confidence = torch.ones(rows)  # SpecDec++: P(every token drafted so far is accepted)
    calls = 0
    for t in range(1, gamma):
        if predictor is not None:
            drafted_q = qs[:, 0, t - 1].gather(-1, tokens[:, 0, t - 1, None])[:, 0]
            confidence *= predictor.predict(drafted_q)
            stop = (1 - confidence > cfg.threshold) & (t >= cfg.min_gamma)
            valid[:, :, t:] &= ~stop[:, None, None] & valid[:, :, t - 1 : t]
            if not valid[:, :, t].any():
                break
        logits = step(t, tokens[:, :, t - 1].to(start_logits.device))
        calls += 1
        q = processed(logits, params).cpu()
        qs[:, :, t] = q
        if greedy:
            tokens[:, :, t] = q.argmax(-1)
        else:
            u = torch.stack([torch.rand(k, generator=rng, dtype=torch.float64) for rng in rngs])
            cdf = q.double().cumsum(-1)
            tokens[:, :, t] = torch.searchsorted(cdf, (u * cdf[..., -1])[..., None], right=True)[..., 0].clamp(
                max=q.shape[-1] - 1)
    parents = [-1 if t == 0 else c * gamma + t - 1 for c in range(k) for t in range(gamma)]
    return Draft(tokens.reshape(rows, k * gamma), parents, valid.reshape(rows, k * gamma),
                 qs.reshape(rows, k * gamma, -1), without_replacement, calls)


def soft_labels(draft: Draft, logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """(q(token), min(1, p/q)) for every valid drafted token: what the acceptance predictor learns from."""
    rows, nodes = draft.tokens.shape
    parent_cols = torch.tensor([p + 1 for p in draft.parents])
    p_tgt = processed(logits[:, parent_cols].cpu(), params)
    p_tok = p_tgt.gather(-1, draft.tokens[..., None])[..., 0]
    q_tok = draft.q.gather(-1, draft.tokens[..., None])[..., 0]
    soft = torch.where(q_tok > 0, (p_tok / q_tok.clamp_min(1e-30)).clamp(max=1), torch.ones_like(q_tok))
    return q_tok[draft.valid], soft[draft.valid]


def _draft_steps(model, cache, valid: torch.Tensor, base_pos: torch.Tensor, k: int, skip=()):
    """The `step` of sample_chains on a cache whose first valid.shape[1] columns are the prefix."""
    rows, prefix = valid.shape

    def step(t: int, inputs: torch.Tensor) -> torch.Tensor:
        own = torch.eye(k, dtype=torch.bool, device=valid.device)
        earlier = own.repeat(1, t - 1)  # columns appended by steps 1..t-1, k per step
        seen = torch.cat([valid[:, None, :].expand(rows, k, prefix), earlier.expand(rows, k, -1)], dim=-1)
        positions = (base_pos + t)[:, None].expand(rows, k)
        with layerskip.skipping(model, skip):
            return forward_chunk(model, cache, seen, inputs, positions, own)

    return step


# -- drafters ------------------------------------------------------------------------------------


class ModelDrafter:
    """Another causal LM (or the policy's own weights) drafting on its own cache."""

    def __init__(self, model, cfg: SpeculativeConfig, pad_id: int, capacity_slack: int = 64) -> None:
        self.model, self.cfg, self.pad_id = model, cfg, pad_id
        self.max_nodes = cfg.gamma * cfg.num_drafts
        self.slack = capacity_slack
        self.predictor = AcceptancePredictor() if cfg.adaptive else None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def begin(self, batch: Batch) -> None:
        self.rngs = row_generators(batch, "draft")
        self.params = batch.params
        contexts = [tuple(h[:-1]) for h in batch.history]
        unique = list(dict.fromkeys(contexts))
        slot = {c: i for i, c in enumerate(unique)}
        headroom = batch.params.max_new_tokens + 2 * (self.max_nodes + 1) + self.slack
        self.cache, _, mask, _ = prefill_shared(self.model, [list(c) for c in unique], [slot[c] for c in contexts],
                                                self.pad_id, self.device, headroom)
        self.capacity = mask.shape[1] + headroom
        self.valid = mask.bool()
        self.consumed = [len(h) - 1 for h in batch.history]

    @torch.inference_mode()
    def propose(self, batch: Batch) -> Draft:
        """Feed each row's tokens the draft has not seen yet, then sample the chains."""
        pending = [h[c:] for h, c in zip(batch.history, self.consumed, strict=True)]
        rows, width = len(pending), max(len(p) for p in pending)
        if self.valid.shape[1] + width + self.max_nodes > self.capacity:
            self.valid = compact(self.cache, self.valid)
        tokens = torch.full((rows, width), self.pad_id, dtype=torch.long)
        positions = torch.zeros((rows, width), dtype=torch.long)
        real = torch.zeros((rows, width), dtype=torch.bool)
        for r, (todo, done) in enumerate(zip(pending, self.consumed, strict=True)):
            tokens[r, width - len(todo):] = torch.tensor(todo)
            positions[r, width - len(todo):] = torch.arange(done, done + len(todo))
            real[r, width - len(todo):] = True
        # real pending tokens see each other causally; a padding column sees only itself
        visible = torch.tril(torch.ones((width, width), dtype=torch.bool))[None] & real[:, None, :]
        visible |= torch.eye(width, dtype=torch.bool)[None]
        logits = forward_chunk(self.model, self.cache, self.valid, tokens.to(self.device),
                               positions.to(self.device), visible, logits_to_keep=1)
        self.valid = torch.cat([self.valid, real.to(self.device)], dim=-1)
        self.consumed = [c + len(p) for c, p in zip(self.consumed, pending, strict=True)]
        self.base = self.valid.shape[1]
        step = _draft_steps(self.model, self.cache, self.valid, positions[:, -1].to(self.device), self.cfg.num_drafts)
        draft = sample_chains(logits[:, -1], step, self.cfg, self.params, self.rngs, self.predictor)
        draft.calls += 1
        crop(self.cache, self.base)  # the chains' columns: their accepted tokens come back as pending
        return draft

    def observe(self, batch: Batch, draft: Draft, logits: torch.Tensor) -> None:
        if self.predictor is not None:
            self.predictor.update(*soft_labels(draft, logits, self.params))

    def select(self, keep: torch.Tensor) -> None:
        self.cache.batch_select_indices(keep.to(self.device))
        self.valid = self.valid[keep.to(self.device)]
        self.consumed = [self.consumed[i] for i in keep.tolist()]
        self.rngs = [self.rngs[i] for i in keep.tolist()]


class LayerSkipDrafter:
    """The policy with sub-blocks skipped (SWIFT / unified layer skipping), on the policy's cache."""

    def __init__(self, model, cfg: SpeculativeConfig) -> None:
        self.model, self.cfg = model, cfg
        num_layers = len(model.model.layers)
        self.skip = cfg.skip if cfg.skip is not None else layerskip.even_skip(num_layers, cfg.skip_ratio)
        for kind, layer in self.skip:
            if kind not in ("attn", "mlp") or not 0 < layer < num_layers - 1:
                raise ValueError(f"draft.skip: ({kind!r}, {layer}) is not attn/mlp of a layer in 1..{num_layers - 2}")
        self.search = layerskip.SkipSearch(num_layers, self.skip) if cfg.search else None
        self.max_nodes = cfg.gamma * cfg.num_drafts
        self.predictor = AcceptancePredictor() if cfg.adaptive else None

    @torch.inference_mode()
    def begin(self, batch: Batch) -> None:
        self.rngs = row_generators(batch, "draft")
        self.params = batch.params
        if self.search is not None and not self.search.done:
            contexts = sorted({tuple(h) for h in batch.history})
            self.skip = self.search.step(self.model, [list(c) for c in contexts], self.cfg.search)

    @torch.inference_mode()
    def propose(self, batch: Batch) -> Draft:
        cache, valid = batch.cache, batch.valid
        length = valid.shape[1]
        here = torch.ones((1, 1), dtype=torch.bool)
        with layerskip.skipping(self.model, self.skip):
            logits = forward_chunk(self.model, cache, valid, batch.last[:, None], batch.pos[:, None], here)
        seen = torch.cat([valid, valid.new_ones((valid.shape[0], 1))], dim=-1)
        step = _draft_steps(self.model, cache, seen, batch.pos, self.cfg.num_drafts, self.skip)
        draft = sample_chains(logits[:, -1], step, self.cfg, self.params, self.rngs, self.predictor)
        draft.calls += 1
        crop(cache, length)  # the target recomputes the root and verifies the nodes
        return draft

    def observe(self, batch: Batch, draft: Draft, logits: torch.Tensor) -> None:
        if self.predictor is not None:
            self.predictor.update(*soft_labels(draft, logits, self.params))

    def select(self, keep: torch.Tensor) -> None:
        self.rngs = [self.rngs[i] for i in keep.tolist()]


def find_candidate(ids: list[int], max_ngram: int, num_tokens: int) -> list[int]:
    """Prompt lookup (transformers' PromptLookupCandidateGenerator): the tokens that followed the
    earliest earlier occurrence of the longest matching suffix n-gram."""
    length = len(ids)
    for n in range(min(max_ngram, length - 1), 0, -1):
        suffix = ids[-n:]
        for start in range(length - n):
            if ids[start : start + n] == suffix:
                follow = ids[start + n : min(start + n + num_tokens, length)]
                if follow:
                    return follow
    return []


class LookupDrafter:
    def __init__(self, cfg: SpeculativeConfig) -> None:
        self.cfg = cfg
        self.max_nodes = cfg.gamma

    def begin(self, batch: Batch) -> None:
        pass

    def propose(self, batch: Batch) -> Draft:
        rows, gamma = len(batch.history), self.cfg.gamma
        tokens = torch.zeros((rows, gamma), dtype=torch.long)
        valid = torch.zeros((rows, gamma), dtype=torch.bool)
        for r, ids in enumerate(batch.history):
            found = find_candidate(ids, self.cfg.max_ngram, gamma)
            tokens[r, : len(found)] = torch.tensor(found, dtype=torch.long)
            valid[r, : len(found)] = True
        return Draft(tokens, [t - 1 for t in range(gamma)], valid)

    def observe(self, batch: Batch, draft: Draft, logits: torch.Tensor) -> None:
        pass

    def select(self, keep: torch.Tensor) -> None:
        pass




class RecycleDrafter:
    """Token Recycling: M[token] holds the top-k next tokens the target last predicted after `token`;
    the draft tree reads M breadth first from the last token. M persists across requests (hot start)."""

    def __init__(self, cfg: SpeculativeConfig, vocab_size: int) -> None:
        self.parents, ranks = tree_shape(cfg.tree, cfg.topk)
        self.ranks = torch.tensor(ranks)
        self.topk = cfg.topk
        self.matrix = torch.zeros((vocab_size, cfg.topk), dtype=torch.long)
        self.max_nodes = len(self.parents)

    def begin(self, batch: Batch) -> None:
        pass

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

    def select(self, keep: torch.Tensor) -> None:
        pass
