"""The transformers engine: its own short decode loop over the model's forward pass and KV cache.

Why not `model.generate`: it cannot give each row its own random stream (results would then
depend on how prompts were batched), cannot share one prefill across n samples of a prompt
without recomputing it, and exposes no teacher-forced scoring. The loop below is gpt-fast's
shape: prefill once, expand the cache to n rows per prompt, then decode one token per step.

Sampling is inverse-CDF with one uniform per (row, step) drawn up front from that row's own
generator, so the token a row picks depends only on (seed, prompt id, sample index) and the
model's probabilities, never on its neighbours in the batch.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from qsteer.engines.base import (
    Completion,
    SamplingParams,
    check_prompts,
    encode_prompts,
    eos_ids,
    sample_seed,
)
from qsteer.models import resolve_model_path

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # bf16 halves memory traffic on GPUs; CPUs here have no fast bf16 matmul.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"model.dtype={dtype!r} is not one of: auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def gqa_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                       **_kwargs):
    """SDPA with grouped-query attention done inside the kernel.

    transformers' `sdpa` copies every key/value head group (`repeat_kv`) whenever a mask is
    given, which with left padding is always: on CPU that copy of the whole KV cache in every
    layer at every step costs as much as the attention itself. torch's CPU kernel takes the
    mask and `enable_gqa` together, so nothing needs copying.
    """
    causal = query.shape[2] > 1 and attention_mask is None and (is_causal if is_causal is not None else True)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=causal,
        enable_gqa=key.shape[1] != query.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("qsteer_gqa_sdpa", gqa_sdpa_attention)
AttentionMaskInterface.register("qsteer_gqa_sdpa", sdpa_mask)


def small_batch_head(head: torch.nn.Linear):
    """The LM head's forward for few rows: weight @ hidden.T instead of hidden @ weight.T.

    On CPU, MKL runs `linear` with a handful of rows (one decode step of a few sequences, a
    speculative verify chunk) far below its speed for the transposed product: measured here for
    the 49152 x 576 head, 17 ms against 3 ms at 2 rows and 25 ms against 9 ms at 11. A single
    row goes to a slower matrix-vector kernel, so it is doubled. The product's values depend on
    the row count, while `linear`'s do not from 4 rows up (measured): plain decoding therefore
    uses it only below 4 rows (where `linear` is not batch-invariant either), and the speculative
    loop, which trades that for latency, up to `head.small_rows = 24` (`many_small_rows`).
    """
    weight = head.weight
    head.small_rows = 3

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1])
        rows = flat.shape[0]
        if rows > head.small_rows:
            return torch.nn.functional.linear(hidden, weight)
        if rows == 1:
            flat = flat.expand(2, -1)
        return (weight @ flat.T).T[:rows].reshape(*hidden.shape[:-1], weight.shape[0])

    return forward


@contextlib.contextmanager
def many_small_rows(model, rows: int = 24):
    """Let the small-batch head take up to `rows` rows (speculative verify chunks) for a while."""
    head = model.get_output_embeddings()
    previous = getattr(head, "small_rows", None)
    if previous is not None:
        head.small_rows = rows
    try:
        yield
    finally:
        if previous is not None:
            head.small_rows = previous


class PreallocatedLayer(DynamicLayer):
    """A DynamicLayer whose keys/values are views into a buffer sized for the whole generation.

    DynamicLayer concatenates at every step, copying the whole cache each time: a quarter of
    CPU decode time at 128 rows. Here a step writes one slot in place (gpt-fast's KV cache).
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            shape = (*key_states.shape[:2], self.capacity, key_states.shape[-1])
            self._keys, self._values = key_states.new_empty(shape), value_states.new_empty(shape)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache of {self.capacity} positions cannot take position {end}")
        self._keys[:, :, self.length : end] = key_states
        self._values[:, :, self.length : end] = value_states
        self.length = end
        return self._views()

    def _views(self):
        self.keys, self.values = self._keys[:, :, : self.length], self._values[:, :, : self.length]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, max_length: int) -> None:
        if max_length < self.length:
            self.length = max(max_length, 0)
            self._views()

    def keep_positions(self, index: torch.Tensor) -> None:
        """Per row, keep only the cache positions in `index` [rows, width] (speculative rollback)."""
        if not self.length:
            return
        gather = index[:, None, :, None].expand(-1, self._keys.shape[1], -1, self._keys.shape[-1])
        width = index.shape[1]
        self._keys[:, :, :width] = self._keys[:, :, : self.length].gather(2, gather)
        self._values[:, :, :width] = self._values[:, :, : self.length].gather(2, gather)
        self.length = width
        self._views()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.length:
            self._keys, self._values = self._keys[beam_idx], self._values[beam_idx]
            self._views()

    batch_select_indices = reorder_cache


