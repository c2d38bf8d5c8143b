"""The transformers engine: a thin facade over the token loops in `qsteer.decoding` and the model in `qsteer.lm`.

Why its own loops rather than `model.generate`: generate cannot give each row its own random
stream (results would then depend on how prompts were batched), cannot share one prefill across
n samples of a prompt without recomputing it, and exposes no teacher-forced scoring. The loops
are gpt-fast's shape: prefill once, expand the cache to n rows per prompt, then decode.

`generate` picks the loop: plain (`decoding.plain`), speculative with a drafter
(`decoding.speculative`; the drafter is built here from `params.speculative`, or passed in,
as the policy actor passes a draft actor's), or EAD (`decoding.ead`). `generate_guided` runs
the token-wise guided loop (`decoding.guided`) with the scorer it is given (controlled decoding,
Transfer Q*, ARGS).

`prefix_cache_tokens` > 0 keeps a bounded prefix cache (`lm.prefix_cache`) that the plain loop's
prefills reuse, as vLLM's automatic prefix caching does: step-level methods, whose prompts grow by
one step per call, then pay for each step's new tokens rather than the whole prefix. Its counters
are in `prefix_cache_stats()` and the policy's `info()`.
"""

from __future__ import annotations

import torch

from qsteer.decoding import (
    DraftConfig,
    Drafter,
    EADConfig,
    build_drafter,
    draft_config,
    ead,
    guided,
    plain,
    speculative,
)
from qsteer.decoding.guided import TokenScorer
from qsteer.engines.base import Completion, SamplingParams, check_prompts, encode_prompts
from qsteer.lm.forward import left_pad
from qsteer.lm.loading import load_language_model
from qsteer.lm.prefix_cache import PrefixCache


class HFEngine:
    def __init__(
        self,
        path: str | None = None,
        dtype: str = "auto",
        device: str = "auto",
        max_batch_rows: int = 256,
        num_threads: int | None = None,
        chat_template: bool = True,
        trust_remote_code: bool = False,
        continuous_batching: bool = True,
        fuse_projections: bool = False,
        prefix_cache_tokens: int = 0,
    ) -> None:
        if num_threads:
            torch.set_num_threads(int(num_threads))
        self.lm = load_language_model(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                                      fuse_projections=fuse_projections)
        self.path, self.device, self.dtype = self.lm.path, self.lm.device, self.lm.dtype
        self.model, self.tokenizer = self.lm.model, self.lm.tokenizer
        self.eos_token_ids, self.pad_id, self.context_length = self.lm.eos_token_ids, self.lm.pad_id, self.lm.context_length
        self.max_batch_rows = max_batch_rows
        self.continuous_batching = continuous_batching
        self.use_chat_template = chat_template and bool(self.tokenizer.chat_template)
        # one drafter (or EAD small model) per draft config: recycling tables and searches persist
        self.drafters: dict[tuple, object] = {}
        self.prefix_cache = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens > 0 else None

    def prefix_cache_stats(self) -> dict | None:
        """The prefix cache's counters (hits, misses, reused and prefilled tokens, ...), or None when off."""
        return None if self.prefix_cache is None else self.prefix_cache.stats.as_dict()

    # -- text at the edges -------------------------------------------------------------------
    def encode(self, prompts: list[str | list[dict]], chat: bool = True) -> list[list[int]]:
        return encode_prompts(self.tokenizer, prompts, chat, self.use_chat_template)

    def decode(self, token_ids: list[int]) -> str:
        return self.lm.decode(token_ids)

    # -- generate ----------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self, prompt_ids: list[list[int]], params: SamplingParams, keys: list[str] | None = None,
        drafter: Drafter | None = None,
    ) -> list[list[Completion]]:
        """`n` completions per prompt; `keys[i]` (the prompt's id) names its random streams. With
        `params.speculative`, `drafter` (any `Drafter`) drafts instead of one built here."""
        keys = keys if keys is not None else [str(i) for i in range(len(prompt_ids))]
        check_prompts(prompt_ids, keys, self.context_length)
        rows = [(p, params.first_sample + j) for p in range(len(prompt_ids)) for j in range(params.n)]
        if not params.speculative:
            completions = plain.generate_rows(self.lm, prompt_ids, keys, rows, params, self.max_batch_rows,
                                              continuous=self.continuous_batching, prefix_cache=self.prefix_cache)
        else:
            if params.offset or params.offsets is not None or params.budgets is not None:
                raise ValueError("stream offsets (a continuation's draws) and per-prompt budgets (step-level "
                                 "search) are for plain decoding only; set generation.speculative=false")
            run, chunk_rows = self._speculative(draft_config(params.speculative), drafter)
            completions = []
            for start in range(0, len(rows), chunk_rows):
                completions += run(prompt_ids, keys, rows[start : start + chunk_rows], params)
        results: list[list[Completion]] = [[] for _ in prompt_ids]
        for (p, _), completion in zip(rows, completions, strict=True):
            results[p].append(completion)
        return results

    @torch.inference_mode()
    def generate_guided(self, prompt_ids: list[list[int]], params: SamplingParams, keys: list[str] | None,
                        scorer: TokenScorer, alpha: float) -> list[list[Completion]]:
        """`n` completions per prompt from p(z|s) exp(alpha * score(s, z)) / Z over the top `params.top_k`
        (`decoding.guided`); alpha = 0 is `generate`'s top-k sampling, draw for draw."""
        keys = keys if keys is not None else [str(i) for i in range(len(prompt_ids))]
        check_prompts(prompt_ids, keys, self.context_length)
        rows = [(p, params.first_sample + j) for p in range(len(prompt_ids)) for j in range(params.n)]
        completions = guided.generate_rows(self.lm, prompt_ids, keys, rows, params, scorer, alpha,
                                           self.max_batch_rows)
        results: list[list[Completion]] = [[] for _ in prompt_ids]
        for (p, _), completion in zip(rows, completions, strict=True):
            results[p].append(completion)
        return results

    def _speculative(self, cfg: DraftConfig, drafter: Drafter | None):
        """The row generator for a draft config, and how many rows it decodes at a time."""
        if isinstance(cfg, EADConfig):
            if cfg.key() not in self.drafters:
                self.drafters[cfg.key()] = ead.small_model(cfg, self.lm)
            small = self.drafters[cfg.key()]
            return (lambda prompt_ids, keys, rows, p: ead.generate_rows(self.lm, small, cfg, prompt_ids, keys, rows, p),
                    self.max_batch_rows)
        if drafter is None:
            if cfg.key() not in self.drafters:
                self.drafters[cfg.key()] = build_drafter(cfg, self.lm)
            drafter = self.drafters[cfg.key()]
        # a verify forward holds [rows, nodes + 1, vocab] logits (and drafts as much in q): cap it near 256 MB
        per_row = (drafter.max_nodes + 1) * self.model.config.vocab_size * (2 if cfg.stochastic else 1)
        chunk_rows = max(1, min(self.max_batch_rows, (1 << 26) // per_row))
        return (lambda prompt_ids, keys, rows, p: speculative.generate_rows(self.lm, drafter, prompt_ids, keys, rows, p),
                chunk_rows)

    # -- teacher forcing ---------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, prompt_ids: list[list[int]], continuation_ids: list[list[int]]) -> list[list[float]]:
        results: list[list[float]] = []
        pairs = list(zip(prompt_ids, continuation_ids, strict=True))
        for start in range(0, len(pairs), self.max_batch_rows):
            chunk = pairs[start : start + self.max_batch_rows]
            seqs = [list(p) + list(c) for p, c in chunk]
            if max(len(s) for s in seqs) > self.context_length:
                raise ValueError(f"a prompt+continuation exceeds the context length {self.context_length}")
            longest = max(len(c) for _, c in chunk)
            if longest == 0:
                results.extend([] for _ in chunk)
                continue
            ids, mask, positions = left_pad(seqs, self.pad_id, self.device)
            # Left padding puts every continuation at the right edge: the last longest+1 positions
            # hold all the logits needed, so the full [rows, length, vocab] tensor is never built.
            logits = self.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=longest + 1
            ).logits.float()
            logp = torch.log_softmax(logits, dim=-1)
            for row, (_, cont) in enumerate(chunk):
                if not cont:
                    results.append([])
                    continue
                first = longest - len(cont)  # the logit that predicts cont[0]
                idx = torch.tensor(cont, device=self.device)
                picked = logp[row, first : first + len(cont)].gather(-1, idx[:, None])[:, 0]
                results.append(picked.cpu().tolist())
        return results

    @torch.inference_mode()
    def topk_next(self, prefixes: list[list[int]], k: int) -> list[list[tuple[int, float]]]:
        results = []
        for start in range(0, len(prefixes), self.max_batch_rows):
            ids, mask, positions = left_pad(prefixes[start : start + self.max_batch_rows], self.pad_id, self.device)
            logits = self.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1
            ).logits[:, -1, :].float()
            values, indices = torch.log_softmax(logits, dim=-1).topk(k, dim=-1)
            results.extend(
                list(zip(i, v, strict=True)) for i, v in zip(indices.tolist(), values.tolist(), strict=True)
            )
        return results