def new_cache(model, capacity: int) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    # only plain full-attention layers are swapped; sliding-window layers keep their own logic
    cache.layers = [PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def left_pad(seqs: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Left-padded ids, attention mask and position ids (positions count real tokens only)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(seq)
            mask[row, width - len(seq) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def prefill_shared(model, contexts: list[list[int]], slots: list[int], pad_id: int, device: torch.device,
                   extra_capacity: int) -> tuple[DynamicCache, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prefill each context once and copy its cache to every row `slots` maps to it (n samples share
    a prompt's prefill). Returns the cache, each row's last logits, its padding mask and positions."""
    ids, mask, positions = left_pad(contexts, pad_id, device)
    cache = new_cache(model, ids.shape[1] + extra_capacity)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, logits_to_keep=1)
    expand = torch.tensor(slots, device=device)
    cache.reorder_cache(expand)
    return cache, out.logits[:, -1, :].float()[expand], mask[expand], positions[expand]


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p (nucleus) on a [rows, vocab] batch of logits."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token once the mass before it already reaches top_p; the first always stays
        drop = (cumulative - sorted_logits.softmax(-1)) >= params.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits


def sample_tokens(logprobs: torch.Tensor, params: SamplingParams, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row: argmax when greedy, else inverse CDF at that row's own uniform."""
    if params.temperature == 0:
        return logprobs.argmax(-1)
    unfiltered = params.temperature == 1.0 and not params.top_k and params.top_p >= 1.0
    probs = logprobs.exp() if unfiltered else filter_logits(logprobs, params).softmax(-1)
    cdf = probs.cumsum(-1)
    targets = (uniforms.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
    tokens = torch.searchsorted(cdf, targets, right=True).squeeze(-1)
    return tokens.clamp(max=probs.shape[-1] - 1)


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
    ) -> None:
        if num_threads:
            torch.set_num_threads(int(num_threads))
        self.path = resolve_model_path(path)
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, trust_remote_code=trust_remote_code)
        # On CUDA, torch's fused kernels want no mask with GQA, so keep transformers' own choice there.
        attention = "qsteer_gqa_sdpa" if self.device.type == "cpu" else None
        self.model = AutoModelForCausalLM.from_pretrained(
            self.path, dtype=self.dtype, trust_remote_code=trust_remote_code, attn_implementation=attention
        ).to(self.device)
        self.model.eval()
        head = self.model.get_output_embeddings()
        if self.device.type == "cpu" and type(head) is torch.nn.Linear and head.bias is None:
            head.forward = small_batch_head(head)
        self.max_batch_rows = max_batch_rows
        self.use_chat_template = chat_template and bool(self.tokenizer.chat_template)
        self.eos_token_ids = eos_ids(self.tokenizer.eos_token_id, self.model.generation_config.eos_token_id)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.eos_token_ids[0]
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.drafters: dict[tuple, object] = {}  # one per draft config: recycling tables and searches persist
        self.draft_actor = None  # a DraftActor handle, for drafts that are not colocated

    # -- text at the edges -------------------------------------------------------------------
    def encode(self, prompts: list[str | list[dict]], chat: bool = True) -> list[list[int]]:
        return encode_prompts(self.tokenizer, prompts, chat, self.use_chat_template)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    # -- generate ----------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self, prompt_ids: list[list[int]], params: SamplingParams, keys: list[str] | None = None
    ) -> list[list[Completion]]:
        keys = keys if keys is not None else [str(i) for i in range(len(prompt_ids))]
        check_prompts(prompt_ids, keys, self.context_length)
        rows = [(p, j) for p in range(len(prompt_ids)) for j in range(params.n)]
        results: list[list[Completion | None]] = [[None] * params.n for _ in prompt_ids]
        generate_rows, chunk_rows = self._generate_rows, self.max_batch_rows
        if params.speculative:
            generate_rows, chunk_rows = self._speculative(params)
        for start in range(0, len(rows), chunk_rows):
            chunk = rows[start : start + chunk_rows]
            for (p, j), completion in zip(chunk, generate_rows(prompt_ids, keys, chunk, params), strict=True):
                results[p][j] = completion
        return results  # type: ignore[return-value]

    def _speculative(self, params: SamplingParams):
        """The speculative (or EAD) row generator for `params.speculative`, and its rows per chunk."""
        from qsteer.speculative import SpeculativeConfig, build_drafter, decode, ead

        cfg = SpeculativeConfig.from_dict(params.speculative)
        if cfg.key() not in self.drafters:
            self.drafters[cfg.key()] = build_drafter(cfg, self, self.draft_actor)
        drafter = self.drafters[cfg.key()]
        # a verify forward holds [rows, nodes + 1, vocab] logits (and drafts as much in q): cap it near 256 MB
        per_row = (drafter.max_nodes + 1) * self.model.config.vocab_size * (2 if cfg.stochastic else 1)
        chunk_rows = max(1, min(self.max_batch_rows, (1 << 26) // per_row))
        run = ead.generate_rows if cfg.mode == "ead" else decode.generate_rows
        return (lambda prompt_ids, keys, rows, p: run(self, drafter, cfg, prompt_ids, keys, rows, p)), chunk_rows

    def _generate_rows(
        self,
        prompt_ids: list[list[int]],
        keys: list[str],
        rows: list[tuple[int, int]],
        params: SamplingParams,
    ) -> list[Completion]:
        unique = sorted({p for p, _ in rows})
        slot = {p: i for i, p in enumerate(unique)}
        cache, logits, mask, positions = prefill_shared(
            self.model, [prompt_ids[p] for p in unique], [slot[p] for p, _ in rows], self.pad_id, self.device,
            params.max_new_tokens,
        )
        position = positions[:, -1]

        num_rows, steps = len(rows), params.max_new_tokens
        budget = torch.tensor([min(steps, self.context_length - len(prompt_ids[p])) for p, _ in rows])
        uniforms = torch.stack(
            [
                torch.rand(steps, generator=torch.Generator().manual_seed(sample_seed(params.seed, keys[p], j)))
                for p, j in rows
            ]
        ).to(self.device)
        tokens = torch.full((num_rows, steps), self.pad_id, dtype=torch.long)
        logprobs = torch.zeros((num_rows, steps))
        lengths = torch.zeros(num_rows, dtype=torch.long)
        finish = ["length"] * num_rows
        eos = torch.tensor(self.eos_token_ids, device=self.device)
        stop_window = max((len(s) for s in params.stop), default=0) + 2

        live = torch.arange(num_rows)  # which row each batch slot holds
        running = torch.ones(num_rows, dtype=torch.bool)  # per batch slot: still generating
        for step in range(steps):
            raw = torch.log_softmax(logits, dim=-1)
            chosen = sample_tokens(raw, params, uniforms[live.to(self.device), step])
            chosen_logprob = raw.gather(-1, chosen[:, None])[:, 0]
            slots = running.nonzero()[:, 0]
            rows_now = live[slots]
            tokens[rows_now, step] = chosen[slots].cpu()
            logprobs[rows_now, step] = chosen_logprob[slots].cpu()
            lengths[rows_now] += 1
            finished = torch.isin(chosen, eos).cpu() & running
            if params.stop:
                for slot_index, row in zip(slots.tolist(), rows_now.tolist(), strict=True):
                    tail = self.tokenizer.decode(tokens[row, max(0, step + 1 - stop_window) : step + 1])
                    if any(s in tail for s in params.stop):
                        finished[slot_index] = True
            for slot_index in finished.nonzero()[:, 0].tolist():
                finish[int(live[slot_index])] = "stop"
            out_of_budget = lengths[live] >= budget[live]
            running &= ~finished & ~out_of_budget
            if not running.any():
                break
            # Finished rows ride along (their outputs are ignored) until enough of them pile up;
            # then shrink the batch, since every cache copy costs as much as a few decode steps.
            if (~running).sum() * 4 >= len(running):
                keep = running.nonzero()[:, 0]
                cache.batch_select_indices(keep.to(self.device))
                live, running, chosen = live[keep], running[keep], chosen[keep.to(self.device)]
                mask, position = mask[keep.to(self.device)], position[keep.to(self.device)]
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
            position = position + 1
            out = self.model(
                input_ids=chosen[:, None],
                attention_mask=mask,
                position_ids=position[:, None],
                past_key_values=cache,
            )
            logits = out.logits[:, -1, :].float()

        completions = []
        for row in range(num_rows):
            n_tokens = int(lengths[row])
            token_ids = tokens[row, :n_tokens].tolist()
            text = self.decode(token_ids)
            if finish[row] == "stop" and params.stop:
                cut = min((text.find(s) for s in params.stop if s in text), default=-1)
                if cut >= 0:
                    text = text[:cut]
            completions.append(Completion(token_ids, text, logprobs[row, :n_tokens].tolist(), finish[row]))
        return completions

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

